"""Sweeps: many recipes through the simulator, a few at a time, and the sets that chose the defaults.

    python scripts/bench_simulate.py --sweep outer          # one named set (see SWEEPS)
    python scripts/bench_simulate.py --recipe a --recipe b  # any recipes (bench/recipe.py syntax)

Each recipe runs in its own worker process (one torch thread each, ``workers`` at a time), so a
sweep of a dozen recipes on the reference task takes about as many minutes as a swarm run.
Results are ``bench.simulator.simulate`` summaries; ``table`` prints them beside the controls.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import torch

from bench.recipe import Recipe, parse_recipe
from bench.simulator import simulate, simulate_dataparallel
from bench.task import TaskSpec

__all__ = ["SWEEPS", "sweep_recipes", "run_sweep", "table"]

_SL = "lr=1:mom=0:decay=0.95:agg=senders"  # SparseLoCo's outer step: decayed error feedback, SGD 1
_BMAX = "bmax-c4096-b64-s2"

SWEEPS: dict[str, list[str]] = {
    # the outer step and the aggregation, at H 25 (the table, and what changed it);
    # every key is spelled out, so these mean the same whatever the manifest's defaults are
    "outer": [
        "diloco:25:none:lr=0.7:mom=0.9:nesterov=1",
        "plain-avg:25:none:lr=1:mom=0",
        "topk-q2-nesterov:25:topk-c4096-k64-q2:lr=0.7:mom=0.9:nesterov=1:decay=1:agg=mean",
        "topk-q2-sgd:25:topk-c4096-k64-q2:lr=1:mom=0:decay=1:agg=mean",
        "topk-q2-ef95:25:topk-c4096-k64-q2:lr=1:mom=0:decay=0.95:agg=mean",
        f"topk-q2-sl:25:topk-c4096-k64-q2:{_SL}",
        f"topk-f32-sl:25:topk-c4096-k64-f32:{_SL}",
        "topk-f32-sl-mean:25:topk-c4096-k64-f32:lr=1:mom=0:decay=0.95:agg=mean",
    ],
    # the codec under the SparseLoCo step at H 25: quantiser, index coding, density
    "codec": [
        f"topk-s2-sl:25:topk-c4096-k64-s2:{_SL}",
        f"bmax-b64-sl:25:{_BMAX}:{_SL}",
        f"bmax-b32-sl:25:bmax-c4096-b32-s2:{_SL}",
    ],
    # the step's knobs around the chosen codec at H 25
    "step": [
        f"bmax-lr1.3:25:{_BMAX}:lr=1.3:mom=0:decay=0.95:agg=senders",
        f"bmax-lr1.6:25:{_BMAX}:lr=1.6:mom=0:decay=0.95:agg=senders",
        f"bmax-d0.98:25:{_BMAX}:lr=1:mom=0:decay=0.98:agg=senders",
    ],
    # rounds: H, and density against H at about equal bytes
    "rounds": [
        f"bmax-b64-h50:50:{_BMAX}:{_SL}",
        f"bmax-b32-h50:50:bmax-c4096-b32-s2:{_SL}",
        f"bmax-b64-h15:15:{_BMAX}:{_SL}",
        f"bmax-b128-h12:12:bmax-c4096-b128-s2:{_SL}",
        f"bmax-b64-h10:10:{_BMAX}:{_SL}",
    ],
    # around the default (H 15): update rules, an H that starts small, outer Nesterov,
    # and sample weighting when half the peers run at half speed
    "default": [
        f"eager:15:{_BMAX}:{_SL}:rule=eager",
        f"delayed:15:{_BMAX}:{_SL}:rule=delayed",
        f"h0-1:15:{_BMAX}:{_SL}:h0=1",
        f"nesterov:15:{_BMAX}:lr=0.5:mom=0.9:nesterov=1:decay=1:agg=senders",
        f"uneven-samples:15:{_BMAX}:{_SL}:speeds=1/1/0.5/0.5:weights=samples",
        f"uneven-uniform:15:{_BMAX}:{_SL}:speeds=1/1/0.5/0.5:weights=uniform",
    ],
    # asynchronous rounds (rule=arrival): round r's update lands `lag` inner steps into round
    # r + 1, against sync at the same default step (H 15); the rule is spelled out, as the
    # manifest's default may be either
    "arrival": [
        f"sync:15:{_BMAX}:{_SL}:rule=sync",
        f"arrival-lag1:15:{_BMAX}:{_SL}:rule=arrival:lag=1",
        f"arrival-lag2:15:{_BMAX}:{_SL}:rule=arrival:lag=2",
        f"arrival-lag4:15:{_BMAX}:{_SL}:rule=arrival:lag=4",
    ],
}
"""Named recipe sets, in ``bench.recipe`` syntax; the "alone" control is added to every set."""


def sweep_recipes(name: str) -> list[Recipe]:
    return [parse_recipe(text) for text in SWEEPS[name]]


def _init_worker() -> None:
    torch.set_num_threads(1)


def _run_one(spec: TaskSpec, recipe: Recipe | None, device: str) -> dict[str, Any]:
    return simulate_dataparallel(spec, device=device) if recipe is None else simulate(spec, recipe, device=device)


def run_sweep(spec: TaskSpec, recipes: list[Recipe | None], *, workers: int = 2, device: str = "cpu",
              on_result: Callable[[dict[str, Any]], None] = print,
              runner: Callable[[TaskSpec, Recipe | None, str], dict[str, Any]] = _run_one) -> list[dict[str, Any]]:
    """Simulate every recipe (None: data-parallel), ``workers`` at a time; results in the given order.
    ``runner(spec, recipe, device)`` runs one (a module-level function: workers are spawned)."""
    if workers <= 1:
        _init_worker()
        results = [runner(spec, recipe, device) for recipe in recipes]
        for result in results:
            on_result(result)
        return results
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    results: dict[int, dict[str, Any]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(runner, spec, recipe, device): i for i, recipe in enumerate(recipes)}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            on_result(results[futures[future]])
    return [results[i] for i in range(len(recipes))]


def dataparallel_bytes(spec: TaskSpec, parameters: int) -> float:
    """Bytes per peer of fp32 ring all-reduce data parallelism on ``spec``: 2 (N − 1) / N × 4 × n a step."""
    return 2 * (spec.peers - 1) / spec.peers * 4 * parameters * spec.steps


def table(spec: TaskSpec, results: list[dict[str, Any]]) -> str:
    """Markdown: held-out loss, against "alone" and data-parallel when present, payload bytes and ratio."""
    alone = next((r for r in results if r["contender"] == "alone"), None)
    dp = next((r for r in results if r["contender"] == "dp-fp32"), None)
    lines = ["| recipe | held-out | vs alone | vs dp-fp32 | rounds | payload bytes per peer | dp-fp32 bytes / these |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        loss, sent = result["heldout_loss"], result["bytes_per_peer"]
        ratio = dataparallel_bytes(spec, result["parameters"]) / sent if sent > 0 else None
        lines.append(f"| {result['contender']} | {loss:.4f} | {_versus(loss, alone)} | {_versus(loss, dp)} | {result['rounds']} |"
                     f" {sent / 1e6:.3f} MB | {'—' if ratio is None else f'{ratio:,.0f}×'} |")
    return "\n".join(lines)


def _versus(loss: float, reference: dict[str, Any] | None) -> str:
    return "—" if reference is None else f"{loss / reference['heldout_loss'] - 1:+.1%}"


def cpu_workers() -> int:
    """Workers for this machine: one per core."""
    return max(1, len(os.sched_getaffinity(0)))


AGREEMENT_TOLERANCE = 0.01
"""The simulator agrees with the swarm when their held-out losses differ by at most 1%."""


def check_agreement(spec: TaskSpec, recipe: Recipe, workdir, *, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Train ``recipe`` once with a real swarm (``bench.barnraise_contender``, as the bytes-to-loss
    benchmark runs it) and once in the simulator; their held-out losses, the relative gap, and the
    share of swarm rounds whose update held every peer's contribution (the simulator's all do).
    The simulator runs on one torch thread, as the peers do: with more, CPU kernels sum in another
    order and the bits differ (measured: 0.27% apart on the reference task, against bit-identical
    on one thread)."""
    from bench.barnraise_contender import run_barnraise  # a swarm: only when a check asks for one

    swarm = run_barnraise(spec, recipe, workdir, timeout_s=timeout_s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the swarm's peers run (--threads 1): the same bits when every round averaged
    try:
        simulated = simulate(spec, recipe)
    finally:
        torch.set_num_threads(threads)
    gap = simulated["heldout_loss"] / swarm["heldout_loss"] - 1
    return {"recipe": recipe.name, "swarm_heldout_loss": swarm["heldout_loss"],
            "simulated_heldout_loss": simulated["heldout_loss"], "relative_gap": gap,
            "agrees": abs(gap) <= AGREEMENT_TOLERANCE, "swarm_full_group_fraction": swarm["full_group_fraction"],
            "swarm_curve": swarm["curve"], "simulated_curve": simulated["curve"]}
