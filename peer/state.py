"""A peer's round-boundary state: global parameters θ_r and outer momentum, as flat vectors.

Flat vectors are what travels (one averaged outer gradient, one state download); named
views of them are what is hashed and written to checkpoints, so the canonical root of the
state a peer serves is the root of ``model/<name>`` and ``outer/<name>`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.errors import HashMismatch
from protocol.hashing import checkpoint_root
from protocol.policy import state_problem

__all__ = ["StateLayout", "RoundState"]


@dataclass(frozen=True)
class StateLayout:
    """Names and shapes of the model's parameters, in the model's order."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: torch.nn.Module) -> StateLayout:
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def size(self) -> int:
        return sum(s.numel() for s in self.shapes)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into a flat vector (no copy)."""
        if flat.numel() != self.size:
            raise HashMismatch(f"state vector has {flat.numel()} values, the model needs {self.size}")
        out, offset = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return out

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A flat float32 vector from named tensors (names and shapes must match exactly)."""
        if set(tensors) != set(self.names):
            odd = sorted(set(tensors) ^ set(self.names))[0]
            raise HashMismatch(f"state does not fit the model: tensor {odd!r} is missing or unexpected")
        for name, shape in zip(self.names, self.shapes, strict=True):
            if tensors[name].shape != shape:
                raise HashMismatch(f"state does not fit the model: tensor {name!r} has shape {tuple(tensors[name].shape)}")
        return torch.cat([tensors[n].reshape(-1).float() for n in self.names])


@dataclass
class RoundState:
    """θ_r and the outer momentum at the start of round ``round`` (flat float32, CPU)."""

    round: int
    parameters: torch.Tensor
    momentum: torch.Tensor
    void: str | None = None
    """Set by ``outer_step`` when it refused the round's step (why): the state is the previous one's."""

    def named(self, layout: StateLayout) -> dict[str, torch.Tensor]:
        """The tensors a joiner receives, by their canonical names."""
        named = {f"model/{n}": t for n, t in layout.views(self.parameters).items()}
        named.update({f"outer/{n}": t for n, t in layout.views(self.momentum).items()})
        return named

    def root(self, layout: StateLayout) -> str:
        return checkpoint_root(self.named(layout))

    def copy(self) -> RoundState:
        return RoundState(self.round, self.parameters.clone(), self.momentum.clone())


def outer_step(state: RoundState, update: torch.Tensor | None, *, lr: float, momentum: float,
               nesterov: bool) -> RoundState:
    """θ_{r+1} from θ_r and the round's combined update (the same arithmetic on every peer, the
    coordinator and any follower): ``m = μ·m + U``; ``θ − η·(U + μ·m)`` with Nesterov, else
    ``θ − η·m``. A round nobody contributed to (``update`` None) moves nothing but the round, and
    so does one whose step would leave a value that is not finite or beyond
    ``protocol.policy.MAX_PARAMETER`` (``protocol.policy.state_problem``)."""
    if update is None:
        return RoundState(state.round + 1, state.parameters.clone(), state.momentum.clone())
    moment = state.momentum.mul(momentum).add_(update)
    step = update + momentum * moment if nesterov else moment
    moved = RoundState(state.round + 1, state.parameters - lr * step, moment)
    if (problem := state_problem(moved.parameters, moved.momentum)) is not None:
        # not finite, or beyond MAX_PARAMETER: the round is void (the same on every peer, since
        # every peer computes the same update); never a poisoned consensus
        return RoundState(state.round + 1, state.parameters.clone(), state.momentum.clone(), void=problem)
    return moved
