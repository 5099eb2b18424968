"""Bytes to loss: fp32 data-parallel vs hivemind.Optimizer (fp16) vs Barnraise variants, one run.

    python scripts/bench_bytes_to_loss.py --quick          # smoke test, under 2 minutes
    python scripts/bench_bytes_to_loss.py                  # the full table (docs/benchmarks.md)

4 peers on loopback train the reference task (bench/task.py) for the same tokens; bytes are the
loopback counter's difference around each contender. As root, the script re-runs itself in a
private network namespace (``unshare -n``) so only its own traffic is counted. Prints a Markdown
table and one JSON line ``{"bench": "bytes_to_loss", ...}``.
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

from bench.barnraise_contender import Variant  # noqa: E402
from bench.bytes_to_loss import DP, HIVEMIND, run_all, table  # noqa: E402
from bench.task import TaskSpec  # noqa: E402
from protocol.manifest import DataSpec, ModelConfig  # noqa: E402

_ISOLATED = "BARNRAISE_BENCH_PRIVATE_NET"


def _variant(text: str) -> Variant:
    """``NAME:H:CODEC[:overlap][:lr=X][:mom=Y]``, e.g. ``h50-topk:50:topk-c4096-k64-q2`` (synchronous
    rounds unless ``:overlap``; the outer learning rate and momentum default to the manifest's)."""
    parts = text.split(":")
    if len(parts) < 3 or not parts[1].isdigit():
        raise argparse.ArgumentTypeError(f"variant {text!r} is not NAME:H:CODEC[:overlap][:lr=X][:mom=Y]")
    options: dict = {"overlap": False}
    for extra in parts[3:]:
        key, _, value = extra.partition("=")
        try:
            if key == "overlap" and not value:
                options["overlap"] = True
            elif key in ("lr", "mom"):
                options["outer_lr" if key == "lr" else "outer_momentum"] = float(value)
            else:
                raise ValueError(extra)
        except ValueError:
            raise argparse.ArgumentTypeError(f"variant {text!r}: {extra!r} is not overlap, lr=X or mom=Y") from None
    return Variant(name=parts[0], inner_steps=int(parts[1]), codec=parts[2], **options)


FULL_VARIANTS = [
    "h50-topk64:50:topk-c4096-k64-q2",
    "h25-topk64:25:topk-c4096-k64-q2",
    "h100-topk64:100:topk-c4096-k64-q2",
    "h50-topk64-overlap:50:topk-c4096-k64-q2:overlap",
    "h50-int8:50:int8-b256",
]
QUICK_VARIANTS = ["h10-topk64:10:topk-c4096-k64-q2"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    parser.add_argument("--steps", type=int, help="global steps (default 600; 20 with --quick)")
    parser.add_argument("--variant", dest="variants", type=_variant, action="append",
                        help="a Barnraise variant NAME:H:CODEC[:overlap][:lr=X][:mom=Y] (repeatable; default: the documented set)")
    parser.add_argument("--baselines", nargs="*", default=[DP, HIVEMIND], choices=[DP, HIVEMIND])
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
    if args.quick:
        return TaskSpec(model=ModelConfig(n_embd=64, n_layer=1, n_head=2, n_positions=64), data=DataSpec(seq_len=64),
                        steps=args.steps or 20, per_peer_batch=8, eval_windows=64, curve_points=2)
    return TaskSpec(steps=args.steps or 600, eval_windows=256)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if not args.shared_net and (code := _isolate(argv)) is not None:
        return code
    spec = _spec(args)
    variants = args.variants or [_variant(v) for v in (QUICK_VARIANTS if args.quick else FULL_VARIANTS)]
    scratch = Path(tempfile.mkdtemp(prefix="bench-bytes-")) if args.workdir is None else args.workdir
    started = time.time()
    try:
        results = run_all(spec, variants, scratch, baselines=tuple(args.baselines),
                          on_result=lambda r: print(f"{r['contender']}: loss {r['heldout_loss']:.4f},"
                                                    f" {r['bytes_per_peer'] / 1e6:.2f} MB per peer", flush=True))
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    text, rows = table(results)
    print(text)
    line = json.dumps({
        "bench": "bytes_to_loss", "date": time.strftime("%Y-%m-%d", time.gmtime(started)),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "private_net": bool(os.environ.get(_ISOLATED)),
        "spec": spec.to_dict(), "rows": rows,
        "results": [{k: v for k, v in r.items() if k != "curve"} | {"curve": r.get("curve", [])} for r in results],
    })
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
