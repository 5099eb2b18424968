"""Robust aggregation, measured: ``combine``'s clip ratio against hostile replicas.

    python scripts/bench_robust.py            # the full sweep (docs/benchmarks.md, "Robust aggregation")
    python scripts/bench_robust.py --quick    # smoke test, ~1.5 minutes

5 replicas train the task in the simulator (``bench.simulator``: the real Trainer, codecs and
``combine``) with the default recipe, once per (clip ratio, behaviour): clean, and 1 of 5
hostile for each attack of ``bench.forged_payloads``. Then, for the ratio or two that held best, 2 of 5
hostile, and one payload that fails to parse (combine must reject it whatever the ratio), with
the "one peer alone" control beside them. A row's loss is compared with the clean run at the
same ratio (what the attack costs under that rule) and with the clean run at ratio 0 (the
unprotected protocol with nobody hostile: attack and clipping together).

The issue's goal: with 1 of 5 hostile, every behaviour within ``GOAL`` (5%) of the clean loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from bench.bytes_to_loss import ALONE, controls
from bench.recipe import Recipe
from bench.simulator import simulate
from bench.sweep import run_sweep
from bench.task import TaskSpec
from protocol.errors import InputError

__all__ = ["ATTACKS", "GOAL", "RATIOS", "choose", "grid", "run_robust", "simulate_or_diverge", "summary",
           "summary_table", "table", "variant"]

RATIOS: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0)
"""Clip ratios swept (0: clipping off)."""
ATTACKS: tuple[str, ...] = ("flip", "scale", "flipscale", "noise", "replay")
"""Behaviours of ``bench.forged_payloads`` that send a well-formed payload: the ones a clip ratio must absorb."""
GOAL = 0.05
"""With 1 of 5 hostile, every behaviour within this fraction of the clean loss."""
CLEAN = "clean"


def variant(base: Recipe, clip: float, behaviour: str = CLEAN, hostiles: int = 1) -> Recipe:
    """``base`` at clip ratio ``clip`` with ``hostiles`` replicas behaving as ``behaviour``."""
    if behaviour == CLEAN:
        return dataclasses.replace(base, name=f"clip{clip:g}-clean", clip=clip, hostile="none")
    return dataclasses.replace(base, name=f"clip{clip:g}-{behaviour}-{hostiles}of", clip=clip, hostile=behaviour,
                               hostiles=hostiles)  # fmt: skip


def grid(base: Recipe, ratios: Sequence[float] = RATIOS, attacks: Sequence[str] = ATTACKS) -> list[Recipe]:
    """Every ratio, clean and with each attack by 1 replica."""
    return [variant(base, clip, behaviour) for clip in ratios for behaviour in (CLEAN, *attacks)]


def simulate_or_diverge(spec: TaskSpec, recipe: Recipe, device: str) -> dict[str, Any]:
    """``simulate``, or, when the consensus went non-finite (an unclipped attack can do that: the
    next outer gradient then fails the codec's finite check), a result with an infinite loss."""
    try:
        return simulate(spec, recipe, device=device)
    except InputError as error:
        count = recipe.replicas(spec)
        return {"contender": recipe.name, "recipe": recipe.to_dict(), "heldout_loss": float("inf"),
                "diverged": str(error), "curve": [], "rounds": len(recipe.schedule(spec)), "peers": count,
                "hostiles": recipe.hostile_count, "rejected": 0, "clipped_honest": 0, "clipped_hostile": 0}


def _key(result: dict[str, Any]) -> tuple[float, str, int]:
    recipe = result["recipe"]
    return recipe["clip"], CLEAN if recipe["hostile"] == "none" else recipe["hostile"], result["hostiles"]


def summary(results: Sequence[dict[str, Any]], attacks: Sequence[str] = ATTACKS) -> list[dict[str, Any]]:
    """Per swept ratio: what clipping costs a clean run (vs ratio 0), and the worst 1-of-5 attack
    against the clean run at that ratio and at ratio 0; ``meets_goal`` on the latter."""
    loss = {_key(r): r["heldout_loss"] for r in results if r["contender"] != ALONE}
    ratios = sorted({clip for clip, behaviour, _ in loss if behaviour == CLEAN})
    if 0.0 not in ratios:
        return []
    clean0 = loss[(0.0, CLEAN, 0)]
    rows = []
    for clip in ratios:
        clean = loss[(clip, CLEAN, 0)]
        attacked = {a: loss[(clip, a, 1)] for a in attacks if (clip, a, 1) in loss}
        worst = max(attacked, key=attacked.get) if attacked else None
        rows.append({
            "clip": clip, "clean_cost": clean / clean0 - 1, "worst_attack": worst,
            "worst_vs_clean": attacked[worst] / clean - 1 if worst else None,
            "worst_vs_clean0": attacked[worst] / clean0 - 1 if worst else None,
            "meets_goal": bool(worst) and attacked[worst] / clean0 - 1 <= GOAL,
        })  # fmt: skip
    return rows


def choose(rows: Sequence[dict[str, Any]], count: int) -> list[float]:
    """The ``count`` ratios (> 0) whose worst 1-of-5 attack costs least against clean at ratio 0."""
    ranked = sorted((r for r in rows if r["clip"] > 0 and r["worst_vs_clean0"] is not None),
                    key=lambda r: (r["worst_vs_clean0"], r["clean_cost"]))  # fmt: skip
    return [r["clip"] for r in ranked[:count]]


def run_robust(spec: TaskSpec, base: Recipe, *, ratios: Sequence[float] = RATIOS, attacks: Sequence[str] = ATTACKS,
               two_of_five: int = 2, workers: int = 2, device: str = "cpu",
               on_result: Callable[[dict[str, Any]], None] = print) -> dict[str, Any]:
    """The sweep: the grid (and the alone control), then 2 hostile of each attack and one that
    sends an unparseable payload at the ``two_of_five`` best ratios. Results in run order."""
    if 0.0 not in ratios:
        ratios = (0.0, *ratios)  # every row is compared with the unprotected clean run
    first = run_sweep(spec, [*grid(base, ratios, attacks), controls(base)[0]], workers=workers, device=device,
                      on_result=on_result, runner=simulate_or_diverge)  # fmt: skip
    best = choose(summary(first, attacks), two_of_five)
    second = [variant(base, clip, attack, 2) for clip in best for attack in attacks]
    second += [variant(base, clip, "nan") for clip in best[:1]]
    results = first + run_sweep(spec, second, workers=workers, device=device, on_result=on_result,
                                runner=simulate_or_diverge)  # fmt: skip
    rows = summary(results, attacks)
    passing = [r for r in rows if r["clip"] > 0 and r["meets_goal"]]
    recommended = min(passing, key=lambda r: (r["clean_cost"], r["worst_vs_clean0"]))["clip"] if passing else None
    return {"results": results, "summary": rows, "two_of_five_ratios": best, "recommended_clip": recommended}


def table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: one row per run, against the clean run at its ratio and at ratio 0."""
    loss = {_key(r): r["heldout_loss"] for r in results if r["contender"] != ALONE}
    clean0 = loss.get((0.0, CLEAN, 0))
    lines = ["| clip | behaviour | hostile | held-out | vs clean, same clip | vs clean, clip 0 |"
             " hostile clipped | honest clipped | rejected |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        held = result["heldout_loss"]
        if result["contender"] == ALONE:
            lines.append(f"| — | alone (1 peer) | — | {_loss(held)} | — | {_versus(held, clean0)} | — | — | — |")
            continue
        clip, behaviour, hostiles = _key(result)
        clean = loss.get((clip, CLEAN, 0))
        member_rounds = result["rounds"] * hostiles
        lines.append(f"| {clip:g} | {behaviour} | {hostiles} of {result['peers']} | {_loss(held)} |"
                     f" {_versus(held, clean)} | {_versus(held, clean0)} |"
                     f" {result['clipped_hostile']}/{member_rounds} |"
                     f" {result['clipped_honest']}/{result['rounds'] * (result['peers'] - hostiles)} |"
                     f" {result['rejected']} |")  # fmt: skip
    return "\n".join(lines)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: per ratio, clipping's cost and the worst 1-of-5 attack."""
    lines = ["| clip | clean vs clean at clip 0 | worst 1-of-5 attack | vs clean, same clip | vs clean, clip 0 |"
             f" within {GOAL:.0%} |", "| ---: | ---: | --- | ---: | ---: | --- |"]
    for row in rows:
        worst = row["worst_attack"] or "—"
        lines.append(f"| {row['clip']:g} | {row['clean_cost']:+.1%} | {worst} | {_signed(row['worst_vs_clean'])} |"
                     f" {_signed(row['worst_vs_clean0'])} | {'yes' if row['meets_goal'] else 'no'} |")
    return "\n".join(lines)


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "diverged"


def _versus(loss: float, reference: float | None) -> str:
    return "—" if reference is None else _signed(loss / reference - 1)


def _signed(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:+.1%}" if math.isfinite(value) else "diverged"
