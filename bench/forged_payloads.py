"""Hostile replicas for the simulator: what a volunteer who means harm sends instead of its payload.

A hostile replica trains like any other (same windows, same inner steps, same error feedback,
and it adopts the consensus every round, as a real peer that wants to stay in the swarm must),
but each round it replaces the payload it would have sent by a forged one of the same codec and
size, and signs for it the record an honest peer would (its honest sample count as its weight:
the protocol caps a claim at one round's samples anyway). Let x be the vector its honest
payload decodes to:

    none     the honest payload (a clean replica)
    flip     the payload of −x: pulls the consensus back by as much as it pushes
    scale    the payload of 1000·x: an honest direction, a thousand times too long
    flipscale  the payload of −1000·x: clipped to the group's ceiling, it is the strongest pull
             back that a norm rule lets through (the clip ratio times an honest norm)
    noise    the payload of Gaussian noise whose decoded norm is ‖x‖: as long as an honest
             payload, so a norm rule cannot tell it apart (seeded by round and peer id)
    replay   the payload it sent in round 0, again every round (honest in round 0)
    nan      a payload whose body is all 0xFF bytes: NaN where the codec reads floats; it fails
             ``parse_payload``, so every groupmate's ``combine`` rejects it
    zero     the payload of the zero vector: a free rider that dilutes the mean

The forged payload is a well-formed one of the round's codec (``nan`` excepted), so what
``combine`` can do about it is what its robust rule (``clip``) does, nothing more.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from protocol.codecs import HEADER_SIZE, Codec, PayloadError, decode, encode, parse_payload
from protocol.errors import ConfigError

__all__ = ["BEHAVIOURS", "SCALE", "Behaviour", "Forger"]

Behaviour = Literal["none", "flip", "scale", "flipscale", "noise", "replay", "nan", "zero"]
BEHAVIOURS: tuple[str, ...] = get_args(Behaviour)
SCALE = 1000.0
"""``scale``: how many times its honest payload a hostile replica sends."""


@dataclass
class Forger:
    """One hostile replica's forging: its behaviour, and what it remembers between rounds."""

    behaviour: Behaviour
    codec: Codec
    numel: int
    peer_id: str
    first: bytes | None = None
    """``replay``: the payload sent in the first round."""

    def payload(self, honest: bytes, round_: int) -> bytes:
        """What this replica sends in ``round_`` instead of ``honest`` (the same number of bytes)."""
        if self.first is None:
            self.first = honest
        if self.behaviour == "none":
            return honest
        if self.behaviour == "replay":
            return self.first
        if self.behaviour == "nan":
            return self._unparseable(honest)
        if self.behaviour == "zero":
            return encode(self.codec, torch.zeros(self.numel))
        own = decode(honest, self.codec, self.numel)
        if self.behaviour == "flip":
            return encode(self.codec, -own)
        if self.behaviour == "scale":
            return encode(self.codec, own * SCALE)
        if self.behaviour == "flipscale":
            return encode(self.codec, own * -SCALE)
        return self._noise(float(own.norm()), round_)

    def _noise(self, norm: float, round_: int) -> bytes:
        """Gaussian noise, rescaled so that its payload decodes to a vector of norm ``norm`` (the
        codec keeps part of it; its scales follow the input's, so one rescale lands within ~1%)."""
        seed = int.from_bytes(hashlib.sha256(f"hostile-noise/{self.peer_id}/{round_}".encode()).digest()[:8], "little")
        noise = torch.randn(self.numel, generator=torch.Generator().manual_seed(seed))
        kept = float(decode(encode(self.codec, noise), self.codec, self.numel).norm())
        return encode(self.codec, noise * (norm / kept if kept > 0 else 0.0))

    def _unparseable(self, honest: bytes) -> bytes:
        body = HEADER_SIZE + len(self.codec.name)
        forged = honest[:body] + b"\xff" * (len(honest) - body)
        try:
            parse_payload(forged, self.codec, self.numel)
        except PayloadError:
            return forged
        raise ConfigError(f"hostile nan: codec {self.codec.name!r} parses a body of 0xFF bytes; pick another codec")
