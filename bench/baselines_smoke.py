"""Run the baseline contenders once on a small task and print what each did and sent.

    PYTHONPATH=. python -m bench.baselines_smoke --contender both --size tiny
    unshare -n sh -c 'ip link set lo up && PYTHONPATH=. python -m bench.baselines_smoke --size medium'

``tiny`` (1 layer, width 64, 10 steps) checks that a contender runs end to end; ``medium``
(the demo model, 60 steps of 4 x 16 windows) sizes the full benchmark. The second command
counts only this run's loopback traffic (a private network namespace; needs root).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.counters import InterfaceBytes
from bench.dataparallel import run_dataparallel
from bench.hivemind_baseline import HivemindOptions, run_hivemind
from bench.task import TaskSpec
from protocol.manifest import DataSpec, ModelConfig

__all__ = ["SIZES", "measure", "main"]

SIZES: dict[str, TaskSpec] = {
    "tiny": TaskSpec(
        model=ModelConfig(n_embd=64, n_layer=1, n_head=2, n_positions=64),
        data=DataSpec(seq_len=64),
        steps=10,
        per_peer_batch=8,
        curve_points=2,
    ),
    "medium": TaskSpec(steps=60, eval_windows=256),
}
"""Named smoke tasks."""

_CONTENDERS: dict[str, Callable[..., dict[str, Any]]] = {"dp": run_dataparallel, "hivemind": run_hivemind}


def measure(contender: str, spec: TaskSpec, workdir: Path, timeout_s: float, **options: Any) -> dict[str, Any]:
    """Run one contender (keyword ``options`` go to its runner) under the loopback byte counter."""
    with InterfaceBytes("lo") as counter:
        summary = _CONTENDERS[contender](spec, workdir / contender, timeout_s=timeout_s, **options)
    count = counter.result
    summary.pop("ranks")
    return {**summary, "lo_tx_bytes": count.tx_bytes, "bytes_per_peer": count.per_peer(spec.peers)}


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the chosen contenders, print one JSON line each."""
    parser = argparse.ArgumentParser(description="Run the bytes-to-loss baselines on a small task.")
    parser.add_argument("--contender", choices=["dp", "hivemind", "both"], default="both")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each contender may run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here (default: a temporary folder)")
    parser.add_argument(
        "--average-state-every",
        type=int,
        default=1,
        help="hivemind: average parameters every N epochs (1 is hivemind's default; a large N turns it off)",
    )
    args = parser.parse_args(argv)
    options = {"hivemind": {"options": HivemindOptions(average_state_every=args.average_state_every)}}
    contenders = ["dp", "hivemind"] if args.contender == "both" else [args.contender]
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as scratch:
        workdir = args.workdir or Path(scratch)
        for contender in contenders:
            summary = measure(contender, SIZES[args.size], workdir, args.timeout, **options.get(contender, {}))
            print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
