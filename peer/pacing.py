"""Pacing a volunteer's traffic: ``--max-upload-mbps`` and ``--max-download-mbps``.

A token bucket per direction, in the averager process that serves and fetches payloads and the
run's files: every chunk sent or received takes its bytes from the bucket first, and waits when
the bucket is empty. Traffic is spread over the round instead of cut: nothing is dropped, and a
stream that waits still finishes within its own deadline when the cap leaves enough time for the
round's bytes (``round_budget`` says whether it does, so the peer warns at start).
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["Pacer", "bytes_per_second", "round_budget"]

_BURST_SECONDS = 0.25
"""A bucket holds this many seconds of its rate (at least one chunk): short bursts pass at once."""
_MIN_BURST = 256 * 1024


def bytes_per_second(mbps: float | None) -> float | None:
    """Megabits per second (the unit ISPs sell) to bytes per second; None: no cap."""
    return None if mbps is None else mbps * 1e6 / 8


class Pacer:
    """An asyncio token bucket of ``rate`` bytes per second (None: unpaced). Used from one event
    loop only (the averager process's); concurrent streams share the rate."""

    def __init__(self, rate: float | None, clock=time.monotonic, sleep=asyncio.sleep):
        if rate is not None and not rate > 0:
            raise ValueError("a pacing rate must be positive")
        self.rate = rate
        self.burst = None if rate is None else max(_MIN_BURST, rate * _BURST_SECONDS)
        self._clock, self._sleep = clock, sleep
        self._tokens = self.burst or 0.0
        self._at = clock()
        self.waited = 0.0
        """Seconds streams have waited on this bucket, in all."""

    async def take(self, count: int) -> None:
        """Wait until ``count`` bytes may pass. A chunk larger than the burst passes once the bucket
        is full and leaves it in debt, so the next chunks wait for the difference."""
        if self.rate is None or count <= 0:
            return
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= count
        if self._tokens < 0:
            wait = -self._tokens / self.rate
            self.waited += wait
            await self._sleep(wait)


def round_budget(*, upload: float | None, download: float | None, payload_bytes: int, members: int,
                 seconds: float) -> str | None:
    """Why a cap is too low for a round, or None. In a round of ``members`` payloads of about
    ``payload_bytes`` each, a peer fetches the others' (download) and serves its own to each of
    them at most once (upload), within about ``seconds``."""
    others = max(0, members - 1)
    for name, rate, volume in (("--max-download-mbps", download, payload_bytes * others),
                               ("--max-upload-mbps", upload, payload_bytes * others)):
        if rate is not None and volume / rate > seconds:
            need = volume / seconds * 8 / 1e6
            return (f"{name} {rate * 8 / 1e6:g} leaves {volume / rate:.1f} s for a round's {volume / 1e6:.2f} MB "
                    f"of payloads, more than the round's {seconds:.1f} s: this peer will often be out of step "
                    f"(at least {need:.2f} Mbit/s fits)")
    return None
