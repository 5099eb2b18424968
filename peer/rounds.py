"""A round's exchange: compress Δ with error feedback, all-gather the payloads, combine them.

    launch:  e ← β·e + Δ;  payload = codec(e);  e ← e − decode(payload)   (error feedback,
             β = ``averaging.error_feedback_decay``); the payload goes to every groupmate and
             theirs come back (``SwarmNode.start_exchange``)
    resolve: update = the combine of the decoded payloads in canonical order
             (``protocol.averaging.combine`` with ``averaging.aggregation``), or this peer's own
             decoded payload when the exchange failed: a local round, reported as such

The residual ``e`` is part of the peer's local state: it is saved in the workdir after every
launch, so a restarted peer still sends what its codec held back.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from peer.swarm import PendingExchange, SwarmNode
from peer.workdir import write_atomic
from protocol.averaging import GroupMember, combine
from protocol.codecs import compress_with_feedback, decode, parse_codec
from protocol.errors import InputError, TransportError
from protocol.manifest import RunManifest

__all__ = ["RoundWork", "RoundOutcome", "Exchange", "OuterExchanger"]

RESIDUAL_FILE = "residual.safetensors"


@dataclass(frozen=True)
class RoundWork:
    """What one round's inner steps produced on this peer."""

    round: int
    loss: float
    samples: int
    seconds: float


@dataclass(frozen=True)
class RoundOutcome:
    """What a round did; ``averaged`` is False whenever the peer applied only its own payload."""

    round: int
    loss: float
    samples: int
    samples_per_second: float
    """Samples over the seconds of inner steps plus the seconds spent waiting on the network."""
    group_size: int
    """Peers whose payloads are in the applied update (1 when local)."""
    averaged: bool
    failure: str | None
    compute_seconds: float
    """Seconds of inner steps."""
    network_seconds: float
    """From the exchange's launch to the last payload in hand (overlapped with compute)."""
    wait_seconds: float
    """Of those, the seconds this peer sat idle waiting for them."""
    payload_bytes: int
    """Size of this peer's payload (what it uploads to each groupmate)."""
    diverged: bool = False
    """Most of the group held another consensus state than this peer: it must load theirs."""
    contributed: bool = True
    """This peer's own payload is in the applied update (its samples earn credit)."""

    def to_log(self) -> dict:
        return asdict(self)


@dataclass
class Exchange:
    """One round's exchange: launched (``pending``), or already settled (local or bootstrap)."""

    round: int
    work: RoundWork | None
    """None for the empty exchange a peer starts with (it applies a zero update, reports nothing)."""
    own: torch.Tensor
    """This peer's own decoded payload: the update of a local round."""
    payload_bytes: int = 0
    pending: PendingExchange | None = None
    failure: str | None = None
    delta: torch.Tensor | None = None
    """This peer's own outer gradient of the round (its progress on top of the consensus)."""
    base_root: str = ""
    """Root of the consensus state this peer held at launch."""
    own_excluded: bool = False
    """This peer loaded another consensus after launching: its own payload (computed against the
    old one) is left out, and it applies the mean of the groupmates that hold the new one."""


def outvoted(own_root: str, own_members: int, other_roots: Sequence[str]) -> bool:
    """Whether a consensus root held by ``own_members`` members of a group loses to another root
    of the group (``other_roots``: one entry per member holding it): the root with the most
    members wins, a tie goes to the smaller root. Pure, so every member of a group that saw the
    same records picks the same winner, and exactly its holders keep their state. (Comparing our
    count with all the others together, as before, made every member of a group whose members
    all held different roots give way, and with none serving its state the fork never healed.)"""
    counts = Counter(other_roots)
    if not counts:
        return False
    root, members = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return members > own_members or (members == own_members and root < own_root)


class OuterExchanger:
    """Owns the codec, the error-feedback residual and the peer's side of every exchange."""

    def __init__(self, node: SwarmNode, manifest: RunManifest, peer_id: str, workdir: Path, numel: int):
        self.node, self.peer_id, self.numel = node, peer_id, numel
        self.run_id = manifest.run_id
        averaging = manifest.config.averaging
        self.codec = parse_codec(averaging.codec)
        self.decay, self.aggregation = averaging.error_feedback_decay, averaging.aggregation
        training = manifest.config.training
        self.max_weight = float(training.inner_steps * training.batch_size)
        self.residual_path = workdir / RESIDUAL_FILE
        self.residual = self._load_residual()

    def _load_residual(self) -> torch.Tensor:
        """The residual a previous life of this peer saved for this run and codec, else zeros."""
        try:
            with safe_open(str(self.residual_path), framework="pt") as saved:
                metadata = saved.metadata() or {}
                residual = saved.get_tensor("residual") if "residual" in saved.keys() else None
        except (OSError, SafetensorError, ValueError):
            return torch.zeros(self.numel)
        fits = metadata.get("run_id") == self.run_id and metadata.get("codec") == self.codec.name
        if not fits or residual is None or residual.shape != (self.numel,) or residual.dtype != torch.float32:
            return torch.zeros(self.numel)
        return residual if bool(torch.isfinite(residual).all()) else torch.zeros(self.numel)

    def _save_residual(self, round_: int) -> None:
        metadata = {"run_id": self.run_id, "codec": self.codec.name, "round": str(round_)}
        write_atomic(self.residual_path, save_safetensors({"residual": self.residual.contiguous()}, metadata))

    def empty(self, round_: int) -> Exchange:
        """The zero-update exchange a peer holds after starting at a consensus state."""
        return Exchange(round_, None, torch.zeros(self.numel))

    def launch(self, work: RoundWork, delta: torch.Tensor, *, base_root: str, skip: str | None = None) -> Exchange:
        """Compress Δ (with the residual) and start its exchange; ``skip`` keeps it local.
        ``base_root`` is the root of the consensus state this peer holds (its θ_r)."""
        payload, self.residual = compress_with_feedback(self.codec, delta, self.residual, decay=self.decay)
        self._save_residual(work.round)
        own = decode(payload, self.codec, self.numel)
        exchange = Exchange(work.round, work, own, payload_bytes=len(payload), failure=skip, delta=delta,
                            base_root=base_root)
        if skip is None:
            member = GroupMember.for_payload(
                peer_id=self.peer_id, round=work.round, weight=float(work.samples), codec=self.codec, payload=payload,
                base_root=base_root,
            )
            try:
                exchange.pending = self.node.start_exchange(
                    round=work.round, payload=payload, member=member.to_wire(), weight=float(work.samples)
                )
            except TransportError as error:  # the residual already assumes this payload: a local round
                exchange.failure = str(error)
        return exchange

    def resolve(self, exchange: Exchange) -> tuple[torch.Tensor, RoundOutcome | None]:
        """(the update to apply, the round's outcome); waits for the exchange (bounded)."""
        update, group_size, failure, seconds, waited = exchange.own, 1, exchange.failure, 0.0, 0.0
        diverged = False
        if exchange.pending is not None:
            started = time.monotonic()
            result = exchange.pending.result()
            waited, seconds, failure = time.monotonic() - started, result.seconds, result.failure
            if failure is None and result.missing:
                # groupmates that got every payload would average a different set: stay out
                failure = f"{result.missing} groupmate payload(s) did not arrive"
            if failure is None:
                update, group_size, failure, diverged = self._combine(exchange, result.payloads.values())
        work = exchange.work
        if work is None:
            return update, None
        busy = work.seconds + waited
        return update, RoundOutcome(
            round=work.round,
            loss=work.loss,
            samples=work.samples,
            samples_per_second=work.samples / busy if busy > 0 else 0.0,
            group_size=group_size,
            averaged=failure is None,
            failure=failure,
            compute_seconds=work.seconds,
            network_seconds=seconds,
            wait_seconds=waited,
            payload_bytes=exchange.payload_bytes,
            diverged=diverged,
            contributed=failure is None and not exchange.own_excluded,
        )

    def _combine(self, exchange: Exchange, entries) -> tuple[torch.Tensor, int, str | None, bool]:
        """(update, group size, failure, diverged): a peer whose consensus another one outvotes in
        the group (``outvoted``) stays out and must load that state."""
        entries = list(entries)
        if exchange.own_excluded:
            entries = [(r, p) for r, p in entries if not (isinstance(r, dict) and r.get("peer_id") == self.peer_id)]
        try:
            group = combine(entries, codec=self.codec, numel=self.numel, round=exchange.round,
                            max_weight=self.max_weight, base_root=exchange.base_root, aggregation=self.aggregation)
        except InputError as error:  # MalformedRecord, or weights that do not sum to a finite number
            return exchange.own, 1, str(error), False
        others, ours = len(group.other_bases), len(group.members)
        if outvoted(exchange.base_root, ours, group.other_bases):
            return exchange.own, 1, f"{others} of the group hold another consensus state than this peer", True
        if exchange.own_excluded:
            return group.update, ours, None, False
        if ours < 2 or self.peer_id not in {m.peer_id for m in group.members}:
            why = "; ".join(group.rejected[:2]) or "no groupmate's payload arrived"
            return exchange.own, 1, f"no usable groupmate ({why})", False
        return group.update, ours, None, False

