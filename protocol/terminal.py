"""What the command-line tools print: ``rich`` on a terminal, plain lines everywhere else.

Progress lines and tables go through ``rich`` when standard output is a terminal and ``rich`` is
installed (it comes with the ``[swarm]`` extra): lines that say something went wrong (``OUT OF
STEP``, ``ROUND VOID``, ``FAILED``, ...) stand out, tables get borders. Piped or redirected,
output stays one plain line per event, so logs stay greppable and nothing in them is an escape
code. ``NO_COLOR`` (any value) also keeps it plain.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Terminal"]

_ALARM = re.compile(r"OUT OF STEP|ROUND VOID|NOT IN THE ROUND|FAILED|UNANSWERED|error|refused", re.IGNORECASE)
_GOOD = re.compile(r"passed|checkpoint \d+:|reachable directly")


class Terminal:
    """Prints to ``stream`` (default: standard output), through ``rich`` only on a terminal."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.console = None
        if self.stream.isatty() and "NO_COLOR" not in os.environ:
            try:
                from rich.console import Console
            except ImportError:  # the core install: plain lines
                pass
            else:
                self.console = Console(file=self.stream, highlight=False, soft_wrap=True)

    @property
    def rich(self) -> bool:
        return self.console is not None

    def line(self, text: str) -> None:
        if self.console is None:
            print(text, file=self.stream, flush=True)
            return
        style = "bold red" if _ALARM.search(text) else "green" if _GOOD.search(text) else None
        self.console.print(text, style=style, markup=False)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]], *, title: str | None = None,
              right: Sequence[int] = ()) -> None:
        """A table: rich's on a terminal, else aligned plain columns (``right``: right-aligned column indexes)."""
        cells = [[str(c) for c in row] for row in rows]
        if self.console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left")
            for index, header in enumerate(headers):
                table.add_column(header, justify="right" if index in right else "left")
            for row in cells:
                table.add_row(*row)
            self.console.print(table)
            return
        if title:
            print(title, file=self.stream)
        widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
        for row in [list(headers), *cells]:
            print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                  .rstrip(), file=self.stream)
        self.stream.flush()
