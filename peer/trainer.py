"""One peer's training: H inner AdamW steps, the outer gradient, the outer step.

    round r:  x' = H AdamW steps from x_r (the round's start) on this peer's windows
              Δ  = x_r − x'                       (the outer gradient)
              Δ̄  = weighted mean of the group's decoded Δ (own decoded Δ when the round was local)
              m  = μ·m + Δ̄ ;  θ_{r+1} = θ_r − η·(Δ̄ + μ·m)   (Nesterov; plain momentum without)

Synchronous rounds start at x_r = θ_r. Overlapped rounds (``averaging.overlap``) start the
next round before Δ̄ arrives, from θ_r − Δ (the consensus plus this peer's own progress not yet
averaged: ``rebase``), and apply Δ̄ one round late; see docs/protocol.md, "Staleness".

The inner AdamW state stays with the peer across rounds (as in DiLoCo); its learning rate
follows the manifest's schedule (``TrainingConfig.inner_lr_at``) by the run's step count.

An inner step always covers the run's ``batch_size`` windows; a peer short of memory splits them
into micro-batches and accumulates their gradients (``micro_batch``; on CUDA it halves the
micro-batch by itself when a step runs out of memory). On CUDA the forward and backward passes
run under bf16 autocast; parameters, gradients, AdamW's moments and the round state stay fp32.
With ``outer_momentum = 0`` the outer step is plain SGD: θ_{r+1} = θ_r − η·Δ̄.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from peer.data import Corpus, ShardCorpus
from peer.model import batch_loss, build_model
from peer.state import RoundState, StateLayout, outer_step
from protocol.errors import InputError
from protocol.manifest import RunManifest

__all__ = ["Trainer", "InnerResult"]


@dataclass(frozen=True)
class InnerResult:
    loss: float
    samples: int
    seconds: float


class Trainer:
    """Holds the model, the inner optimiser and the round-boundary state."""

    def __init__(self, manifest: RunManifest, corpus: Corpus | ShardCorpus, peer_id: str, device: str = "cpu", *,
                 config_json: bytes | None = None, micro_batch: int | None = None,
                 activation_checkpointing: bool = False):
        self.config = manifest.config
        self.corpus = corpus
        self.peer_id = peer_id
        self.device = torch.device(device)
        self.model = build_model(self.config.model, config_json).to(self.device)
        rows = self.model.get_input_embeddings().num_embeddings
        if isinstance(corpus, ShardCorpus) and corpus.index.vocab_size > rows:
            raise InputError(f"the run's tokens go up to {corpus.index.vocab_size - 1}, beyond the model's "
                             f"{rows} embeddings")
        if activation_checkpointing:  # transformers 5 renamed it; 4.x knows the old name only
            enable = getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable
            enable()
        self.model.train()
        self.micro_batch = min(micro_batch or self.config.training.batch_size, self.config.training.batch_size)
        """Windows per forward pass; the gradients of ``batch_size / micro_batch`` passes are summed."""
        self.autocast = self.device.type == "cuda"
        """bf16 autocast for the forward and backward passes (CUDA only)."""
        self.layout = StateLayout.of(self.model)
        training = self.config.training
        self.inner = torch.optim.AdamW(
            self.model.parameters(),
            lr=training.inner_lr,
            betas=training.inner_betas,
            weight_decay=training.inner_weight_decay,
        )
        flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().cpu()
        self.state = RoundState(0, flat.clone(), torch.zeros_like(flat))
        self.round_start = flat.clone()
        """x_r: where this round's inner steps started (Δ is measured from here)."""

    def load(self, state: RoundState) -> None:
        """Adopt a (verified) round-boundary state; the inner AdamW state starts over."""
        self.state = state.copy()
        self._start_at(self.state.parameters)
        self.inner.state.clear()

    def _start_at(self, flat: torch.Tensor) -> None:
        self.round_start = flat.clone()
        self._write_parameters(self.round_start)

    @torch.no_grad()
    def _write_parameters(self, flat: torch.Tensor) -> None:
        """Copy θ into the model. A copy, not ``vector_to_parameters``: that makes each parameter
        a view of ``flat``, so the inner steps would overwrite θ_r itself and Δ would be zero."""
        offset = 0
        for parameter in self.model.parameters():
            parameter.copy_(flat[offset : offset + parameter.numel()].view_as(parameter))
            offset += parameter.numel()

    def inner_steps(self, round: int, stop_requested=lambda: False, steps: int | None = None,
                    first_step: int | None = None, first_window: int = 0, slowdown: float = 1.0) -> InnerResult:
        """Run round ``round``'s inner steps (H, or ``steps`` fewer) from x_r; returns the mean loss
        (stops early if asked). ``first_step`` is the run's inner-step count at the first of these
        steps, which sets the learning rate (default round × H + first_window). ``first_window`` is
        the index within the round of the first of these steps: its windows are
        ``training_batch(..., round=round, step=first_window + k)``, so a round run in two calls
        (``steps=a``, then ``steps=b, first_step=s + a, first_window=a``) draws the same windows
        at the same rates as one call of a + b steps."""
        training = self.config.training
        first_step = round * training.inner_steps + first_window if first_step is None else first_step
        started, losses = time.monotonic(), []
        for step in range(min(training.inner_steps, steps or training.inner_steps)):
            if stop_requested():
                break
            began = time.monotonic()
            windows = self.corpus.batch(
                self.config.data, training.batch_size, peer_id=self.peer_id, round=round, step=first_window + step,
            ).to(self.device, non_blocking=True)
            for group in self.inner.param_groups:  # the run's schedule: every peer of a round agrees
                group["lr"] = training.inner_lr_at(first_step + step)
            loss = self._gradient(windows)
            if training.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), training.grad_clip)
            self.inner.step()
            losses.append(loss)
            if slowdown > 1.0:  # a slower peer, for tests and benchmarks of uneven speeds
                time.sleep((slowdown - 1.0) * (time.monotonic() - began))
        samples = len(losses) * training.batch_size
        mean = sum(losses) / len(losses) if losses else float("nan")
        return InnerResult(mean, samples, time.monotonic() - started)

    def _gradient(self, windows: torch.Tensor) -> float:
        """The gradient of the mean loss over ``windows`` in ``.grad`` (summed over micro-batches);
        returns the loss. On CUDA, a micro-batch that runs out of memory is halved and retried."""
        while True:
            try:
                return self._accumulate(windows)
            except torch.cuda.OutOfMemoryError:
                pass  # leave the handler first: its traceback holds the failed pass's activations
            self.inner.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if self.micro_batch == 1:
                raise InputError("one window does not fit in GPU memory: try --activation-checkpointing, or a GPU "
                                 "with more memory")
            self.micro_batch //= 2

    def _accumulate(self, windows: torch.Tensor) -> float:
        self.inner.zero_grad(set_to_none=True)
        total = 0.0
        for chunk in windows.split(self.micro_batch):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = batch_loss(self.model, chunk)
            (loss * (chunk.size(0) / windows.size(0))).backward()
            total += loss.detach() * chunk.size(0)
        return float(total) / windows.size(0)

    def outer_gradient(self) -> torch.Tensor:
        """Δ = x_r − x' (flat float32, CPU)."""
        local = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach().cpu()
        return self.round_start - local

    def rebase(self, own_outer_gradient: torch.Tensor) -> None:
        """Overlap: start the next round at θ − Δ (consensus plus own progress not yet averaged)."""
        self._start_at(self.state.parameters - own_outer_gradient)

    def apply_outer(self, outer_gradient: torch.Tensor) -> None:
        """The outer step on the averaged Δ; moves the consensus to round r + 1 and starts there."""
        training = self.config.training
        momentum = self.state.momentum.mul_(training.outer_momentum).add_(outer_gradient)
        update = outer_gradient + training.outer_momentum * momentum if training.nesterov else momentum
        parameters = self.state.parameters - training.outer_lr * update
        self.state = RoundState(self.state.round + 1, parameters, momentum)
        self._start_at(parameters)

    def apply_outer_in_flight(self, outer_gradient: torch.Tensor) -> None:
        """The outer step on the averaged Δ of the previous round, arriving while this round's
        inner steps run (asynchronous rounds): the consensus moves θ → θ' exactly as
        ``apply_outer`` moves it (momentum included), the live parameters keep the progress made
        since the round started (x ← θ' + (x − x_r)), and from now on this round's Δ is measured
        from θ' (x_r ← θ'). The inner AdamW state is untouched."""
        progress = -self.outer_gradient()  # x − x_r, before apply_outer resets the model to θ'
        self.apply_outer(outer_gradient)  # θ', the round counter and momentum; x_r = θ'
        self._write_parameters(self.round_start + progress)

    def advance(self, update: torch.Tensor | None, *, in_flight: bool = False) -> str | None:
        """Move the consensus one round with the round's combined update (None: nobody contributed;
        ``peer.state.outer_step``). ``in_flight``: as ``apply_outer_in_flight``, keep the progress
        made since this round's steps started; otherwise start over at the new consensus. Returns
        why the step was refused (the round is then void: ``peer.state.outer_step``), or None."""
        progress = -self.outer_gradient() if in_flight else None
        training = self.config.training
        self.state = outer_step(self.state, update, lr=training.outer_lr, momentum=training.outer_momentum,
                                nesterov=training.nesterov)
        self._start_at(self.state.parameters)
        if progress is not None:
            self._write_parameters(self.round_start + progress)
        return self.state.void
