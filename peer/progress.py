"""Reading and writing signed progress records in the DHT (through a ``SwarmNode``)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from protocol.errors import MalformedRecord, VerificationError
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
    """The verified progress records of a run's peers, and how many were rejected."""

    records: dict[str, PeerProgress]
    rejected: int

    def alive(self, within: float = PROGRESS_TTL, now: float | None = None) -> list[PeerProgress]:
        now = time.time() if now is None else now
        return [r for r in self.records.values() if now - r.time <= within]

    @property
    def max_round(self) -> int:
        return max((r.round for r in self.alive()), default=-1)


def read_progress(node, run_id: str, *, local: bool = False) -> SwarmView:
    """Fetch, decode, verify every peer's progress record; drop (and count) bad ones. ``local``:
    only the records this node stores itself (no network; all of them in a swarm of up to 5 nodes)."""
    raw = node.fetch_local(progress_key(run_id)) if local else node.fetch(progress_key(run_id))
    records, rejected = {}, 0
    for subkey, value in (raw or {}).items() if isinstance(raw, dict) else ():
        try:
            record = PeerProgress.from_bytes(value).verify()
        except (MalformedRecord, VerificationError):
            rejected += 1
            continue
        if record.run_id != run_id or record.peer_id != subkey:
            rejected += 1
            continue
        records[record.peer_id] = record
    return SwarmView(records, rejected)
