"""Bytes to loss (BENCHMARKS.md section 1): every contender on the same task, side by side.

Each contender trains ``spec`` (4 peers, the same global batch and tokens) once, wrapped in a
loopback byte counter, so DHT, libp2p and coordinator traffic count with the payloads. Run it in
a private network namespace (``unshare -n``; ``scripts/bench_bytes_to_loss.py`` does so when it
can) so that no other process on the machine adds to the counter.

The headline is bytes(a) / bytes(c) for a Barnraise variant whose held-out loss is within
``LOSS_TOLERANCE`` of data-parallel's (a).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from bench.barnraise_contender import Variant, run_barnraise
from bench.counters import InterfaceBytes
from bench.dataparallel import run_dataparallel
from bench.hivemind_baseline import run_hivemind
from bench.task import TaskSpec

__all__ = ["LOSS_TOLERANCE", "measure", "run_all", "table", "DP", "HIVEMIND"]

LOSS_TOLERANCE = 0.02
"""A contender is "at equal loss" when its held-out loss is at most (1 + this) × data-parallel's."""
DP, HIVEMIND = "dp-fp32", "hivemind-fp16"


def measure(name: str, spec: TaskSpec, workdir: Path, variant: Variant | None, timeout_s: float) -> dict[str, Any]:
    """Run one contender under the loopback counter; its summary plus ``bytes_per_peer``."""
    folder = workdir / name
    shutil.rmtree(folder, ignore_errors=True)
    with InterfaceBytes("lo") as counter:
        if name == DP:
            summary = run_dataparallel(spec, folder, timeout_s=timeout_s)
        elif name == HIVEMIND:
            summary = run_hivemind(spec, folder, timeout_s=timeout_s)
        else:
            summary = run_barnraise(spec, variant, folder, timeout_s=timeout_s)
    summary.pop("ranks", None)
    count = counter.result
    return {**summary, "contender": name, "bytes_per_peer": count.per_peer(spec.peers), "lo_tx_bytes": count.tx_bytes}


def run_all(spec: TaskSpec, variants: list[Variant], workdir: Path, *, baselines: tuple[str, ...] = (DP, HIVEMIND),
            timeout_s: float = 1800.0, on_result=print) -> list[dict[str, Any]]:
    """Every baseline, then every variant, one after another (never two at once)."""
    results = []
    for name in baselines:
        results.append(measure(name, spec, workdir, None, timeout_s))
        on_result(results[-1])
    for variant in variants:
        results.append(measure(f"barnraise-{variant.name}", spec, workdir, variant, timeout_s))
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
        "| contender | held-out loss | vs dp-fp32 | tokens trained | bytes per peer | dp-fp32 bytes / these | wall s | compute |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        gap = result["heldout_loss"] / reference["heldout_loss"] - 1 if reference else None
        ratio = _ratio(reference, result)
        row = {
            "contender": result["contender"],
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
            f"| {row['contender']} | {row['heldout_loss']:.4f} | {gap_text} | {row['tokens'] or 0:,} |"
            f" {_size(row['bytes_per_peer'])} |"
            f" {ratio_text} | {row['seconds']:.0f} | {'—' if compute is None else f'{compute:.0%}'} |"
        )
    return "\n".join(lines), rows


def _size(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"
