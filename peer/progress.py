"""Reading and writing signed progress records in the DHT (through a ``SwarmNode``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protocol.consensus import RoundClock
from protocol.errors import MalformedRecord, VerificationError
from protocol.policy import progress_problem
from protocol.records import PeerProgress

__all__ = ["progress_key", "MANIFEST_KEY", "MANIFEST_TTL", "SwarmView", "read_progress", "PROGRESS_TTL"]

MANIFEST_KEY = "barnraise.manifest"
PROGRESS_TTL = 120.0
"""Seconds a progress record stays in the DHT; a peer silent that long is gone."""
MANIFEST_TTL = 600.0
"""Seconds the signed manifest (the same bytes for the whole run) stays in the DHT after a store.
The coordinator re-stores it every half of this; peers only when it is about to lapse."""


def progress_key(run_id: str) -> str:
    return f"{run_id}.progress"


@dataclass(frozen=True)
class SwarmView:
    """The believed progress records of a run's peers (verified, and passing
    ``protocol.policy.progress_problem``), and how many were rejected, why."""

    records: dict[str, PeerProgress]
    rejected: int
    read_at: float = 0.0
    """Unix time of the read: a record is alive if signed within ``PROGRESS_TTL`` of it."""
    reasons: tuple[str, ...] = ()
    """One line per rejected record (the first few)."""
    kinds: dict[str, int] = field(default_factory=dict)
    """Rejected records by kind: ``malformed`` (undecodable, badly signed), ``foreign`` (of another
    run, or under another peer's subkey), ``policy`` (``protocol.policy.progress_problem``)."""

    def alive(self, within: float = PROGRESS_TTL) -> list[PeerProgress]:
        return [r for r in self.records.values() if self.read_at - r.time <= within]


def read_progress(node, run_id: str, *, clock: RoundClock, local: bool = False) -> SwarmView:
    """Fetch, decode, verify every peer's progress record; drop (and count) the ones not believed:
    malformed, badly signed, of another run, under another peer's subkey, signed in the future or
    at a round the run's clock has not reached. ``local``: only the records this node stores
    itself (no network; all of them in a swarm of up to 5 nodes)."""
    raw = node.fetch_local(progress_key(run_id)) if local else node.fetch(progress_key(run_id))
    now = time.time()
    records, reasons, kinds = {}, [], {"malformed": 0, "foreign": 0, "policy": 0}
    for subkey, value in (raw or {}).items() if isinstance(raw, dict) else ():
        try:
            record = PeerProgress.from_bytes(value).verify()
        except (MalformedRecord, VerificationError) as error:
            reasons.append(f"{str(subkey)[:16]}: {error}")
            kinds["malformed"] += 1
            continue
        if record.run_id != run_id or record.peer_id != subkey:
            reasons.append(f"{str(subkey)[:16]}: of run {record.run_id} by peer {record.peer_id}")
            kinds["foreign"] += 1
            continue
        if (problem := progress_problem(record, now=now, clock=clock)) is not None:
            reasons.append(problem)
            kinds["policy"] += 1
            continue
        records[record.peer_id] = record
    return SwarmView(records, len(reasons), now, tuple(reasons[:8]), kinds)
