"""``barnraise-coordinator launch RUN.toml [--workdir DIR]``: launch or resume a run.
``barnraise-coordinator export --workdir DIR [--round N] OUT``: a checkpoint as a Hugging Face folder.
``barnraise-coordinator admit --workdir DIR KEY [--days N]``: let a volunteer key join a private run.
``barnraise-coordinator credit --workdir DIR [--format json]``: verified samples per volunteer key.
``barnraise-coordinator spot-check --workdir DIR CHECK [--format json]``: rerun a kept spot check."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer.lifeline import bind_children_to_this_process
from protocol.cli import OneLineParser, run_command
from protocol.extras import require_extra
from protocol.terminal import Terminal

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
    check = commands.add_parser("spot-check", help="rerun a kept spot check (checks/r000042-<peer id>) and compare")
    check.add_argument("folder", type=Path, metavar="CHECK", help="the check's folder (in WORKDIR/checks/)")
    check.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="the run's coordinator folder")
    check.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")
    credit = commands.add_parser("credit", help="the leaderboard: verified samples per volunteer key, from the ledger")
    credit.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="the run's coordinator folder")
    credit.add_argument("--format", choices=("text", "json"), default="text", help="text (default) or json")
    credit.add_argument("--top", type=int, default=100, metavar="N", help="the N largest (default 100)")
    return parser


def main(argv: list[str] | None = None) -> int:
    bind_children_to_this_process()  # a SIGKILLed coordinator leaves no DHT, averager or p2pd behind
    return run_command("barnraise-coordinator", lambda: _dispatch(_parser().parse_args(argv)), also=(OSError,))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command != "credit":  # credit reads the ledger only: the core install runs it
        require_extra("swarm", "barnraise-coordinator")
    return {"export": _export, "admit": _admit, "credit": _credit,
            "spot-check": _spot_check}.get(args.command, _launch)(args)


def _spot_check(args: argparse.Namespace) -> int:
    import json

    from coordinator.spotcheck import MAX_NORM_DIFFERENCE, MIN_COSINE, rerun_in_workdir

    result = rerun_in_workdir(args.workdir, args.folder)
    if args.format == "json":
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        how = "bitwise" if result["bitwise"] else (
            f"cosine {result['cosine']:.4f}, norm ratio {result['norm_ratio']:.3f}; passing needs a cosine of at least "
            f"{MIN_COSINE} and a ratio within {MAX_NORM_DIFFERENCE:.0%} of 1")
        print(f"round {result['round']}, peer {result['peer_id']}: {'passed' if result['passed'] else 'FAILED'} "
              f"({how}); the ledger says {result['ledger_verdict'] or 'nothing yet'}")
    return 0 if result["agrees"] else 1


def _credit(args: argparse.Namespace) -> int:
    import json

    from coordinator.runpage import leaderboard
    from protocol.errors import InputError
    from protocol.ledger import entries_from_jsonl, verify_chain
    from protocol.signing import public_key_from_pem

    try:
        text = (args.workdir / "ledger.jsonl").read_text(encoding="utf-8")
        key = public_key_from_pem((args.workdir / "coordinator.pub").read_bytes())
    except OSError as error:
        raise InputError(f"--workdir {args.workdir}: no run's ledger there ({error.strerror or error})") from None
    entries = entries_from_jsonl(text)
    verify_chain(entries, key)  # credit is read only from a ledger whose every entry this key signed
    head = entries[-1]
    board = leaderboard({c.peer_id: c.samples for c in head.contributors}, limit=max(1, args.top))
    if args.format == "json":
        print(json.dumps({"run_id": head.run_id, "ledger_entry": head.seq, "round": head.round,
                          "total_samples": head.total_samples, "leaderboard": board}, indent=2))
        return 0
    terminal = Terminal()
    terminal.line(f"run {head.run_id}, ledger entry {head.seq} (round {head.round}): {head.total_samples:,} verified "
                  f"samples, {len(head.contributors)} volunteer keys")
    if not board:
        terminal.line("no verified samples yet")
        return 0
    terminal.table(["#", "key", "samples", "share"],
                   [[r["rank"], r["peer_id"], f"{r['samples']:,}", f"{100 * r['share']:.1f} %"] for r in board],
                   right=(0, 2, 3))
    return 0


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
        on_line=Terminal().line,
    )
    return serve(options)


if __name__ == "__main__":
    sys.exit(main())
