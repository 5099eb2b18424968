"""One consensus at any size, on loopback: N peers of uneven speed, optionally under chaos.

    python scripts/bench_consensus.py --peers 12 --spread 3 --minutes 4
    python scripts/bench_consensus.py --peers 4 --minutes 3 --chaos-every 30
    python scripts/bench_consensus.py --quick

Prints one line per peer (rounds, rounds its payload entered, out of step, samples in the model
within two rounds, compute fraction) and the forks (rounds after which peers held different
consensus roots); writes the whole summary as JSON to WORKDIR/summary.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.consensus_run import SwarmRunSpec, run_swarm  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--spread", type=float, default=3.0, help="slowest peer's slowdown (fastest: 1)")
    parser.add_argument("--round-seconds", type=float, default=8.0)
    parser.add_argument("--max-contributors", type=int, default=16)
    parser.add_argument("--sync", action="store_true", help="overlap = false")
    parser.add_argument("--chaos-every", type=float, help="SIGKILL and restart a random peer every this many seconds")
    parser.add_argument("--start-in", type=float, default=20.0, help="seconds from launch to round 0")
    parser.add_argument("--workdir", type=Path, default=Path("runs/consensus"))
    parser.add_argument("--quick", action="store_true", help="3 peers for 1 minute (a smoke run)")
    args = parser.parse_args(argv)
    spec = SwarmRunSpec(peers=3 if args.quick else args.peers, minutes=1.0 if args.quick else args.minutes,
                        spread=args.spread, round_seconds=args.round_seconds, max_contributors=args.max_contributors,
                        overlap=not args.sync, chaos_every=args.chaos_every, start_in=args.start_in)
    if args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty")
    summary = run_swarm(spec, args.workdir)
    (args.workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| peer | slowdown | rounds | entered | waiting | out of step | samples in within 2 rounds"
          " (all / once formed) | compute fraction |")
    print("|---|---|---|---|---|---|---|---|")
    for row, slowdown in zip(summary["peers"], summary["slowdowns"], strict=True):
        print(f"| {row['peer']} | {slowdown:.2f} | {row['rounds']} | {row['entered']} | {row['waiting']} |"
              f" {row['out_of_step']} | {row['samples_in_within_two_rounds']:.1%} /"
              f" {row['formed_samples_in_within_two_rounds']:.1%} | {row['compute_fraction']:.1%} |")
    print(f"rounds {summary['rounds']} (every peer's payload in one from round {summary['formed_at']}), forks {summary['forks'] or 'none'}, audit "
          f"{'passed' if summary['audit_passed'] else 'FAILED'}, kills {len(summary['killed'])},"
          f" leaked {summary['leaked'] or 'nothing'}")
    ok = summary["audit_passed"] and not summary["forks"] and not summary["leaked"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
