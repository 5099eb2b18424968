"""Robust aggregation: combine's clip ratio against 1 (and 2) hostile of 5 replicas, in the simulator.

    python scripts/bench_robust.py                  # the full sweep: 36 runs, ~27 min on 2 idle cores (docs/benchmarks.md)
    python scripts/bench_robust.py --quick          # smoke test, ~1.5 minutes
    python scripts/bench_robust.py --ratios 0,1.5,2,3 --two-of-five 1

5 replicas train the reference task (bench/task.py; 120 global steps, 8 rounds of the default H 15) with the default
recipe at each clip ratio, clean and with one replica flipping, scaling ×1000, both, sending
noise of an honest norm, or replaying its first payload (bench/forged_payloads.py); then 2 hostile at
the best ratio or two, an unparseable payload, and the "one peer alone" control (bench/robust.py).
Prints a table of held-out losses against the clean run at the same ratio and at ratio 0, a
table per ratio, the recommended ratio, and one JSON line ``{"bench": "robust", ...}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.recipe import parse_recipe  # noqa: E402
from bench.robust import RATIOS, run_robust, summary_table, table  # noqa: E402
from bench.sweep import cpu_workers  # noqa: E402
from bench.task import benchmark_task, reference_task  # noqa: E402
from protocol.cli import OneLineParser, run_command  # noqa: E402
from protocol.errors import InputError  # noqa: E402

PEERS = 5
FULL_STEPS = 120
"""Global steps of the full sweep: 8 rounds at the default H 15, ~90 s a run on one idle core."""
QUICK_H = 5
"""--quick: H 5 on the tiny task's 20 steps, so that its 4 rounds can be attacked."""


def _parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    parser.add_argument("--steps", type=int, help=f"global steps (default {FULL_STEPS}; 20 with --quick)")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                        help="comma-separated clip ratios (0, clipping off, is always added)")
    parser.add_argument("--two-of-five", type=int, default=2, help="best ratios that also face 2 hostile of 5")
    parser.add_argument("--workers", type=int, default=cpu_workers(), help="runs simulated at once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    return parser


def _ratios(text: str) -> tuple[float, ...]:
    try:
        ratios = tuple(sorted({float(part) for part in text.split(",")}))
    except ValueError:
        raise InputError(f"--ratios {text!r}: expected comma-separated numbers") from None
    if not all(math.isfinite(r) and r >= 0 for r in ratios):
        raise InputError(f"--ratios {text!r}: a ratio is 0 or more")
    return ratios


def _finite(value):
    """JSON without Infinity: a diverged run's loss is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    ratios = _ratios(args.ratios)
    if args.quick:
        spec = dataclasses.replace(benchmark_task(quick=True, steps=args.steps), peers=PEERS)
        base = parse_recipe(f"default:{QUICK_H}")
    else:
        spec = reference_task(steps=args.steps or FULL_STEPS, peers=PEERS, curve_points=5)
        base = parse_recipe("default")
    began = time.perf_counter()
    outcome = run_robust(spec, base, ratios=ratios, two_of_five=args.two_of_five, workers=args.workers,
                         device=args.device, on_result=lambda r: print(f"{r['contender']}: held-out"
                                                                      f" {r['heldout_loss']:.4f}", flush=True))
    print(table(outcome["results"]))
    print()
    print(summary_table(outcome["summary"]))
    recommended = outcome["recommended_clip"]
    print(f"recommended clip ratio: {'none meets the goal' if recommended is None else f'{recommended:g}'}")
    line = json.dumps(_finite({
        "bench": "robust", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "device": args.device, "quick": args.quick, "spec": spec.to_dict(), "base": base.to_dict(),
        "seconds": time.perf_counter() - began, **outcome,
    }))  # fmt: skip
    print(line)
    if args.out:
        with args.out.open("a") as out:
            out.write(line + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("bench_robust", lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
