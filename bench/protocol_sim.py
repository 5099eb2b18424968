"""The round protocol at 10 to 1,000 peers, as a discrete-event simulation: no training, no network.

    python scripts/bench_protocol_scale.py --peers 10 100 1000 --rounds 48
    pytest -q tests/test_protocol_sim.py

Rounds. Round r is the window [rW, (r+1)W). A peer computes through every window except while it
stalls: window w needs the updates of rounds up to w-2 in hand, so round r's exchange runs during
window r+1. At the close a peer with work encodes its payload (``encode_s`` for a median-speed
peer, scaled by 1/speed; ``late_share`` of them later still) and stores a signed announcement
under the round's one DHT key: ``hops`` = ceil(log_20 n) lookup RTTs, then a 500-byte store RPC to
each of 5 replicas. At close + settle every live peer reads the key once: its read reaches a
replica after ``hops`` RTTs and sees exactly the announcements stored by then; the replica sends
the n records FIFO from its uplink. Each reader decides with ``decide``; two different sets among
one round's readers is a fork. A record is signed when its peer announces (encode done) and is
valid only if signed by close + ``deadline_share`` x settle (protocol/consensus.py: half the
settle), so a valid store lands before the reads once settle/2 exceeds a store's few RTTs;
``deadline_share=None`` takes every record a read returns (then late stores can fork).

Payloads. Every reader fetches the G payloads of its set as ``pieces`` pieces, BitTorrent-like.
A transfer holds an upload slot at its source (one per ``slot_mbit`` of uplink, at most
``upload_slots``) and one of ``download_slots`` at its receiver; its bytes start one RTT (the
mean of both ends') after the request. A source's uplink is split max-min fairly among its
flowing uploads, each capped at its receiver's downlink / ``download_slots``: no link ever
carries more than its capacity, and a downlink may idle while its slots wait on slow sources
(so times are upper bounds). A peer with a free download slot asks for the oldest round's
rarest piece it lacks, samples ``holder_choices`` holders and takes the one with the most to
spare (uplink share one more upload would get, times what is left of its cap); a piece goes to
at most as many peers at once as hold it, so a payload's author sends each piece once before
any twice. A peer that finds no free holder queues and asks again ``retry_s`` later; a holder
offers its pieces to queued peers whenever an upload slot frees or it gets a piece.

Upload cap (a peer-side policy the protocol does not require): with ``upload_cap`` a peer stops
starting uploads in a window once they reach that share of W x its uplink, except for a piece
whose every holder is past its cap (else the piece would wait a window).

Churn. Poisson leaves and joins, ``churn_per_hour`` x n of each. Leaves are graceful: a peer that
announced a round not yet read, or is the only holder of a piece someone needs, stays until that
is over. A joiner loads the latest checkpoint (every ``checkpoint_every`` rounds; served outside
the swarm, not counted) and fetches the payloads of every round since, G per round, from
holders; peers keep pieces for ``checkpoint_every + 2`` rounds. Links, RTTs and speeds are drawn
log-uniform; every round(1/``reference_share``)-th peer gets the ``reference_mbit`` link instead.

Left out: compute and encode contend with nothing; DHT traffic (stores, reads, serving) is not
in the uplink sharing; replicas never leave during a read; clocks agree; every peer is honest
and on the same base root; work not selected is dropped (not carried to a later round).
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field

from protocol.errors import ConfigError

__all__ = ["PAYLOAD_BYTES_1B", "SimConfig", "Announcement", "RoundStats", "WindowStats", "SimResult",
           "rank", "decide", "simulate"]

PAYLOAD_BYTES_1B = 16_601_613
"""``payload_size(parse_codec("bmax-c4096-b64-s2"), 10**9)``: 1 byte per 64 values + scales."""
MBIT = 1e6 / 8
"""Bytes per second in one Mbit/s."""


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    peers: int = 100
    """Peers at the start; as many join as leave."""
    rounds: int = 24
    """Compute windows simulated; the exchange of the last runs in one more window."""
    window_s: float = 300.0
    """W: seconds per round."""
    settle_s: float = 15.0
    """Seconds from a window's close to every peer's read of the round's key."""
    group: int = 3
    """G: most contributors a round's set takes (3: what a 20/100 Mbit/s peer carries in 10% of W at 1B)."""
    payload_bytes: int = PAYLOAD_BYTES_1B
    """P: bytes of one contributor's payload."""
    pieces: int = 8
    """Pieces per payload: the unit a peer fetches and serves."""
    upload_slots: int = 8
    """Most concurrent uploads per peer."""
    slot_mbit: float = 5.0
    """A peer opens one upload slot per this much uplink (at least 1, at most upload_slots)."""
    download_slots: int = 8
    """Concurrent downloads per peer; each gets an equal share of the downlink."""
    upload_cap: float | None = 0.1
    """A peer starts uploads worth at most this share of W x its uplink per window (see the module
    docstring); None: it serves whatever is asked."""
    retry_s: float = 2.0
    """A peer that found no free holder asks again this much later (if no offer came first)."""
    holder_choices: int = 8
    """Holders of a piece a peer samples before it picks the one with the most spare upload."""
    record_bytes: int = 400
    """One signed announcement as a DHT read returns it."""
    store_rpc_bytes: int = 500
    """One store RPC to one replica."""
    replicas: int = 5
    """Nodes that keep a DHT key."""
    down_mbit: tuple[float, float] = (20.0, 500.0)
    """Downlink range (log-uniform), Mbit/s."""
    up_mbit: tuple[float, float] = (5.0, 100.0)
    """Uplink range (log-uniform), Mbit/s."""
    rtt_s: tuple[float, float] = (0.02, 0.15)
    """Round-trip time range (log-uniform), seconds."""
    speed_spread: float = 10.0
    """Fastest / slowest compute speed (log-uniform); samples per round are proportional."""
    reference_share: float = 0.1
    """Share of peers on the reference link instead of a drawn one (every round(1/share)-th)."""
    reference_mbit: tuple[float, float] = (20.0, 100.0)
    """(up, down) Mbit/s of the reference link whose fit in 10% of W the goal asks about."""
    encode_s: float = 3.0
    """Seconds a median-speed peer needs to encode its payload after the close."""
    combine_s: float = 2.5
    """Seconds to decode and combine one payload of the set, once all are in hand."""
    late_share: float = 0.0
    """Share of announcements delayed further (a busy host, a stalled uplink)."""
    late_s: float = 30.0
    """A late announcement's extra delay: uniform in [0, late_s] seconds."""
    deadline_share: float | None = 0.5
    """A record signed after close + deadline_share x settle is invalid; None: no deadline."""
    churn_per_hour: float = 0.1
    """Leaves per peer per hour; joins arrive at the same rate."""
    checkpoint_every: int = 12
    """Rounds between checkpoints a joiner starts from."""
    seed: int = 0
    """Seed of the one random generator every draw comes from."""

    def __post_init__(self) -> None:
        for name in ("peers", "rounds", "group", "payload_bytes", "pieces", "upload_slots", "download_slots",
                     "holder_choices", "replicas", "checkpoint_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.window_s <= 0 or not 0 <= self.settle_s < self.window_s:
            raise ConfigError(f"need window_s > 0 and 0 <= settle_s < window_s, got {self.window_s}, {self.settle_s}")
        for name in ("down_mbit", "up_mbit", "rtt_s"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ConfigError(f"{name} must be a range 0 < low <= high, got {(low, high)}")
        for name in ("reference_share", "late_share", "churn_per_hour"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.upload_cap is not None and not 0 < self.upload_cap <= 1:
            raise ConfigError(f"upload_cap must be in (0, 1] or None, got {self.upload_cap}")
        if self.retry_s <= 0 or self.slot_mbit <= 0 or self.speed_spread < 1 or min(self.encode_s, self.combine_s, self.late_s) < 0:
            raise ConfigError("retry_s and slot_mbit must be > 0, speed_spread >= 1, and encode_s, combine_s, late_s >= 0")


@dataclass(frozen=True, kw_only=True)
class Announcement:
    """One contribution record as a reader gets it from the round's key."""

    round: int
    peer: int
    signed_time: float
    base_root: int
    """Stands for the checkpoint root the work started from: rounds applied to it."""
    weight: float
    """Samples computed in the window."""
    stored_at: float
    """When the store reached the replicas (not signed: the simulator's clock)."""


def rank(round_: int, peer: int) -> bytes:
    """sha256(round || peer): the rotating order in which contributors enter a round's set
    (``protocol.consensus.priority`` hashes a prefix and the peer id's bytes the same way)."""
    return hashlib.sha256(round_.to_bytes(8, "big") + peer.to_bytes(8, "big")).digest()


def decide(records: list[Announcement], *, round_: int, latest: float, group: int) -> tuple[int, ...]:
    """The round's contributor set, in rank order. Pure: the same records give every peer the same set.

    Kept (as ``protocol.consensus.decide``): records of this round signed no later than ``latest``,
    on the plurality base root (ties: the smaller root); of those the ``group`` with the smallest
    ``rank``.
    """
    valid = [a for a in records if a.round == round_ and a.signed_time <= latest]
    if not valid:
        return ()
    counts = Counter(a.base_root for a in valid)
    base = min(counts, key=lambda root: (-counts[root], root))
    chosen = sorted((rank(round_, a.peer), a.peer) for a in valid if a.base_root == base)
    return tuple(peer for _, peer in chosen[:group])


@dataclass(frozen=True, kw_only=True)
class RoundStats:
    round: int
    live: int
    """Peers live at the close."""
    announced: int
    late: int
    """Records signed after the deadline: stored and read, but left out by every reader."""
    selected: int
    """Size of the set most readers decided."""
    in_two_rounds: int
    """Live peers whose work entered this round's or the previous round's set."""
    samples_in: float
    """Share of the announced samples (weights) that the set takes."""
    distinct_sets: int
    """Different sets among the round's readers: above 1 is a fork."""
    fork_peers: int
    """Readers that decided another set than most."""
    round_time_s: float
    """From the close to the last reader holding the update: readers that held every earlier
    update when they read and did not leave first (inf if one never held it)."""


@dataclass(frozen=True, kw_only=True)
class WindowStats:
    window: int
    peers: int
    """Peers live through the whole window: the ones the quantiles are over."""
    down_median: float
    down_p95: float
    up_median: float
    up_p95: float
    reference_link_p95: float
    """95th percentile over reference-link peers of max(up / up link, down / down link) / W."""
    reference_link_max: float
    dht_serve_max: float
    """Most bytes one replica uploaded answering reads of the round's key."""


@dataclass(frozen=True, kw_only=True)
class SimResult:
    config: SimConfig
    rounds: list[RoundStats]
    windows: list[WindowStats]
    compute_fraction: float
    """Compute seconds / live seconds, over all peers, within the simulated windows."""
    joins: int
    leaves: int
    catchup_bytes_mean: float
    """Bytes a joiner fetched for the rounds since its checkpoint (mean over joiners)."""
    catchup_s_mean: float
    """Seconds from a join to holding every update before the join's window (mean over joiners)."""
    events: int

    def summary(self) -> dict[str, float]:
        """Per-round figures averaged over rounds, with their worst round: one row of the table."""
        c, rounds, windows = self.config, self.rounds, self.windows
        announced = sum(r.announced for r in rounds)
        return {
            "peers": c.peers, "group": c.group, "rounds": c.rounds, "settle_s": c.settle_s,
            "payload_mb": c.payload_bytes / 1e6,
            **{f"{key}_mb": statistics.fmean(getattr(w, key) for w in windows) / 1e6
               for key in ("down_median", "down_p95", "up_median", "up_p95")},
            **{f"{key}_max_mb": max(getattr(w, key) for w in windows) / 1e6 for key in ("down_p95", "up_p95")},
            "round_time_mean_s": statistics.fmean(r.round_time_s for r in rounds),
            "round_time_max_s": max(r.round_time_s for r in rounds),
            "work_in_round": statistics.fmean(r.selected / r.live for r in rounds),
            "work_in_two_rounds": statistics.fmean(r.in_two_rounds / r.live for r in rounds),
            "samples_in_round": statistics.fmean(r.samples_in for r in rounds),
            "compute_fraction": self.compute_fraction,
            "forks": sum(r.distinct_sets > 1 for r in rounds), "fork_peers": sum(r.fork_peers for r in rounds),
            "late": sum(r.late for r in rounds) / announced if announced else 0.0,
            "reference_link_p95": statistics.fmean(w.reference_link_p95 for w in windows),
            "reference_link_p95_max": max(w.reference_link_p95 for w in windows),
            "reference_link_max": max(w.reference_link_max for w in windows),
            "dht_serve_max_mb": max(w.dht_serve_max for w in windows) / 1e6,
            "joins": self.joins, "leaves": self.leaves, "catchup_mb": self.catchup_bytes_mean / 1e6,
            "catchup_s": self.catchup_s_mean,
        }


@dataclass(eq=False)
class _Peer:
    id: int
    up: float
    down: float
    rtt: float
    speed: float
    reference: bool
    joined: float
    base_round: int = 0
    alive: bool = True
    free_up: int = 0
    free_down: int = 0
    have: set[int] = field(default_factory=set)
    need: dict[int, dict[int, None]] = field(default_factory=dict)
    """round -> pieces of its set still missing, once the peer has decided that round."""
    in_flight: set[int] = field(default_factory=set)
    transfers: dict[int, _Transfer] = field(default_factory=dict)
    """Transfers it holds a slot for, at either end, by id."""
    flowing: list[_Transfer] = field(default_factory=list)
    """Its uploads past their first RTT: they share its uplink."""
    held: dict[int, float] = field(default_factory=dict)
    """round -> when its update was in hand (pieces, then combine)."""
    left: float = math.inf
    decided: set[int] = field(default_factory=set)
    set_size: dict[int, int] = field(default_factory=dict)
    retrying: bool = False
    pending_round: int = -1
    """A round it announced whose key nobody has read yet: it does not leave before that read."""
    catchup: set[int] = field(default_factory=set)
    catchup_bytes: float = 0.0
    compute_s: float = 0.0
    up_bytes: dict[int, float] = field(default_factory=dict)
    down_bytes: dict[int, float] = field(default_factory=dict)
    dht_serve: dict[int, float] = field(default_factory=dict)
    slots: int = 1
    cap_bytes: float | None = None
    """Upload bytes started in a window past which it is over its cap (less one piece)."""
    serving_window: int = -1
    serving_bytes: float = 0.0
    """Piece bytes of the uploads it started in ``serving_window`` (what the cap counts)."""


@dataclass(eq=False, kw_only=True)
class _Transfer:
    id: int
    piece: int
    source: _Peer
    peer: _Peer
    cap: float
    """Its download slot's share of the receiver's downlink, bytes/s."""
    left: float
    updated: float
    rate: float = 0.0
    version: int = 0
    """Bumped at each new rate: only the latest 'drained' event counts."""


def _add(counter: dict[int, float], key: int, value: float) -> None:
    counter[key] = counter.get(key, 0.0) + value


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


class _Swarm:
    """The simulation's state and its event handlers; ``simulate`` is the way in."""

    def __init__(self, config: SimConfig) -> None:
        self.c, self.rng = config, random.Random(config.seed)
        self.W, self.horizon = config.window_s, config.rounds * config.window_s
        self.hops = max(1, math.ceil(math.log(max(config.peers, 2)) / math.log(20)))
        self.piece_bytes = config.payload_bytes / config.pieces
        self.queue: list[tuple] = []
        self.seq = self.events = self.next_id = self.next_piece = self.next_transfer = 0
        self.peers: dict[int, _Peer] = {}
        self.live: dict[int, _Peer] = {}
        self.holders: dict[int, list[_Peer]] = {}
        self.position: dict[int, dict[int, int]] = {}
        self.piece_round: dict[int, int] = {}
        self.needed: Counter[int] = Counter()
        self.sending: Counter[int] = Counter()
        self.payload_pieces: dict[tuple[int, int], list[int]] = {}
        self.round_pieces: dict[int, list[int]] = {}
        self.waiters: dict[int, dict[int, bool]] = {}
        self.announcements: dict[int, list[Announcement]] = {}
        self.replicas: dict[int, list[_Peer]] = {}
        self.canonical: dict[int, tuple[int, ...]] = {}
        self.readers: dict[int, list[_Peer]] = {}
        self.round_info: dict[int, dict] = {}
        self.joins = self.leaves = 0
        self.window = 0

    # -- the event queue ------------------------------------------------------------------------
    def push(self, time: float, kind: str, *args) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (time, self.seq, kind, args))

    def run(self) -> None:
        for _ in range(self.c.peers):
            self.new_peer(0.0)
        rate = self.c.churn_per_hour * self.c.peers / 3600
        for kind in ("leave", "join"):
            t = self.rng.expovariate(rate) if rate else math.inf
            while t < self.horizon:
                self.push(t, kind)
                t += self.rng.expovariate(rate)
        self.push(self.W, "close", 0)
        while self.queue:
            time, _, kind, args = heapq.heappop(self.queue)
            self.events, self.window = self.events + 1, int(time // self.W)
            getattr(self, "on_" + kind)(time, *args)

    def new_peer(self, now: float) -> _Peer:
        c, draw = self.c, lambda low, high: math.exp(self.rng.uniform(math.log(low), math.log(high)))
        up, down = draw(*c.up_mbit), draw(*c.down_mbit)
        reference = c.reference_share > 0 and self.next_id % round(1 / c.reference_share) == 0
        if reference:
            up, down = c.reference_mbit
        peer = _Peer(id=self.next_id, up=up * MBIT, down=down * MBIT, rtt=draw(*c.rtt_s),
                     speed=draw(1.0, c.speed_spread), reference=reference, joined=now,
                     free_down=c.download_slots)
        peer.slots = peer.free_up = max(1, min(c.upload_slots, round(up / c.slot_mbit)))
        if c.upload_cap is not None:
            peer.cap_bytes = c.upload_cap * self.W * peer.up - self.piece_bytes
        self.next_id += 1
        self.peers[peer.id] = self.live[peer.id] = peer
        return peer

    # -- rounds ---------------------------------------------------------------------------------
    def usable(self, peer: _Peer, round_: int) -> float:
        """When the peer holds every update up to ``round_`` (it starts from its checkpoint)."""
        ready = peer.joined
        for r in range(peer.base_round, round_ + 1):
            ready = max(ready, peer.held.get(r, math.inf))
        return ready

    def account_compute(self, peer: _Peer, window: int, end: float) -> float:
        start = max(window * self.W, self.usable(peer, window - 2))
        seconds = max(0.0, min(end, self.horizon) - start)
        peer.compute_s += seconds
        return seconds

    def on_close(self, now: float, window: int) -> None:
        c, records, late = self.c, [], 0
        latest = now + (math.inf if c.deadline_share is None else c.deadline_share * c.settle_s)
        self.replicas[window] = self.rng.sample(list(self.live.values()), min(c.replicas, len(self.live)))
        for peer in self.live.values():
            seconds = self.account_compute(peer, window, now)
            if seconds <= 0:
                continue
            encoded = now + c.encode_s * math.sqrt(c.speed_spread) / peer.speed
            if self.rng.random() < c.late_share:
                encoded += self.rng.uniform(0, c.late_s)
            late += encoded > latest
            stored = encoded + (self.hops + 1) * peer.rtt
            records.append(Announcement(round=window, peer=peer.id, signed_time=encoded, base_root=window - 2,
                                        weight=seconds * peer.speed, stored_at=stored))
            peer.pending_round = window
            _add(peer.up_bytes, int(stored // self.W), len(self.replicas[window]) * c.store_rpc_bytes)
            for replica in self.replicas[window]:
                _add(replica.down_bytes, int(stored // self.W), c.store_rpc_bytes)
        records.sort(key=lambda a: (a.stored_at, a.peer))
        self.announcements[window] = records
        self.round_info[window] = {"live": len(self.live), "announced": len(records), "late": late,
                                   "latest": latest,
                                   "live_ids": set(self.live)}
        self.push(now + c.settle_s, "read", window)
        if window + 1 < c.rounds:
            self.push(now + self.W, "close", window + 1)
        self.forget(window - c.checkpoint_every - 2)
        for peer in list(self.live.values()):  # a new window: upload caps start over
            self.offer(peer, now)

    def on_read(self, now: float, round_: int) -> None:
        c, records = self.c, self.announcements[round_]
        stored = [a.stored_at for a in records]
        sets, decisions = {}, []
        replica_free = {replica.id: now for replica in self.replicas[round_]}
        readers = sorted(self.live.values(), key=lambda p: (now + self.hops * p.rtt, p.id))
        for reader in readers:
            snapshot = now + self.hops * reader.rtt
            seen = bisect.bisect_right(stored, snapshot)
            if seen not in sets:
                sets[seen] = decide(records[:seen], round_=round_, latest=self.round_info[round_]["latest"],
                                    group=c.group)
            replica = self.replicas[round_][self.rng.randrange(len(self.replicas[round_]))]
            size = seen * c.record_bytes
            start = max(snapshot, replica_free[replica.id])
            replica_free[replica.id] = start + size / replica.up
            done = max(replica_free[replica.id], snapshot + size / reader.down) + reader.rtt / 2
            _add(reader.down_bytes, int(done // self.W), size)
            _add(replica.up_bytes, int(done // self.W), size)
            _add(replica.dht_serve, int(done // self.W), size)
            decisions.append((reader, sets[seen], done))
        tally = Counter(chosen for _, chosen, _ in decisions)
        canonical = min(tally, key=lambda s: (-tally[s], s)) if tally else ()
        self.canonical[round_] = canonical
        self.readers[round_] = [p for p in readers if self.usable(p, round_ - 1) <= now]  # not catching up
        weights = {a.peer: a.weight for a in records}
        self.round_info[round_].update(distinct=len(tally), fork_peers=len(decisions) - tally.get(canonical, 0),
                                       samples_in=sum(weights[p] for p in canonical) / max(sum(weights.values()), 1e-9))
        for a in records:
            self.peers[a.peer].pending_round = -1
        for reader, chosen, done in decisions:
            self.want(reader, round_, chosen)
            self.push(done, "decided", round_, reader.id)

    def want(self, peer: _Peer, round_: int, chosen: tuple[int, ...]) -> None:
        """Register the pieces of ``chosen`` the peer lacks (it fetches them once it has decided)."""
        missing = {}
        for author in chosen:
            for piece in self.pieces_of(round_, author):
                if piece not in peer.have:
                    missing[piece] = None
                    self.needed[piece] += 1
        peer.need[round_], peer.set_size[round_] = missing, len(chosen)

    def pieces_of(self, round_: int, author: int) -> list[int]:
        """A payload's pieces, created (held by its author) the first time a set names it."""
        key = (round_, author)
        if key not in self.payload_pieces:
            pieces = list(range(self.next_piece, self.next_piece + self.c.pieces))
            self.next_piece += self.c.pieces
            self.payload_pieces[key] = pieces
            self.round_pieces.setdefault(round_, []).extend(pieces)
            for piece in pieces:
                self.piece_round[piece], self.holders[piece], self.position[piece] = round_, [], {}
                if self.peers[author].alive:
                    self.hold(self.peers[author], piece)
        return self.payload_pieces[key]

    def on_decided(self, now: float, round_: int, peer_id: int) -> None:
        peer = self.peers[peer_id]
        if peer.alive:
            peer.decided.add(round_)
            self.check_held(peer, round_, now)
            self.pull(peer, now)

    def check_held(self, peer: _Peer, round_: int, now: float) -> None:
        if round_ in peer.decided and round_ in peer.need and not peer.need[round_]:
            del peer.need[round_]
            peer.held[round_] = now + self.c.combine_s * peer.set_size[round_]

    def forget(self, round_: int) -> None:
        """Peers drop the pieces of a round no joiner will replay any more."""
        for piece in self.round_pieces.pop(round_, []):
            for holder in self.holders.pop(piece):
                holder.have.discard(piece)
            for table in (self.position, self.piece_round, self.needed, self.waiters, self.sending):
                table.pop(piece, None)
        for key in [key for key in self.payload_pieces if key[0] == round_]:
            del self.payload_pieces[key]

    # -- pieces ---------------------------------------------------------------------------------
    def hold(self, peer: _Peer, piece: int) -> None:
        peer.have.add(piece)
        self.position[piece][peer.id] = len(self.holders[piece])
        self.holders[piece].append(peer)

    def unhold(self, peer: _Peer, piece: int) -> None:
        holders, position = self.holders[piece], self.position[piece]
        index, last = position.pop(peer.id), holders.pop()
        if last is not peer:
            holders[index], position[last.id] = last, index

    def pull(self, peer: _Peer, now: float) -> None:
        """Fill free download slots: oldest round first, rarest piece first; else wait for an offer,
        and ask again ``retry_s`` later (an idle holder does not know it is wanted).

        Holders are sampled for at most one piece per free slot; the peer queues for the rest.
        """
        tries, waiting = peer.free_down, False
        for round_ in sorted(r for r in peer.need if r in peer.decided):
            wanted = sorted((p for p in peer.need[round_] if p not in peer.in_flight),
                            key=lambda p: len(self.holders[p]))
            for piece in wanted:
                if not peer.free_down:
                    return
                source = self.pick_holder(piece) if tries > 0 else None
                tries -= 1
                if source is None:
                    self.waiters.setdefault(piece, {})[peer.id] = waiting = True
                else:
                    self.start(piece, source, peer, now)
        if waiting and not peer.retrying:
            peer.retrying = True
            self.push(now + self.c.retry_s, "retry", peer.id)

    def on_retry(self, now: float, peer_id: int) -> None:
        peer = self.peers[peer_id]
        peer.retrying = False
        if peer.alive:
            self.pull(peer, now)

    def pick_holder(self, piece: int) -> _Peer | None:
        """Of ``holder_choices`` sampled holders, the free one with the most to spare (past its cap
        only if every holder is).

        None while the piece is on its way to as many peers as hold it: a piece spreads by
        doubling, and a payload's author sends each piece once before any twice (super-seeding).
        When no copy is under way (so no holder will free up and offer it), every holder is
        looked at.
        """
        holders = self.holders[piece]
        if self.sending[piece] >= len(holders):
            return None
        best = self.best_holder(self.sample(holders), piece)
        if best is None and self.sending[piece] == 0 and len(holders) > self.c.holder_choices:
            best = self.best_holder(holders, piece)
        return best

    def sample(self, holders: list[_Peer]) -> list[_Peer]:
        k = self.c.holder_choices  # with replacement: cheap, and a duplicate only narrows the choice
        return holders if len(holders) <= k else [holders[int(self.rng.random() * len(holders))] for _ in range(k)]

    def best_holder(self, holders: list[_Peer], piece: int) -> _Peer | None:
        free = sorted((h for h in holders if h.free_up), key=lambda h: (-self.spare(h), h.id))
        for holder in free:
            if not self.over_cap(holder):
                return holder
        return free[0] if free and self.past_caps(piece) else None

    def past_caps(self, piece: int) -> bool:
        """Every holder of the piece is past its cap: nobody would serve it this window, so a holder
        past its cap does (the only way past a cap)."""
        return all(self.over_cap(h) for h in self.holders[piece])

    def spare(self, holder: _Peer) -> float:
        """What a holder has to spare: the uplink share one more upload would get, times what is
        left of its cap this window (when there is a cap)."""
        share = holder.up / (1 + holder.slots - holder.free_up)
        if holder.cap_bytes is None:
            return share
        used = holder.serving_bytes if holder.serving_window == self.window else 0.0
        return share * max(holder.cap_bytes - used, 0.0)

    def over_cap(self, holder: _Peer) -> bool:
        """Whether a holder has started this window's upload cap's worth of uploads."""
        return holder.cap_bytes is not None and holder.serving_window == self.window and \
            holder.serving_bytes > holder.cap_bytes

    def offer(self, source: _Peer, now: float) -> None:
        """A holder with a free upload slot serves peers waiting for pieces it has, first come first."""
        for piece in list(self.waiters):
            if not source.free_up or not source.alive:
                return
            if piece not in source.have:
                continue
            queue, round_ = self.waiters[piece], self.piece_round[piece]
            while queue and source.free_up and self.sending[piece] < len(self.holders[piece]):
                if self.over_cap(source) and not self.past_caps(piece):
                    break
                peer = self.peers[next(iter(queue))]
                del queue[peer.id]
                if peer.alive and peer.free_down and piece not in peer.in_flight and piece in peer.need.get(round_, ()):
                    self.start(piece, source, peer, now)
            if not queue:
                del self.waiters[piece]

    def start(self, piece: int, source: _Peer, peer: _Peer, now: float) -> None:
        """Reserve a slot at both ends; the bytes start to flow one RTT later (request, first byte)."""
        self.next_transfer += 1
        transfer = _Transfer(id=self.next_transfer, piece=piece, source=source, peer=peer,
                             cap=peer.down / self.c.download_slots, left=self.piece_bytes, updated=now)
        source.free_up, peer.free_down = source.free_up - 1, peer.free_down - 1
        if source.serving_window != self.window:
            source.serving_window, source.serving_bytes = self.window, 0.0
        source.serving_bytes += self.piece_bytes
        source.transfers[transfer.id] = peer.transfers[transfer.id] = transfer
        peer.in_flight.add(piece)
        self.sending[piece] += 1
        self.waiters.get(piece, {}).pop(peer.id, None)
        self.push(now + (source.rtt + peer.rtt) / 2, "begin", transfer)

    def on_begin(self, now: float, transfer: _Transfer) -> None:
        if transfer.id in transfer.source.transfers:  # else aborted: one end left
            self.reshare(transfer.source, now, joining=transfer)

    def reshare(self, source: _Peer, now: float, joining: _Transfer | None = None,
                leaving: _Transfer | None = None) -> None:
        """Max-min fair split of the uplink among its flowing uploads, each capped by its download slot."""
        for flow in source.flowing:
            flow.left -= flow.rate * (now - flow.updated)
            flow.updated = now
        if leaving is not None:
            source.flowing.remove(leaving)
        if joining is not None:
            joining.updated = now
            source.flowing.append(joining)
        spare = source.up
        for i, flow in enumerate(sorted(source.flowing, key=lambda f: (f.cap, f.id))):
            rate = min(flow.cap, spare / (len(source.flowing) - i))
            spare -= rate
            if rate != flow.rate:
                flow.rate, flow.version = rate, flow.version + 1
                self.push(now + max(flow.left, 0.0) / rate, "drained", flow, flow.version)

    def on_drained(self, now: float, transfer: _Transfer, version: int) -> None:
        source, peer, piece = transfer.source, transfer.peer, transfer.piece
        if transfer.version != version or transfer.id not in source.transfers:
            return
        self.reshare(source, now, leaving=transfer)
        self.release(transfer, now, self.piece_bytes)
        round_ = self.piece_round.get(piece)
        if round_ is not None and peer.alive:
            self.hold(peer, piece)
            missing = peer.need.get(round_, {})
            if piece in missing:
                del missing[piece]
                self.needed[piece] -= 1
                if round_ in peer.catchup:
                    peer.catchup_bytes += self.piece_bytes
            self.check_held(peer, round_, now)
        self.pull(peer, now)
        self.offer(source, now)
        self.offer(peer, now)

    def release(self, transfer: _Transfer, now: float, moved: float) -> None:
        source, peer = transfer.source, transfer.peer
        _add(source.up_bytes, int(now // self.W), moved)
        _add(peer.down_bytes, int(now // self.W), moved)
        source.free_up, peer.free_down = source.free_up + 1, peer.free_down + 1
        del source.transfers[transfer.id], peer.transfers[transfer.id]
        peer.in_flight.discard(transfer.piece)
        self.sending[transfer.piece] -= 1

    # -- churn ----------------------------------------------------------------------------------
    def on_leave(self, now: float, peer_id: int | None = None) -> None:
        if not self.live:
            return
        peer = self.peers[peer_id] if peer_id is not None else self.rng.choice(list(self.live.values()))
        if peer.pending_round >= 0 or any(self.needed[p] > 0 and len(self.holders[p]) == 1 for p in peer.have):
            if now < self.horizon + self.W:
                self.push(now + 5.0, "leave", peer.id)  # graceful: stays until nobody depends on it
            return
        self.account_compute(peer, int(now // self.W), now)
        peer.alive, peer.left = False, now
        del self.live[peer.id]
        self.leaves += 1
        for _, transfer in sorted(peer.transfers.items()):
            source, other = transfer.source, transfer.peer
            if transfer in source.flowing:
                self.reshare(source, now, leaving=transfer)
            self.release(transfer, now, self.piece_bytes - max(transfer.left, 0.0))
            if source is peer:
                self.pull(other, now)
            else:
                self.offer(source, now)
        for piece in sorted(peer.have):
            self.unhold(peer, piece)
        for missing in peer.need.values():
            self.needed.subtract(missing.keys())
        peer.need.clear()

    def on_join(self, now: float) -> None:
        peer, window = self.new_peer(now), int(now // self.W)
        self.joins += 1
        peer.base_round = max(0, (window - 1) // self.c.checkpoint_every * self.c.checkpoint_every)
        for round_ in range(peer.base_round, window):
            if round_ in self.canonical:  # read before it came: replay it from holders
                peer.catchup.add(round_)
                peer.decided.add(round_)
                self.want(peer, round_, self.canonical[round_])
                self.check_held(peer, round_, now)
        self.pull(peer, now)

    # -- results --------------------------------------------------------------------------------
    def round_stats(self, round_: int) -> RoundStats:
        info, chosen = self.round_info[round_], self.canonical[round_]
        recent = set(chosen) | set(self.canonical.get(round_ - 1, ()))
        times = [p.held.get(round_, math.inf) for p in self.readers[round_] if round_ in p.held or p.alive]
        return RoundStats(round=round_, live=info["live"], announced=info["announced"], late=info["late"],
                          selected=len(chosen), in_two_rounds=len(recent & info["live_ids"]),
                          samples_in=info["samples_in"],
                          distinct_sets=info["distinct"], fork_peers=info["fork_peers"],
                          round_time_s=max(times, default=0.0) - (round_ + 1) * self.W)

    def window_stats(self, window: int) -> WindowStats:
        start, end = window * self.W, (window + 1) * self.W
        through = [p for p in self.peers.values() if p.joined <= start and p.left >= end]
        down = [p.down_bytes.get(window, 0.0) for p in through]
        up = [p.up_bytes.get(window, 0.0) for p in through]
        links = [max(p.up_bytes.get(window, 0.0) / p.up, p.down_bytes.get(window, 0.0) / p.down) / self.W
                 for p in through if p.reference]
        return WindowStats(window=window, peers=len(through), down_median=_quantile(down, 0.5),
                           down_p95=_quantile(down, 0.95), up_median=_quantile(up, 0.5), up_p95=_quantile(up, 0.95),
                           reference_link_p95=_quantile(links, 0.95), reference_link_max=max(links, default=0.0),
                           dht_serve_max=max((p.dht_serve.get(window, 0.0) for p in self.peers.values()), default=0.0))

    def result(self) -> SimResult:
        live_s = sum(min(p.left, self.horizon) - p.joined for p in self.peers.values() if p.joined < self.horizon)
        joiners = [p for p in self.peers.values() if p.joined > 0]
        waits = [self.usable(p, int(p.joined // self.W) - 1) - p.joined for p in joiners]
        waits = [wait for wait in waits if wait < math.inf]  # not those that left before catching up
        return SimResult(config=self.c, rounds=[self.round_stats(r) for r in range(self.c.rounds)],
                         windows=[self.window_stats(w) for w in range(1, self.c.rounds + 1)],
                         compute_fraction=sum(p.compute_s for p in self.peers.values()) / live_s,
                         joins=self.joins, leaves=self.leaves,
                         catchup_bytes_mean=statistics.fmean([p.catchup_bytes for p in joiners]) if joiners else 0.0,
                         catchup_s_mean=statistics.fmean(waits) if waits else 0.0, events=self.events)


def simulate(config: SimConfig) -> SimResult:
    """Run the protocol on ``config``; the same config (seed included) gives the same result."""
    swarm = _Swarm(config)
    swarm.run()
    return swarm.result()
