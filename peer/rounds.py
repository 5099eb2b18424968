"""A round's exchange: compress Δ with error feedback, announce it, decide the round, fetch, combine.

    announce: e ← β·e + Δ;  payload = codec(e);  e ← e − decode(payload)   (error feedback,
              β = ``averaging.error_feedback_decay``); the payload goes into this peer's store
              (served by sha256) and a signed ``RoundAnnouncement`` into the round's DHT key
    settle:   at the round's close plus the settle time, one read of that key; the contributor set
              is ``protocol.consensus.decide`` of what it holds; the members' payloads are fetched
              from any holder until the receipts are due, and a signed ``PayloadReceipt`` names
              those this peer holds; one read of the receipts keeps the members some other peer
              holds (``protocol.consensus.available``); their payloads are combined in canonical
              order (``protocol.averaging.combine``).
              A peer whose payload was left out adds it back to its residual: the work waits for a
              later round, it is not lost.

``settle`` needs no work of this peer's own: a joiner or the coordinator replays a round with it.
The residual is part of the peer's local state, saved in the workdir after every change.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from peer.swarm import SwarmNode
from peer.workdir import write_atomic
from protocol.averaging import GroupMember, combine
from protocol.codecs import compress_with_feedback, decode, parse_codec, payload_size
from protocol.consensus import (
    Availability,
    RoundClock,
    RoundDecision,
    announcement_key,
    available,
    decide,
    receipt_key,
)
from protocol.errors import DeadlineExceeded, InputError, TransportError
from protocol.manifest import RunManifest
from protocol.policy import MAX_TTL
from protocol.records import PayloadReceipt, RoundAnnouncement
from protocol.signing import SigningKey

__all__ = ["RoundWork", "RoundOutcome", "Announced", "Settled", "RoundExchanger", "clock_of"]

RESIDUAL_FILE = "residual.safetensors"
ANNOUNCE_ROUNDS = 12
"""Rounds an announcement stays in the DHT (followers replay rounds this recent)."""
KEEPERS = 2
"""Peers asked to fetch a payload as soon as it is announced."""


def clock_of(manifest: RunManifest) -> RoundClock:
    averaging = manifest.config.averaging
    return RoundClock(manifest.created_at, averaging.round_seconds, averaging.settle_seconds)


@dataclass(frozen=True)
class RoundWork:
    """What one round's inner steps produced on this peer."""

    round: int
    loss: float
    samples: int
    seconds: float


@dataclass
class Announced:
    """This peer's contribution to a round, announced (or not: ``failure``)."""

    work: RoundWork
    own: torch.Tensor
    """This peer's decoded payload (added back to the residual if the round leaves it out)."""
    payload_bytes: int
    base_root: str
    failure: str | None = None


@dataclass(frozen=True)
class Settled:
    """A round decided and, unless ``failure``, its update in hand."""

    decision: RoundDecision | None
    update: torch.Tensor | None
    """The combined update (None: nobody contributed, or ``failure``)."""
    failure: str | None
    """Why this peer could not compute the round's update (it is then out of step)."""
    seconds: float
    """From the start of the read to the update in hand."""
    entered: bool = False
    """This peer's own payload is in the update."""
    credit: tuple[tuple[str, int], ...] = ()
    """(peer id, samples) of every payload the update holds whose author another peer's signed
    receipt says held it (``Availability.witnessed``): a round earns credit only on that evidence."""
    void: str | None = None
    """Why the round is void for this peer (a member's payload could not be had from anyone)."""
    left_out: str | None = None
    """Why this peer's payload, a member of the decision, was left out (nobody else held it)."""
    dropped: int = 0
    """Members of the decision left out because nobody but their author held their payload."""

    @property
    def members(self) -> int:
        return len(self.decision.members) if self.decision is not None else 0


@dataclass(frozen=True)
class RoundOutcome:
    """What a round did for this peer; one line of the log."""

    round: int
    loss: float
    samples: int
    samples_per_second: float
    """Samples over the seconds of inner steps plus the seconds spent idle waiting on the network."""
    contributors: int
    """Payloads in the round's update (this peer's included or not)."""
    entered: bool
    """This peer's payload is in the update (its samples earn credit)."""
    waiting: bool
    """This peer's payload was left out (more than G contributed): its work stays in the residual."""
    void: str | None
    """The round was void here (a payload nobody served): nothing applied, the work back in the residual."""
    failure: str | None
    compute_seconds: float
    network_seconds: float
    """From the read of the round's announcements to its update in hand (overlapped with compute)."""
    wait_seconds: float
    """Of this round, the seconds this peer sat idle."""
    payload_bytes: int

    @property
    def averaged(self) -> bool:
        return self.failure is None and self.contributors >= 2

    def to_log(self) -> dict:
        return asdict(self) | {"averaged": self.averaged}


class RoundExchanger:
    """Owns the codec, the error-feedback residual and this peer's side of every round."""

    def __init__(self, node: SwarmNode, manifest: RunManifest, key: SigningKey | None, peer_id: str,
                 workdir: Path | None, numel: int):
        self.node, self.key, self.peer_id, self.numel = node, key, peer_id, numel
        self.run_id = manifest.run_id
        averaging, training = manifest.config.averaging, manifest.config.training
        self.averaging = averaging
        self.codec = parse_codec(averaging.codec)
        self.payload_size = payload_size(self.codec, numel)
        self.clock = clock_of(manifest)
        self.max_weight = float(training.inner_steps * training.batch_size)
        self.residual_path = workdir / RESIDUAL_FILE if workdir is not None else None
        self.residual = self._load_residual()
        self.recent: list[str] = []
        """libp2p ids of the latest decided round's announcers."""

    def _load_residual(self) -> torch.Tensor:
        """The residual a previous life of this peer saved for this run and codec, else zeros."""
        if self.residual_path is None:
            return torch.zeros(self.numel)
        try:
            with safe_open(str(self.residual_path), framework="pt") as saved:
                metadata = saved.metadata() or {}
                residual = saved.get_tensor("residual") if "residual" in saved.keys() else None
        except (OSError, SafetensorError, ValueError, TypeError, RuntimeError):  # odd shapes raise the last two
            return torch.zeros(self.numel)
        fits = metadata.get("run_id") == self.run_id and metadata.get("codec") == self.codec.name
        if not fits or residual is None or residual.shape != (self.numel,) or residual.dtype != torch.float32:
            return torch.zeros(self.numel)
        return residual if bool(torch.isfinite(residual).all()) else torch.zeros(self.numel)

    def _save_residual(self, round_: int) -> None:
        if self.residual_path is None:
            return
        metadata = {"run_id": self.run_id, "codec": self.codec.name, "round": str(round_)}
        write_atomic(self.residual_path, save_safetensors({"residual": self.residual.contiguous()}, metadata))

    def announce(self, work: RoundWork, delta: torch.Tensor, *, base_root: str) -> Announced:
        """Compress Δ (with the residual), keep the payload in the store, announce it."""
        payload, self.residual = compress_with_feedback(self.codec, delta, self.residual, decay=self.averaging.error_feedback_decay)
        self._save_residual(work.round)
        own = decode(payload, self.codec, self.numel)
        announced = Announced(work, own, len(payload), base_root)
        try:
            digest = self.node.hold_payload(payload, notify=self._keepers(work.round))
            record = RoundAnnouncement.signed(
                self.key, run_id=self.run_id, round=work.round, weight=float(work.samples), codec=self.codec.name,
                payload_size=len(payload), payload_sha256=digest, base_root=base_root, loss=work.loss,
                p2p_id=self.node.p2p_id, time=time.time(),
            )
            ttl = min(ANNOUNCE_ROUNDS * self.clock.seconds + 60.0, MAX_TTL["announcement"])  # the DHT's cap
            if not self.node.store(announcement_key(self.run_id, work.round), record.to_bytes(), ttl=ttl,
                                   subkey=self.peer_id):
                announced.failure = "the DHT did not take this round's announcement"
        except (TransportError, DeadlineExceeded) as error:
            announced.failure = str(error)
        if announced.failure is not None:
            self.take_back(announced)
        return announced

    def _keepers(self, round_: int) -> list[str]:
        """Two announcers of the latest decided round (by a hash of this peer and round): asked to
        fetch this peer's payload at once, so that it outlives this peer if it dies right after."""
        others = sorted(h for h in self.recent if h != self.node.p2p_id)
        random.Random(f"{self.peer_id}:{round_}").shuffle(others)
        return others[:KEEPERS]

    def take_back(self, announced: Announced) -> None:
        """The round did not take this payload: its values go back to the residual (sent later)."""
        self.residual += announced.own
        self._save_residual(announced.work.round)

    def decide(self, round_: int) -> RoundDecision:
        """One read of the round's announcements, and the pure decision over them."""
        raw = self.node.fetch(announcement_key(self.run_id, round_))
        return decide(raw if isinstance(raw, dict) else {}, round_=round_, run_id=self.run_id, codec=self.codec.name,
                      payload_size=self.payload_size, max_weight=self.max_weight,
                      max_contributors=self.averaging.max_contributors,
                      latest_time=self.clock.latest_announcement(round_))

    def settle(self, round_: int, state_root: str, own: Announced | None = None,
               stop=lambda: False) -> Settled:
        """Round ``round_``'s update for a peer holding the consensus ``state_root`` (waits until the
        round is decided; the fetch is bounded by ``round_deadline_seconds``)."""
        while (wait := self.clock.decided(round_) - time.time()) > 0 and not stop():
            time.sleep(min(wait, 0.25))
        started = time.monotonic()
        try:
            decision = self.decide(round_)
        except (TransportError, DeadlineExceeded) as error:
            # the payload is not taken back: the round may hold it (a replay of the round tells)
            return Settled(None, None, f"could not read the round's announcements: {error}", time.monotonic() - started)
        self.recent = [m.p2p_id for m in (*decision.members, *decision.waiting)]
        entered = own is not None and own.failure is None and decision.holds(self.peer_id)
        if own is not None and own.failure is None and not entered:
            self.take_back(own)
        if decision.empty:
            return Settled(decision, None, None, time.monotonic() - started)
        if decision.base_root != state_root:
            why = f"the round built on consensus {decision.base_root[:16]}, this peer holds {state_root[:16]}"
            return Settled(decision, None, why, time.monotonic() - started, entered)
        # the fetch of the payloads the receipts name is bounded by round_deadline_seconds after their read
        budget = time.monotonic() + max(0.0, self.clock.receipts_read(round_) - time.time()) \
            + self.averaging.round_deadline_seconds
        left_out = None
        announcers = (*decision.members, *decision.waiting)
        payloads: dict[str, bytes] = {}
        if len(announcers) == 1:  # the round's only announcer: nobody else could hold its payload
            availability = available(decision, {}, run_id=self.run_id, latest_time=0.0)
        else:
            availability, payloads, failure = self._availability(round_, decision, own, announcers, stop)
            if failure is not None:
                return Settled(decision, None, failure, time.monotonic() - started)
        dropped = len(availability.dropped)
        if availability.dropped:  # announced and held by nobody else: left out by every peer alike
            decision = dataclasses.replace(decision, members=availability.members,
                                           rejected=decision.rejected + availability.dropped)
            if entered and not decision.holds(self.peer_id):
                self.take_back(own)
                entered = False
                left_out = "no other peer said it held this peer's payload in time"
        if decision.empty:
            return Settled(decision, None, None, time.monotonic() - started, left_out=left_out, dropped=dropped)
        missing = [m for m in decision.members if m.payload_sha256 not in payloads]
        if missing:
            payloads |= self._fetch(missing, availability.holders, announcers, budget - time.monotonic())
        missing = [m for m in decision.members if m.payload_sha256 not in payloads]
        if missing:
            # A payload another peer said it held but nobody served in time: the round is void
            # here, θ stays as it is, and this peer's payload goes back to its residual. Peers that
            # did fetch everything apply the round; the next round's base root says which side the
            # swarm is on, and a peer on the other one repairs (it knows both outcomes).
            if entered:
                self.take_back(own)
            void = f"{len(missing)} of the round's {len(decision.members)} payloads did not arrive"
            return Settled(decision, None, None, time.monotonic() - started, void=void, left_out=left_out,
                           dropped=dropped)
        entries = [(_member(m).to_wire(), payloads[m.payload_sha256]) for m in decision.members]
        try:
            group = combine(entries, codec=self.codec, numel=self.numel, round=round_, max_weight=self.max_weight,
                            base_root=decision.base_root, aggregation=self.averaging.aggregation)
        except InputError:  # no payload usable: every peer rejects the same ones, so the round is empty everywhere
            return Settled(decision, None, None, time.monotonic() - started, dropped=dropped)
        return Settled(decision, group.update, None, time.monotonic() - started,
                       entered and self.peer_id in {m.peer_id for m in group.members},
                       tuple((m.peer_id, int(m.weight)) for m in group.members if m.peer_id in availability.witnessed),
                       left_out=left_out, dropped=dropped)

    def _availability(self, round_: int, decision: RoundDecision, own: Announced | None, announcers,
                      stop) -> tuple[Availability, dict[str, bytes], str | None]:
        """Live (before the round's receipts are due): fetch the members' payloads, then sign what
        this peer holds if it announced on the base root. Then read the round's receipts once:
        (which members are available, the payloads in hand, why the receipts could not be read)."""
        payloads: dict[str, bytes] = {}
        # a quarter of the settle time is left to sign and store the receipt before it is due
        if (first := self.clock.held_by(round_) - self.clock.settle / 4 - time.time()) > 0:
            payloads = self._fetch(decision.members, {}, announcers, first)
            signer = own is not None and own.failure is None and any(a.peer_id == self.peer_id for a in announcers)
            if signer and time.time() <= self.clock.held_by(round_):  # a late receipt would not count
                self._receipt(round_, decision.base_root, sorted(payloads))
        while (wait := self.clock.receipts_read(round_) - time.time()) > 0:
            if stop():  # reading now would find few receipts and drop members others keep
                return available(decision, {}, run_id=self.run_id, latest_time=0.0), payloads, \
                    "stopped before the round's receipts were read"
            time.sleep(min(wait, 0.25))
        try:
            raw = self.node.fetch(receipt_key(self.run_id, round_))
        except (TransportError, DeadlineExceeded) as error:
            return available(decision, {}, run_id=self.run_id, latest_time=0.0), payloads, \
                f"could not read the round's receipts: {error}"
        receipts = raw if isinstance(raw, dict) else {}
        return available(decision, receipts, run_id=self.run_id, latest_time=self.clock.held_by(round_)), payloads, None

    def _fetch(self, members, receipted: dict[str, tuple[str, ...]], announcers, timeout: float) -> dict[str, bytes]:
        """The payloads of ``members`` that arrived within ``timeout``: each asked of the peers whose
        receipts name it first, then of its author, then of the round's other announcers."""
        if timeout <= 0 or not members:
            return {}
        wanted = []
        for member in members:
            others = [a.p2p_id for a in announcers if a.p2p_id != member.p2p_id]
            random.Random(f"{self.peer_id}{member.payload_sha256}").shuffle(others)
            named = [h for h in receipted.get(member.payload_sha256, ()) if h != member.p2p_id]
            random.Random(f"{self.peer_id}{member.payload_sha256}").shuffle(named)
            # the author second: the first ask spreads the load over holders that already have it
            order = [*named[:1], *others[:1], member.p2p_id, *named[1:], *others[1:]]
            wanted.append((member.payload_sha256, member.payload_size, list(dict.fromkeys(order))))
        try:
            return self.node.fetch_payloads(wanted, timeout=timeout)
        except (TransportError, DeadlineExceeded):
            return {}

    def _receipt(self, round_: int, base_root: str, held: list[str]) -> None:
        """Sign and store this peer's receipt for the payloads of ``round_`` it holds (a failure to
        store it only means its word is not counted)."""
        receipt = PayloadReceipt.signed(self.key, run_id=self.run_id, round=round_, base_root=base_root, held=held,
                                        p2p_id=self.node.p2p_id, time=time.time())
        ttl = min(ANNOUNCE_ROUNDS * self.clock.seconds + 60.0, MAX_TTL["receipt"])
        try:
            self.node.store(receipt_key(self.run_id, round_), receipt.to_bytes(), ttl=ttl, subkey=self.peer_id)
        except (TransportError, DeadlineExceeded):
            pass


def _member(record: RoundAnnouncement) -> GroupMember:
    return GroupMember(peer_id=record.peer_id, round=record.round, weight=record.weight, codec=record.codec,
                       payload_size=record.payload_size, payload_sha256=record.payload_sha256,
                       base_root=record.base_root)
