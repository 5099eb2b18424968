"""One round of a peer: inner steps, the averaged outer gradient (checked), the outer step."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

from peer.swarm import AverageOutcome, SwarmNode
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


def _check(outcome: AverageOutcome, member: GroupMember, own, signs, codec: str) -> tuple[str | None, list[GroupMember]]:
    """(why the received vector cannot be used, or None; the group's member records)."""
    try:
        group = [GroupMember.from_wire(value) for value in outcome.gathered.values()]
    except MalformedRecord as error:
        return f"a groupmate sent a malformed record ({error})", [member]
    if len(rounds := {m.round for m in group}) > 1:
        return f"the group mixed rounds {sorted(rounds)}: not applying a stale average", group
    return check_average(group, outcome.averaged, own, signs, codec), group


def average_round(
    trainer: Trainer,
    node: SwarmNode,
    manifest: RunManifest,
    peer_id: str,
    stop_requested: Callable[[], bool],
    swarm_round: Callable[[], int],
) -> RoundOutcome | None:
    """Run one round on ``trainer``; None if a stop was requested before it finished.

    ``swarm_round()`` is asked after the inner steps: if the swarm has moved past this round,
    this peer's Δ is stale, so it does not enter averaging (which would spoil the round for
    its groupmates) and the round is local; the runner then catches up.
    """
    averaging = manifest.config.averaging
    round_ = trainer.state.round
    inner = trainer.inner_steps(stop_requested)
    if stop_requested() or inner.samples == 0:
        return None
    outer_gradient = trainer.outer_gradient()
    signs = probe_signs(round_, outer_gradient.numel())
    own_probes, own_norm = probe(outer_gradient, signs)
    member = GroupMember(peer_id=peer_id, round=round_, weight=float(inner.samples), probes=own_probes, norm=own_norm)
    failure, group, applied, seconds_on_network = None, [member], outer_gradient, 0.0
    if (ahead := swarm_round()) > round_:
        failure = f"behind the swarm (round {round_}, swarm at {ahead}): not averaging a stale update"
    else:
        outcome = node.average(
            outer_gradient, gather=member.to_wire(), weight=float(inner.samples), timeout=averaging.round_deadline_seconds
        )
        failure, seconds_on_network = outcome.failure, outcome.seconds
        if failure is None:
            failure, group = _check(outcome, member, outer_gradient, signs, averaging.compression)
        if failure is None:
            applied = outcome.averaged
    trainer.apply_outer(applied)
    seconds = inner.seconds + seconds_on_network
    return RoundOutcome(
        round=round_,
        loss=inner.loss if math.isfinite(inner.loss) else 0.0,
        samples=inner.samples,
        samples_per_second=inner.samples / seconds if seconds > 0 else 0.0,
        group_size=len(group) if failure is None else 1,
        averaged=failure is None,
        failure=failure,
        network_seconds=seconds_on_network,
        group_rounds=tuple(sorted(m.round for m in group)),
    )
