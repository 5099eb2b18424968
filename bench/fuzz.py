"""A fuzzer for every decoder of untrusted bytes: only ``BarnraiseError`` may come out.

    python scripts/fuzz.py                  # 100,000 inputs per decoder (about 17 minutes on 2 busy cores)
    python scripts/fuzz.py --quick          # 2,000 per decoder, the slice tests/test_fuzz.py runs
    python scripts/fuzz.py --only payload:fp16 --count 5000 --seed 7

Each decoder (a ``Target``, listed in ``bench.fuzz_targets``) gets inputs made from valid
records built with the real encoders and signing code: seeds passed through unchanged, random
bytes, byte-level mutations, and mutations that know the format (``bench.fuzz_inputs``). An
input is a *finding* when decoding it raises anything that is not a ``BarnraiseError`` (a
decoder's own postcondition check counts: ``Broken``), runs past ``hang_seconds``, or lifts
the process's peak RSS past ``memory_limit_mib``. Input ``i`` of a target is drawn from
``random.Random(f"{seed}/{target}/{i}")``, so one input is reproduced alone with
``--only TARGET --input I``.

The peak RSS is ``getrusage(RUSAGE_SELF).ru_maxrss``, read after every input; the CLI also caps
the address space (``cap_address_space``) so that an input asking for gigabytes fails in the
allocator, as a finding, instead of taking the machine down.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import fuzz_inputs
from protocol.errors import BarnraiseError

__all__ = ["Target", "Broken", "Finding", "TargetReport", "fuzz_target", "fuzz_all", "make_input", "peak_rss_mib",
           "cap_address_space", "Watchdog"]

HEX_SHOWN = 256
"""Bytes of a finding's input printed as hex."""


class Broken(AssertionError):
    """A decoder accepted an input but what it returned breaks its documented promise."""


class _Hang(BaseException):
    """Raised by SIGALRM in the decoder under test (a BaseException: no ``except Exception`` eats it)."""


@dataclass(frozen=True)
class Target:
    """One decoder of untrusted bytes, with valid inputs to mutate."""

    name: str
    decode: Callable[[bytes], object]
    """Decodes one input; raises a ``BarnraiseError`` for anything malformed (or ``Broken``)."""
    seeds: Sequence[bytes]
    """Valid inputs made with the real encoders (each must decode without error)."""
    mutate: Callable[[random.Random, bytes, Sequence[bytes]], bytes]
    """The structure-aware mutation of one seed (``bench.fuzz_inputs``)."""
    max_bytes: int = 1 << 20
    """Longest input generated (the decoder's own limit may be lower: then longer inputs test it)."""
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Finding:
    target: str
    index: int
    kind: str
    """``exception``, ``hang`` or ``memory``."""
    error: str
    where: str
    """The innermost project frame (file:line) of the exception, when there is one."""
    raw: bytes

    def describe(self, seed: int) -> str:
        shown = self.raw[:HEX_SHOWN].hex() + ("..." if len(self.raw) > HEX_SHOWN else "")
        return (f"FINDING {self.target} input {self.index} ({self.kind}): {self.error} at {self.where}\n"
                f"  input ({len(self.raw)} bytes): {shown}\n"
                f"  reproduce: python scripts/fuzz.py --only {self.target} --seed {seed} --input {self.index}")


@dataclass
class TargetReport:
    name: str
    inputs: int = 0
    accepted: int = 0
    errors: Counter = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    digest: Any = field(default_factory=hashlib.sha256)
    """Of every input in order: the same on every run of the same seed and count."""

    def summary(self) -> dict:
        return {"inputs": self.inputs, "accepted": self.accepted, "error_types": dict(sorted(self.errors.items())),
                "findings": len(self.findings), "seconds": round(self.seconds, 2),
                "peak_rss_mib": round(self.peak_rss_mib, 1), "inputs_sha256": self.digest.hexdigest()[:16]}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cap_address_space(extra_mib: int) -> int:
    """Limit this process's address space to what it maps now plus ``extra_mib``; returns the cap (MiB)."""
    with open("/proc/self/statm") as statm:
        mapped = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = mapped + extra_mib * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap >> 20


def make_input(target: Target, seed: int, index: int) -> bytes:
    """Input ``index`` of ``target``: a function of (seed, target, index) alone."""
    rng = random.Random(f"{seed}/{target.name}/{index}")
    return fuzz_inputs.generate(rng, target.seeds, target.mutate, target.max_bytes)


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if "/site-packages/" not in f.filename and "/lib/python" not in f.filename]
    frame = (ours or frames or [None])[-1]
    if frame is None:
        return "?"
    parts = frame.filename.replace(os.sep, "/").split("/")
    return f"{'/'.join(parts[-2:])}:{frame.lineno}"


class Watchdog:
    """Ends the process if one input runs far past its deadline inside C code, where SIGALRM cannot
    interrupt it (the alarm is only seen between bytecodes). Prints the stuck input first."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.current: tuple[str, int, bytes, float] | None = None
        self.seed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            current = self.current
            if current is not None and time.monotonic() - current[3] > self.seconds:
                name, index, raw, _ = current
                finding = Finding(name, index, "hang", f"no return after {self.seconds:.0f} s (stuck in C code)", "?", raw)
                print(finding.describe(self.seed), flush=True)
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _on_alarm(_signum, _frame) -> None:
    raise _Hang()


def fuzz_target(target: Target, *, count: int, seed: int, hang_seconds: float, memory_limit_mib: float,
                watchdog: Watchdog | None = None, indices: Sequence[int] | None = None,
                max_findings: int = 20) -> TargetReport:
    """Run ``count`` inputs (or just ``indices``) through ``target.decode``; collect what is not typed."""
    report = TargetReport(target.name)
    seen: set[tuple[str, str]] = set()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    started = time.monotonic()
    try:
        for index in indices if indices is not None else range(count):
            raw = make_input(target, seed, index)
            report.digest.update(len(raw).to_bytes(8, "little") + raw)
            before = peak_rss_mib()
            if watchdog is not None:
                watchdog.current = (target.name, index, raw, time.monotonic())
            finding = None
            signal.setitimer(signal.ITIMER_REAL, hang_seconds)
            try:
                target.decode(raw)
                report.accepted += 1
            except BarnraiseError as error:
                report.errors[type(error).__name__] += 1
            except _Hang:
                finding = Finding(target.name, index, "hang", f"still running after {hang_seconds} s", "?", raw)
            except MemoryError as error:
                finding = Finding(target.name, index, "memory", f"MemoryError: {error}", _where(error), raw)
            except Exception as error:  # anything untyped is what we are looking for
                message = str(error).splitlines()[0][:200] if str(error) else ""
                finding = Finding(target.name, index, "exception", f"{type(error).__module__}.{type(error).__qualname__}:"
                                  f" {message}", _where(error), raw)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if watchdog is not None:
                    watchdog.current = None
            after = peak_rss_mib()
            if finding is None and before <= memory_limit_mib < after:
                finding = Finding(target.name, index, "memory", f"peak RSS rose to {after:.0f} MiB", "?", raw)
            report.inputs += 1
            if finding is not None:
                key = (finding.kind, finding.error.split(":")[0] + "@" + finding.where)
                if key not in seen and len(report.findings) < max_findings:
                    seen.add(key)
                    report.findings.append(finding)
                    print(finding.describe(seed), file=sys.stderr, flush=True)
    finally:
        signal.signal(signal.SIGALRM, previous)
        report.seconds = time.monotonic() - started
        report.peak_rss_mib = peak_rss_mib()
    return report


def fuzz_all(builders: Sequence[Callable[[], Target]], *, count: int, seed: int, hang_seconds: float,
             memory_limit_mib: float, indices: Sequence[int] | None = None,
             say: Callable[[str], None] = print) -> dict:
    """Build, fuzz and close each target in turn (one line each); the summary of the whole run."""
    watchdog = Watchdog(max(30.0, 3 * hang_seconds))
    watchdog.seed = seed
    reports = []
    try:
        for build in builders:
            target = build()
            try:
                report = fuzz_target(target, count=count, seed=seed, hang_seconds=hang_seconds,
                                     memory_limit_mib=memory_limit_mib, watchdog=watchdog, indices=indices)
            finally:
                target.close()
            reports.append(report)
            errors = ", ".join(f"{name} {n}" for name, n in sorted(report.errors.items())) or "none"
            say(f"{report.name:28} {report.inputs:7d} inputs {report.seconds:7.1f} s  peak RSS {report.peak_rss_mib:6.0f} MiB"
                f"  accepted {report.accepted:6d}  {len(report.errors)} error types ({errors})"
                f"  findings {len(report.findings)}")
    finally:
        watchdog.stop()
    peak = peak_rss_mib()
    return {"seed": seed, "count": count if indices is None else len(indices), "memory_limit_mib": memory_limit_mib, "peak_rss_mib": round(peak, 1),
            "findings": sum(len(r.findings) for r in reports) + int(peak > memory_limit_mib),
            "decoders": {r.name: r.summary() for r in reports}}
