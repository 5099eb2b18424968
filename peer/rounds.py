"""One round of a peer: inner steps, the averaged outer gradient (checked), the outer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from peer.swarm import SwarmNode
from peer.trainer import Trainer
from protocol.averaging import GroupMember, check_average, probe, probe_signs
from protocol.errors import MalformedRecord
from protocol.manifest import RunManifest

__all__ = ["RoundOutcome", "average_round"]


@dataclass(frozen=True)
class RoundOutcome:
    """What a round did; ``averaged`` is False whenever the peer fell back to its own Δ."""

    round: int
    loss: float
    samples: int
    samples_per_second: float
    group_size: int
    """Peers whose outer gradients are in the applied update (1 when local)."""
    averaged: bool
    failure: str | None
    network_seconds: float
    group_rounds: tuple[int, ...]

    def to_log(self) -> dict:
        return asdict(self)


def _members(gathered: dict[str, object]) -> list[GroupMember]:
    return [GroupMember.from_wire(value) for value in gathered.values()]


def average_round(
    trainer: Trainer,
    node: SwarmNode,
    manifest: RunManifest,
    peer_id: str,
    stop_requested: Callable[[], bool],
) -> RoundOutcome | None:
    """Run one round on ``trainer``; None if a stop was requested before it finished."""
    averaging = manifest.config.averaging
    round_ = trainer.state.round
    inner = trainer.inner_steps(stop_requested)
    if stop_requested() or inner.samples == 0:
        return None
    outer_gradient = trainer.outer_gradient()
    signs = probe_signs(round_, outer_gradient.numel())
    own_probe, own_norm = probe(outer_gradient, signs)
    member = GroupMember(peer_id=peer_id, round=round_, weight=float(inner.samples), probe=own_probe, norm=own_norm)
    outcome = node.average(
        outer_gradient, gather=member.to_wire(), weight=float(inner.samples), timeout=averaging.round_deadline_seconds
    )
    failure, group, applied = outcome.failure, [member], outer_gradient
    if failure is None:
        try:
            group = _members(outcome.gathered)
            failure = check_average(group, outcome.averaged, outer_gradient, signs, averaging.compression)
        except MalformedRecord as error:
            failure = f"a groupmate sent a malformed record ({error})"
        if failure is None:
            applied = outcome.averaged
        else:
            group = [member]
    trainer.apply_outer(applied)
    seconds = inner.seconds + outcome.seconds
    return RoundOutcome(
        round=round_,
        loss=inner.loss if math.isfinite(inner.loss) else 0.0,
        samples=inner.samples,
        samples_per_second=inner.samples / seconds if seconds > 0 else 0.0,
        group_size=len(group),
        averaged=failure is None,
        failure=failure,
        network_seconds=outcome.seconds,
        group_rounds=tuple(sorted(m.round for m in group)),
    )
