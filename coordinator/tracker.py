"""The coordinator's view of the run, built from the peers' signed progress records."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field

from peer.progress import PROGRESS_TTL, SwarmView
from protocol.multiaddr import checked_multiaddrs
from protocol.policy import plausible_samples, swarm_round
from protocol.records import Contribution, LedgerEntry, PeerProgress

__all__ = ["Tracker", "MAX_CONTRIBUTORS", "relayed"]

MAX_CONTRIBUTORS = 4000
"""Contributors one ledger entry lists (the wire decoder caps a list at 4096 items)."""


def relayed(record: PeerProgress) -> bool:
    """Whether a peer is reached only through a relay: every address it publishes is a circuit."""
    return bool(record.maddrs) and all("/p2p-circuit" in a for a in record.maddrs)


@dataclass
class Tracker:
    """Global round, live peers, per-peer sample totals; fed one ``SwarmView`` at a time."""

    run_id: str
    samples_per_round: int
    """H × batch size: a peer cannot honestly claim more than this per round it has reached."""
    totals: dict[str, int] = field(default_factory=dict)
    """Largest cumulative sample count each peer ever reported (never decreases)."""
    latest: dict[str, PeerProgress] = field(default_factory=dict)
    arrived: dict[str, float] = field(default_factory=dict)
    """When each peer's latest record was first read here: liveness is judged by arrival, not by
    the time the record claims."""
    rejected: int = 0
    rejected_kinds: dict[str, int] = field(default_factory=dict)
    """Records not believed at the last read, by kind (``peer.progress.SwarmView.kinds``)."""
    updated_at: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """``update`` runs on a worker thread while HTTP handlers read: every access holds it."""

    def seed_from_ledger(self, head: LedgerEntry) -> None:
        with self.lock:
            self._seed(head)

    def _seed(self, head: LedgerEntry) -> None:
        for contribution in head.contributors:
            self.totals[contribution.peer_id] = max(self.totals.get(contribution.peer_id, 0), contribution.samples)

    def update(self, view: SwarmView) -> None:
        with self.lock:
            for record in view.records.values():
                known = self.latest.get(record.peer_id)
                if known is None or (record.time > known.time and record.signature != known.signature):
                    self.latest[record.peer_id] = record
                    self.arrived[record.peer_id] = view.read_at or time.time()
                plausible = plausible_samples(record, self.samples_per_round)
                self.totals[record.peer_id] = max(self.totals.get(record.peer_id, 0), plausible)
            self.rejected = view.rejected
            self.rejected_kinds = dict(view.kinds)
            self.updated_at = time.time()

    def alive(self, now: float | None = None) -> list[PeerProgress]:
        now = time.time() if now is None else now
        with self.lock:
            return sorted((r for r in self.latest.values() if now - self.arrived[r.peer_id] <= PROGRESS_TTL),
                          key=lambda r: r.peer_id)

    @property
    def global_round(self) -> int:
        """The median round of the live peers (``protocol.policy.swarm_round``), not the max."""
        return max(0, swarm_round(self.alive()))

    def contributions(self) -> list[Contribution]:
        """The largest contributors (at most ``MAX_CONTRIBUTORS``, what one ledger entry holds)."""
        with self.lock:
            largest = sorted(((s, p) for p, s in self.totals.items() if s > 0), reverse=True)[:MAX_CONTRIBUTORS]
        return [Contribution(peer_id=p, samples=s) for s, p in sorted(largest, key=lambda item: item[1])]

    def peer_maddrs(self) -> list[str]:
        """Up to 2 valid addresses of each live peer (its own libp2p id only), peers in random order:
        made-up low peer ids cannot crowd honest peers out of ``/bootstrap`` and ``swarm.json``."""
        alive = self.alive()
        random.shuffle(alive)
        return [a for r in alive for a in checked_multiaddrs(r.maddrs, limit=2, p2p_id=r.p2p_id).kept]

    def status(self, head: LedgerEntry | None) -> dict:
        now = time.time()
        alive = self.alive(now)
        with self.lock:
            totals = dict(self.totals)
        losses = [r.loss for r in alive if r.samples > 0]
        return {
            "run_id": self.run_id,
            "global_round": self.global_round,
            "alive_peers": len(alive),
            "total_samples": sum(totals.values()),
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "rejected_records": self.rejected,
            "rejected_by_reason": dict(self.rejected_kinds),
            "samples_per_second": sum(r.samples_per_second for r in alive),
            "updated_at": self.updated_at,
            "last_checkpoint": None if head is None else {
                "seq": head.seq, "round": head.round, "root": head.checkpoint_root, "heldout_loss": head.heldout_loss,
            },
            "peers": [
                {
                    "peer_id": r.peer_id,
                    "round": r.round,
                    "samples": totals.get(r.peer_id, r.samples),
                    "loss": r.loss,
                    "samples_per_second": r.samples_per_second,
                    "averaged_with": r.averaged_with,
                    "averaged": r.averaged,
                    "network_seconds": r.network_seconds,
                    "seconds_since_report": round(now - self.arrived[r.peer_id], 1),
                    "samples_reported": r.samples,
                    "peer_key": r.peer_key,
                    "state_root": r.state_root,
                    "p2p_id": r.p2p_id,
                    "maddrs": list(r.maddrs),
                    "relayed": relayed(r),
                    "time": r.time,
                }
                for r in alive
            ],
        }
