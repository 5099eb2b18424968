"""``barnraise-peer join --only-when-idle [PERCENT]``: train only while the machine is otherwise idle.

The BOINC way: the peer measures how much of the machine's CPU is used by everything but itself
(all CPUs' busy time from ``/proc/stat``, less this process's own user and system time), every
``INTERVAL`` seconds. Above PERCENT it pauses at the next round boundary (as a ``pause`` file
does), and resumes once two readings in a row are below it. Where ``/proc/stat`` cannot be read
(not Linux), it says so once and never pauses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

__all__ = ["IdleWatch", "INTERVAL", "read_proc_stat"]

INTERVAL = 5.0
"""Seconds between two readings (a reason is kept in between)."""


def read_proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of all CPUs since boot, or None where /proc/stat is not there."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:8]]  # user nice system idle iowait irq softirq
    hertz = os.sysconf("SC_CLK_TCK")
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / hertz, sum(ticks) / hertz


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class IdleWatch:
    """Whether others use more than ``percent`` of the machine's CPU (``reason``)."""

    def __init__(self, percent: float, *, clock: Callable[[], float] = time.monotonic,
                 stat: Callable[[], tuple[float, float] | None] = read_proc_stat,
                 own: Callable[[], float] = _own_seconds):
        self.percent, self.clock, self.stat, self.own = percent, clock, stat, own
        self.last = stat()
        self.last_own = own()
        self.read_at = clock()
        self.busy: float | None = None
        """Others' share of the machine's CPU at the latest reading (percent), None before one."""
        self.paused = False
        self.calm = 0
        """Readings in a row below the threshold while paused (two resume)."""
        self.unsupported = self.last is None

    def reason(self) -> str | None:
        if self.unsupported:
            return None
        if self.clock() - self.read_at >= INTERVAL:
            self._read()
        if self.paused:
            return f"the machine is busy (other programs use {self.busy:.0f}% of its CPU, above {self.percent:g}%)"
        return None

    def _read(self) -> None:
        now, own = self.stat(), self.own()
        if now is None or self.last is None:
            self.unsupported = True
            return
        busy, total = now[0] - self.last[0], now[1] - self.last[1]
        mine = own - self.last_own
        self.last, self.last_own, self.read_at = now, own, self.clock()
        if total <= 0:
            return
        self.busy = max(0.0, min(100.0, 100.0 * (busy - mine) / total))
        if self.busy > self.percent:
            self.paused, self.calm = True, 0
        elif self.paused:
            self.calm += 1
            self.paused = self.calm < 2
