"""The model: a GPT-2-family causal LM built from the manifest, and its named state.

A checkpoint holds the model's parameters by their transformers names (tied weights
once) plus the outer optimiser's momentum, so a run can resume from it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from protocol.errors import HashMismatch
from protocol.manifest import ModelConfig

__all__ = ["build_model", "parameters_by_name", "load_parameters", "heldout_loss", "batch_loss"]


def build_model(config: ModelConfig) -> GPT2LMHeadModel:
    """The genesis model: same config and seed give bitwise the same parameters (on CPU)."""
    gpt2 = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,  # byte-level vocabulary: GPT-2's default ids (50256) do not exist here
        eos_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        model = GPT2LMHeadModel(gpt2)
    return model


def parameters_by_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name; tied tensors appear once (``named_parameters`` dedups)."""
    return dict(model.named_parameters())


@torch.no_grad()
def load_parameters(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the model's parameters; the name sets and shapes must match."""
    own = parameters_by_name(model)
    if set(own) != set(tensors):
        odd = sorted(set(own) ^ set(tensors))[0]
        raise HashMismatch(f"state does not fit the model: tensor {odd!r} is missing or unexpected")
    for name, parameter in own.items():
        if tensors[name].shape != parameter.shape:
            raise HashMismatch(f"state does not fit the model: tensor {name!r} has shape {tuple(tensors[name].shape)}")
        parameter.copy_(tensors[name])


def batch_loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats/byte) of [B, T+1] windows."""
    logits = model(input_ids=windows[:, :-1]).logits  # [B, T, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), windows[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean held-out loss (nats/byte) over fixed windows, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.size(0), batch_size):
        chunk = windows[start : start + batch_size].to(device)
        total += batch_loss(model, chunk).item() * chunk.size(0)
    model.train(was_training)
    loss = total / windows.size(0)
    return loss if math.isfinite(loss) else float("inf")
