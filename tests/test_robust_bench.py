"""Hostile replicas in the simulator and the robust-aggregation sweep: tiny tasks, seconds each.

    pytest -q tests/test_robust_bench.py

The full sweep is ``scripts/bench_robust.py`` (docs/benchmarks.md, "Robust aggregation").
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.forged_payloads import Forger
from bench.recipe import Recipe, parse_recipe
from bench.robust import choose, grid, summary
from bench.simulator import simulate
from bench.task import TaskSpec
from protocol.codecs import PayloadError, decode, encode, parse_codec, parse_payload
from protocol.errors import ConfigError
from protocol.manifest import DataSpec, ModelConfig

CODEC = "bmax-c4096-b64-s2"


def _tiny(steps: int = 12, peers: int = 4) -> TaskSpec:
    return TaskSpec(model=ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=32), data=DataSpec(seq_len=32),
                    steps=steps, peers=peers, per_peer_batch=4, eval_windows=16, curve_points=2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(hostile: str = "none", clip: float = 2.0, hostiles: int = 1) -> dict:
    recipe = Recipe(name=hostile, inner_steps=3, codec=CODEC, clip=clip, hostile=hostile, hostiles=hostiles)
    return simulate(_tiny(), recipe, keep_state=True)


def test_hostile_recipe_keys_parse_and_nonsense_is_refused():
    recipe = parse_recipe(f"h:15:{CODEC}:clip=1.5:hostile=flip:hostiles=2")
    assert (recipe.clip, recipe.hostile, recipe.hostiles, recipe.hostile_count) == (1.5, "flip", 2, 2)
    assert not recipe.swarm_can_run and parse_recipe("c").hostile_count == 0
    for bad in ("x:clip=-1", "x:clip=nan", "x:hostile=sneaky", "x:1:none:hostile=flip", "x:hostile=flip:hostiles=0"):
        with pytest.raises(ConfigError):
            parse_recipe(bad)
    with pytest.raises(ConfigError, match="none honest"):
        parse_recipe("x:hostile=scale:hostiles=4").replicas(_tiny(peers=4))


def test_each_forged_payload_is_what_its_behaviour_says():
    codec, numel = parse_codec(CODEC), 3 * 4096
    honest = [encode(codec, torch.randn(numel, generator=torch.Generator().manual_seed(s))) for s in range(2)]
    x = decode(honest[1], codec, numel)
    forged = {b: Forger(b, codec, numel, "0" * 16) for b in ("flip", "scale", "flipscale", "noise", "replay", "nan")}
    out = {b: decode(f.payload(honest[0], 0), codec, numel) if b != "nan" else None for b, f in forged.items()}
    assert torch.equal(out["replay"], decode(honest[0], codec, numel))
    out = {b: f.payload(honest[1], 1) for b, f in forged.items()}
    assert out["replay"] == honest[0]  # the first round's payload, again
    assert all(len(p) == len(honest[1]) for p in out.values())
    flip = decode(out["flip"], codec, numel)
    assert torch.allclose(flip, -x, rtol=0.05, atol=1e-6 * float(x.abs().max()))
    assert float(decode(out["scale"], codec, numel).norm() / x.norm()) == pytest.approx(1000, rel=0.02)
    assert float(decode(out["flipscale"], codec, numel) @ x) < 0
    noise = decode(out["noise"], codec, numel)
    assert float(noise.norm()) == pytest.approx(float(x.norm()), rel=0.02)
    assert abs(float(noise @ x)) < 0.2 * float(x.norm()) ** 2  # not the honest direction
    with pytest.raises(PayloadError):
        parse_payload(out["nan"], codec, numel)


def test_clipping_stops_a_scaled_payload_that_wrecks_the_unclipped_mean():
    clean = _run(clip=0.0)
    unclipped, clipped = _run("scale", clip=0.0), _run("scale", clip=2.0)
    assert unclipped["heldout_loss"] > 2 * clean["heldout_loss"]  # ×1000 of Δ took over the mean
    assert clipped["heldout_loss"] < 1.05 * clean["heldout_loss"]
    assert clipped["clipped_hostile"] == clipped["rounds"] == 4 and unclipped["clipped_hostile"] == 0
    assert clean["clipped_honest"] == 0 and clean["rejected"] == 0


def test_hostile_payloads_enter_the_combine_and_a_bad_one_is_rejected():
    clean = _run()
    assert not torch.equal(_run("flip")["state"], clean["state"])  # the forged payload is in the mean
    assert not torch.equal(_run("flip", hostiles=2)["state"], _run("flip")["state"])
    rejected = _run("nan")
    assert rejected["rejected"] == rejected["rounds"]  # every round, the one unparseable payload
    assert not torch.equal(rejected["state"], clean["state"])


def test_the_sweep_judges_each_ratio_against_the_clean_unclipped_run():
    base = Recipe(name="b", codec=CODEC)
    plan = grid(base, (0.0, 2.0), ("flip", "scale"))
    assert [(r.clip, r.hostile, r.hostile_count) for r in plan] == [
        (0.0, "none", 0), (0.0, "flip", 1), (0.0, "scale", 1), (2.0, "none", 0), (2.0, "flip", 1), (2.0, "scale", 1)]
    losses = [2.0, 2.06, float("inf"), 2.02, 2.05, 2.03]
    results = [{"contender": r.name, "recipe": dataclasses.asdict(r), "hostiles": r.hostile_count,
                "heldout_loss": loss} for r, loss in zip(plan, losses, strict=True)]  # fmt: skip
    rows = summary(results, ("flip", "scale"))
    assert [r["worst_attack"] for r in rows] == ["scale", "flip"]
    assert rows[1]["clean_cost"] == pytest.approx(0.01) and rows[1]["worst_vs_clean0"] == pytest.approx(0.025)
    assert [r["meets_goal"] for r in rows] == [False, True] and choose(rows, 2) == [2.0]
