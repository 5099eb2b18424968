"""The command-line convention Barnraise's tools share: every failure is one line on stderr.

argparse normally prints a multi-line usage block; a ``OneLineParser`` raises ``InputError``
instead, which each tool's ``main`` prints as ``PROG: error: MESSAGE`` and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from protocol.errors import BarnraiseError, InputError

__all__ = ["OneLineParser", "run_command"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error raises ``InputError`` (one line, exit 2) like any bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def run_command(prog: str, command: Callable[[], int], *, also: tuple[type[Exception], ...] = ()) -> int:
    """Run a tool's command and map failures to one stderr line and an exit code.

    ``InputError`` (bad input, usage) exits 2; any other ``BarnraiseError`` (and the types in
    ``also``, e.g. ``OSError`` for a port already taken) exits 1; Ctrl+C exits 130, with one line
    too: ``PROG: interrupted``, or ``PROG: `` and the ``KeyboardInterrupt``'s own message.
    """
    try:
        return command()
    except InputError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except (BarnraiseError, *also) as error:
        text = getattr(error, "strerror", None) or str(error)
        print(f"{prog}: error: {text}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"{prog}: {str(interrupt) or 'interrupted'}", file=sys.stderr)
        return 130
