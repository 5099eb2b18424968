"""Plain lines when output is not a terminal (logs stay greppable); rich on a terminal."""

from __future__ import annotations

import io
import os
import pty

from protocol.terminal import Terminal


def test_piped_output_is_plain_lines_and_aligned_tables():
    out = io.StringIO()
    terminal = Terminal(out)
    assert not terminal.rich
    terminal.line("round    3 | OUT OF STEP: something")
    terminal.table(["#", "key", "samples"], [[1, "ab" * 8, "1,104"], [2, "cd" * 8, "96"]], right=(0, 2))
    assert out.getvalue().splitlines() == [
        "round    3 | OUT OF STEP: something",
        "#  key               samples",
        f"1  {'ab' * 8}    1,104",
        f"2  {'cd' * 8}       96",
    ]
    assert "\x1b" not in out.getvalue()


def test_a_terminal_gets_rich_with_styles_unless_no_color(monkeypatch):
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as stream:
        monkeypatch.delenv("NO_COLOR", raising=False)
        terminal = Terminal(stream)
        assert terminal.rich
        terminal.line("spot check of round 7, peer ab: FAILED")
        stream.flush()
        written = os.read(leader, 4096)
        assert b"\x1b[" in written and b"FAILED" in written  # styled
        monkeypatch.setenv("NO_COLOR", "1")
        assert not Terminal(stream).rich
    os.close(leader)
