"""The coordinator's view of the run, built from the peers' signed progress records."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from peer.progress import PROGRESS_TTL, SwarmView
from protocol.records import Contribution, LedgerEntry, PeerProgress

__all__ = ["Tracker"]


@dataclass
class Tracker:
    """Global round, live peers, per-peer sample totals; fed one ``SwarmView`` at a time."""

    run_id: str
    totals: dict[str, int] = field(default_factory=dict)
    """Largest cumulative sample count each peer ever reported (never decreases)."""
    latest: dict[str, PeerProgress] = field(default_factory=dict)
    rejected: int = 0
    updated_at: float = 0.0

    def seed_from_ledger(self, head: LedgerEntry) -> None:
        for contribution in head.contributors:
            self.totals[contribution.peer_id] = max(self.totals.get(contribution.peer_id, 0), contribution.samples)

    def update(self, view: SwarmView) -> None:
        for record in view.records.values():
            known = self.latest.get(record.peer_id)
            if known is None or record.time >= known.time:
                self.latest[record.peer_id] = record
            self.totals[record.peer_id] = max(self.totals.get(record.peer_id, 0), record.samples)
        self.rejected = view.rejected
        self.updated_at = time.time()

    def alive(self, now: float | None = None) -> list[PeerProgress]:
        now = time.time() if now is None else now
        return sorted((r for r in self.latest.values() if now - r.time <= PROGRESS_TTL), key=lambda r: r.peer_id)

    @property
    def global_round(self) -> int:
        return max((r.round for r in self.alive()), default=0)

    def contributions(self) -> list[Contribution]:
        return [Contribution(peer_id=p, samples=s) for p, s in sorted(self.totals.items()) if s > 0]

    def peer_maddrs(self) -> list[str]:
        return [a for r in self.alive() for a in r.maddrs[:2]]

    def status(self, head: LedgerEntry | None) -> dict:
        now = time.time()
        alive = self.alive(now)
        losses = [r.loss for r in alive if r.samples > 0]
        return {
            "run_id": self.run_id,
            "global_round": self.global_round,
            "alive_peers": len(alive),
            "total_samples": sum(self.totals.values()),
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "rejected_records": self.rejected,
            "updated_at": self.updated_at,
            "last_checkpoint": None if head is None else {
                "seq": head.seq, "round": head.round, "root": head.checkpoint_root, "heldout_loss": head.heldout_loss,
            },
            "peers": [
                {
                    "peer_id": r.peer_id,
                    "round": r.round,
                    "samples": self.totals.get(r.peer_id, r.samples),
                    "loss": r.loss,
                    "samples_per_second": r.samples_per_second,
                    "averaged_with": r.averaged_with,
                    "averaged": r.averaged,
                    "network_seconds": r.network_seconds,
                    "seconds_since_report": round(now - r.time, 1),
                }
                for r in alive
            ],
        }
