"""A round's all-gather, checked: the record each groupmate sends, and the canonical combine.

Every peer of a group ends the exchange holding every groupmate's compressed payload, so
each one computes the group's update itself: records are decoded under the strict schema,
each payload is checked against its record (codec, exact size, sha256) and the manifest
(codec, vector length) and parsed (its content checked) without being decoded, and the
weighted mean is accumulated in one canonical order (by Barnraise peer id) straight from the
payloads into one float64 sum (``codecs.ParsedPayload.add_to``, then ``codecs.finish``): the
same bits as ``codecs.aggregate`` over the decoded vectors, without building them. Groupmates
that received the same payloads therefore hold bit-identical updates, and an update is by
construction the mean of the decoded payloads that it names: there is no silent fallback to a
peer's own values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from protocol.codecs import Codec, ParsedPayload, finish, parse_payload, payload_size
from protocol.errors import MalformedRecord
from protocol.wire import PROTOCOL_VERSION, Field, check_fields, is_hex

__all__ = ["GroupMember", "GroupUpdate", "combine"]

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
    """Weighted mean of the accepted members' decoded payloads (float32, [numel])."""
    members: tuple[GroupMember, ...]
    """Accepted members, in the canonical order they were summed in."""
    rejected: tuple[str, ...]
    """One line per groupmate left out, saying why."""
    other_bases: tuple[str, ...] = ()
    """The consensus roots of valid members left out for holding another consensus than ours."""


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


def combine(entries: Sequence[tuple[Any, Any]], *, codec: Codec, numel: int, round: int,
            max_weight: float, base_root: str) -> GroupUpdate:
    """The group's update from untrusted (record, payload) pairs; bad ones are left out, named.

    ``max_weight`` bounds a member's claimed weight (the samples one round can hold), so no
    member can outweigh the others by fiat. Members whose ``base_root`` is not ours computed
    their update against another consensus: they are left out and counted in ``other_bases``.

    First every entry is checked in full (record, payload bytes, payload content), in the order
    given: a bad one is rejected, and of two usable entries for one peer id the later one is.
    Only then are the accepted payloads summed, in ascending peer-id order, into one float64
    vector that starts at zeros: ``sum += float64(decoded) * weight`` per payload, then
    ``sum / (the weights added in the same order)``, rounded once to float32. That is exactly
    ``aggregate`` over the decoded vectors in peer-id order; a rejected payload never touches
    the sum. Raises ``MalformedRecord`` when no entry is usable.
    """
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
    total = torch.zeros(numel, dtype=torch.float64)
    for member in members:
        accepted[member.peer_id][1].add_to(total, member.weight)
    update = finish(total, sum(member.weight for member in members))
    return GroupUpdate(update, tuple(members), tuple(rejected), tuple(other_bases))

