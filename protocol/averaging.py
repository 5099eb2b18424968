"""A round's all-gather, checked: the record each groupmate sends, and the canonical combine.

Every peer of a group ends the exchange holding every groupmate's compressed payload, so
each one computes the group's update itself: records are decoded under the strict schema,
each payload is checked against its record (codec, exact size, sha256) and the manifest
(codec, vector length) and parsed (its content checked) without being decoded, and the
weighted mean is taken in one canonical order (by Barnraise peer id) straight from the
payloads. Before the mean, every payload is clipped to ``CLIP_RATIO`` times the median norm of
the group's payloads (``protocol.policy.clip_scales``): one member cannot outweigh the others
by the size of what it sends, whatever its sign or scale. Two rules (``aggregation``): ``"mean"`` divides every coordinate by all accepted
members' weight (the bits of ``codecs.aggregate`` over the decoded vectors), ``"senders"``
divides it by the weight of the members whose payload kept it. A dense codec's payloads are
added into one float64 sum (``codecs.ParsedPayload.add_to``, then ``codecs.finish``); a
sparse codec's kept entries are added span by span into cache-sized float64 sums, with no
dense float64 vector. Groupmates that received the same payloads therefore hold
bit-identical updates, and an update is by construction the mean of the decoded payloads that
it names: there is no silent fallback to a peer's own values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from protocol import codec_core as core
from protocol.codecs import Codec, ParsedPayload, finish, parse_payload, payload_size
from protocol.errors import ConfigError, InputError, MalformedRecord
from protocol.policy import CLIP_RATIO, clip_scales
from protocol.wire import PROTOCOL_VERSION, Field, check_fields, is_hex

__all__ = ["Aggregation", "GroupMember", "GroupUpdate", "combine", "payload_norm"]

Aggregation = Literal["mean", "senders"]
"""How a coordinate is averaged: over every accepted member, or over those that kept it."""

_MAX_CODEC_NAME = 64


@dataclass(frozen=True, kw_only=True)
class GroupMember:
    """What one peer tells its groupmates about its payload for a round."""

    FIELDS: ClassVar[tuple[Field, ...]] = (
        Field("version", int, lambda v: v == PROTOCOL_VERSION),
        Field("peer_id", str, lambda v: is_hex(v, 16)),
        Field("round", int, lambda v: v >= 0),
        Field("weight", float, lambda v: v > 0 and v < float("inf")),
        Field("codec", str, lambda v: 0 < len(v) <= _MAX_CODEC_NAME),
        Field("payload_size", int, lambda v: v > 0),
        Field("payload_sha256", str, lambda v: is_hex(v, 64)),
        Field("base_root", str, lambda v: is_hex(v, 64)),
    )

    version: int = PROTOCOL_VERSION
    peer_id: str
    """Barnraise peer id (key id of the peer's signing key)."""
    round: int
    weight: float
    """The averaging weight (samples of this round)."""
    codec: str
    payload_size: int
    payload_sha256: str
    base_root: str
    """Canonical root of the consensus state the peer held when it launched (its θ_r): updates
    computed against different consensus states must not be averaged."""

    @classmethod
    def for_payload(cls, *, peer_id: str, round: int, weight: float, codec: Codec, payload: bytes,
                    base_root: str) -> GroupMember:
        digest = hashlib.sha256(payload).hexdigest()
        return cls(peer_id=peer_id, round=round, weight=weight, codec=codec.name, payload_size=len(payload),
                   payload_sha256=digest, base_root=base_root)

    def to_wire(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.FIELDS}

    @classmethod
    def from_wire(cls, mapping: Any) -> GroupMember:
        if not isinstance(mapping, Mapping):
            raise MalformedRecord("group member: expected a map")
        return cls(**check_fields(mapping, cls.FIELDS, what="group member"))


@dataclass(frozen=True)
class GroupUpdate:
    """The group's update for one round, and who is in it."""

    update: torch.Tensor
    """The accepted members' decoded payloads combined under the aggregation rule (float32,
    [numel]); see ``combine``."""
    members: tuple[GroupMember, ...]
    """Accepted members, in the canonical order they were summed in."""
    rejected: tuple[str, ...]
    """One line per groupmate left out, saying why."""
    other_bases: tuple[str, ...] = ()
    """The consensus roots of valid members left out for holding another consensus than ours."""
    touched: int = 0
    """Diagnostics: coordinates some accepted payload lists (all of them for a dense codec);
    every other coordinate of the update is 0."""
    scales: tuple[float, ...] = ()
    """The clip factor of each accepted member, in ``members`` order (1.0: not clipped)."""


def _accept(record: Any, payload: Any, *, codec: Codec, numel: int, round: int,
            max_weight: float) -> tuple[GroupMember, ParsedPayload]:
    member = GroupMember.from_wire(record)
    if member.weight > max_weight:
        raise MalformedRecord(f"peer {member.peer_id[:8]} claims weight {member.weight:g}, more than {max_weight:g}")
    if member.round != round:
        raise MalformedRecord(f"peer {member.peer_id[:8]} sent round {member.round}, not {round}")
    if member.codec != codec.name:
        raise MalformedRecord(f"peer {member.peer_id[:8]} used codec {member.codec!r}, not {codec.name!r}")
    expected = payload_size(codec, numel)
    if not isinstance(payload, bytes) or len(payload) != member.payload_size or member.payload_size != expected:
        raise MalformedRecord(f"peer {member.peer_id[:8]}: payload is not the {expected} bytes its codec gives")
    if hashlib.sha256(payload).hexdigest() != member.payload_sha256:
        raise MalformedRecord(f"peer {member.peer_id[:8]}: payload does not match its sha256")
    return member, parse_payload(payload, codec, numel)


def payload_norm(parsed: ParsedPayload) -> float:
    """The L2 norm of a payload's decoded vector, from its listed entries: float64 squares
    (exact for float32 values), summed pairwise per window (numpy), windows in order."""
    total = 0.0
    for _, values in parsed.entries():
        if len(values):
            total += float(np.square(values.astype(np.float64)).sum())
    return float(np.sqrt(total))


def combine(entries: Sequence[tuple[Any, Any]], *, codec: Codec, numel: int, round: int,
            max_weight: float, base_root: str, aggregation: Aggregation = "mean",
            clip: float = CLIP_RATIO) -> GroupUpdate:
    """The group's update from untrusted (record, payload) pairs; bad ones are left out, named.

    ``max_weight`` bounds a member's claimed weight (the samples one round can hold), so no
    member can outweigh the others by fiat. Members whose ``base_root`` is not ours computed
    their update against another consensus: they are left out and counted in ``other_bases``.

    First every entry is checked in full (record, payload bytes, payload content), in the order
    given: a bad one is rejected, and of two usable entries for one peer id the later one is.
    Only then are the accepted payloads summed; a rejected payload never touches the sum.
    Each accepted payload m is first given its clip factor c_m (``clip_scales`` of the members'
    ``payload_norm``s, ``clip`` times their lower median; ``clip`` 0: every c_m is 1).
    Raises ``MalformedRecord`` when no entry is usable, ``InputError`` when the accepted
    weights add up to more than a float64 holds.

    The arithmetic, per coordinate i, members in ascending peer-id order, all in float64:
    ``sum = 0.0``, then ``sum += float64(x_m[i]) * (w_m * c_m)`` for each member m that lists i;
    ``weight = 0.0``, then ``weight += w_m`` for the same members (``"senders"``) or for every
    accepted member (``"mean"``); the update is ``float32(sum / weight)``, one division and one
    rounding, and 0 where no member lists i. A dense codec lists every coordinate; a sparse
    one (top-k, block max) lists the entries it kept, whatever their value (0 included). So
    with no member clipped, ``"mean"`` is exactly ``codecs.aggregate`` over the decoded vectors in peer-id order (an
    entry a payload does not list decodes as +0.0 and adding it changes nothing), and for a
    dense codec ``"senders"`` equals ``"mean"``.
    """
    if aggregation not in ("mean", "senders"):
        raise ConfigError(f"combine: aggregation {aggregation!r} is not 'mean' or 'senders'")
    accepted: dict[str, tuple[GroupMember, ParsedPayload]] = {}
    rejected: list[str] = []
    other_bases: list[str] = []
    for record, payload in entries:
        try:
            member, parsed = _accept(record, payload, codec=codec, numel=numel, round=round, max_weight=max_weight)
        except MalformedRecord as error:
            rejected.append(str(error))
            continue
        if member.peer_id in accepted:
            rejected.append(f"peer {member.peer_id[:8]} appeared twice in the group")
            continue
        if member.base_root != base_root:
            rejected.append(f"peer {member.peer_id[:8]} holds another consensus (root {member.base_root[:16]})")
            other_bases.append(member.base_root)
            continue
        accepted[member.peer_id] = (member, parsed)
    if not accepted:
        raise MalformedRecord("no groupmate's payload was usable: " + "; ".join(rejected[:3]))
    members = [accepted[key][0] for key in sorted(accepted)]
    parsed_payloads = [accepted[member.peer_id][1] for member in members]
    weights = [member.weight for member in members]
    scales = clip_scales([payload_norm(parsed) for parsed in parsed_payloads], clip)
    factors = [weight * scale for weight, scale in zip(weights, scales, strict=True)]
    if codec.sparse:
        update, touched = _sparse_mean(parsed_payloads, weights, factors, numel, aggregation)
    else:
        total = torch.zeros(numel, dtype=torch.float64)
        for parsed, factor in zip(parsed_payloads, factors, strict=True):
            if factor > 0:
                parsed.add_to(total, factor)
        update, touched = finish(total, sum(weights)), numel
    return GroupUpdate(update, tuple(members), tuple(rejected), tuple(other_bases), touched, tuple(scales))


def _sparse_mean(payloads: list[ParsedPayload], weights: list[float], factors: list[float], numel: int,
                 aggregation: Aggregation) -> tuple[torch.Tensor, int]:
    """(update, touched) from sparse payloads (see ``combine`` for the arithmetic).

    The work follows the listed entries only, window by window (``ParsedPayload.entries``): a
    float64 sum per coordinate of the window (and the senders' weight), 0.0 where nothing was
    added yet, gets each member's products at its listed positions, members in the given order
    (positions are unique within a member, ascending, so each pass sweeps the window in order);
    then the listed coordinates of the update are written, one division per coordinate, and
    just those sums are set back to 0.0. The work is done span by span (``SUM_SLICE``
    elements), so the sums stay in cache; nothing is done per unlisted coordinate but the
    update's initial zeros.
    """
    total = sum(weights)  # left to right, like the products
    if not np.isfinite(total):
        raise InputError("combine: the weights add up to more than a float64 holds")
    span, window = core.SUM_SLICE, payloads[0].window
    sums = np.zeros(span)
    # "senders": a coordinate is listed iff its senders' weight is > 0 (every weight is > 0)
    listed = np.zeros(span) if aggregation == "senders" else np.zeros(span, dtype=bool)
    update = torch.zeros(numel)  # written now: cheaper than faulting pages in on scattered stores
    out = update.numpy()
    touched = 0
    for number, members in enumerate(zip(*(payload.entries() for payload in payloads), strict=True)):
        first = number * window
        stop = min(first + window, numel)
        starts = range(first, stop, span)
        cuts = [np.searchsorted(positions, [*starts, stop]) for positions, _ in members]
        products = [values.astype(np.float64) * factor for (_, values), factor in zip(members, factors, strict=True)]
        for part, start in enumerate(starts):
            ats = []
            for (positions, _), product, weight, cut in zip(members, products, weights, cuts, strict=True):
                at = positions[cut[part] : cut[part + 1]] - start
                sums[at] += product[cut[part] : cut[part + 1]]
                if aggregation == "senders":
                    listed[at] += weight
                else:
                    listed[at] = True
                ats.append(at)
            at = np.concatenate(ats)  # a coordinate listed by several members appears several times
            if not len(at):
                continue
            divisor = listed[at] if aggregation == "senders" else total
            # the float64 quotient, rounded once to float32 as it is stored
            out[start + at] = sums[at] / divisor
            touched += int(np.count_nonzero(listed))
            sums[at] = 0.0
            listed[at] = 0
    return update, touched
