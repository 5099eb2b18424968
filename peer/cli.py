"""``barnraise-peer join (--coordinator URL | --initial-peers MULTIADDR...) [--workdir DIR]``.
``barnraise-peer key [--workdir DIR]``: this peer's public key (what a private run's coordinator admits).
``barnraise-peer status [--workdir DIR] [--format text|json] [--coordinator [URL]]``: what the peer's
folder says about it (no network unless ``--coordinator``)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

__all__ = ["main"]

# Only the standard library is imported at module level: Barnraise's own modules may load torch
# and hivemind, which takes seconds, and a Ctrl+C meanwhile must end in one line, not a traceback
# (``main`` installs ``_interrupted_while_loading`` before importing them).


def _interrupted_while_loading(signum, frame) -> None:
    os.write(2, b"barnraise-peer: interrupted while starting\n")
    os._exit(130)  # nothing is running yet: no child, no file half written


def _parser() -> argparse.ArgumentParser:
    from protocol.cli import OneLineParser

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
    join.add_argument("--port", type=_port, default=0, metavar="N",
                      help="TCP port to listen on (default: any free one); keep it fixed to forward it on a router")
    join.add_argument("--no-relay", action="store_true",
                      help="behind NAT, do not reserve a slot on a relay (trains over its own connections only)")
    join.add_argument("--max-upload-mbps", type=_rate, metavar="MBIT",
                      help="pace what this peer sends (payloads, run files) to this many megabits per second")
    join.add_argument("--max-download-mbps", type=_rate, metavar="MBIT",
                      help="pace what this peer fetches to this many megabits per second")
    join.add_argument("--metrics-port", type=_port, metavar="N",
                      help="serve Prometheus metrics at http://HOST:N/metrics (0: any free port)")
    join.add_argument("--only-when-idle", nargs="?", type=_percent, const=25.0, metavar="PERCENT",
                      help="pause while the machine's other work uses more than PERCENT of its CPU (default 25)")
    key = commands.add_parser("key", help="print this peer's public key (created if there is none yet)")
    key.add_argument("--workdir", type=Path, default=Path("barnraise-peer"), help="the peer's folder")
    status = commands.add_parser("status", help="what this peer's folder says: run, rounds, credit (offline)")
    status.add_argument("--workdir", type=Path, default=Path("barnraise-peer"), help="the peer's folder")
    status.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    status.add_argument("--coordinator", nargs="?", const="", metavar="URL",
                        help="also ask the coordinator (the one the peer joined through, or URL) for its /status")
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


def _number(kind: type, what: str, low: float, high: float, bounds: str):
    """An argparse type: ``kind`` of ``text`` within [low, high], else one line naming the value."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r} must {bounds}")
        return value

    return parse


_port = _number(int, "a port number", 0, 65535, "lie in 0-65535")
_rate = _number(float, "a number of megabits per second", 0.01, 1e6, "lie in 0.01-1000000 Mbit/s")
_percent = _number(float, "a percentage", 1, 100, "lie in 1-100")
_positive = _number(int, "a whole number", 1, float("inf"), "be at least 1")


def _pinned_key(value: str | None) -> str | None:
    """The hex public key ``--coordinator-key`` names: a PEM file, a file of 64 hex digits, or the
    digits themselves; one line naming the flag when it is none of these."""
    from protocol.errors import InputError
    from protocol.signing import public_key_from_pem

    if value is None:
        return None
    path = Path(value)
    try:
        return public_key_from_pem(path.read_bytes() if path.is_file() else value.encode())
    except InputError as error:
        if path.is_file():
            raise InputError(f"--coordinator-key {value}: {error}") from None
        if path.exists():
            raise InputError(f"--coordinator-key {value}: not a file, and not a PEM or hex public key") from None
        raise InputError(f"--coordinator-key {value}: no such file, and not a PEM or hex public key") from None


def _initial_peers(values: list[str] | None) -> tuple[str, ...]:
    """The ``--initial-peers`` multiaddrs, each checked as hivemind will parse it (one line, exit 2)."""
    from protocol.errors import InputError
    from protocol.multiaddr import multiaddr_problem

    for value in values or ():
        if (problem := multiaddr_problem(value)) is not None:
            raise InputError(f"--initial-peers {ascii(value)[1:-1]}: not a usable multiaddr ({problem}); "
                             "expected /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT/p2p/ID")
    return tuple(values or ())


def _token_file(path: Path | None) -> bytes | None:
    from protocol.errors import InputError

    if path is None:
        return None
    try:
        return path.read_bytes()[:4096]
    except OSError as error:
        raise InputError(f"--token {path}: {error.strerror or error}") from None


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGINT, _interrupted_while_loading)
    from peer.lifeline import bind_children_to_this_process
    from protocol.cli import run_command

    # from here on a Ctrl+C is a KeyboardInterrupt, which run_command turns into one line and 130
    signal.signal(signal.SIGINT, previous)
    bind_children_to_this_process()  # a SIGKILLed peer leaves no DHT, averager or p2pd behind
    return run_command("barnraise-peer", lambda: _dispatch(_parser().parse_args(argv)))


def _dispatch(args: argparse.Namespace) -> int:
    return {"key": _key, "status": _status}.get(args.command, _join)(args)


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
    from protocol.extras import require_extra
    from protocol.terminal import Terminal

    require_extra("swarm", "barnraise-peer")  # key and status run on the core install too
    initial_peers, pin = _initial_peers(args.initial_peers), _pinned_key(args.coordinator_key)
    token = _token_file(args.token)
    # here: --help and argument errors answer at once. Loading torch and hivemind takes seconds, and a
    # KeyboardInterrupt inside an extension's import can leave the interpreter to die by SIGINT at
    # exit: until they are loaded, Ctrl+C ends the process at once, in one line, with 130
    previous = signal.signal(signal.SIGINT, _interrupted_while_loading)
    try:
        from peer.runner import PeerOptions, run_peer
    finally:
        signal.signal(signal.SIGINT, previous)

    options = PeerOptions(
        coordinator_url=args.coordinator,
        initial_peers=initial_peers,
        workdir=args.workdir,
        host=args.host,
        coordinator_key=pin,
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
        token=token,
        port=args.port,
        relay=not args.no_relay,
        max_upload_mbps=args.max_upload_mbps,
        max_download_mbps=args.max_download_mbps,
        metrics_port=args.metrics_port,
        only_when_idle=args.only_when_idle,
        on_line=Terminal().line,
    )
    return run_peer(options)


_OUTCOME_WORDS = {"entered": "entered", "waiting": "left for a later round", "not_in_round": "not in the round",
                  "void": "void", "out_of_step": "out of step"}
"""``peer.workdir.OUTCOMES`` in words, in that order."""
_STATUS_MAX_BYTES = 4 << 20
"""A coordinator's ``/status`` lists every live peer: a few hundred bytes each."""


def _status(args: argparse.Namespace) -> int:
    import json

    from peer.workdir import summarise_workdir

    summary = summarise_workdir(args.workdir)
    asked = None
    if args.coordinator is not None:
        asked = _coordinator_status(args.coordinator or summary.coordinator_url, summary.peer_id)
    if args.format == "json":
        print(json.dumps(summary.to_json() | ({"coordinator_status": asked} if asked is not None else {})))
        return 0
    for name, value in _status_lines(summary, time.time()):
        print(f"{name:<13} {value}")
    if asked is not None:
        print(f"{'coordinator':<13} {_coordinator_line(asked)}")
    return 0


def _status_lines(summary, now: float) -> list[tuple[str, str]]:
    """(label, value) lines of ``barnraise-peer status``: only what the workdir holds."""
    lines = [("workdir", summary.workdir), ("peer id", summary.peer_id or "unknown (no peer.key)")]
    if summary.run_id is not None:
        lines.append(("run", f"{summary.run_name} ({summary.run_id})" if summary.run_name else summary.run_id))
    if summary.coordinator_url is not None:
        lines.append(("joined via", summary.coordinator_url))
    counts = ", ".join(f"{summary.rounds[o]} {words}" for o, words in _OUTCOME_WORDS.items() if summary.rounds.get(o))
    lines.append(("rounds", f"{summary.rounds_taken}" + (f": {counts}" if counts else "")))
    lines.append(("credit", "unknown (no contribution.json)" if summary.samples is None
                  else f"{summary.samples} samples"))
    if summary.last_round is not None:
        loss = "n/a" if summary.last_loss is None else f"{summary.last_loss:.3f}"
        held = "" if summary.state_round is None else f" (consensus at round {summary.state_round} after it)"
        lines.append(("last round", f"{summary.last_round}, loss {loss}{held}"))
    if summary.last_written is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(summary.last_written))
        lines.append(("last written", f"{stamp} ({_ago(now - summary.last_written)})"))
    if summary.paused:
        lines.append(("paused", f"yes: {summary.workdir}/pause exists (remove it to resume)"))
    return lines


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{max(0, seconds):.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _coordinator_status(url: str | None, peer_id: str | None) -> dict:
    """The coordinator's ``/status`` (2 s to connect and answer), or ``{"url", "unreachable"}``."""
    import json

    from peer.coordinator_client import CoordinatorClient
    from protocol.errors import BarnraiseError, InputError

    if not url:
        raise InputError("the workdir records no coordinator (the peer joined by multiaddrs): give --coordinator URL")
    client = CoordinatorClient(url, timeout=2.0, request_seconds=2.0, min_bytes_per_second=2 << 20)
    try:
        status = json.loads(client.get("/status", max_bytes=_STATUS_MAX_BYTES))
    except (BarnraiseError, ValueError, RecursionError) as error:
        return {"url": url, "unreachable": " ".join(str(error).split())[:200] or type(error).__name__}
    if not isinstance(status, dict):
        return {"url": url, "unreachable": "its /status is not a JSON object"}
    peers = status.get("peers") if isinstance(status.get("peers"), list) else []
    mine = next((p for p in peers if isinstance(p, dict) and p.get("peer_id") == peer_id), None)
    return {"url": url, "global_round": status.get("global_round"), "alive_peers": status.get("alive_peers"),
            "credited_samples": mine.get("samples") if mine else None, "listed": mine is not None}


def _coordinator_line(asked: dict) -> str:
    if "unreachable" in asked:
        return f"{asked['url']}: unreachable ({asked['unreachable']})"
    listed = (f"credits this peer {asked['credited_samples']} samples" if asked["listed"]
              else "does not list this peer as live")
    return f"{asked['url']}: round {asked['global_round']}, {asked['alive_peers']} live peers; {listed}"


if __name__ == "__main__":
    sys.exit(main())
