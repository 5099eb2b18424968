"""Benchmark 3: one averaging round of a 100M-float tensor among 4 peers on loopback.

    PYTHONPATH=. python scripts/bench_round.py --quick            # N = 5M, 1 measured round
    PYTHONPATH=. python scripts/bench_round.py                    # N = 100M, 1 warm-up + 3 rounds
    PYTHONPATH=. python scripts/bench_round.py --codec int8-b256 fp16 --contenders barnraise memcpy
    PYTHONPATH=. python scripts/bench_round.py --codec bmax-c4096-b64-s2 topk-c4096-k64-s2 \
        topk-c4096-k64-q2 --aggregation senders --contenders barnraise memcpy

Barnraise's round vs hivemind's bare DecentralizedAverager vs the memcpy bound for the same
bytes (``bench.round_bench`` says what each measures); one Barnraise row and one memcpy row
per codec, all combined under one ``--aggregation`` rule. Prints a table and one JSON line
``{"bench": "round", ...}``; exits 1 if a contender's check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.round_bench import FULL_NUMEL, QUICK_NUMEL, ContenderReport, RoundSpec, run_round_bench
from protocol.errors import BarnraiseError
from protocol.manifest import AveragingConfig

__all__ = ["main"]

_LOOPBACK_NOTE = "loopback counters count every process on the machine's lo, not only this run"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"N = {QUICK_NUMEL:,} and 1 measured round")
    parser.add_argument("--size", type=int, default=None, help=f"N, floats per peer (default {FULL_NUMEL:,})")
    parser.add_argument("--rounds", type=int, default=None, help="measured rounds (default 3; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds, not measured")
    parser.add_argument("--codec", nargs="+", default=[AveragingConfig().codec], help="Barnraise codecs to run")
    parser.add_argument("--aggregation", choices=["mean", "senders"], default="mean",
                        help="Barnraise's combine: mean over all peers, or over the peers that kept each coordinate")
    parser.add_argument("--contenders", nargs="+", choices=["barnraise", "hivemind", "memcpy"],
                        default=["barnraise", "hivemind", "memcpy"])  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=None, help="keep rank logs here (default: a temporary folder)")
    return parser.parse_args(argv)


def _table(reports: list[ContenderReport]) -> str:
    header = (f"{'contender':<40} {'s/round (median)':>16} {'eff. GB/s (4N B / s)':>21} "
              f"{'lo bytes/peer/round':>20} {'expected':>14}  split encode / exchange / decode+combine s")  # fmt: skip
    lines = [header, "-" * len(header)]
    for report in reports:
        sent = "-" if report.bytes_per_peer_round is None else f"{report.bytes_per_peer_round:,.0f}"
        split = " / ".join(f"{v:.3f}" for v in report.split.values()) if report.split else ""
        lines.append(f"{report.name:<40} {report.seconds:>16.4f} {report.effective_gbps:>21.3f} "
                     f"{sent:>20} {report.expected_bytes_per_peer_round:>14,.0f}  {split}")  # fmt: skip
    lines.append("")
    lines.extend(f"{report.name}: {report.check}" for report in reports)
    lines.append(f"expected = payload bytes a peer sends (memcpy: bytes copied, in + out); {_LOOPBACK_NOTE}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the contenders one after another, print the table and the JSON line."""
    args = _parse(argv)
    numel = args.size or (QUICK_NUMEL if args.quick else FULL_NUMEL)
    rounds = args.rounds or (1 if args.quick else 3)
    try:
        spec = RoundSpec(numel=numel, rounds=rounds, warmup=args.warmup, aggregation=args.aggregation)
        with tempfile.TemporaryDirectory(prefix="bench-round-") as scratch:
            reports = run_round_bench(spec, args.codec, args.workdir or Path(scratch), args.contenders)
    except BarnraiseError as error:
        print(f"bench_round: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    print(_table(reports))
    line = {"bench": "round", **spec.to_dict(), "cpus": os.cpu_count(), "loopback_note": _LOOPBACK_NOTE,
            "contenders": [report.to_dict() for report in reports]}  # fmt: skip
    print(json.dumps(line))
    if not all(report.passed for report in reports):
        keep = "" if args.workdir else " (rerun with --workdir DIR to keep the rank logs)"
        print(f"bench_round: a contender failed its run or its check{keep}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
