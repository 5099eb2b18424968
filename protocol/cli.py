"""The one command-line convention all Barnraise tools share: a usage error is one line.

argparse normally prints a multi-line usage block; a ``OneLineParser`` raises ``InputError``
instead, which each tool's ``main`` prints as ``PROG: error: MESSAGE`` and exits 2.
"""

from __future__ import annotations

import argparse

from protocol.errors import InputError

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error raises ``InputError`` (one line, exit 2) like any bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)
