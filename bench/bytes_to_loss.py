"""Bytes to loss (BENCHMARKS.md section 1): every contender on the same task, side by side.

Contenders, each training ``spec`` (N peers, the same global batch and tokens) once:

    dp-fp32         (a) data parallel, fp32 gradient all-reduce every step
    hivemind-fp16   (b) plain ``hivemind.Optimizer`` with fp16 gradients
    alone           control: ONE peer training alone on the same per-peer steps (no swarm, no
                    bytes): the swarm must beat it, or joining it was not worth it
    diloco-h<H>     control: uncompressed DiLoCo (Nesterov 0.7 / 0.9, the exact mean of the outer
                    gradients) at the default's H: what compression costs, or gains
    barnraise-NAME  (c) a Barnraise recipe (``bench.recipe``), ``barnraise-default`` the manifest's

A real run measures (a), (b) and (c) on loopback, each wrapped in a loopback byte counter so that
DHT, libp2p and coordinator traffic count with the payloads (run it in a private network
namespace: ``scripts/bench_bytes_to_loss.py`` does so when it can). The controls always run in
the simulator (``bench.simulator``): "alone" sends nothing, and DiLoCo's bytes are its exact
fp32 payloads. ``simulate=True`` runs (a), the controls and (c) in the simulator, with exact
payload bytes (no swarm overhead), in minutes.

The headline is bytes(a) / bytes(c) for a Barnraise recipe whose held-out loss is within
``LOSS_TOLERANCE`` of data-parallel's (a).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.barnraise_contender import run_barnraise
from bench.counters import InterfaceBytes
from bench.dataparallel import run_dataparallel
from bench.hivemind_baseline import run_hivemind
from bench.recipe import Recipe
from bench.simulator import simulate, simulate_dataparallel
from bench.task import TaskSpec

__all__ = ["LOSS_TOLERANCE", "DP", "HIVEMIND", "ALONE", "controls", "measure", "run_all", "table"]

LOSS_TOLERANCE = 0.02
"""A contender is "at equal loss" when its held-out loss is at most (1 + this) × data-parallel's."""
DP, HIVEMIND, ALONE = "dp-fp32", "hivemind-fp16", "alone"


def controls(default: Recipe) -> list[Recipe]:
    """The two controls for a default recipe: one peer alone, and uncompressed DiLoCo at its H."""
    alone = Recipe(name=ALONE, inner_steps=default.inner_steps, inner_lr=default.inner_lr, codec=None, outer_lr=1.0,
                   outer_momentum=0.0,
                   nesterov=False, error_feedback_decay=1.0, aggregation="mean", update_rule="sync", peers=1)
    diloco = Recipe(name=f"diloco-h{default.inner_steps}", inner_steps=default.inner_steps, inner_lr=default.inner_lr,
                    codec=None,
                    outer_lr=0.7, outer_momentum=0.9, nesterov=True, error_feedback_decay=1.0, update_rule="sync")
    return [alone, diloco]


def measure(name: str, spec: TaskSpec, workdir: Path, recipe: Recipe | None, timeout_s: float, *,
            simulated: bool = False, device: str = "cpu") -> dict[str, Any]:
    """Run one contender (under the loopback counter unless simulated); its summary plus ``bytes_per_peer``."""
    if simulated:
        summary = simulate_dataparallel(spec, device=device) if name == DP else simulate(spec, recipe, device=device)
        return {**summary, "contender": name, "simulated": True, "seconds": summary["compute_seconds"],
                "compute_fraction": None}
    folder = workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    with InterfaceBytes("lo") as counter:
        if name == DP:
            summary = run_dataparallel(spec, folder, timeout_s=timeout_s)
        elif name == HIVEMIND:
            summary = run_hivemind(spec, folder, timeout_s=timeout_s)
        else:
            summary = run_barnraise(spec, recipe, folder, timeout_s=timeout_s, device=device)
    summary.pop("ranks", None)
    count = counter.result
    return {**summary, "contender": name, "simulated": False, "bytes_per_peer": count.per_peer(spec.peers),
            "lo_tx_bytes": count.tx_bytes}


def run_all(spec: TaskSpec, recipes: list[Recipe], workdir: Path, *, baselines: tuple[str, ...] = (DP, HIVEMIND),
            with_controls: bool = True, simulated: bool = False, device: str = "cpu", timeout_s: float = 1800.0,
            on_result=print) -> list[dict[str, Any]]:
    """Baselines, controls, then every recipe, one after another (never two at once). Simulated,
    hivemind is left out (it has no in-process twin)."""
    default = next((r for r in recipes if r.name == "default"), Recipe(name="default"))
    plan: list[tuple[str, Recipe | None, bool]] = [(b, None, simulated) for b in baselines
                                                   if not (simulated and b == HIVEMIND)]
    if with_controls:
        plan += [(c.name, c, True) for c in controls(default)]
    plan += [(f"barnraise-{r.name}", r, simulated) for r in recipes]
    results = []
    for name, recipe, in_process in plan:
        results.append(measure(name, spec, workdir, recipe, timeout_s, simulated=in_process, device=device))
        on_result(results[-1])
    return results


def _ratio(reference: dict[str, Any] | None, result: dict[str, Any]) -> float | None:
    if reference is None or result["bytes_per_peer"] <= 0:
        return None
    return reference["bytes_per_peer"] / result["bytes_per_peer"]


def table(results: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """A Markdown table and the rows behind it (ratios and loss gaps to data-parallel)."""
    reference = next((r for r in results if r["contender"] == DP), None)
    rows, lines = [], [
        "| contender | held-out loss | vs dp-fp32 | tokens trained | bytes per peer | dp-fp32 bytes / these | s | compute |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        gap = result["heldout_loss"] / reference["heldout_loss"] - 1 if reference else None
        ratio = _ratio(reference, result)
        row = {
            "contender": result["contender"],
            "simulated": bool(result.get("simulated")),
            "heldout_loss": result["heldout_loss"],
            "loss_gap": gap,
            "equal_loss": gap is not None and gap <= LOSS_TOLERANCE + 1e-9,  # "within 2%" includes 2%
            "bytes_per_peer": result["bytes_per_peer"],
            "tokens": result.get("tokens"),
            "ratio_to_dp": ratio,
            "seconds": result["seconds"],
            "compute_fraction": result.get("compute_fraction"),
        }
        rows.append(row)
        gap_text = "—" if gap is None else f"{gap:+.1%}" + (" ✓" if row["equal_loss"] else "")
        ratio_text = "—" if ratio is None else f"{ratio:,.0f}×"
        compute = row["compute_fraction"]
        lines.append(
            f"| {row['contender']}{' (sim)' if row['simulated'] else ''} | {row['heldout_loss']:.4f} | {gap_text} |"
            f" {row['tokens'] or 0:,} |"
            f" {_size(row['bytes_per_peer'])} |"
            f" {ratio_text} | {row['seconds']:.0f} | {'—' if compute is None else f'{compute:.0%}'} |"
        )
    return "\n".join(lines), rows


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"
