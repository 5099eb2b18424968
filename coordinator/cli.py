"""``barnraise-coordinator launch RUN.toml [--workdir DIR]``: launch or resume a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from coordinator.service import CoordinatorOptions, serve
from peer.lifeline import bind_children_to_this_process
from protocol.cli import OneLineParser, run_command

__all__ = ["main"]


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="barnraise-coordinator", description="Launch and keep a Barnraise run.")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="launch a run from RUN.toml, or resume it in its workdir")
    launch.add_argument("run_config", type=Path, metavar="RUN.toml")
    launch.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="folder for key, ledger, checkpoints")
    launch.add_argument("--host", default="127.0.0.1", help="address for HTTP and the DHT node (default 127.0.0.1)")
    launch.add_argument("--http-port", type=int, default=8470, help="HTTP port (0 picks a free one)")
    launch.add_argument("--start-in", type=float, default=0.0, metavar="SECONDS",
                        help="a new run's round 0 opens this many seconds after launch (peers can join first)")
    return parser


def main(argv: list[str] | None = None) -> int:
    bind_children_to_this_process()  # a SIGKILLed coordinator leaves no DHT, averager or p2pd behind
    return run_command("barnraise-coordinator", lambda: _launch(_parser().parse_args(argv)), also=(OSError,))


def _launch(args: argparse.Namespace) -> int:
    options = CoordinatorOptions(
        run_config=args.run_config, workdir=args.workdir, host=args.host, http_port=args.http_port,
        start_in=max(0.0, args.start_in),
        on_line=lambda line: print(line, flush=True),
    )
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
