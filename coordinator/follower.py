"""The coordinator's copy of the consensus, moved round by round from the rounds' own payloads.

The combine is deterministic, so the coordinator follows the swarm the way a peer does: once a
round is decided it reads the round's announcements, fetches the members' payloads from any
holder, checks each against its announced sha256, and takes the same outer step
(``peer.rounds.RoundExchanger.settle``, ``peer.state.outer_step``). Checkpoints are then written
from that state: computed from verified payloads, not taken on one donor's word, and no volunteer
uploads a full state for them. Credit is the samples of the payloads a round's update holds
that another peer signed it held (``Settled.credit``): a lone announcer's rounds earn none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from peer.rounds import ANNOUNCE_ROUNDS, RoundExchanger, Settled, clock_of
from peer.state import RoundState, StateLayout, outer_step
from peer.swarm import SwarmNode
from protocol.manifest import RunManifest
from protocol.records import LedgerEntry

__all__ = ["Follower", "FOLLOWER_ID"]

FOLLOWER_ID = "0" * 16
"""The follower's id in ``settle`` (it has no key and never contributes)."""
_MARGIN = 0.3
"""Seconds after a round is decided before the follower reads it."""


class Follower:
    """Replays decided rounds onto ``state``; ``changed`` says whether any round moved it."""

    def __init__(self, node: SwarmNode, manifest: RunManifest, state: RoundState, layout: StateLayout,
                 head: LedgerEntry, observe: Callable[[Settled, RoundState], None] = lambda settled, state: None):
        self.exchanger = RoundExchanger(node, manifest, None, FOLLOWER_ID, None, layout.size)
        self.clock = clock_of(manifest)
        self.training = manifest.config.training
        self.layout, self.state = layout, state
        self.root = state.root(layout)
        self.changed = False
        self.credit = {c.peer_id: c.samples for c in head.contributors}
        """Samples of each peer's payloads in the consensus, in all (seeded from the ledger)."""
        self.before: tuple[RoundState, tuple[tuple[str, int], ...]] | None = None
        """The state before the latest round and that round's credit (to redo it another way)."""
        self.unconfirmed = False
        """The latest round was void here: whether the swarm applied it is known only at the next round."""
        self.problem: str | None = None
        """Why the latest round could not be replayed (retried next time), or None."""
        self.observe = observe
        """Called with every round replayed and the state it started from (metrics, spot checks)."""

    def next_due(self) -> float:
        """Unix time at which the next round can be replayed (its receipts are read)."""
        return self.clock.receipts_read(self.state.round) + _MARGIN

    def lapsed(self, now: float) -> bool:
        """Whether the next round to replay is too old for its announcements to be in the DHT."""
        return now - self.clock.closes(self.state.round) > (ANNOUNCE_ROUNDS - 2) * self.clock.seconds

    def follow(self, now: float) -> int:
        """Replay every round decided by ``now``; returns how many moved. Stops at the first that
        cannot be replayed yet (``problem`` says why)."""
        replayed = 0
        while self.next_due() <= now and not self.lapsed(now):
            settled = self.exchanger.settle(self.state.round, self.root)
            if settled.failure is not None and settled.decision is not None and self._repair(settled.decision.base_root):
                continue
            if settled.failure is not None:
                self.problem = f"round {self.state.round}: {settled.failure}"
                return replayed
            self.problem = None
            # void here (a payload nobody served us) may be applied by the swarm: the next round's
            # base root tells; until then this state is not checkpointed
            self.unconfirmed = settled.void is not None
            self.observe(settled, self.state)
            before = self.state
            self._apply(settled.update, settled.credit)
            self.before = (before, () if self.state.void is not None else settled.credit)
            replayed += 1
            now = max(now, time.time())
        return replayed

    def _apply(self, update, credit) -> None:
        self.state = outer_step(self.state, update, lr=self.training.outer_lr,
                                momentum=self.training.outer_momentum, nesterov=self.training.nesterov)
        if self.state.void is not None:  # the step was refused: the round is void, and earns nothing
            self.problem = f"round {self.state.round - 1} is void: {self.state.void}"
            return
        for peer_id, samples in credit:
            self.credit[peer_id] = self.credit.get(peer_id, 0) + samples
        if update is not None:
            self.root = self.state.root(self.layout)
            self.changed = True

    def _repair(self, target: str | None) -> bool:
        """The swarm's consensus is ``target``, not ours: the previous round went the other way here
        (void here and applied by the swarm, or the reverse). Redo it from the state before it."""
        if target is None or self.before is None:
            return False
        before, credit = self.before
        ours = (self.state, self.root, dict(self.credit), self.changed)
        for peer_id, samples in credit:  # the round is redone: so is its credit
            self.credit[peer_id] -= samples
        self.state, self.root = before, before.root(self.layout)
        if self.root == target:  # the swarm voided it
            self._apply(None, ())
            self.before = None
            return True
        settled = self.exchanger.settle(before.round, self.root)
        if settled.failure is None and settled.void is None and settled.update is not None:
            self._apply(settled.update, settled.credit)
            if self.root == target:
                self.before = None
                return True
        self.state, self.root, self.credit, self.changed = ours  # neither way: keep ours, report it
        return False

    def adopt(self, state: RoundState) -> None:
        """Fallback: a verified state from a peer, when the rounds since ours have lapsed."""
        self.state, self.root, self.changed = state, state.root(self.layout), True
