"""``barnraise-coordinator launch RUN.toml [--workdir DIR]``: launch or resume a run.
``barnraise-coordinator export --workdir DIR [--round N] OUT``: a checkpoint as a Hugging Face folder.
``barnraise-coordinator admit --workdir DIR KEY [--days N]``: let a volunteer key join a private run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    export = commands.add_parser("export", help="write a recorded checkpoint as a Hugging Face model folder")
    export.add_argument("out", type=Path, metavar="OUT", help="the folder to write (must not exist, or be empty)")
    export.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="the run's coordinator folder")
    export.add_argument("--round", type=int, metavar="N", help="the checkpoint of round N (default: the latest)")
    admit = commands.add_parser("admit", help="issue a join token of a private run for a volunteer's public key")
    admit.add_argument("key", metavar="KEY", help="the volunteer's public key: 64 hex digits (barnraise-peer key "
                       "prints it) or a PEM file")
    admit.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="the run's coordinator folder")
    admit.add_argument("--days", type=float, default=365.0, help="days the token admits for (default 365)")
    return parser


def main(argv: list[str] | None = None) -> int:
    bind_children_to_this_process()  # a SIGKILLed coordinator leaves no DHT, averager or p2pd behind
    return run_command("barnraise-coordinator", lambda: _dispatch(_parser().parse_args(argv)), also=(OSError,))


def _dispatch(args: argparse.Namespace) -> int:
    return {"export": _export, "admit": _admit}.get(args.command, _launch)(args)


def _admit(args: argparse.Namespace) -> int:
    from coordinator.admission import admit

    token, path = admit(args.workdir, args.key, days=args.days)
    print(f"admitted key {token.peer_id} to run {token.run_id} until {_date(token.expires)} ({path})")
    print("its peer fetches the token from this coordinator when it joins (or give it the file: --token FILE)")
    return 0


def _date(moment: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(moment, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _export(args: argparse.Namespace) -> int:
    from coordinator.export import export_checkpoint

    summary = export_checkpoint(args.workdir, args.out, args.round)
    entry = summary.entry
    print(f"exported run {summary.run_name}, ledger entry {entry.seq} (round {entry.round}, root "
          f"{entry.checkpoint_root[:16]}) to {summary.out}")
    print(f"verify with: barnraise-audit verify --ledger {args.workdir / 'ledger.jsonl'} "
          f"--public-key {args.workdir / 'coordinator.pub'} --export {summary.out}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    from coordinator.service import CoordinatorOptions, serve  # here: --help and argument errors answer at once

    options = CoordinatorOptions(
        run_config=args.run_config, workdir=args.workdir, host=args.host, http_port=args.http_port,
        start_in=max(0.0, args.start_in),
        on_line=lambda line: print(line, flush=True),
    )
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
