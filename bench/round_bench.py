"""Benchmark 3: one averaging round of an N-float tensor among 4 peers on loopback.

    PYTHONPATH=. python scripts/bench_round.py --quick      # N = 5M, 1 measured round
    PYTHONPATH=. python scripts/bench_round.py              # N = 100M, 3 measured rounds
    PYTHONPATH=. python scripts/bench_round.py --codec bmax-c4096-b64-s2 topk-c4096-k64-q2 \
        --aggregation senders --contenders barnraise memcpy

Every peer is its own process (``python -m bench.round_bench --rank r``, started and reaped by
``bench.ranks.run_ranks``) holding its own random float32 vector of N elements; the contenders
run one after another, never at the same time:

    barnraise   what a peer does per round: ``compress_with_feedback`` -> the payload into its
                store (``SwarmNode.hold_payload``) and its record into the round's DHT key ->
                one read of that key -> the others' payloads fetched by sha256
                (``SwarmNode.fetch_payloads``) -> ``protocol.averaging.combine``
                (``--aggregation``: mean or senders); timed from "start compress" to "update in
                hand", split into encode / exchange / decode+combine; one row per codec. The
                round's settle wait (``averaging.settle_seconds``) is not in it: a barrier after
                every peer has announced stands for it
    hivemind    hivemind's bare ``DecentralizedAverager`` (butterfly all-reduce), one ``step()``
                per round, without compression and with ``Float16Compression``
    memcpy      the bound if the network were as fast as memory: one in-memory copy (one thread)
                of the bytes a peer moves per round, in plus out: 6 x payload for the all-gather
                (3 payloads in, 3 out), 2 x 2(n-1)/n x (bytes per element x N) for the all-reduce

Each contender runs ``warmup`` rounds, then ``rounds`` measured ones. A round's time is its
slowest peer's (the round is over when every peer holds its update), and the reported time is
the median round; for Barnraise the split is that round's slowest peer's. Waiting at the
barriers that line peers up (before a round, and before the exchange so that no peer's
exchange includes a slower groupmate's encoding) is not counted.

    effective GB/s = 4 x N bytes (the fp32 vector) / seconds per round

Bytes per peer per round are the loopback transmit counter (``bench.counters``), read by rank 0
around the measured rounds, divided by rounds and peers. It counts everything on the machine's
``lo``, other processes included; run in a private network namespace to count only this run.
All peers share this machine's cores, so the CPU phases are slower than on one machine each.

Checks (a failed one marks the contender FAILED): every round forms a group of all 4 peers with
no payload missing; Barnraise's 4 updates are bit-identical (sha256) and, at sampled indices
(1,024 at random and a run of 1,024 consecutive ones, where a sparse codec keeps entries),
exactly the canonical combine of the 4 decoded payloads under the aggregation rule (for
``senders``, over the peers whose payload kept the index); hivemind's updates equal the mean
of the 4 inputs at sampled indices within the codec's tolerance.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from bench.counters import InterfaceBytes
from bench.ranks import arm_watchdog, file_barrier, rendezvous_dir, run_ranks, write_result
from protocol.averaging import Aggregation
from protocol.codecs import compress_with_feedback, decode, parse_codec, parse_payload, payload_size
from protocol.errors import BarnraiseError, ConfigError, DeadlineExceeded, VerificationError

__all__ = [

    "FULL_NUMEL",
    "QUICK_NUMEL",
    "RoundSpec",
    "ContenderReport",
    "HIVEMIND_VARIANTS",
    "run_barnraise",
    "run_hivemind",
    "run_memcpy",
    "memcpy_seconds",
    "run_round_bench",
    "main",
]

_RUN_ID = "0" * 16
"""The run id the round bench's signed announcements carry (no manifest: only the round is timed)."""
_BASE_ROOT = "0" * 64
"""Every rank averages against the same (notional) consensus: the bench has no model state."""

FULL_NUMEL = 100_000_000
QUICK_NUMEL = 5_000_000
HIVEMIND_VARIANTS: dict[str, tuple[str, int]] = {"hivemind-none": ("none", 4), "hivemind-fp16": ("fp16", 2)}
"""Sub-variant name -> (hivemind compression, bytes per element on the wire)."""

_MADDRS_FILE = "dht_maddrs.json"
_PREFIX = "round-bench"
_HIVEMIND_TOLERANCE = {"none": 1e-5, "fp16": 2e-2}
"""Absolute error allowed between hivemind's update and the exact mean (inputs are N(0, 1))."""
_SLOW_LOOPBACK = 10e6
"""Bytes per second a deadline assumes the network moves at least (far below real loopback)."""
_SLOW_CPU = 1.5e-6
"""Seconds per element a deadline allows for one round's local work on a shared core."""
_COPY_CHUNK = 256 << 20
"""Bytes copied at once by ``memcpy_seconds``: far beyond the caches, bounded memory."""

Node = TypeVar("Node")


@dataclass(frozen=True, kw_only=True)
class RoundSpec:
    """What every contender measures: the vector, the group, the rounds."""

    numel: int = FULL_NUMEL
    """N: float32 elements of each peer's vector."""
    peers: int = 4
    """Processes, all in one group."""
    warmup: int = 1
    """Rounds run first and left out of the timing (connections, allocations)."""
    rounds: int = 3
    """Measured rounds; the median is reported."""
    matchmaking_seconds: float = 2.0
    """How long a peer looks for groupmates (a full group starts at once)."""
    seed: int = 0
    """Seeds every rank's vectors and the sampled indices."""
    samples: int = 1024
    """Indices at which the parent checks the updates against the mean: this many at random,
    and a run of this many consecutive ones (so a sparse codec's kept entries are in it)."""
    aggregation: Aggregation = "mean"
    """Barnraise's combine rule (``protocol.averaging.combine``): ``mean`` or ``senders``."""
    host_ip: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.numel < 1 or self.peers < 2 or self.warmup < 0 or self.rounds < 1 or self.samples < 1:
            raise ConfigError(f"round bench: need numel >= 1, peers >= 2, warmup >= 0, rounds >= 1: {self}")
        if self.matchmaking_seconds <= 0:
            raise ConfigError("round bench: matchmaking_seconds must be positive")
        if self.aggregation not in ("mean", "senders"):
            raise ConfigError(f"round bench: aggregation {self.aggregation!r} is not 'mean' or 'senders'")

    def network_deadline(self, bytes_per_peer: float) -> float:
        """Seconds one round's exchange may take when a peer moves ``bytes_per_peer``."""
        return 30.0 + self.matchmaking_seconds + bytes_per_peer / _SLOW_LOOPBACK

    def rank_timeout(self, bytes_per_peer: float, variants: int = 1) -> float:
        """Seconds a rank may run in all: start-up, then every round of every variant."""
        per_round = self.network_deadline(bytes_per_peer) + 30.0 + _SLOW_CPU * self.numel
        return 90.0 + variants * (self.warmup + self.rounds) * per_round

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, mapping: dict[str, Any]) -> RoundSpec:
        return cls(**mapping)


@dataclass(frozen=True, kw_only=True)
class ContenderReport:
    """One contender's result."""

    name: str
    kind: Literal["barnraise", "hivemind", "memcpy"]
    numel: int
    seconds: float
    """Median seconds per round (memcpy: per copy)."""
    round_seconds: tuple[float, ...]
    """Every measured round (memcpy: every copy)."""
    bytes_per_peer_round: float | None
    """Loopback transmit bytes per peer per measured round (None for memcpy)."""
    expected_bytes_per_peer_round: float
    """What a peer must send per round (memcpy: the bytes it copies)."""
    split: dict[str, float] | None = None
    """Barnraise: encode / exchange / decode+combine seconds of the median round's slowest peer."""
    check: str = "ok"
    """``ok`` (details may follow a colon) or ``FAILED: why``."""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def effective_gbps(self) -> float:
        """4 x N bytes (the fp32 vector) per second of one round, in GB/s."""
        return 4 * self.numel / self.seconds / 1e9 if self.seconds != 0 else math.inf

    @property
    def passed(self) -> bool:
        return not self.check.startswith("FAILED")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready map (a failed contender's NaNs become None)."""
        fields = {**asdict(self), "effective_gbps": self.effective_gbps}
        return {key: None if isinstance(v, float) and not math.isfinite(v) else v for key, v in fields.items()}

    @classmethod
    def failed(cls, name: str, kind: Literal["barnraise", "hivemind"], spec: RoundSpec, why: str) -> ContenderReport:
        """The report of a contender whose run did not complete."""
        return cls(name=name, kind=kind, numel=spec.numel, seconds=math.nan, round_seconds=(),
                   bytes_per_peer_round=None, expected_bytes_per_peer_round=math.nan, check=f"FAILED: {why}")  # fmt: skip


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------


def _rank_env() -> dict[str, str]:
    return {"HIVEMIND_LOGLEVEL": os.environ.get("HIVEMIND_LOGLEVEL", "ERROR")}


def _run(spec: RoundSpec, workdir: Path, contender: str, extra: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Start ``spec.peers`` ranks of ``contender``; return their results (every rank reaped)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "spec.json").write_text(json.dumps(spec.to_dict()))

    def rank_args(rank: int) -> list[str]:
        return ["--rank", str(rank), "--workdir", str(workdir), "--contender", contender,
                "--timeout", f"{timeout_s:.1f}", *extra]  # fmt: skip

    results, leftovers = run_ranks("bench.round_bench", rank_args, peers=spec.peers, workdir=workdir,
                                   timeout_s=timeout_s + 30.0, env=_rank_env())  # fmt: skip
    if leftovers:
        print(f"[bench] {contender}: {leftovers} rank process groups had to be killed", file=sys.stderr)
    return results


def run_barnraise(spec: RoundSpec, codec: str, workdir: Path, timeout_s: float | None = None) -> ContenderReport:
    """Barnraise's round with ``codec`` (4 processes); see the module docstring."""
    size = payload_size(parse_codec(codec), spec.numel)
    sent = (spec.peers - 1) * size
    began = time.monotonic()
    results = _run(spec, workdir, "barnraise", ["--codec", codec], timeout_s or spec.rank_timeout(sent))
    wall = time.monotonic() - began
    measured = [r["rounds"][spec.warmup :] for r in results]
    seconds, median_round, slowest = _median_round(measured)
    record = measured[slowest][median_round]
    return ContenderReport(
        name=_barnraise_name(spec, codec),
        kind="barnraise",
        numel=spec.numel,
        seconds=seconds,
        round_seconds=_round_times(measured),
        bytes_per_peer_round=_loopback(results[0], spec),
        expected_bytes_per_peer_round=float(sent),
        split={key: record[key] for key in ("encode", "exchange", "decode_combine")},
        check=_check_barnraise(results, spec),
        detail={"payload_bytes": size, "wall_seconds": wall,
                "aggregation": spec.aggregation, "touched": record["touched"]},
    )


def _barnraise_name(spec: RoundSpec, codec: str) -> str:
    return f"barnraise {codec}" + (f" {spec.aggregation}" if spec.aggregation != "mean" else "")


def run_hivemind(spec: RoundSpec, workdir: Path, timeout_s: float | None = None) -> list[ContenderReport]:
    """hivemind's ``DecentralizedAverager``, each of ``HIVEMIND_VARIANTS`` in turn in the same 4 processes."""
    sent = {name: _allreduce_bytes(spec, width) for name, (_, width) in HIVEMIND_VARIANTS.items()}
    timeout = timeout_s or spec.rank_timeout(max(sent.values()), variants=len(HIVEMIND_VARIANTS))
    began = time.monotonic()
    results = _run(spec, workdir, "hivemind", [], timeout)
    wall = time.monotonic() - began  # both variants
    reports = []
    for name, (compression, _) in HIVEMIND_VARIANTS.items():
        measured = [r["variants"][name]["rounds"][spec.warmup :] for r in results]
        seconds, _, _ = _median_round(measured)
        reports.append(ContenderReport(
            name=name,
            kind="hivemind",
            numel=spec.numel,
            seconds=seconds,
            round_seconds=_round_times(measured),
            bytes_per_peer_round=_loopback(results[0]["variants"][name], spec),
            expected_bytes_per_peer_round=sent[name],
            check=_check_hivemind([r["variants"][name] for r in results], compression),
            detail={"compression": compression, "wall_seconds_both_variants": wall},
        ))  # fmt: skip
    return reports


def memcpy_seconds(nbytes: int, repeats: int = 5) -> float:
    """Median seconds of one thread copying ``nbytes`` in memory (in chunks of at most 256 MiB)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one peer's copy, like a rank (OMP_NUM_THREADS=1)
    try:
        src = torch.ones(max(1, min(nbytes, _COPY_CHUNK)), dtype=torch.uint8)  # touch every page
        dst = torch.zeros_like(src)
        times = []
        for _ in range(repeats + 1):  # the first copy is a warm-up
            began = time.perf_counter()
            for start in range(0, nbytes, len(src)):
                count = min(len(src), nbytes - start)
                dst[:count].copy_(src[:count])
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])
    finally:
        torch.set_num_threads(threads)


def run_memcpy(spec: RoundSpec, codecs: Sequence[str]) -> list[ContenderReport]:
    """The memcpy bound for each codec's all-gather and each hivemind variant's all-reduce."""
    moved = {f"memcpy all-gather {c}": 2 * (spec.peers - 1) * payload_size(c, spec.numel) for c in codecs}
    for compression, width in HIVEMIND_VARIANTS.values():
        moved[f"memcpy all-reduce {compression}"] = round(2 * _allreduce_bytes(spec, width))
    reports = []
    for name, nbytes in moved.items():
        seconds = memcpy_seconds(nbytes)
        reports.append(ContenderReport(
            name=name, kind="memcpy", numel=spec.numel, seconds=seconds, round_seconds=(seconds,),
            bytes_per_peer_round=None, expected_bytes_per_peer_round=float(nbytes),
            detail={"copied_bytes": nbytes, "copy_gbps": nbytes / seconds / 1e9},
        ))  # fmt: skip
    return reports


def run_round_bench(
    spec: RoundSpec,
    codecs: Sequence[str],
    workdir: Path,
    contenders: Sequence[str] = ("barnraise", "hivemind", "memcpy"),
) -> list[ContenderReport]:
    """Run the chosen contenders one after another (each reaps its processes before the next);
    one that fails is reported as FAILED, with its rank logs left in its folder of ``workdir``."""
    reports: list[ContenderReport] = []
    if "barnraise" in contenders:
        for codec in codecs:
            folder = workdir / f"barnraise-{codec}"
            try:
                reports.append(run_barnraise(spec, codec, folder))
            except BarnraiseError as error:
                why = f"{error} ({folder})"
                reports.append(ContenderReport.failed(_barnraise_name(spec, codec), "barnraise", spec, why))
    if "hivemind" in contenders:
        try:
            reports.extend(run_hivemind(spec, workdir / "hivemind"))
        except BarnraiseError as error:
            reports.append(ContenderReport.failed("hivemind", "hivemind", spec, f"{error} ({workdir / 'hivemind'})"))
    if "memcpy" in contenders:
        reports.extend(run_memcpy(spec, codecs))
    return reports


def _allreduce_bytes(spec: RoundSpec, width: int) -> float:
    """Bytes one peer sends in a butterfly all-reduce of N elements of ``width`` bytes: 2(n-1)/n x width x N."""
    return 2 * (spec.peers - 1) / spec.peers * width * spec.numel


def _round_times(measured: list[list[dict[str, Any]]]) -> tuple[float, ...]:
    """Each measured round's time: its slowest peer's."""
    return tuple(max(rank[i]["seconds"] for rank in measured) for i in range(len(measured[0])))


def _median_round(measured: list[list[dict[str, Any]]]) -> tuple[float, int, int]:
    """(median round time, that round's index, its slowest rank); an actual round, not an average."""
    times = _round_times(measured)
    seconds = statistics.median_low(times)
    index = times.index(seconds)
    slowest = max(range(len(measured)), key=lambda rank: measured[rank][index]["seconds"])
    return seconds, index, slowest


def _loopback(lead: dict[str, Any], spec: RoundSpec) -> float:
    return lead["loopback"]["tx_bytes"] / spec.rounds / spec.peers


def _check_barnraise(results: list[dict[str, Any]], spec: RoundSpec) -> str:
    """Updates bit-identical across ranks, and the canonical combine of the decoded payloads at
    the samples: per sample, float64 sums in peer-id order of (decoded value x weight 1.0) and of
    the weights, over every peer (``mean``) or the peers whose payload kept it (``senders``)."""
    order = sorted(range(len(results)), key=lambda rank: results[rank]["peer_id"])
    touched = 0
    for index in range(spec.warmup + spec.rounds):
        rounds = [r["rounds"][index] for r in results]
        if len({record["sha256"] for record in rounds}) != 1:
            return f"FAILED: round {index}: the {len(rounds)} updates are not bit-identical"
        for j, got in enumerate(rounds[0]["update_samples"]):
            acc, weight = 0.0, 0.0
            for rank in order:
                if spec.aggregation == "mean" or rounds[rank]["own_kept"][j]:
                    acc += rounds[rank]["own_samples"][j] * 1.0
                    weight += 1.0
            expected = float(np.float32(acc / weight)) if weight else 0.0
            if expected != got:
                return f"FAILED: round {index}: update sample {j} is {got}, not {expected} ({spec.aggregation})"
            touched += any(rounds[rank]["own_kept"][j] for rank in order)
    samples = len(results[0]["rounds"][0]["update_samples"]) * (spec.warmup + spec.rounds)
    return (f"ok: group of 4, updates bit-identical, = {spec.aggregation} of decoded payloads "
            f"({touched} of {samples} sampled coordinates kept by some peer)")


def _check_hivemind(variants: list[dict[str, Any]], compression: str) -> str:
    """Updates equal the inputs' mean at samples within the tolerance of the compression."""
    tolerance, worst = _HIVEMIND_TOLERANCE[compression], 0.0
    for index in range(len(variants[0]["rounds"])):
        rounds = [v["rounds"][index] for v in variants]
        mean = np.mean([record["input_samples"] for record in rounds], axis=0)
        for record in rounds:
            worst = max(worst, float(np.abs(np.asarray(record["update_samples"]) - mean).max()))
    identical = all(len({v["rounds"][i]["sha256"] for v in variants}) == 1 for i in range(len(variants[0]["rounds"])))
    if worst > tolerance:
        return f"FAILED: an update differs from the inputs' mean by {worst:.3g} (> {tolerance:g})"
    return f"ok: group of 4, max |update - mean| {worst:.2g}, bit-identical: {'yes' if identical else 'no'}"


# ---------------------------------------------------------------------------------------
# Rank side
# ---------------------------------------------------------------------------------------


def _vector(spec: RoundSpec, rank: int, round_: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rank ``rank``'s N(0, 1) float32 vector of ``round_`` (written into ``out`` when given)."""
    generator = torch.Generator().manual_seed((spec.seed * 1_000_003 + rank) * 1_000_003 + round_)
    out = torch.empty(spec.numel) if out is None else out
    return out.normal_(generator=generator)


def _sample_indices(spec: RoundSpec) -> torch.Tensor:
    """``samples`` random indices and a run of ``samples`` consecutive ones, sorted, unique."""
    generator = torch.Generator().manual_seed(spec.seed)
    scattered = torch.randint(spec.numel, (spec.samples,), generator=generator)
    first = int(torch.randint(max(1, spec.numel - spec.samples), (1,), generator=generator))
    run = torch.arange(first, min(spec.numel, first + spec.samples))
    return torch.unique(torch.cat([scattered, run]))


def _kept_at(parsed: Any, indices: torch.Tensor) -> list[bool]:
    """Whether a parsed payload lists each of the (sorted) indices as an entry."""
    wanted, kept = indices.numpy(), np.zeros(len(indices), dtype=bool)
    for positions, _ in parsed.entries():
        kept |= np.isin(wanted, positions, assume_unique=True)
    return kept.tolist()


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy()).hexdigest()


@dataclass(frozen=True)
class _Sync:
    """This rank's side of the file barriers, all under the rank's deadline."""

    rank: int
    peers: int
    workdir: Path
    deadline: float

    def __call__(self, name: str) -> None:
        file_barrier(self.workdir, name, rank=self.rank, peers=self.peers, timeout_s=self.remaining())

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def _join(sync: _Sync, start: Callable[[list[str]], Node], maddrs: Callable[[Node], list[str]]) -> Node:
    """Rank 0 starts the DHT and publishes its addresses; the others bootstrap from them."""
    published = rendezvous_dir(sync.workdir) / _MADDRS_FILE
    if sync.rank == 0:
        node = start([])
        partial = published.with_suffix(".partial")
        partial.write_text(json.dumps(maddrs(node)))
        partial.replace(published)
        return node
    while not published.exists():
        if sync.remaining() <= 0:
            raise DeadlineExceeded("rank 0 did not publish its DHT addresses before the deadline")
        time.sleep(0.1)
    return start(json.loads(published.read_text()))


def _measure(spec: RoundSpec, sync: _Sync, tag: str, one_round: Callable[[int], dict[str, Any]]) -> dict[str, Any]:
    """Warm-up and measured rounds, each started together; rank 0 counts loopback bytes around
    the measured ones (between barriers, so no warm-up traffic is still in flight)."""
    counter = InterfaceBytes("lo") if sync.rank == 0 else None
    records = []
    for index in range(spec.warmup + spec.rounds):
        if index == spec.warmup:
            sync(f"{tag}-warmed")
            if counter is not None:
                counter.start()
        sync(f"{tag}-round{index}")
        records.append(one_round(index))
    sync(f"{tag}-done")
    result: dict[str, Any] = {"rounds": records}
    if counter is not None:
        result["loopback"] = asdict(counter.stop())
    return result


class _BarnraisePeer:
    """One peer's rounds: compress with error feedback, exchange, combine; timed and checked."""

    def __init__(self, node: Any, key: Any, codec: str, spec: RoundSpec, sync: _Sync):
        from protocol.signing import key_id

        self.node, self.key, self.codec, self.spec, self.sync = node, key, parse_codec(codec), spec, sync
        self.peer_id = key_id(key.public_key_hex)
        self.residual = torch.zeros(spec.numel)
        self.indices = _sample_indices(spec)

    def __call__(self, round_: int) -> dict[str, Any]:
        from protocol.averaging import GroupMember, combine
        from protocol.records import RoundAnnouncement

        vector = _vector(self.spec, self.sync.rank, round_)
        began = time.perf_counter()
        payload, self.residual = compress_with_feedback(self.codec, vector, self.residual)
        member = GroupMember.for_payload(peer_id=self.peer_id, round=round_, weight=1.0, codec=self.codec,
                                         payload=payload, base_root=_BASE_ROOT)  # fmt: skip
        encoded = time.perf_counter()
        del vector
        digest = self.node.hold_payload(payload)
        # a signed announcement, as the peer stores it: the DHT's validators take nothing else
        announcement = RoundAnnouncement.signed(
            self.key, run_id=_RUN_ID, round=round_, weight=1.0, codec=self.codec.name, payload_size=len(payload),
            payload_sha256=digest, base_root=_BASE_ROOT, loss=0.0, p2p_id=self.node.p2p_id, time=time.time())
        self.node.store(f"{_PREFIX}.{round_}", announcement.to_bytes(), ttl=600.0, subkey=self.peer_id)
        self.sync(f"barnraise-exchange{round_}")  # every peer has announced: stands for the settle time
        launched = time.perf_counter()
        announced = [RoundAnnouncement.from_bytes(raw).verify()
                     for raw in (self.node.fetch(f"{_PREFIX}.{round_}") or {}).values()]
        others = [a for a in announced if a.payload_sha256 != digest]
        fetched = self.node.fetch_payloads(
            [(a.payload_sha256, a.payload_size, [a.p2p_id]) for a in others],
            timeout=self.spec.network_deadline((self.spec.peers - 1) * len(payload)))
        entries = [(member.to_wire(), payload)] + [
            (GroupMember(peer_id=a.peer_id, round=a.round, weight=a.weight, codec=a.codec, payload_size=a.payload_size,
                         payload_sha256=a.payload_sha256, base_root=a.base_root).to_wire(), fetched[a.payload_sha256])
            for a in others if a.payload_sha256 in fetched]
        arrived = time.perf_counter()
        if len(entries) != self.spec.peers:
            raise VerificationError(f"round {round_}: got {len(entries)} of {self.spec.peers} payloads")
        group = combine(entries, codec=self.codec, numel=self.spec.numel, round=round_,
                        max_weight=float("inf"), base_root=_BASE_ROOT, aggregation=self.spec.aggregation)
        done = time.perf_counter()
        del entries, fetched
        if len(group.members) != self.spec.peers or group.rejected:
            raise VerificationError(f"round {round_}: combined {len(group.members)} members; rejected {group.rejected}")
        group_touched = group.touched
        record = {"encode": encoded - began, "exchange": arrived - launched, "decode_combine": done - arrived,
                  "sha256": _digest(group.update), "update_samples": group.update[self.indices].tolist()}  # fmt: skip
        record["seconds"] = record["encode"] + record["exchange"] + record["decode_combine"]
        del group
        record["own_samples"] = decode(payload, self.codec, self.spec.numel)[self.indices].tolist()
        record["own_kept"] = _kept_at(parse_payload(payload, self.codec, self.spec.numel), self.indices)
        record["touched"] = group_touched
        return record


def _barnraise_rank(spec: RoundSpec, sync: _Sync, codec: str) -> dict[str, Any]:
    from peer.swarm import SwarmNode
    from protocol.manifest import AveragingConfig
    from protocol.signing import SigningKey

    size = payload_size(codec, spec.numel)
    averaging = AveragingConfig(codec=codec, round_deadline_seconds=spec.network_deadline((spec.peers - 1) * size))
    host = [f"/ip4/{spec.host_ip}/tcp/0"]
    key = SigningKey.generate()
    node = _join(sync, lambda peers: SwarmNode(initial_peers=peers, host_maddrs=host, identity=key), lambda n: n.maddrs)
    try:
        node.start_averager(prefix=_PREFIX, payload_limit=size, averaging=averaging)
        peer = _BarnraisePeer(node, key, codec, spec, sync)
        sync("barnraise-ready")
        return {"peer_id": peer.peer_id, **_measure(spec, sync, "barnraise", peer)}
    finally:
        node.shutdown()


class _HivemindPeer:
    """One peer's rounds of ``DecentralizedAverager.step()`` on its shared vector."""

    def __init__(self, averager: Any, spec: RoundSpec, sync: _Sync, step_timeout: float):
        self.averager, self.spec, self.sync, self.step_timeout = averager, spec, sync, step_timeout
        self.indices = _sample_indices(spec)

    def __call__(self, round_: int) -> dict[str, Any]:
        with self.averager.get_tensors() as tensors:
            inputs = _vector(self.spec, self.sync.rank, round_, out=tensors[0])[self.indices].tolist()
        began = time.perf_counter()
        gathered = self.averager.step(timeout=self.step_timeout)
        seconds = time.perf_counter() - began
        if gathered is None or len(gathered) != self.spec.peers:
            got = 0 if gathered is None else len(gathered)
            raise VerificationError(f"round {round_}: hivemind averaged in a group of {got}, not {self.spec.peers}")
        with self.averager.get_tensors() as tensors:
            update = tensors[0]
            return {"seconds": seconds, "sha256": _digest(update), "input_samples": inputs,
                    "update_samples": update[self.indices].tolist()}  # fmt: skip


def _hivemind_variant(dht: Any, spec: RoundSpec, sync: _Sync, name: str, compression: str) -> dict[str, Any]:
    from hivemind.averaging import DecentralizedAverager
    from hivemind.compression import Float16Compression, NoCompression

    width = HIVEMIND_VARIANTS[name][1]
    deadline = spec.network_deadline(_allreduce_bytes(spec, width))
    sigint = signal.getsignal(signal.SIGINT)  # hivemind's averager sets SIGINT to "ignore" here
    try:
        averager = DecentralizedAverager(
            [torch.zeros(spec.numel)], dht, start=True, prefix=f"{_PREFIX}-{name}",
            target_group_size=spec.peers, min_group_size=spec.peers,
            min_matchmaking_time=spec.matchmaking_seconds, request_timeout=min(1.0, spec.matchmaking_seconds / 2),
            allreduce_timeout=deadline, compression=Float16Compression() if compression == "fp16" else NoCompression(),
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, sigint)
    try:
        sync(f"{name}-ready")
        return _measure(spec, sync, name, _HivemindPeer(averager, spec, sync, deadline))
    finally:
        averager.shutdown()


def _hivemind_rank(spec: RoundSpec, sync: _Sync) -> dict[str, Any]:
    import hivemind

    host = [f"/ip4/{spec.host_ip}/tcp/0"]

    def start(peers: list[str]) -> hivemind.DHT:
        return hivemind.DHT(initial_peers=peers, host_maddrs=host, start=True)

    dht = _join(sync, start, lambda d: [str(a) for a in d.get_visible_maddrs()])
    try:
        variants = {}
        for name, (compression, _) in HIVEMIND_VARIANTS.items():
            variants[name] = _hivemind_variant(dht, spec, sync, name, compression)
        return {"variants": variants}
    finally:
        dht.shutdown()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank (started by ``run_barnraise`` or ``run_hivemind``)."""
    parser = argparse.ArgumentParser(description="One rank of the averaging-round benchmark.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--contender", choices=["barnraise", "hivemind"], required=True)
    parser.add_argument("--codec", help="barnraise: the wire codec")
    parser.add_argument("--timeout", type=float, required=True, help="seconds before this rank gives up")
    args = parser.parse_args(argv)
    watchdog = arm_watchdog(args.timeout, f"round-bench {args.contender} rank {args.rank}")
    torch.set_num_threads(1)
    spec = RoundSpec.from_dict(json.loads((args.workdir / "spec.json").read_text()))
    # Leave 10 s before the watchdog, so a failed wait raises (and shuts hivemind down) first.
    sync = _Sync(args.rank, spec.peers, args.workdir, time.monotonic() + args.timeout - 10.0)
    if args.contender == "barnraise":
        result = _barnraise_rank(spec, sync, args.codec)
    else:
        result = _hivemind_rank(spec, sync)
    write_result(args.workdir, args.rank, {"rank": args.rank, **result})
    watchdog.cancel()


if __name__ == "__main__":
    main()
