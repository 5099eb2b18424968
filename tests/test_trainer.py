"""The peer's local training path, without a swarm: inner steps, Δ, outer step."""

from __future__ import annotations

import torch

from peer.data import load_corpus
from peer.state import RoundState
from peer.trainer import Trainer
from protocol.manifest import DataSpec, ModelConfig, RunConfig, RunManifest, TrainingConfig


def _trainer() -> Trainer:
    config = RunConfig(
        name="unit",
        model=ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=32),
        data=DataSpec(seq_len=32),
        training=TrainingConfig(inner_steps=3, batch_size=4),
    )
    manifest = RunManifest(config=config, coordinator_key="0" * 64, genesis_root="0" * 64, created_at=0.0)
    return Trainer(manifest, load_corpus(config.data), peer_id="0" * 16)


def test_inner_steps_leave_the_round_state_alone_and_give_a_nonzero_outer_gradient():
    trainer = _trainer()
    loaded = RoundState(7, trainer.state.parameters.clone() + 0.01, torch.zeros_like(trainer.state.parameters))
    trainer.load(loaded)
    before = trainer.state.parameters.clone()
    trainer.inner_steps(7)
    # θ_r must survive the inner steps untouched: the model holds a copy, not a view of it.
    assert torch.equal(trainer.state.parameters, before)
    assert torch.equal(loaded.parameters, before)
    outer_gradient = trainer.outer_gradient()
    assert float(outer_gradient.norm()) > 0.0


def test_outer_step_is_nesterov_on_the_given_outer_gradient():
    trainer = _trainer()
    training = trainer.config.training
    theta = trainer.state.parameters.clone()
    delta = torch.full_like(theta, 0.5)
    trainer.apply_outer(delta)
    expected = theta - training.outer_lr * (delta + training.outer_momentum * delta)
    assert trainer.state.round == 1
    assert torch.allclose(trainer.state.parameters, expected)
    assert torch.allclose(trainer.state.momentum, delta)
    model_now = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()
    assert torch.equal(model_now, trainer.state.parameters)
    # and the model is not a view of the state: training it must not change θ
    trainer.inner_steps(1)
    assert torch.allclose(trainer.state.parameters, expected)


def test_an_overlapped_round_starts_from_the_consensus_plus_its_own_progress():
    """rebase: x_{r+1} = θ − Δ, and the next Δ is measured from there (not from θ)."""
    trainer = _trainer()
    trainer.inner_steps(0)
    delta = trainer.outer_gradient()
    trainer.apply_outer(torch.zeros_like(delta))  # the earlier round's (empty) update arrives
    theta = trainer.state.parameters.clone()
    trainer.rebase(delta)
    model_now = torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach()
    assert torch.allclose(model_now, theta - delta)
    assert torch.allclose(trainer.round_start, theta - delta)
    assert torch.equal(trainer.state.parameters, theta), "rebase must not move the consensus"
    assert float(trainer.outer_gradient().abs().max()) == 0.0
    trainer.inner_steps(1)
    assert torch.allclose(trainer.outer_gradient(), theta - delta - torch.nn.utils.parameters_to_vector(
        trainer.model.parameters()).detach())
