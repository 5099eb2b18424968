"""Sweep recipes in the in-process simulator, or check it against a real swarm.

    python scripts/bench_simulate.py --sweep outer                  # a named set (bench/sweep.py)
    python scripts/bench_simulate.py --recipe default --dp          # any recipes, with data-parallel
    python scripts/bench_simulate.py --check                        # swarm vs simulator, default recipe
    python scripts/bench_simulate.py --quick                        # smoke test, under 2 minutes

Every recipe is simulated on the same task (bench/task.py; ``--size large`` for 3.3M parameters, ``--size llama`` for a Llama),
with the "alone" control beside it, ``--workers`` at a time. Prints a Markdown table and one JSON
line ``{"bench": "simulate", ...}``; ``--check`` prints the swarm's and the simulator's held-out
loss and exits 1 when they differ by more than 1%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bytes_to_loss import controls  # noqa: E402
from bench.recipe import parse_recipe  # noqa: E402
from bench.sweep import SWEEPS, check_agreement, cpu_workers, run_sweep, sweep_recipes, table  # noqa: E402
from bench.task import SIZES, TaskSpec, benchmark_task  # noqa: E402
from protocol.errors import ConfigError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=sorted(SWEEPS), action="append", default=[], help="a named recipe set")
    parser.add_argument("--recipe", action="append", default=[], help="NAME[:H[:CODEC]][:key=value...] (repeatable)")
    parser.add_argument("--dp", action="store_true", help="also simulate fp32 data-parallel")
    parser.add_argument("--no-alone", action="store_true", help="leave out the one-peer-alone control")
    parser.add_argument("--check", action="store_true", help="a real swarm against the simulator (default recipe)")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    parser.add_argument("--size", choices=sorted(SIZES), default="reference")
    parser.add_argument("--steps", type=int, help="global steps (default: the size's)")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant")
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--workers", type=int, default=cpu_workers(), help="recipes simulated at once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, help="--check: keep the swarm's logs here")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    return parser


def _spec(args: argparse.Namespace) -> TaskSpec:
    return benchmark_task(size=args.size, steps=args.steps, quick=args.quick, schedule=args.schedule, warmup=args.warmup)


def _emit(args: argparse.Namespace, record: dict) -> None:
    line = json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                       "device": args.device, **record})
    print(line)
    if args.out:
        with args.out.open("a") as out:
            out.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        spec = _spec(args)
        recipes = [r for name in args.sweep for r in sweep_recipes(name)] + [parse_recipe(t) for t in args.recipe]
    except ConfigError as error:
        print(f"bench_simulate: {error}", file=sys.stderr)
        return 2
    if args.check:
        recipe = recipes[0] if recipes else parse_recipe("default:5" if args.quick else "default")
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-check-"))
        result = check_agreement(spec, recipe, workdir)
        print(f"{recipe.name}: swarm {result['swarm_heldout_loss']:.4f}, simulator {result['simulated_heldout_loss']:.4f}"
              f" ({result['relative_gap']:+.2%}; every round averaged all peers:"
              f" {result['swarm_full_group_fraction']:.0%})")
        _emit(args, {"bench": "simulator_check", "spec": spec.to_dict(), **result})
        return 0 if result["agrees"] else 1
    recipes = recipes or [parse_recipe("default")]
    plan = ([None] if args.dp else []) + ([] if args.no_alone else controls(recipes[0])[:1]) + recipes
    results = run_sweep(spec, plan, workers=args.workers, device=args.device,
                        on_result=lambda r: print(f"{r['contender']}: held-out {r['heldout_loss']:.4f}", flush=True))
    print(table(spec, results))
    _emit(args, {"bench": "simulate", "spec": spec.to_dict(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
