"""Bytes to loss: fp32 data-parallel vs hivemind.Optimizer (fp16) vs Barnraise, with the controls.

    python scripts/bench_bytes_to_loss.py --quick                      # smoke test, under 2 minutes
    python scripts/bench_bytes_to_loss.py                              # the full table (docs/benchmarks.md)
    python scripts/bench_bytes_to_loss.py --simulate                   # dp, alone, diloco, default in-process
    python scripts/bench_bytes_to_loss.py --size large --simulate      # the 3.3M-parameter size
    python scripts/bench_bytes_to_loss.py --simulate --device cuda     # the simulator on a GPU

4 peers train the reference task (bench/task.py) for the same tokens. For real contenders the
bytes are the loopback counter's difference around each one: as root, the script re-runs itself
in a private network namespace (``unshare -n``) so only its own traffic is counted. The controls
("alone": one peer on the same per-peer steps; "diloco-h<H>": uncompressed DiLoCo at the default's
H) always run in the simulator; ``--simulate`` runs every contender there (exact payload bytes,
no swarm overhead; hivemind has no simulated twin). Prints a Markdown table and one JSON line
``{"bench": "bytes_to_loss", ...}`` whose ``rows`` hold ``contender``, ``heldout_loss`` and
``ratio_to_dp``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bytes_to_loss import DP, HIVEMIND, run_all, table  # noqa: E402
from bench.recipe import parse_recipe  # noqa: E402
from bench.task import SIZES, TaskSpec, benchmark_task  # noqa: E402
from protocol.errors import ConfigError  # noqa: E402

_ISOLATED = "BARNRAISE_BENCH_PRIVATE_NET"
FULL_RECIPES = ["default"]
QUICK_RECIPES = ["default:10"]


def _recipe(text: str):
    try:
        return parse_recipe(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    parser.add_argument("--size", choices=sorted(SIZES), default="reference", help="the reference model size")
    parser.add_argument("--steps", type=int, help="global steps (default: 600 reference, 200 large; 20 with --quick)")
    parser.add_argument("--recipe", dest="recipes", type=_recipe, action="append",
                        help="a Barnraise recipe NAME[:H[:CODEC]][:key=value...] (see bench/recipe.py; repeatable;"
                             " default: the manifest's defaults)")
    parser.add_argument("--baselines", nargs="*", default=[DP, HIVEMIND], choices=[DP, HIVEMIND])
    parser.add_argument("--no-controls", action="store_true", help="leave out the alone and uncompressed-DiLoCo rows")
    parser.add_argument("--simulate", action="store_true", help="every contender in the in-process simulator")
    parser.add_argument("--device", default="cpu", help="torch device of simulated contenders and swarm peers")
    parser.add_argument("--schedule", choices=["constant", "cosine"], default="constant",
                        help="the AdamW learning rate over the run, for every contender")
    parser.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warmup, every contender")
    parser.add_argument("--out", type=Path, help="also write the JSON line here")
    parser.add_argument("--workdir", type=Path, help="keep every run's logs here (default: a temporary folder)")
    parser.add_argument("--shared-net", action="store_true", help="do not move into a private network namespace")
    return parser


def _isolate(argv: list[str]) -> int | None:
    """Re-run in a private network namespace (root only); None if already there or not possible."""
    if os.environ.get(_ISOLATED) or os.geteuid() != 0 or not shutil.which("unshare"):
        return None
    command = f"ip link set lo up && exec {sys.executable} {Path(__file__).resolve()} " + " ".join(
        f"'{a}'" for a in argv
    )
    return subprocess.call(["unshare", "-n", "sh", "-c", command], env={**os.environ, _ISOLATED: "1"})


def _spec(args: argparse.Namespace) -> TaskSpec:
    return benchmark_task(size=args.size, steps=args.steps, quick=args.quick, schedule=args.schedule, warmup=args.warmup)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if not args.simulate and not args.shared_net and (code := _isolate(argv)) is not None:
        return code
    try:
        spec = _spec(args)
    except ConfigError as error:
        print(f"bench_bytes_to_loss: {error}", file=sys.stderr)
        return 2
    recipes = args.recipes or [parse_recipe(r) for r in (QUICK_RECIPES if args.quick else FULL_RECIPES)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-bytes-")) if args.workdir is None else args.workdir
    started = time.time()
    try:
        results = run_all(spec, recipes, scratch, baselines=tuple(args.baselines), with_controls=not args.no_controls,
                          simulated=args.simulate, device=args.device,
                          on_result=lambda r: print(f"{r['contender']}: loss {r['heldout_loss']:.4f},"
                                                    f" {r['bytes_per_peer'] / 1e6:.2f} MB per peer", flush=True))
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    text, rows = table(results)
    print(text)
    line = json.dumps({
        "bench": "bytes_to_loss", "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": args.device,
        "simulated": args.simulate, "size": args.size, "private_net": bool(os.environ.get(_ISOLATED)),
        "spec": spec.to_dict(), "rows": rows,
        "results": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r.get("curve", [])} for r in results],
    })
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
