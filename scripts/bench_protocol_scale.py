"""Simulate the round protocol at 10 to 1,000 peers: bytes per peer, round time, forks, churn.

    python scripts/bench_protocol_scale.py --peers 10 100 1000 --rounds 48    # docs/benchmarks.md section 5
    python scripts/bench_protocol_scale.py --peers 1000 --rounds 8 --group 2 3 4 6 8    # the G sweep
    python scripts/bench_protocol_scale.py --peers 100 --settle 2             # a settle too short: forks
    python scripts/bench_protocol_scale.py --quick                            # smoke test, seconds

No training and no network: bench/protocol_sim.py plays the protocol event by event (the model
is in its docstring). A payload is what ``--codec`` writes for a ``--params`` model (16.6 MB for
1B parameters at the default codec). Every combination of ``--peers``, ``--group`` and
``--settle`` is one run, ``--workers`` at a time. Prints a Markdown table, or with
``--format json`` one JSON line per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.protocol_sim import SimConfig, simulate  # noqa: E402
from protocol.codecs import parse_codec, payload_size  # noqa: E402
from protocol.errors import ConfigError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=24, help="compute windows per run")
    parser.add_argument("--group", type=int, nargs="+", default=[SimConfig.group], help="G: most contributors a round")
    parser.add_argument("--settle", type=float, nargs="+", default=[SimConfig.settle_s], help="seconds, close to read")
    parser.add_argument("--window", type=float, default=SimConfig.window_s, help="W: seconds per round")
    parser.add_argument("--params", type=float, default=1e9, help="model parameters (sets the payload size)")
    parser.add_argument("--codec", default="bmax-c4096-b64-s2")
    parser.add_argument("--late-share", type=float, default=0.0, help="share of announcements delayed 0..30 s")
    parser.add_argument("--no-deadline", action="store_true",
                        help="take every record a read returns (default: only those signed by close + settle/2)")
    parser.add_argument("--upload-cap", type=float, default=SimConfig.upload_cap,
                        help="share of W x uplink a peer uploads per window; 0: no cap")
    parser.add_argument("--churn", type=float, default=SimConfig.churn_per_hour, help="leaves (and joins) per peer-hour")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="10 and 30 peers, 4 rounds: a smoke test")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="runs at once")
    parser.add_argument("--format", choices=["table", "json"], default="table")
    parser.add_argument("--out", type=Path, help="also append the JSON lines to this file")
    return parser


def _configs(args: argparse.Namespace) -> list[SimConfig]:
    peers, rounds = ([10, 30], 4) if args.quick else (args.peers, args.rounds)
    size = payload_size(parse_codec(args.codec), int(args.params))
    return [SimConfig(peers=n, rounds=rounds, group=g, settle_s=settle, window_s=args.window, payload_bytes=size,
                      late_share=args.late_share,
                      deadline_share=None if args.no_deadline else SimConfig.deadline_share, upload_cap=args.upload_cap or None,
                      churn_per_hour=args.churn, seed=args.seed)
            for n, g, settle in itertools.product(peers, args.group, args.settle)]


def _run(config: SimConfig) -> tuple[SimConfig, dict]:
    started = time.perf_counter()
    return config, {**simulate(config).summary(), "sim_seconds": round(time.perf_counter() - started, 1)}


def table(rows: list[dict]) -> str:
    """The Markdown table of docs/benchmarks.md section 5: one row per run."""
    lines = ["| peers | G | settle s | MB down / round: median, p95 (worst round) | MB up / round: median, p95 (worst) "
             "| round time s: mean (max) | work in: round, 2 rounds | compute fraction | forks "
             "| 20/100 peer link time p95, % of W (worst round) | fits 10 % | DHT replica MB up (max) |",
             "| ---: | ---: | ---: | --- | --- | --- | --- | ---: | ---: | --- | :---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['peers']:,} | {r['group']} | {r['settle_s']:g} "
            f"| {r['down_median_mb']:.1f}, {r['down_p95_mb']:.1f} ({r['down_p95_max_mb']:.1f}) "
            f"| {r['up_median_mb']:.1f}, {r['up_p95_mb']:.1f} ({r['up_p95_max_mb']:.1f}) "
            f"| {r['round_time_mean_s']:.0f} ({r['round_time_max_s']:.0f}) "
            f"| {r['work_in_round']:.1%}, {r['work_in_two_rounds']:.1%} | {r['compute_fraction']:.1%} "
            f"| {r['forks']} ({r['fork_peers']} peers) "
            f"| {100 * r['reference_link_p95']:.1f} ({100 * r['reference_link_p95_max']:.1f}) "
            f"| {'yes' if r['reference_link_p95'] <= 0.10 else 'no'} | {r['dht_serve_max_mb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        configs = _configs(args)
    except ConfigError as error:
        print(f"bench_protocol_scale: {error}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, len(configs)))) as pool:
        runs = list(pool.map(_run, sorted(configs, key=lambda c: -c.peers * c.group)))  # the longest first
    runs.sort(key=lambda run: (run[0].peers, run[0].group, -run[0].settle_s))
    stamp = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    lines = [json.dumps({"bench": "protocol_scale", **stamp, "config": dataclasses.asdict(config), **row})
             for config, row in runs]
    print(table([row for _, row in runs]) if args.format == "table" else "\n".join(lines))
    if args.out:
        with args.out.open("a") as out:
            out.write("".join(line + "\n" for line in lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
