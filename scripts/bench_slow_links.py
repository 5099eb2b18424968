"""Wall time to a target held-out loss when every peer sits behind a slow link (BENCHMARKS.md, section 2).

    python scripts/bench_slow_links.py --quick              # smoke test, under 2 minutes (as root)
    python scripts/bench_slow_links.py --rates 20 100       # the full table (as root)

For each link rate, ``bench.netns.SlowLinks`` puts each of ``--peers`` peers in its own network
namespace behind a veth shaped to that rate in both directions (rate 0: not shaped), checks the
rate with one TCP stream, then trains the reference task once with each contender: (a) fp32
data-parallel all-reduce (rank 0's namespace hosts the TCP store), (b) plain hivemind with fp16
gradients, (c) Barnraise (the coordinator in the root namespace, at the bridge address).

The target is data-parallel's final held-out loss at the same rate times ``1 + --target-margin``
(or ``--target``). Time to target is the first point of a contender's held-out curve at or below
it (None if none is); each contender's clock is its own (see its module): data-parallel and
hivemind start once every rank is ready, Barnraise when its peers start training (all present). Also
reported: total seconds, the fraction of them peers spent computing, and bytes per peer on the
links. Prints a table and one JSON line ``{"bench": "slow_links", ...}``. Needs root.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.barnraise_contender import run_barnraise  # noqa: E402
from bench.dataparallel import run_dataparallel  # noqa: E402
from bench.hivemind_baseline import run_hivemind  # noqa: E402
from bench.netns import SlowLinks, measure_mbit  # noqa: E402
from bench.recipe import Recipe, parse_recipe  # noqa: E402
from bench.task import TaskSpec  # noqa: E402
from protocol.errors import BarnraiseError  # noqa: E402
from protocol.manifest import DataSpec, ModelConfig  # noqa: E402

__all__ = ["CONTENDERS", "time_to_target", "main"]

CONTENDERS = ("dp", "hivemind", "barnraise")
"""Contenders by flag name: (a) data-parallel, (b) plain hivemind, (c) Barnraise."""
_DP_PORT = 29500  # torch.distributed's usual TCP store port, in rank 0's namespace


def _task(args: argparse.Namespace) -> TaskSpec:
    if args.quick:
        model = ModelConfig(n_embd=64, n_layer=1, n_head=2, n_positions=64)
        return TaskSpec(model=model, data=DataSpec(seq_len=64), steps=args.steps, peers=args.peers,
                        per_peer_batch=8, curve_points=4)  # fmt: skip
    return TaskSpec(steps=args.steps, peers=args.peers, eval_windows=256, curve_points=args.curve_points)


def _run_barnraise(spec: TaskSpec, recipe: Recipe, links: SlowLinks, workdir: Path, timeout_s: float) -> dict:
    return run_barnraise(spec, recipe, workdir, launcher=links.launcher, host_ips=links.peer_ips,
                         coordinator_ip=links.host_ip, timeout_s=timeout_s)  # fmt: skip


def _run(name: str, spec: TaskSpec, recipe: Recipe, links: SlowLinks, workdir: Path, timeout_s: float) -> dict:
    """One contender over the links: its summary, curve in seconds since its start, bytes per peer."""
    before = links.peer_bytes()
    if name == "dp":
        # The port is chosen here: the parent cannot probe for a free one on an address in rank 0's
        # namespace, and nothing else listens in a namespace that was just built.
        result = run_dataparallel(spec, workdir, launcher=links.launcher, master_addr=links.peer_ips[0],
                                  port=_DP_PORT, gloo_ifname=links.ns_ifname, timeout_s=timeout_s)  # fmt: skip
    elif name == "hivemind":
        result = run_hivemind(spec, workdir, launcher=links.launcher, host_ip=links.peer_ips, timeout_s=timeout_s)
    else:
        result = _run_barnraise(spec, recipe, links, workdir, timeout_s)
    moved = [after - start for after, start in zip(links.peer_bytes(), before, strict=True)]
    result["bytes_per_peer"] = sum(count.total for count in moved) / len(moved)
    return result


def time_to_target(curve: list[dict[str, Any]], target: float) -> float | None:
    """Seconds of the first curve point whose held-out loss is at or below ``target``; None if none."""
    return next((point["seconds"] for point in curve if point["heldout_loss"] <= target), None)


def _with_final(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The curve, ending with the final loss at the total seconds when the curve stops before it."""
    curve = list(result["curve"])
    last = curve[-1] if curve else None
    if last is None or (last["seconds"] < result["seconds"] and last["heldout_loss"] != result["heldout_loss"]):
        curve.append({"step": None, "seconds": result["seconds"], "heldout_loss": result["heldout_loss"]})
    return curve


def _one_rate(rate: float, args: argparse.Namespace, spec: TaskSpec, recipe: Recipe, root: Path) -> dict:
    """Every chosen contender at one link rate (0: unshaped); a failed contender is reported, not fatal."""
    row: dict[str, Any] = {"rate_mbit": rate or None, "contenders": {}}
    with SlowLinks(spec.peers, rate or None) as links:
        row["link_mbit"] = round(measure_mbit(links, 0, 1 if spec.peers > 1 else None, 1.0 if args.quick else 3.0), 1)
        for name in args.contenders:
            print(f"[bench] rate {rate or 'unshaped'}: {name} ...", file=sys.stderr, flush=True)
            try:
                row["contenders"][name] = _run(name, spec, recipe, links, root / f"r{rate:g}-{name}", args.timeout)
            except BarnraiseError as error:
                print(f"[bench] {name} at {rate} Mbit/s failed: {error}", file=sys.stderr, flush=True)
                row["contenders"][name] = {"error": str(error)}
    dp_loss = row["contenders"].get("dp", {}).get("heldout_loss")
    row["target"] = dp_loss * (1 + args.target_margin) if dp_loss is not None else None
    row["target"] = args.target if args.target is not None else row["target"]
    row["contenders"] = {name: _report(result, row["target"]) for name, result in row["contenders"].items()}
    return row


def _report(result: dict[str, Any], target: float | None) -> dict[str, Any]:
    if "error" in result:
        return result
    curve = _with_final(result)
    keys = ("contender", "heldout_loss", "seconds", "compute_fraction", "bytes_per_peer", "tokens")
    reached = time_to_target(curve, target) if target is not None else None
    return {**{key: result.get(key) for key in keys}, "time_to_target": reached, "curve": curve}


def _table(rows: list[dict[str, Any]]) -> str:
    fmt = "{:>8} {:>10} {:<20} {:>10} {:>12} {:>9} {:>8} {:>9}"
    lines = [fmt.format("rate", "measured", "contender", "final", "to target s", "total s", "compute", "MB/peer")]
    for row in rows:
        for name, entry in row["contenders"].items():
            cells = [str(row["rate_mbit"] or "none"), f"{row['link_mbit']:.1f}", entry.get("contender", name)]
            if "error" in entry:
                lines.append(fmt.format(*cells, "failed", "-", "-", "-", "-"))
                continue
            reached = entry["time_to_target"]
            lines.append(fmt.format(*cells, f"{entry['heldout_loss']:.4f}",
                                    "never" if reached is None else f"{reached:.1f}", f"{entry['seconds']:.1f}",
                                    f"{entry['compute_fraction']:.2f}", f"{entry['bytes_per_peer'] / 1e6:.1f}"))  # fmt: skip
        target = "none (dp failed)" if row["target"] is None else f"{row['target']:.4f}"
        lines.append(f"{'':>8} target held-out loss {target}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 2 peers, 20 steps, 20 Mbit/s, dp and barnraise"
    )
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="Mbit/s per peer link; 0: unshaped")
    parser.add_argument("--steps", type=int, default=None, help="global steps (default 600; quick: 20)")
    parser.add_argument("--peers", type=int, default=None, help="peers (default 4; quick: 2)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None)
    parser.add_argument("--recipe", type=parse_recipe, default=None,
                        help="Barnraise's recipe NAME[:H[:CODEC]][:key=value...] (bench/recipe.py; default: the"
                             " manifest's defaults, H 5 with --quick)")
    parser.add_argument("--target", type=float, default=None, help="absolute target held-out loss")
    parser.add_argument("--target-margin", type=float, default=0.02, help="target = dp final loss x (1 + this)")
    parser.add_argument("--curve-points", type=int, default=20, help="held-out evaluations during a run")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per contender run (default 3600)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary folder)")
    return parser


def _defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    quick = args.quick
    args.rates = args.rates or ([20.0] if quick else [20.0, 100.0])
    args.steps = args.steps or (20 if quick else 600)
    args.peers = args.peers or (2 if quick else 4)
    args.contenders = args.contenders or (["dp", "barnraise"] if quick else list(CONTENDERS))
    args.recipe = args.recipe or parse_recipe("default:5" if quick else "default")
    args.timeout = args.timeout or (150.0 if quick else 3600.0)
    if args.target is None and "dp" not in args.contenders:
        parser.error("without dp among --contenders the target needs --target")
    if "dp" in args.contenders:  # dp sets the target, so it runs first
        args.contenders = ["dp", *[name for name in args.contenders if name != "dp"]]
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run every contender at every rate, print the table and the JSON line."""
    parser = _parser()
    args = _defaults(parser.parse_args(argv), parser)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the namespaces are torn down
    spec = _task(args)
    recipe = args.recipe
    with tempfile.TemporaryDirectory(prefix="bench-slow-links-") as scratch:
        # A fresh folder per invocation: a coordinator must not find an earlier run's ledger.
        root = args.workdir / time.strftime("run-%Y%m%d-%H%M%S") if args.workdir else Path(scratch)
        rows = [_one_rate(rate, args, spec, recipe, root) for rate in args.rates]
    print(_table(rows))
    print(json.dumps({"bench": "slow_links", "peers": spec.peers, "steps": spec.steps, "task": spec.to_dict(),
                      "recipe": recipe.to_dict(), "quick": args.quick, "rates": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
