"""Knowing that an average really happened: the record each groupmate gathers, and the check.

hivemind's all-reduce can "succeed" while parts of the vector silently kept local values
(for example when a codec fails inside the averager). So every peer sends its groupmates a
``GroupMember`` record with probes of its own outer gradient, and after the all-reduce checks
that the vector it received has the probe the weighted mean of the members' probes predicts.

A probe is the dot product with a pseudo-random ±1 vector fixed by the round, so a part of
the vector that was not averaged shows up as a normally distributed deviation of about its own
norm, while codec rounding (independent of the signs) stays within ``PROBE_SIGMAS`` standard
deviations of its per-element bound. One probe can miss by luck (a deviation that happens to
be small: a few percent of the time in simulation), so ``PROBE_COUNT`` independent probes must
all hold; the tolerance is a high-probability bound, not a worst case.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from protocol.errors import MalformedRecord
from protocol.wire import PROTOCOL_VERSION, Field, check_fields, is_hex

__all__ = ["GroupMember", "probe", "probe_signs", "check_average", "CODEC_RELATIVE_ERROR"]

CODEC_RELATIVE_ERROR = {"fp16": 2.0**-11, "none": 2.0**-22}
"""Largest relative rounding error of one element, per wire codec."""
_FP16_SMALLEST = 6.0e-8  # below this, fp16 flushes to zero: an absolute error per element
PROBE_SIGMAS = 8.0
PROBE_COUNT = 4


@dataclass(frozen=True, kw_only=True)
class GroupMember:
    """What one peer tells its groupmates about its part in a round's average."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("version", int, lambda v: v == PROTOCOL_VERSION),
        Field("peer_id", str, lambda v: is_hex(v, 16)),
        Field("round", int, lambda v: v >= 0),
        Field("weight", float, lambda v: v > 0),
        Field("probes", list, lambda v: len(v) == PROBE_COUNT and all(_finite_number(x) for x in v),
              f"{PROBE_COUNT} finite numbers"),
        Field("norm", float, lambda v: v >= 0),
    )

    version: int = PROTOCOL_VERSION
    peer_id: str
    round: int
    weight: float
    """The averaging weight (samples of this round)."""
    probes: list[float]
    """Dot products of the peer's outer gradient with the rows of ``probe_signs(round, n)``."""
    norm: float
    """L2 norm of the peer's outer gradient."""

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.FIELDS}

    @classmethod
    def from_wire(cls, mapping: Any) -> GroupMember:
        if not isinstance(mapping, Mapping):
            raise MalformedRecord("group member: expected a map")
        return cls(**check_fields(mapping, cls.FIELDS, what="group member"))


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def probe_signs(round: int, size: int) -> torch.Tensor:
    """The round's ±1 vectors ([PROBE_COUNT, size] float64), the same on every peer."""
    generator = torch.Generator().manual_seed(1_000_003 * round + 17)
    signs = torch.randint(0, 2, (PROBE_COUNT, size), generator=generator, dtype=torch.int8)
    return signs.double().mul_(2).sub_(1)


def probe(vector: torch.Tensor, signs: torch.Tensor) -> tuple[list[float], float]:
    """(dot with each row of the signs, L2 norm) of a flat float vector, in float64."""
    flat = vector.reshape(-1).double()
    return [float(x) for x in signs @ flat], float(flat.norm())


def check_average(
    members: Sequence[GroupMember],
    averaged: torch.Tensor,
    own: torch.Tensor,
    signs: torch.Tensor,
    codec: str,
) -> str | None:
    """None if ``averaged`` is the members' weighted mean within codec error, else why not."""
    if len(members) < 2:
        return f"only {len(members)} member(s) in the group"
    total = sum(m.weight for m in members)
    actual, averaged_norm = probe(averaged, signs)
    own_norm = float(own.reshape(-1).double().norm())
    spread = sum(m.weight * m.norm for m in members) / total + averaged_norm + own_norm
    relative = CODEC_RELATIVE_ERROR[codec]
    tolerance = PROBE_SIGMAS * (relative * spread + math.sqrt(averaged.numel()) * _FP16_SMALLEST) + 1e-9
    for index, received in enumerate(actual):
        expected = sum(m.weight * m.probes[index] for m in members) / total
        if not math.isfinite(received) or abs(received - expected) > tolerance:
            off = abs(received - expected)
            return f"received vector is not the group's mean (probe {index} off by {off:.3g}, tolerance {tolerance:.3g})"
    return None
