"""One consensus per round, at any swarm size: the clock, and the contributor set as a pure function.

    round r          the wall-clock window [start + r·W, start + (r + 1)·W)   (W: round_seconds,
                     start: the manifest's created_at), the same for every peer with a sane clock
    at its close     each peer with work announces it (``RoundAnnouncement``: payload sha256,
                     size, weight, base root), one subkey of the round's DHT key
    at close + S     every peer (and the coordinator, and any follower) reads that key once and
                     calls ``decide``: the same records give the same ``RoundDecision``

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
from protocol.records import RoundAnnouncement

__all__ = ["RoundClock", "RoundDecision", "decide", "priority", "announcement_key"]


def announcement_key(run_id: str, round_: int) -> str:
    """The DHT key holding round ``round_``'s announcements (one subkey per peer id)."""
    return f"{run_id}.round.{round_}"


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
