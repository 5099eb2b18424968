"""The fuzzer (scripts/fuzz.py): its quick slice finds nothing, and it does find what it looks for.

The quick slice (2,000 inputs per decoder) runs as a child process, as a user runs it: the
fuzzer caps its own address space and owns SIGALRM, neither of which belongs in pytest's
process. The engine's own checks run in-process on decoders made to fail.

    pytest -q tests/test_fuzz.py
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.fuzz import Broken, Target, fuzz_target, make_input, peak_rss_mib
from bench.fuzz_inputs import msgpack_mutator
from bench.fuzz_targets import TARGET_NAMES, builders
from protocol.errors import MalformedRecord

ROOT = Path(__file__).resolve().parent.parent
NEVER_RAISES = {"residual_file"}
"""Decoders that answer every input (a residual that does not load is replaced by zeros)."""
KNOWN: dict = {}
"""Findings not fixed yet (strict xfail marks, so a fix makes the test say so); none today."""


@pytest.fixture(scope="module")
def quick_run() -> tuple[dict, str]:
    completed = subprocess.run([sys.executable, "scripts/fuzz.py", "--quick"], cwd=ROOT, capture_output=True,
                               text=True, timeout=240)
    lines = completed.stdout.strip().splitlines()
    assert lines and lines[-1].startswith('{"fuzz"'), completed.stdout[-2000:] + completed.stderr[-2000:]
    return json.loads(lines[-1])["fuzz"], completed.stderr


@pytest.mark.parametrize("name", [pytest.param(n, marks=KNOWN.get(n, ())) for n in TARGET_NAMES])
def test_the_quick_slice_finds_nothing(quick_run, name):
    summary, stderr = quick_run
    report = summary["decoders"][name]
    found = [line for line in stderr.splitlines() if line.startswith(f"FINDING {name} ")]
    assert report["findings"] == 0, "\n".join(found)
    assert report["inputs"] == 2000
    assert report["accepted"] > 0, "no input decoded: the seeds are broken"
    if name not in NEVER_RAISES:
        assert report["error_types"], "no input was refused: the mutations do not reach the decoder"


def test_the_quick_slice_is_the_same_inputs_in_every_process(quick_run):
    summary, _ = quick_run
    for build in builders(["payload:fp16", "residual_file", "ledger_jsonl"]):
        target = build()
        digest = hashlib.sha256()
        try:
            for index in range(2000):
                raw = make_input(target, 0, index)
                digest.update(len(raw).to_bytes(8, "little") + raw)
        finally:
            target.close()
        assert digest.hexdigest()[:16] == summary["decoders"][target.name]["inputs_sha256"], target.name


def test_the_quick_slice_stays_within_its_memory_limit(quick_run):
    summary, _ = quick_run
    assert 0 < summary["peak_rss_mib"] < summary["memory_limit_mib"]


def _target(decode) -> Target:
    seeds = [b"\x81\xa1a\x01", b"\x82\xa1a\x02\xa1b\xc3"]
    return Target("test", decode, seeds, msgpack_mutator(("a", "b")))


def _decode_strictly(raw: bytes) -> None:
    if not raw.startswith(b"\x81"):
        raise MalformedRecord("not a one-field map")


def test_inputs_are_reproducible_one_by_one():
    target = _target(_decode_strictly)
    assert [make_input(target, 3, i) for i in range(50)] == [make_input(target, 3, i) for i in range(50)]
    assert make_input(target, 3, 7) != make_input(target, 4, 7) or make_input(target, 3, 8) != make_input(target, 4, 8)


def test_typed_errors_are_counted_and_anything_else_is_a_finding():
    def decode(raw: bytes) -> None:
        _decode_strictly(raw)
        if len(raw) > 6:
            raise KeyError("untyped")
        if raw == b"\x81\xa1a\x01":
            raise Broken("accepted, but wrong")

    report = fuzz_target(_target(decode), count=300, seed=0, hang_seconds=5.0, memory_limit_mib=1e9)
    assert report.inputs == 300 and report.errors["MalformedRecord"] > 0
    kinds = {finding.error.split(":")[0] for finding in report.findings}
    assert kinds == {"builtins.KeyError", "bench.fuzz.Broken"}
    assert all(f.kind == "exception" and f.where.startswith("tests/test_fuzz.py:") for f in report.findings)


def test_a_hang_and_a_memory_jump_are_findings():
    def slow(raw: bytes) -> None:
        time.sleep(10)

    started = time.monotonic()
    report = fuzz_target(_target(slow), count=2, seed=0, hang_seconds=0.2, memory_limit_mib=1e9)
    assert time.monotonic() - started < 5
    assert [f.kind for f in report.findings] == ["hang"]  # the second is the same finding

    def greedy(raw: bytes) -> None:
        b"x" * (256 << 20)  # written, so resident: the peak rises by 256 MiB

    limit = peak_rss_mib() + 128
    report = fuzz_target(_target(greedy), count=1, seed=0, hang_seconds=5.0, memory_limit_mib=limit)
    assert [f.kind for f in report.findings] == ["memory"]
