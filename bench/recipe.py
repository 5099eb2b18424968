"""A recipe: one way for N peers to train the reference task, as the simulator and the swarm run it.

A recipe's defaults are the manifest's defaults (``protocol.manifest``), so ``Recipe(name="default")``
is what a run launched with an empty ``[training]`` and ``[averaging]`` does. ``run_config`` turns a
recipe into the run config a coordinator would sign (the parts a manifest holds); the rest
(``update_rule`` other than sync and arrival, ``weighting``, ``speeds``, ``first_inner_steps``, a
``clip`` other than the protocol's, ``hostile`` replicas) only the simulator (``bench.simulator``) can run.

On the command line a recipe is ``NAME[:H[:CODEC]][:key=value...]``, e.g.

    default                                   the manifest's defaults
    h50:50:topk-c4096-k64-q2:lr=0.7:mom=0.9   H 50, that codec, outer learning rate and momentum
    diloco:25:none                            uncompressed (the exact mean of the outer gradients)

with keys ``ilr`` (the inner AdamW rate), ``lr``, ``mom``, ``nesterov`` (0/1), ``decay`` (error feedback), ``agg`` (mean, senders),
``weights`` (samples, uniform), ``rule`` (sync, delayed, rebase, eager, arrival; ``overlap`` is short
for ``rule=arrival``), ``lag`` (arrival: the inner steps into round r + 1 at which round r's update
arrives), ``h0`` (first inner steps of a doubling H schedule), ``speeds`` (slash-separated,
e.g. ``1/1/0.5/0.25``), ``peers``, ``clip`` (combine's clip ratio, 0: off), ``hostile`` (what the
hostile replicas send: ``bench.forged_payloads``) and ``hostiles`` (how many), e.g.
``flip2:15:bmax-c4096-b64-s2:clip=2:hostile=flip:hostiles=2``. The inner learning rate and its schedule belong to the task
(``bench.task.TaskSpec``): every contender of a comparison trains with the same schedule, and a
recipe may only set its peers' own rate (``ilr``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from bench.forged_payloads import BEHAVIOURS, Behaviour
from bench.task import TaskSpec
from protocol.codecs import parse_codec
from protocol.errors import ConfigError
from protocol.manifest import AveragingConfig, RunConfig, TrainingConfig
from protocol.policy import CLIP_RATIO

__all__ = ["Recipe", "run_config", "parse_recipe"]

_TRAINING, _AVERAGING = TrainingConfig(), AveragingConfig()


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Everything that changes what N peers learn from the task (defaults: the manifest's)."""

    name: str
    inner_steps: int = _TRAINING.inner_steps
    """H: inner steps per round (the full-speed peer's, with ``speeds``)."""
    codec: str | None = _AVERAGING.codec
    """Wire codec of the outer gradients; None: uncompressed (the exact float32 mean, 4 bytes a value)."""
    inner_lr: float | None = None
    """The peers' AdamW rate; None takes the task's (a peer's batch is 1/N of data-parallel's, so
    its best rate may differ: a recipe may tune it, and the "alone" control follows it)."""
    outer_lr: float = _TRAINING.outer_lr
    outer_momentum: float = _TRAINING.outer_momentum
    nesterov: bool = _TRAINING.nesterov
    error_feedback_decay: float = _AVERAGING.error_feedback_decay
    aggregation: Literal["mean", "senders"] = _AVERAGING.aggregation
    weighting: Literal["samples", "uniform"] = "samples"
    """Combine weights: the samples of the round (what the swarm sends), or 1 each (simulator only)."""
    update_rule: Literal["sync", "delayed", "rebase", "eager", "arrival"] = "arrival" if _AVERAGING.overlap else "sync"
    """See ``bench.simulator``; the swarm runs sync and arrival (``averaging.overlap``; its lag is
    whatever the settle time and the fetch take, in inner steps)."""
    lag: int = 1
    """arrival (simulator only): round r's update arrives ``lag`` inner steps into round r + 1."""
    first_inner_steps: int | None = None
    """H schedule (simulator only): round r takes min(H, first_inner_steps · 2**r) steps."""
    speeds: tuple[float, ...] | None = None
    """Relative speed of each peer (simulator only): peer i takes round(H · speed_i) steps a round."""
    peers: int | None = None
    """Peers; None takes the task's count (1 is the "one peer alone" control)."""
    clip: float = CLIP_RATIO
    """``combine``'s clip ratio: each payload scaled to at most this many times the group's median
    payload norm (``protocol.policy.clip_scales``); 0 turns clipping off. The swarm runs the protocol's."""
    hostile: Behaviour = "none"
    """What the first ``hostiles`` replicas in peer-id order send instead of their payload
    (simulator only, with a codec; ``bench.forged_payloads``)."""
    hostiles: int = 1
    """How many replicas are hostile when ``hostile`` is not "none"."""

    def __post_init__(self) -> None:
        if self.inner_steps < 1 or (self.first_inner_steps is not None and self.first_inner_steps < 1):
            raise ConfigError(f"recipe {self.name}: inner steps must be positive")
        if self.codec is not None:
            parse_codec(self.codec)
        if self.speeds is not None and not all(0 < s <= 1 for s in self.speeds):
            raise ConfigError(f"recipe {self.name}: speeds must lie in (0, 1]")
        if self.weighting not in ("samples", "uniform"):
            raise ConfigError(f"recipe {self.name}: weights must be samples or uniform")
        if self.update_rule not in ("sync", "delayed", "rebase", "eager", "arrival"):
            raise ConfigError(f"recipe {self.name}: rule must be sync, delayed, rebase, eager or arrival")
        if self.lag < 0:
            raise ConfigError(f"recipe {self.name}: lag must not be negative")
        if self.peers is not None and self.peers < 1:
            raise ConfigError(f"recipe {self.name}: peers must be positive")
        if not (math.isfinite(self.clip) and self.clip >= 0):
            raise ConfigError(f"recipe {self.name}: clip must be a finite ratio, 0 or more")
        if self.hostile not in BEHAVIOURS:
            raise ConfigError(f"recipe {self.name}: hostile must be one of {', '.join(BEHAVIOURS)}")
        if self.hostiles < 0 or (self.hostile != "none" and (self.hostiles < 1 or self.codec is None)):
            raise ConfigError(f"recipe {self.name}: hostile replicas need a codec and a positive count")

    def replicas(self, spec: TaskSpec) -> int:
        count = self.peers or spec.peers
        if self.speeds is not None and len(self.speeds) != count:
            raise ConfigError(f"recipe {self.name}: {len(self.speeds)} speeds for {count} peers")
        if self.hostile != "none" and self.hostiles >= count:
            raise ConfigError(f"recipe {self.name}: {self.hostiles} hostile of {count} peers leaves none honest")
        return count

    @property
    def hostile_count(self) -> int:
        """Replicas that forge their payload (0 for a clean recipe)."""
        return 0 if self.hostile == "none" else self.hostiles

    def schedule(self, spec: TaskSpec) -> list[int]:
        """Inner steps of each round; the run ends when a full-speed peer has taken ``spec.steps``."""
        rounds, done = [], 0
        while done < spec.steps:
            count = self.inner_steps
            if self.first_inner_steps is not None:
                count = min(count, self.first_inner_steps * 2 ** min(len(rounds), 30))
            rounds.append(min(count, spec.steps - done))
            done += rounds[-1]
        return rounds

    @property
    def swarm_can_run(self) -> bool:
        """Whether ``barnraise-peer`` runs this recipe as it is (the rest only the simulator does)."""
        return (self.codec is not None and self.update_rule in ("sync", "arrival") and self.weighting == "samples"
                and self.first_inner_steps is None and self.speeds is None and self.clip == CLIP_RATIO
                and self.hostile == "none")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_config(spec: TaskSpec, recipe: Recipe, *, averaging: dict[str, Any] | None = None,
               eval_windows: int | None = None) -> RunConfig:
    """The run config for this recipe on this task (``averaging`` overrides the swarm's settings)."""
    training = TrainingConfig(
        inner_steps=recipe.inner_steps, batch_size=spec.per_peer_batch, inner_lr=recipe.inner_lr or spec.inner_lr,
        inner_betas=spec.betas, inner_weight_decay=spec.weight_decay, grad_clip=spec.grad_clip,
        outer_lr=recipe.outer_lr, outer_momentum=recipe.outer_momentum, nesterov=recipe.nesterov,
        lr_schedule=spec.lr_schedule, warmup_steps=spec.warmup_steps,
        total_steps=spec.steps if spec.lr_schedule == "cosine" else 0, min_lr_ratio=spec.min_lr_ratio,
    )  # fmt: skip
    # one group of every peer, where the manifest forms groups (not a field of windowed rounds)
    swarm = {"target_group_size": max(2, recipe.replicas(spec))} if hasattr(_AVERAGING, "target_group_size") else {}
    swarm.update(averaging or {})
    averaging_config = AveragingConfig(
        codec=recipe.codec or "fp16", error_feedback_decay=recipe.error_feedback_decay,
        aggregation=recipe.aggregation, overlap=recipe.update_rule == "arrival", **swarm,
    )  # fmt: skip
    data = spec.data if eval_windows is None else dataclasses.replace(spec.data, eval_windows=eval_windows)
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"bench-{recipe.name}")[:64]
    return RunConfig(name=name, model=spec.model, data=data, training=training, averaging=averaging_config)


_KEYS: dict[str, tuple[str, Any]] = {
    "ilr": ("inner_lr", float),
    "lr": ("outer_lr", float),
    "mom": ("outer_momentum", float),
    "nesterov": ("nesterov", lambda v: {"0": False, "1": True}[v]),
    "decay": ("error_feedback_decay", float),
    "agg": ("aggregation", str),
    "weights": ("weighting", str),
    "rule": ("update_rule", str),
    "lag": ("lag", int),
    "h0": ("first_inner_steps", int),
    "speeds": ("speeds", lambda v: tuple(float(s) for s in v.split("/"))),
    "peers": ("peers", int),
    "clip": ("clip", float),
    "hostile": ("hostile", str),
    "hostiles": ("hostiles", int),
}


def parse_recipe(text: str) -> Recipe:
    """A recipe from ``NAME[:H[:CODEC]][:key=value...]`` (see the module docstring), or ConfigError."""
    name, *parts = text.split(":")
    fields: dict[str, Any] = {}
    positional = [p for p in parts if "=" not in p and p != "overlap"]
    if not name or len(positional) > 2 or any("=" not in p and p != "overlap" for p in parts[len(positional):]):
        raise ConfigError(f"recipe {text!r} is not NAME[:H[:CODEC]][:key=value...]")
    try:
        if positional:
            fields["inner_steps"] = int(positional[0])
        if len(positional) == 2:
            fields["codec"] = None if positional[1] == "none" else positional[1]
        for part in parts[len(positional):]:
            if part == "overlap":
                fields["update_rule"] = "arrival"
                continue
            key, _, value = part.partition("=")
            if key not in _KEYS:
                raise ConfigError(f"recipe {text!r}: unknown key {key!r} (known: {', '.join(_KEYS)}, overlap)")
            field_name, kind = _KEYS[key]
            fields[field_name] = kind(value)
    except (ValueError, KeyError):
        raise ConfigError(f"recipe {text!r}: a value does not parse") from None
    return Recipe(name=name, **fields)
