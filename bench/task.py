"""The reference task every "bytes to loss" contender trains: model, data, budget, evaluation.

Every contender trains ``spec.model`` from the same genesis parameters (``init_seed``) for
``spec.steps`` global optimizer steps of ``spec.global_batch`` windows, so all of them see
``spec.tokens`` training tokens. Peer ``rank`` at its local step ``k`` trains on
``windows(corpus, spec, rank, k)``, the same bytes whatever the contender, because the draw
is fixed by (data seed, peer id ``bench-{rank}``, round ``k``, step 0). A contender that
numbers its peers and steps the same way therefore sees identical data.

Held-out loss is ``evaluate(model, corpus, spec)``: mean next-byte cross-entropy (nats/byte)
over ``spec.eval_windows`` fixed, evenly spaced held-out windows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peer.data import Corpus, heldout_windows, training_batch
from peer.model import heldout_loss
from protocol.errors import ConfigError
from protocol.manifest import INLINE_PREFIX, DataSpec, ModelConfig, TrainingConfig
from protocol.signing import SigningKey, key_id

__all__ = ["TaskSpec", "SIZES", "reference_task", "bench_peer_id", "swarm_peer_key", "swarm_peer_id", "windows", "evaluate", "checkpoint_steps"]

_TRAINING = TrainingConfig()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One benchmark task: what is trained, on what, for how long, with which optimizer."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model (the demo's ~0.45M-parameter GPT-2 by default)."""
    data: DataSpec = field(default_factory=DataSpec)
    """Corpus, window length and data seed."""
    steps: int
    """Global optimizer steps; each consumes ``global_batch`` windows."""
    peers: int = 4
    """Number of peer processes."""
    per_peer_batch: int = 16
    """Windows each peer contributes to one global step."""
    inner_lr: float = _TRAINING.inner_lr
    """AdamW learning rate."""
    betas: tuple[float, float] = _TRAINING.inner_betas
    """AdamW betas."""
    weight_decay: float = _TRAINING.inner_weight_decay
    """AdamW weight decay."""
    grad_clip: float = _TRAINING.grad_clip
    """Clip of the averaged gradient's global norm before each step (0 disables)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """The AdamW learning rate over the run, for every contender alike: constant, or linear warmup
    then a cosine to ``min_lr_ratio`` × ``inner_lr`` at the last step (``TrainingConfig.inner_lr_at``
    with ``total_steps = steps``); a peer's step count is its own steps since the start."""
    warmup_steps: int = 0
    """Steps of linear warmup (0: none)."""
    min_lr_ratio: float = 0.1
    """Cosine: the floor, as a fraction of ``inner_lr``."""
    eval_windows: int | None = None
    """Held-out windows scored per evaluation; None takes ``data.eval_windows`` (256 is less noisy)."""
    curve_points: int = 10
    """Held-out evaluations recorded during training (plus the start) for time-to-target."""

    def __post_init__(self) -> None:
        _require(self.steps > 0, "task.steps must be positive")
        _require(self.peers > 0, "task.peers must be positive")
        _require(self.per_peer_batch > 0, "task.per_peer_batch must be positive")
        _require(self.inner_lr > 0, "task.inner_lr must be positive")
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "task.betas must be two values in [0, 1)"
        )
        _require(self.weight_decay >= 0, "task.weight_decay must be non-negative")
        _require(self.grad_clip >= 0, "task.grad_clip must be non-negative")
        self.training_schedule()  # a schedule the manifest would refuse is refused here too
        _require(self.eval_windows is None or self.eval_windows > 0, "task.eval_windows must be positive")
        _require(self.curve_points > 0, "task.curve_points must be positive")
        if not self.model.config:
            _require(self.model.n_positions >= self.data.seq_len, "task.model.n_positions must be at least data.seq_len")

    def training_schedule(self) -> TrainingConfig:
        """The learning-rate schedule as the manifest holds it: ``.inner_lr_at(step)`` is the rate."""
        try:
            return TrainingConfig(inner_lr=self.inner_lr, lr_schedule=self.lr_schedule, warmup_steps=self.warmup_steps,
                                  total_steps=self.steps if self.lr_schedule == "cosine" else 0,
                                  min_lr_ratio=self.min_lr_ratio)  # fmt: skip
        except ConfigError as error:
            raise ConfigError(f"task: {error}") from None

    @property
    def global_batch(self) -> int:
        """Windows per global optimizer step (all peers together)."""
        return self.peers * self.per_peer_batch

    @property
    def tokens(self) -> int:
        """Training tokens (bytes) of the whole run: steps x global batch x window length."""
        return self.steps * self.global_batch * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``from_dict`` inverts it (how ranks receive the task)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TaskSpec:
        """Rebuild a spec written by ``to_dict``."""
        fields = dict(values)
        fields["model"] = ModelConfig(**fields["model"])
        fields["data"] = DataSpec(**fields["data"])
        fields["betas"] = tuple(fields["betas"])
        return cls(**fields)


def bench_peer_id(rank: int) -> str:
    """The peer id whose data stream rank ``rank`` trains on, in every contender."""
    return f"bench-{rank}"


def swarm_peer_key(rank: int) -> SigningKey:
    """The signing key Barnraise's peer ``rank`` gets in every benchmark: fixed (from a hash of the
    rank), so its peer id, and with it the windows it trains on, is known before the run, and
    the simulator (``bench.simulator``) trains its replica ``rank`` on exactly those windows."""
    seed = hashlib.sha256(f"barnraise-bench-peer-{rank}".encode()).digest()
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


def swarm_peer_id(rank: int) -> str:
    """The Barnraise peer id (key id) of ``swarm_peer_key(rank)``."""
    return key_id(swarm_peer_key(rank).public_key_hex)


def windows(corpus: Corpus, spec: TaskSpec, rank: int, step: int) -> torch.Tensor:
    """[per_peer_batch, seq_len + 1] int64 windows for peer ``rank`` at its local step ``step``.

    Fixed by (data seed, ``bench-{rank}``, round=step, step=0): any contender that numbers
    peers 0..peers-1 and their local steps from 0 trains on exactly these bytes.
    """
    return training_batch(corpus, spec.data, spec.per_peer_batch, peer_id=bench_peer_id(rank), round=step, step=0)


def evaluate(model: torch.nn.Module, corpus: Corpus, spec: TaskSpec) -> float:
    """Held-out loss (nats/byte) of ``model`` over ``spec.eval_windows`` fixed held-out windows."""
    count = spec.data.eval_windows if spec.eval_windows is None else spec.eval_windows
    held_out = heldout_windows(corpus, dataclasses.replace(spec.data, eval_windows=count))
    return heldout_loss(model, held_out)


def checkpoint_steps(spec: TaskSpec) -> list[int]:
    """Global steps after which held-out loss is recorded: 0, every steps//curve_points, and the last."""
    every = max(1, spec.steps // spec.curve_points)
    return sorted({*range(0, spec.steps, every), spec.steps})


_LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 128, "intermediate_size": 352,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 128, "tie_word_embeddings": True}
SIZES: dict[str, tuple[ModelConfig, int]] = {
    "reference": (ModelConfig(), 600),
    "large": (ModelConfig(n_embd=256, n_layer=4, n_head=8), 200),
    "llama": (ModelConfig(family="llama", config=INLINE_PREFIX + json.dumps(_LLAMA, sort_keys=True, separators=(",", ":"))),
              600),
}
"""Reference model sizes and their default global steps: the demo's 0.45M-parameter GPT-2, a
3.3M-parameter one (fewer steps) where payloads, not the swarm's fixed overhead, set the bytes,
and a 0.40M-parameter Llama (RMSNorm, rotary positions, SwiGLU, grouped-query attention) on the
same bytes, its config inline."""


def reference_task(size: str = "reference", *, steps: int | None = None, **changes: Any) -> TaskSpec:
    """The bytes-to-loss task at a reference size: 4 peers, batch 16 each, 256 held-out windows."""
    if size not in SIZES:
        raise ConfigError(f"task size {size!r} is not one of {', '.join(SIZES)}")
    model, default_steps = SIZES[size]
    return TaskSpec(model=model, steps=steps or default_steps, eval_windows=256, **changes)


def benchmark_task(*, size: str = "reference", steps: int | None = None, quick: bool = False,
                   schedule: str = "constant", warmup: int = 0) -> TaskSpec:
    """The task a benchmark script's flags name: a reference size, or (``quick``) a tiny model
    for a smoke test; ``schedule`` and ``warmup`` set the inner learning rate for every contender."""
    changes = {"lr_schedule": schedule, "warmup_steps": warmup}
    if quick:
        return TaskSpec(model=ModelConfig(n_embd=64, n_layer=1, n_head=2, n_positions=64), data=DataSpec(seq_len=64),
                        steps=steps or 20, per_peer_batch=8, eval_windows=64, curve_points=2, **changes)
    return reference_task(size, steps=steps, **changes)
