"""``barnraise-peer join (--coordinator URL | --initial-peers MULTIADDR...) [--workdir DIR]``.
``barnraise-peer key [--workdir DIR]``: this peer's public key (what a private run's coordinator admits)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peer.lifeline import bind_children_to_this_process
from protocol.cli import OneLineParser, run_command
from protocol.errors import InputError
from protocol.signing import public_key_from_pem

__all__ = ["main"]


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="barnraise-peer", description="Lend this machine to a Barnraise run.")
    commands = parser.add_subparsers(dest="command", required=True)
    join = commands.add_parser("join", help="join a run and train until stopped (Ctrl+C)")
    source = join.add_mutually_exclusive_group(required=True)
    source.add_argument("--coordinator", metavar="URL", help="the coordinator's HTTP address")
    source.add_argument("--initial-peers", nargs="+", metavar="MULTIADDR", help="any running peers' multiaddrs")
    join.add_argument("--workdir", type=Path, default=Path("barnraise-peer"), help="folder for this peer's key and logs")
    join.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    join.add_argument("--coordinator-key", metavar="FILE|HEX", help="refuse a run not signed by this public key")
    join.add_argument("--max-rounds", type=int, help="leave after taking part in N rounds")
    join.add_argument("--max-minutes", type=float, help="leave after this many minutes")
    join.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda, cuda:1, ...)")
    join.add_argument("--threads", type=int, help="torch CPU threads")
    join.add_argument("--snapshot-every", type=int, default=0, metavar="N",
                      help="every N rounds, write the consensus model to WORKDIR/snapshots/ (safetensors)")
    join.add_argument("--slowdown", type=float, default=1.0, metavar="X",
                      help="(tests, benchmarks) train X times slower than this machine can")
    join.add_argument("--save-state", type=Path, metavar="FILE",
                      help="on leaving, write the consensus model's parameters to FILE (safetensors)")
    join.add_argument("--max-memory", type=_size, metavar="SIZE",
                      help="memory this peer may use for the model, e.g. 6G or 512M (default: what the machine has)")
    join.add_argument("--micro-batch", type=_positive, metavar="N",
                      help="windows per forward pass; gradients are accumulated up to the run's batch (default: all)")
    join.add_argument("--activation-checkpointing", action="store_true",
                      help="recompute activations in the backward pass: less memory, more compute")
    join.add_argument("--token", type=Path, metavar="FILE",
                      help="a private run's join token for this peer's key (default: fetched from --coordinator)")
    key = commands.add_parser("key", help="print this peer's public key (created if there is none yet)")
    key.add_argument("--workdir", type=Path, default=Path("barnraise-peer"), help="the peer's folder")
    return parser


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _size(text: str) -> int:
    """Bytes from ``6G``, ``512M``, ``1.5G`` or a plain count."""
    value = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = value[-1:] if value[-1:] in _UNITS and value[-1:] != "" else ""
    try:
        number = float(value[: len(value) - len(unit)])
        size = int(number * _UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 6G, 512M)") from None
    if not 0 < size < 1 << 60:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive size below an exabyte")
    return size


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _pinned_key(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return public_key_from_pem(path.read_bytes())
    return public_key_from_pem(value.encode())


def _token_file(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()[:4096]
    except OSError as error:
        raise InputError(f"--token {path}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    bind_children_to_this_process()  # a SIGKILLed peer leaves no DHT, averager or p2pd behind
    return run_command("barnraise-peer", lambda: _dispatch(_parser().parse_args(argv)))


def _dispatch(args: argparse.Namespace) -> int:
    return _key(args) if args.command == "key" else _join(args)


def _key(args: argparse.Namespace) -> int:
    from peer.workdir import load_or_create_key
    from protocol.signing import key_id

    args.workdir.mkdir(parents=True, exist_ok=True)
    public = load_or_create_key(args.workdir / "peer.key").public_key_hex
    print(public)
    print(f"peer id {key_id(public)}; a private run's coordinator admits it with: "
          f"barnraise-coordinator admit {public}", file=sys.stderr)
    return 0


def _join(args: argparse.Namespace) -> int:
    from peer.runner import PeerOptions, run_peer  # here: --help and argument errors answer at once

    options = PeerOptions(
        coordinator_url=args.coordinator,
        initial_peers=tuple(args.initial_peers or ()),
        workdir=args.workdir,
        host=args.host,
        coordinator_key=_pinned_key(args.coordinator_key),
        max_rounds=args.max_rounds,
        max_minutes=args.max_minutes,
        device=args.device,
        threads=args.threads,
        snapshot_every=args.snapshot_every,
        slowdown=args.slowdown,
        save_state=args.save_state,
        max_memory=args.max_memory,
        micro_batch=args.micro_batch,
        activation_checkpointing=args.activation_checkpointing,
        token=_token_file(args.token),
        on_line=lambda line: print(line, flush=True),
    )
    return run_peer(options)


if __name__ == "__main__":
    sys.exit(main())
