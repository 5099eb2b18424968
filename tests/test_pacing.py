"""The token bucket behind --max-upload-mbps / --max-download-mbps, on a fake clock, and one real
paced transfer timed on loopback-free asyncio (no network)."""

from __future__ import annotations

import asyncio
import time

import pytest

from peer.pacing import Pacer, bytes_per_second, round_budget


class _Clock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_mbps_are_megabits():
    assert bytes_per_second(8.0) == 1_000_000 and bytes_per_second(None) is None


def test_a_burst_passes_at_once_then_bytes_flow_at_the_rate():
    clock = _Clock()
    pacer = Pacer(1_000_000.0, clock=clock, sleep=clock.sleep)  # 1 MB/s, burst 256 KiB

    async def send(chunks: int, size: int) -> None:
        for _ in range(chunks):
            await pacer.take(size)

    asyncio.run(send(4, 64 * 1024))  # exactly the burst: no wait
    assert clock.slept == []
    asyncio.run(send(16, 64 * 1024))  # 1 MiB more: about 1.05 s at 1 MB/s
    assert sum(clock.slept) == pytest.approx(16 * 64 * 1024 / 1e6)
    assert pacer.waited == pytest.approx(sum(clock.slept))


def test_an_idle_bucket_refills_only_up_to_its_burst():
    clock = _Clock()
    pacer = Pacer(1_000_000.0, clock=clock, sleep=clock.sleep)
    asyncio.run(pacer.take(256 * 1024))
    clock.now += 3600.0  # an hour idle does not bank an hour of bytes
    asyncio.run(pacer.take(256 * 1024 + 500_000))
    assert sum(clock.slept) == pytest.approx(0.5)


def test_no_cap_never_waits_and_a_bad_rate_is_refused():
    pacer = Pacer(None)
    asyncio.run(pacer.take(10**12))
    assert pacer.waited == 0
    with pytest.raises(ValueError):
        Pacer(0.0)


def test_a_real_paced_stream_takes_as_long_as_its_rate_says():
    pacer = Pacer(2_000_000.0)  # 2 MB/s; a burst of a quarter second

    async def stream() -> float:
        started = time.monotonic()
        for _ in range(24):
            await pacer.take(64 * 1024)  # 1.5 MiB
        return time.monotonic() - started

    elapsed = asyncio.run(stream())
    expected = (24 * 64 * 1024 - pacer.burst) / 2e6  # what exceeds the burst, at the rate
    assert expected * 0.9 <= elapsed <= expected + 0.5, elapsed


def test_a_cap_too_low_for_the_round_is_named_with_what_would_fit():
    assert round_budget(upload=None, download=None, payload_bytes=10**6, members=8, seconds=10) is None
    assert round_budget(upload=bytes_per_second(100), download=bytes_per_second(100), payload_bytes=10**6,
                        members=8, seconds=10) is None
    why = round_budget(upload=None, download=bytes_per_second(1), payload_bytes=10**6, members=8, seconds=10)
    assert why.startswith("--max-download-mbps 1 leaves 56.0 s for a round's 7.00 MB") and "at least 5.60 Mbit/s" in why
