"""One consensus per round, at any swarm size: the clock, and the contributor set as a pure function.

    round r          the wall-clock window [start + r·W, start + (r + 1)·W)   (W: round_seconds,
                     start: the manifest's created_at), the same for every peer with a sane clock
    at its close     each peer with work announces it (``RoundAnnouncement``: payload sha256,
                     size, weight, base root), one subkey of the round's DHT key
    at close + S     every peer (and the coordinator, and any follower) reads that key once and
                     calls ``decide``: the same records give the same ``RoundDecision``
    until + W/4      each announcer on the base root fetches the members' payloads and signs a
                     ``PayloadReceipt`` naming those it holds, one subkey of the round's receipt key
    then + S/2       every reader reads the receipts once and calls ``available``: a member whose
                     payload no peer but its author holds is left out, by every peer alike (a
                     payload announced and then withheld cannot void the round)

``decide`` uses nothing but the records and the manifest: valid records (signed, naming the
signer's own libp2p id, this run and round, the codec's exact payload size, a weight a round can hold, announced by the close plus
half the settle time); of those, the ones on the base root most of them name (a tie goes to the
smaller root); of those, at most G (``max_contributors``), the G with the smallest
``priority(round, peer_id)``, a hash that rotates who gets in from round to round. A peer left
out keeps its work in its error-feedback residual and sends it in a later round. No leader picks
the set, so no single peer can censor it; a peer whose own consensus is not the decision's base
root knows it is out of step and repairs by replaying the rounds it missed (docs/protocol.md,
"Rounds").
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import MalformedRecord, VerificationError
from protocol.multiaddr import libp2p_id_of
from protocol.records import PayloadReceipt, RoundAnnouncement

__all__ = ["RoundClock", "RoundDecision", "Availability", "decide", "available", "priority", "announcement_key",
           "receipt_key"]


def announcement_key(run_id: str, round_: int) -> str:
    """The DHT key holding round ``round_``'s announcements (one subkey per peer id)."""
    return f"{run_id}.round.{round_}"


def receipt_key(run_id: str, round_: int) -> str:
    """The DHT key holding round ``round_``'s payload receipts (one subkey per peer id)."""
    return f"{run_id}.held.{round_}"


@dataclass(frozen=True)
class RoundClock:
    """The run's rounds as wall-clock windows."""

    start: float
    """Unix time at which round 0 opens (the manifest's ``created_at``)."""
    seconds: float
    """W: the length of one round."""
    settle: float
    """S: how long after a round's close its announcements are read."""

    def round_at(self, now: float) -> int:
        """The round whose window holds ``now`` (0 before the start)."""
        return max(0, math.floor((now - self.start) / self.seconds))

    def opens(self, round_: int) -> float:
        return self.start + round_ * self.seconds

    def closes(self, round_: int) -> float:
        return self.start + (round_ + 1) * self.seconds

    def decided(self, round_: int) -> float:
        """When round ``round_``'s announcements are read: its close plus the settle time."""
        return self.closes(round_) + self.settle

    def latest_announcement(self, round_: int) -> float:
        """The latest signed time an announcement of ``round_`` may carry."""
        return self.closes(round_) + self.settle / 2

    def held_by(self, round_: int) -> float:
        """The latest signed time a payload receipt of ``round_`` may carry: its payloads are
        fetched from the decision until then (a quarter window)."""
        return self.decided(round_) + self.seconds / 4

    def receipts_read(self, round_: int) -> float:
        """When round ``round_``'s receipts are read, and its members' availability decided."""
        return self.held_by(round_) + self.settle / 2


def priority(round_: int, peer_id: str) -> bytes:
    """The order in which a round takes valid contributions (smallest first)."""
    return hashlib.sha256(b"barnraise.round" + round_.to_bytes(8, "big") + bytes.fromhex(peer_id)).digest()


@dataclass(frozen=True)
class RoundDecision:
    """Who is in round ``round`` and on which consensus; equal for every peer that read the same records."""

    round: int
    base_root: str | None
    """The consensus root the members' outer gradients were measured from (None: nobody announced)."""
    members: tuple[RoundAnnouncement, ...]
    """At most G announcements, in ascending peer-id order (the order ``combine`` sums in)."""
    waiting: tuple[RoundAnnouncement, ...]
    """Valid announcements on the base root beyond the first G: their work waits for a later round."""
    rejected: tuple[str, ...]
    """One line per record left out, saying why (other roots included)."""

    @property
    def empty(self) -> bool:
        return not self.members

    def holds(self, peer_id: str) -> bool:
        return any(m.peer_id == peer_id for m in self.members)

    @property
    def digest(self) -> str:
        """sha256 of the ordered (peer id, payload sha256) list: equal decisions, equal digests."""
        text = "".join(f"{m.peer_id}:{m.payload_sha256};" for m in self.members)
        return hashlib.sha256(f"{self.round}|{self.base_root}|{text}".encode()).hexdigest()


def decide(records: Mapping[str, bytes], *, round_: int, run_id: str, codec: str, payload_size: int,
           max_weight: float, max_contributors: int, latest_time: float) -> RoundDecision:
    """The contributor set of round ``round_`` from the raw records of its DHT key (subkey -> bytes)."""
    valid: list[RoundAnnouncement] = []
    rejected: list[str] = []
    for subkey, raw in sorted(records.items()):
        try:
            record = _check(subkey, raw, round_=round_, run_id=run_id, codec=codec, payload_size=payload_size,
                            max_weight=max_weight, latest_time=latest_time)
        except (MalformedRecord, VerificationError) as error:
            rejected.append(f"{str(subkey)[:16]}: {error}")
            continue
        valid.append(record)
    if not valid:
        return RoundDecision(round_, None, (), (), tuple(rejected))
    counts = Counter(r.base_root for r in valid)
    base_root, _ = min(counts.items(), key=lambda item: (-item[1], item[0]))
    rejected += [f"{r.peer_id}: computed on another consensus (root {r.base_root[:16]})"
                 for r in valid if r.base_root != base_root]
    on_base = sorted((r for r in valid if r.base_root == base_root), key=lambda r: priority(round_, r.peer_id))
    members = tuple(sorted(on_base[:max_contributors], key=lambda r: r.peer_id))
    return RoundDecision(round_, base_root, members, tuple(on_base[max_contributors:]), tuple(rejected))


def _check(subkey: object, raw: object, *, round_: int, run_id: str, codec: str, payload_size: int,
           max_weight: float, latest_time: float) -> RoundAnnouncement:
    if not isinstance(raw, bytes):
        raise MalformedRecord("not bytes")
    record = RoundAnnouncement.from_bytes(raw).verify()
    if record.peer_id != subkey:
        raise MalformedRecord(f"stored under subkey {str(subkey)[:16]}, signed by {record.peer_id}")
    if record.p2p_id != libp2p_id_of(record.peer_key):  # its payload would be asked of another peer
        raise MalformedRecord(f"names libp2p id {record.p2p_id[:60]!r}, not its own key's")
    if record.run_id != run_id:
        raise MalformedRecord(f"run {record.run_id}, not {run_id}")
    if record.round != round_:
        raise MalformedRecord(f"round {record.round}, not {round_}")
    if record.codec != codec or record.payload_size != payload_size:
        raise MalformedRecord(f"codec {record.codec!r} of {record.payload_size} bytes, not {codec!r} of {payload_size}")
    if record.weight > max_weight:
        raise MalformedRecord(f"weight {record.weight:g} is more than a round holds ({max_weight:g})")
    if record.time > latest_time:
        raise MalformedRecord(f"announced {record.time - latest_time:.1f} s after the round's last moment")
    return record


@dataclass(frozen=True)
class Availability:
    """Which of a decision's members a peer other than their author holds (by signed receipts)."""

    members: tuple[RoundAnnouncement, ...]
    """The decision's members whose payloads are available, in the decision's order."""
    holders: dict[str, tuple[str, ...]]
    """payload sha256 -> libp2p ids of the peers whose receipts name it (to fetch it from)."""
    dropped: tuple[str, ...]
    """One line per member left out: its payload was held by nobody but its author."""
    rejected: tuple[str, ...]
    """One line per receipt not counted, saying why."""
    witnessed: frozenset[str] = frozenset()
    """Key ids of the kept members whose payload another announcer signed it held: the evidence a
    round's credit rests on (a lone announcer is kept, unwitnessed, and earns no credit)."""


def available(decision: RoundDecision, receipts: Mapping[str, bytes], *, run_id: str,
              latest_time: float) -> Availability:
    """The members of ``decision`` whose payloads at least one other announcer of the round on its
    base root (a member, or one left waiting) holds, from the raw records of the round's receipt
    key (subkey -> bytes). A member that is the round's only such announcer needs no receipt.

    A receipt counts when it is signed, stored under its signer's id, names the signer's own
    libp2p id, this run, round and base root, was signed by ``latest_time``, and its signer
    announced on the base root. Pure: every peer that read the same receipts keeps the same set.
    """
    announcers = {m.peer_id: m for m in (*decision.members, *decision.waiting)}
    holders: dict[str, list[str]] = {}
    rejected: list[str] = []
    for subkey, raw in sorted(receipts.items()):
        try:
            receipt = _check_receipt(subkey, raw, decision=decision, run_id=run_id, latest_time=latest_time)
            if receipt.peer_id not in announcers:
                raise MalformedRecord("its signer did not announce on the round's base root")
        except (MalformedRecord, VerificationError) as error:
            rejected.append(f"{str(subkey)[:16]}: {error}")
            continue
        for digest in receipt.held:
            holders.setdefault(digest, []).append(receipt.peer_id)
    alone = len(announcers) == 1
    kept, dropped, witnessed = [], [], set()
    for member in decision.members:
        others = [p for p in holders.get(member.payload_sha256, ()) if p != member.peer_id]
        if others:
            witnessed.add(member.peer_id)
        if others or alone:
            kept.append(member)
        else:
            dropped.append(f"{member.peer_id}: its payload {member.payload_sha256[:16]} was held by nobody else")
    by_id = {p: announcers[p].p2p_id for p in announcers}
    return Availability(tuple(kept), {d: tuple(by_id[p] for p in ps) for d, ps in holders.items()},
                        tuple(dropped), tuple(rejected), frozenset(witnessed))


def _check_receipt(subkey: object, raw: object, *, decision: RoundDecision, run_id: str,
                   latest_time: float) -> PayloadReceipt:
    if not isinstance(raw, bytes):
        raise MalformedRecord("not bytes")
    receipt = PayloadReceipt.from_bytes(raw).verify()
    if receipt.peer_id != subkey:
        raise MalformedRecord(f"stored under subkey {str(subkey)[:16]}, signed by {receipt.peer_id}")
    if receipt.p2p_id != libp2p_id_of(receipt.peer_key):
        raise MalformedRecord(f"names libp2p id {receipt.p2p_id[:60]!r}, not its own key's")
    if receipt.run_id != run_id or receipt.round != decision.round:
        raise MalformedRecord(f"of run {receipt.run_id} round {receipt.round}, not {run_id} round {decision.round}")
    if receipt.base_root != decision.base_root:
        raise MalformedRecord(f"on consensus {receipt.base_root[:16]}, not the round's")
    if receipt.time > latest_time:
        raise MalformedRecord(f"signed {receipt.time - latest_time:.1f} s after the round's receipts were due")
    return receipt
