"""The swarm in one process: N replicas on the swarm's own windows, codecs and combine.

    python scripts/bench_simulate.py --recipe default --recipe alone     # one table of recipes
    python scripts/bench_simulate.py --check                             # against a real swarm

Replica ``i`` is what Barnraise's peer ``i`` of the bytes-to-loss benchmark runs
(``bench.task.swarm_peer_id(i)``): a ``peer.trainer.Trainer`` (the same inner AdamW steps on
``training_batch(peer_id, round, step)``, the same learning-rate schedule and outer step), whose
outer gradient goes through ``protocol.codecs.compress_with_feedback`` and, with every other
replica's, through ``protocol.averaging.combine`` in the canonical peer-id order. What the
real swarm adds (matchmaking, transport, catch-up, local rounds) is left out: every round here
is one group of all N replicas. So on a run whose rounds all averaged every peer, the simulator
computes the swarm's consensus bit for bit (``--check`` shows it), and a recipe can be swept in
minutes instead of a swarm run per recipe.

A ``bench.recipe.Recipe`` says what to run; beyond what a manifest holds, a sweep can set:

    update_rule   sync     a round starts at the consensus that includes its predecessor's update
                  delayed  the update of round r is applied one round late; round r + 1 starts at
                           the consensus without it (naive one-step delay)
                  rebase   like delayed, but round r + 1 starts at the consensus minus this
                           replica's own Δ_r (the swarm's overlap before asynchronous rounds)
                  eager    like delayed, but round r + 1 starts at the consensus minus η·(w/W)·its
                           own decoded payload: its share of the coming update, applied at once
                           (Kale et al., 2025; with outer momentum it is a proxy)
                  arrival  asynchronous rounds: round r + 1 starts at once from the consensus
                           minus its own Δ_r (as rebase), and round r's update arrives ``lag``
                           inner steps into it (at its end when it is no longer): the consensus
                           takes the outer step, the replica keeps the progress made since the
                           round started on top of it, and Δ_{r+1} is measured from there
                           (``Trainer.apply_outer_in_flight``). lag 0 is sync, a lag of at least
                           H is rebase (to float32 rounding)
    weighting     samples (the swarm's) or uniform weights in the combine
    speeds        relative speeds: replica i takes round(H · speed_i) inner steps a round
    first_inner_steps   an H schedule: round r takes min(H, first · 2**r) steps
    codec None    uncompressed: the exact weighted float32 mean of the Δs (4 bytes per value)
    clip          combine's clip ratio (0: off); the protocol's by default
    hostile       the first ``hostiles`` replicas in peer-id order forge their payload each round
                  (``bench.forged_payloads``: flip, scale, flipscale, noise, replay, nan, zero); they train, keep
                  their error feedback and adopt the consensus like every other replica, and the
                  honest replicas' path is the same as in a clean run

Bytes are exact payload sizes: every replica sends its payload to each of the N − 1 others per
round, as the all-gather does; the swarm's own overhead (matchmaking, DHT) is not in them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from bench.forged_payloads import Forger
from bench.recipe import Recipe, run_config
from bench.task import TaskSpec, checkpoint_steps, evaluate, swarm_peer_id, windows
from peer.data import Corpus, load_corpus
from peer.model import batch_loss, build_model, load_parameters
from peer.trainer import Trainer
from protocol.averaging import GroupMember, GroupUpdate, combine
from protocol.codecs import aggregate, compress_with_feedback, decode, parse_codec, payload_size
from protocol.manifest import RunManifest

__all__ = ["simulate", "simulate_dataparallel"]

_BASE_ROOT = "0" * 64
"""Every replica holds the same consensus; combine's base-root check is met by construction."""
_HEADER_BYTES = 16


@dataclass
class _Replica:
    peer_id: str
    trainer: Trainer
    speed: float
    residual: torch.Tensor
    own_share: torch.Tensor | None = None
    """rebase / eager / arrival: what this replica carries on top of the consensus in the next round."""
    forger: Forger | None = None
    """A hostile replica's: what it sends instead of its payload (None: honest)."""


@dataclass
class _Ledger:
    """What a simulated run sent and how long its parts took."""

    sent_bytes: int = 0
    rounds: int = 0
    compute_seconds: float = 0.0
    codec_seconds: float = 0.0
    curve: list[dict[str, float]] = field(default_factory=list)
    rejected: int = 0
    """Payloads combine left out, over all rounds."""
    clipped_honest: int = 0
    """(round, honest member) pairs whose payload combine clipped."""
    clipped_hostile: int = 0
    """(round, hostile member) pairs whose payload combine clipped."""


def simulate(spec: TaskSpec, recipe: Recipe, *, corpus: Corpus | None = None, device: str = "cpu",
             on_round=None, keep_state: bool = False) -> dict[str, Any]:
    """Train ``spec`` with ``recipe``; the held-out curve and loss of the consensus, exact bytes
    (and, with ``keep_state``, the consensus parameters under ``"state"``, a flat float32 tensor)."""
    corpus = corpus or load_corpus(spec.data)
    config = run_config(spec, recipe)
    manifest = RunManifest(config=config, coordinator_key="0" * 64, genesis_root="0" * 64, created_at=0.0)
    count = recipe.replicas(spec)
    replicas = []
    for rank in range(count):
        trainer = Trainer(manifest, corpus, swarm_peer_id(rank), device)
        replicas.append(_Replica(swarm_peer_id(rank), trainer, (recipe.speeds or (1.0,) * count)[rank],
                                 torch.zeros(trainer.layout.size)))
    replicas.sort(key=lambda r: r.peer_id)
    for replica in replicas[: recipe.hostile_count]:
        replica.forger = Forger(recipe.hostile, parse_codec(recipe.codec), replica.trainer.layout.size, replica.peer_id)
    scorer = build_model(spec.model).to(device)
    ledger, pending = _Ledger(), None
    schedule, done = recipe.schedule(spec), 0
    marks = set(checkpoint_steps(spec))
    _score(ledger, scorer, replicas[0].trainer, corpus, spec, 0)
    for round_, steps in enumerate(schedule):
        arriving = pending if recipe.update_rule == "arrival" else None
        works = _inner_round(replicas, round_, steps, done, ledger, arriving=arriving, lag=recipe.lag)
        done += steps
        if recipe.update_rule == "arrival":  # the previous round's update arrived during this one
            pending = _exchange(replicas, works, recipe, spec, round_, ledger)
            for replica in replicas:
                replica.trainer.rebase(replica.own_share)
        elif recipe.update_rule == "sync":
            update = _exchange(replicas, works, recipe, spec, round_, ledger)
            for replica in replicas:
                replica.trainer.apply_outer(update)
        else:
            if pending is not None:  # the previous round's update arrives now
                for replica in replicas:
                    replica.trainer.apply_outer(pending)
            pending = _exchange(replicas, works, recipe, spec, round_, ledger)
            for replica in replicas:
                replica.trainer.rebase(replica.own_share)
        if done in marks or any(done >= m > done - steps for m in marks):
            _score(ledger, scorer, replicas[0].trainer, corpus, spec, done)
        if on_round is not None:
            on_round(round_, done, ledger)
    if pending is not None:
        for replica in replicas:
            replica.trainer.apply_outer(pending)
        if ledger.curve[-1]["step"] == spec.steps:
            ledger.curve.pop()
        _score(ledger, scorer, replicas[0].trainer, corpus, spec, spec.steps)
    summary = _summary(spec, recipe, count, replicas[0].trainer, ledger)
    if keep_state:
        summary["state"] = replicas[0].trainer.state.parameters.clone()
    return summary


def _inner_round(replicas: list[_Replica], round_: int, steps: int, done: int, ledger: _Ledger, *,
                 arriving: torch.Tensor | None = None, lag: int = 0) -> list[tuple[torch.Tensor, int]]:
    """Every replica's inner steps of this round (the run had ``done`` steps before it): (Δ, samples).
    ``arriving``: the previous round's update, applied in flight after ``lag`` of a replica's steps
    (after all of them when it takes no more); the round's windows and rates are those of one call."""
    works = []
    began = time.perf_counter()
    for replica in replicas:
        own = max(1, round(steps * replica.speed))
        if arriving is None:
            samples = replica.trainer.inner_steps(round_, steps=own, first_step=done).samples
        else:
            before, samples = min(lag, own), 0
            if before > 0:  # steps=0 would mean H
                samples += replica.trainer.inner_steps(round_, steps=before, first_step=done).samples
            replica.trainer.apply_outer_in_flight(arriving)
            if own > before:
                samples += replica.trainer.inner_steps(round_, steps=own - before, first_step=done + before,
                                                       first_window=before).samples  # fmt: skip
        works.append((replica.trainer.outer_gradient(), samples))
    ledger.compute_seconds += time.perf_counter() - began
    return works


def _exchange(replicas: list[_Replica], works: list[tuple[torch.Tensor, int]], recipe: Recipe, spec: TaskSpec,
              round_: int, ledger: _Ledger) -> torch.Tensor:
    """The round's update, as every groupmate computes it; sets each replica's carried share."""
    began = time.perf_counter()
    weights = [float(samples) if recipe.weighting == "samples" else 1.0 for _, samples in works]
    numel = works[0][0].numel()
    ledger.rounds += 1
    if recipe.codec is None:
        update = aggregate([delta for delta, _ in works], weights)
        owns = [delta for delta, _ in works]
        ledger.sent_bytes += (len(works) - 1) * (4 * numel + _HEADER_BYTES) * len(works)
    else:
        codec = parse_codec(recipe.codec)
        entries, owns = [], []
        for replica, (delta, _), weight in zip(replicas, works, weights, strict=True):
            payload, replica.residual = compress_with_feedback(codec, delta, replica.residual,
                                                               decay=recipe.error_feedback_decay)
            owns.append(decode(payload, codec, numel) if recipe.update_rule == "eager" else delta)
            if replica.forger is not None:  # it sends another payload in its own name, with its honest weight
                payload = replica.forger.payload(payload, round_)
            member = GroupMember.for_payload(peer_id=replica.peer_id, round=round_, weight=weight, codec=codec,
                                             payload=payload, base_root=_BASE_ROOT)  # fmt: skip
            entries.append((member.to_wire(), payload))
            ledger.sent_bytes += (len(works) - 1) * len(payload)
        if len(entries) == 1:
            update = owns[0] if recipe.update_rule == "eager" else decode(entries[0][1], codec, numel)
        else:
            group = combine(entries, codec=codec, numel=numel, round=round_, max_weight=float("inf"),
                            base_root=_BASE_ROOT, aggregation=recipe.aggregation, clip=recipe.clip)
            update = group.update
            _count_defences(ledger, replicas, group)
    total = sum(weights)
    for replica, own, weight in zip(replicas, owns, weights, strict=True):
        if recipe.update_rule in ("rebase", "arrival"):
            replica.own_share = own
        elif recipe.update_rule == "eager":
            replica.own_share = own * (recipe.outer_lr * weight / total)
        else:
            replica.own_share = torch.zeros_like(own)
    ledger.codec_seconds += time.perf_counter() - began
    return update


def _count_defences(ledger: _Ledger, replicas: list[_Replica], group: GroupUpdate) -> None:
    """What combine's checks and clip did this round, honest and hostile members apart."""
    hostile = {replica.peer_id for replica in replicas if replica.forger is not None}
    ledger.rejected += len(group.rejected)
    for member, scale in zip(group.members, group.scales, strict=True):
        if scale < 1.0:
            if member.peer_id in hostile:
                ledger.clipped_hostile += 1
            else:
                ledger.clipped_honest += 1


def _score(ledger: _Ledger, scorer: torch.nn.Module, trainer: Trainer, corpus: Corpus, spec: TaskSpec,
           step: int) -> None:
    """Held-out loss of the consensus θ (not a replica's working point)."""
    load_parameters(scorer, {n: t for n, t in trainer.layout.views(trainer.state.parameters).items()})
    ledger.curve.append({"step": step, "heldout_loss": evaluate(scorer, corpus, spec)})


def _summary(spec: TaskSpec, recipe: Recipe, count: int, trainer: Trainer, ledger: _Ledger) -> dict[str, Any]:
    numel = trainer.layout.size
    payload = None if recipe.codec is None else payload_size(recipe.codec, numel)
    return {
        "contender": recipe.name,
        "recipe": recipe.to_dict(),
        "heldout_loss": ledger.curve[-1]["heldout_loss"],
        "curve": ledger.curve,
        "rounds": ledger.rounds,
        "peers": count,
        "tokens": spec.steps * spec.per_peer_batch * count * spec.data.seq_len,
        "payload_bytes": payload,
        "bytes_per_peer": ledger.sent_bytes / count,
        "compute_seconds": ledger.compute_seconds,
        "codec_seconds": ledger.codec_seconds,
        "parameters": numel,
        "hostiles": recipe.hostile_count,
        "rejected": ledger.rejected,
        "clipped_honest": ledger.clipped_honest,
        "clipped_hostile": ledger.clipped_hostile,
    }


def simulate_dataparallel(spec: TaskSpec, *, corpus: Corpus | None = None, device: str = "cpu") -> dict[str, Any]:
    """Contender (a) in one process: each step the mean gradient of every peer's windows
    (``bench.task.windows``, as ``bench.dataparallel`` draws them), clipped, one AdamW step at
    the task's learning rate.
    Bytes are a ring all-reduce's: 2 (N − 1) / N × 4 bytes × parameters per peer per step."""
    corpus = corpus or load_corpus(spec.data)
    model = build_model(spec.model).to(device).train()
    parameters = list(model.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=spec.inner_lr, betas=spec.betas, weight_decay=spec.weight_decay)
    marks, curve, schedule = set(checkpoint_steps(spec)), [], spec.training_schedule()
    began = time.perf_counter()
    for step in range(spec.steps + 1):
        if step in marks:
            curve.append({"step": step, "heldout_loss": evaluate(model, corpus, spec)})
        if step == spec.steps:
            break
        for group in optimizer.param_groups:
            group["lr"] = schedule.inner_lr_at(step)
        optimizer.zero_grad(set_to_none=True)
        for rank in range(spec.peers):
            (batch_loss(model, windows(corpus, spec, rank, step).to(device)) / spec.peers).backward()
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
        optimizer.step()
    numel = sum(p.numel() for p in parameters)
    return {
        "contender": "dp-fp32",
        "heldout_loss": curve[-1]["heldout_loss"],
        "curve": curve,
        "rounds": spec.steps,
        "peers": spec.peers,
        "tokens": spec.tokens,
        "payload_bytes": 4 * numel,
        "bytes_per_peer": 2 * (spec.peers - 1) / spec.peers * 4 * numel * spec.steps,
        "compute_seconds": time.perf_counter() - began,
        "codec_seconds": 0.0,
        "parameters": numel,
    }
