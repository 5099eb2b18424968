"""The in-process simulator and its recipes: tiny tasks, so each test takes seconds.

    pytest -q tests/test_simulator.py

The last test runs a real swarm (coordinator and 3 peer processes) next to the simulator on the
same recipe and requires the same consensus parameters, bit for bit: the simulator is the swarm
without the network, not a model of it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import our_p2pd
from safetensors.torch import load_file

from bench.barnraise_contender import run_barnraise, run_toml
from bench.bytes_to_loss import controls
from bench.recipe import Recipe, parse_recipe, run_config
from bench.simulator import simulate, simulate_dataparallel
from bench.task import TaskSpec, swarm_peer_id
from peer.data import load_corpus, training_batch
from peer.model import batch_loss, build_model
from peer.trainer import Trainer
from protocol.codecs import payload_size
from protocol.errors import ConfigError
from protocol.manifest import DataSpec, ModelConfig, RunConfig, RunManifest


def _tiny(steps: int = 12, peers: int = 3, **changes) -> TaskSpec:
    return TaskSpec(model=ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=32), data=DataSpec(seq_len=32),
                    steps=steps, peers=peers, per_peer_batch=4, eval_windows=16, curve_points=3, **changes)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a benchmark peer runs with (--threads 1): the same bits
    yield
    torch.set_num_threads(threads)


def test_recipe_text_sets_each_field_and_refuses_nonsense():
    recipe = parse_recipe("x:50:topk-c1024-k32-q2:lr=1:mom=0:decay=0.95:agg=senders:rule=eager:h0=5:speeds=1/0.5")
    assert (recipe.inner_steps, recipe.codec, recipe.outer_lr, recipe.outer_momentum) == (50, "topk-c1024-k32-q2", 1.0, 0.0)
    assert (recipe.error_feedback_decay, recipe.aggregation, recipe.update_rule) == (0.95, "senders", "eager")
    assert recipe.first_inner_steps == 5 and recipe.speeds == (1.0, 0.5)
    assert parse_recipe("d:25:none").codec is None
    assert parse_recipe("o:10:fp16:overlap").update_rule == "arrival"
    assert parse_recipe("default") == Recipe(name="default")
    arrival = parse_recipe("a:15:bmax-c4096-b64-s2:lr=1:mom=0:decay=0.95:agg=senders:rule=arrival:lag=2")
    assert (arrival.update_rule, arrival.lag, arrival.inner_steps) == ("arrival", 2, 15)
    for bad in ("", "x:ten", "x:1:fp16:bogus=1", "x:1:notacodec", "x:1:fp16:rule=later", "x:1:fp16:lr=fast",
                "x:1:fp16:rule=arrival:lag=-1", "x:1:fp16:lag=soon"):
        with pytest.raises(ConfigError):
            parse_recipe(bad)


def test_an_h_schedule_doubles_up_to_h_and_ends_on_the_budget():
    assert Recipe(name="h", inner_steps=8, first_inner_steps=1).schedule(_tiny(steps=30)) == [1, 2, 4, 8, 8, 7]
    assert Recipe(name="h", inner_steps=5).schedule(_tiny(steps=12)) == [5, 5, 2]


def test_a_recipe_becomes_the_run_toml_a_coordinator_launches():
    spec = _tiny(lr_schedule="cosine", warmup_steps=2)
    recipe = parse_recipe("r:4:topk-c1024-k32-q2:decay=0.9:agg=senders:lr=1:mom=0")
    config = RunConfig.from_toml(run_toml(spec, recipe, eval_windows=16))
    assert config.training == run_config(spec, recipe).training
    assert config.training.total_steps == spec.steps and config.training.lr_schedule == "cosine"
    assert (config.averaging.error_feedback_decay, config.averaging.aggregation) == (0.9, "senders")
    assert config.averaging.max_contributors >= spec.peers  # every peer's contribution enters every round
    with pytest.raises(ConfigError, match="the swarm runs only"):
        run_toml(spec, parse_recipe("e:4:fp16:rule=eager"), eval_windows=16)


def test_alone_is_plain_adamw_training_on_one_peers_windows():
    """One replica with outer SGD at rate 1 and no codec is one AdamW run: the outer step puts the
    model where its inner steps left it (to float32 rounding)."""
    spec = _tiny(steps=6, peers=1)
    alone = controls(Recipe(name="default", inner_steps=3))[0]
    result = simulate(spec, alone, keep_state=True)
    corpus = load_corpus(spec.data)
    model = build_model(spec.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.inner_lr, betas=spec.betas, weight_decay=spec.weight_decay)
    for round_ in range(2):
        for step in range(3):
            windows = training_batch(corpus, spec.data, spec.per_peer_batch, peer_id=swarm_peer_id(0), round=round_,
                                     step=step)  # fmt: skip
            optimizer.zero_grad()
            batch_loss(model, windows).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
            optimizer.step()
    direct = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    # θ − 1·(θ − x') is x' up to a float32 rounding, which AdamW's later steps carry along
    assert torch.allclose(result["state"], direct, atol=1e-5, rtol=0)
    assert result["bytes_per_peer"] == 0 and result["rounds"] == 2


@pytest.mark.parametrize("rule", ["sync", "delayed", "rebase", "eager", "arrival"])
def test_every_update_rule_learns_and_counts_exact_payload_bytes(rule):
    spec = _tiny(steps=12, peers=3)
    codec = "topk-c1024-k32-q2"
    result = simulate(spec, Recipe(name=rule, inner_steps=4, codec=codec, update_rule=rule))
    assert result["rounds"] == 3
    numel = sum(p.numel() for p in build_model(spec.model).parameters())
    assert result["bytes_per_peer"] == 3 * 2 * payload_size(codec, numel)  # rounds × groupmates × payload
    assert result["curve"][0]["step"] == 0 and result["curve"][-1]["step"] == spec.steps
    assert result["heldout_loss"] < result["curve"][0]["heldout_loss"]


def _trainer(spec: TaskSpec, recipe: Recipe) -> Trainer:
    manifest = RunManifest(config=run_config(spec, recipe), coordinator_key="0" * 64, genesis_root="0" * 64,
                           created_at=0.0)  # fmt: skip
    return Trainer(manifest, load_corpus(spec.data), swarm_peer_id(0))


def _live(trainer: Trainer) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(trainer.model.parameters()).detach().clone()


def test_a_round_split_in_two_calls_trains_as_one_call():
    """first_window continues the round's window indices, first_step its learning rates."""
    spec = _tiny(steps=8, lr_schedule="cosine", warmup_steps=2)
    recipe = Recipe(name="split", inner_steps=4)
    whole, split = _trainer(spec, recipe), _trainer(spec, recipe)
    whole.inner_steps(1, steps=4, first_step=4)
    split.inner_steps(1, steps=1, first_step=4)
    split.inner_steps(1, steps=3, first_step=5, first_window=1)
    assert torch.equal(_live(whole), _live(split))
    shifted = _trainer(spec, recipe)  # and the windows do differ by index: the offset is not a no-op
    shifted.inner_steps(1, steps=1, first_step=4)
    shifted.inner_steps(1, steps=3, first_step=5)
    assert not torch.equal(_live(whole), _live(shifted))


def test_an_update_in_flight_moves_the_consensus_and_keeps_the_rounds_progress():
    spec = _tiny(steps=8)
    recipe = Recipe(name="flight", inner_steps=4, outer_lr=0.7, outer_momentum=0.9, nesterov=True)
    flight, plain = _trainer(spec, recipe), _trainer(spec, recipe)
    update = torch.randn(flight.layout.size) * 1e-2
    flight.inner_steps(0, steps=2)
    progress, adam = _live(flight) - flight.round_start, [s["exp_avg"].clone() for s in flight.inner.state.values()]
    flight.apply_outer_in_flight(update)
    plain.apply_outer(update)
    assert torch.equal(flight.state.parameters, plain.state.parameters)  # the consensus: apply_outer's step
    assert torch.equal(flight.state.momentum, plain.state.momentum) and flight.state.round == plain.state.round == 1
    assert torch.equal(flight.round_start, plain.state.parameters)  # Δ is measured from θ' from now on
    assert torch.allclose(_live(flight), plain.state.parameters + progress, atol=1e-6, rtol=0)
    assert torch.allclose(-flight.outer_gradient(), progress, atol=1e-6, rtol=0)
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(adam, flight.inner.state.values(), strict=True))


def test_arrival_is_sync_at_lag_0_rebase_at_lag_h_and_lag_changes_the_result():
    spec = _tiny(steps=12, peers=3)
    base = {"inner_steps": 4, "codec": "topk-c1024-k32-q2"}
    state = lambda **changes: simulate(spec, Recipe(name="a", **base, **changes), keep_state=True)["state"]  # noqa: E731
    arrival = {lag: state(update_rule="arrival", lag=lag) for lag in (0, 1, 2, 4)}
    assert torch.equal(arrival[0], state(update_rule="sync"))
    assert torch.allclose(arrival[4], state(update_rule="rebase"), atol=1e-4, rtol=0)
    assert not torch.equal(arrival[1], arrival[2]) and not torch.equal(arrival[2], arrival[4])


def test_uneven_speeds_and_uniform_weights_change_the_result():
    spec = _tiny(steps=8, peers=2)
    base = {"name": "s", "inner_steps": 4, "codec": None, "speeds": (1.0, 0.5)}
    by_samples = simulate(spec, Recipe(**base), keep_state=True)["state"]
    uniform = simulate(spec, Recipe(**base, weighting="uniform"), keep_state=True)["state"]
    assert not torch.equal(by_samples, uniform)


def test_dataparallel_learns_and_counts_ring_bytes():
    spec = _tiny(steps=4, peers=2)
    result = simulate_dataparallel(spec)
    numel = result["parameters"]
    assert result["bytes_per_peer"] == 2 * (2 - 1) / 2 * 4 * numel * 4
    assert result["heldout_loss"] < result["curve"][0]["heldout_loss"]


@pytest.mark.swarm
def test_the_simulator_computes_the_swarms_consensus_bit_for_bit(tmp_path):
    """3 real peer processes (every peer's contribution in every round) and the simulator train
    the same synchronous recipe: every peer's final consensus equals the simulator's, bit for bit."""
    p2pd_before = our_p2pd()
    spec = _tiny(steps=12, peers=3)
    recipe = parse_recipe("check:4:topk-c1024-k32-q2:rule=sync")
    swarm = run_barnraise(spec, recipe, tmp_path, timeout_s=240.0)
    assert swarm["full_group_fraction"] == 1.0, "a round averaged fewer than all 3 peers"
    simulated = simulate(spec, recipe, keep_state=True)
    names = [name for name, _ in build_model(spec.model).named_parameters()]  # the flat state's order
    for rank in range(spec.peers):
        final = load_file(str(tmp_path / f"p{rank}" / "final.safetensors"))
        assert set(final) == set(names)
        flat = torch.cat([final[name].reshape(-1) for name in names])
        assert torch.equal(flat, simulated["state"]), f"peer {rank}'s consensus differs from the simulator's"
    assert swarm["heldout_loss"] == simulated["heldout_loss"]
    assert our_p2pd() <= p2pd_before, "a p2pd outlived the swarm"
