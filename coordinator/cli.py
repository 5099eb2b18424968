"""``barnraise-coordinator launch RUN.toml [--workdir DIR]``: launch or resume a run."""

from __future__ import annotations

import sys
from pathlib import Path

from coordinator.service import CoordinatorOptions, serve
from protocol.cli import OneLineParser
from protocol.errors import BarnraiseError, InputError

__all__ = ["main"]


def _parser() -> OneLineParser:
    parser = OneLineParser(prog="barnraise-coordinator", description="Launch and keep a Barnraise run.")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("launch", help="launch a run from RUN.toml, or resume it in its workdir")
    launch.add_argument("run_config", type=Path, metavar="RUN.toml")
    launch.add_argument("--workdir", type=Path, default=Path("barnraise-run"), help="folder for key, ledger, checkpoints")
    launch.add_argument("--host", default="127.0.0.1", help="address for HTTP and the DHT node (default 127.0.0.1)")
    launch.add_argument("--http-port", type=int, default=8470, help="HTTP port (0 picks a free one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except InputError as error:
        print(f"barnraise-coordinator: error: {error}", file=sys.stderr)
        return 2
    options = CoordinatorOptions(
        run_config=args.run_config, workdir=args.workdir, host=args.host, http_port=args.http_port,
        on_line=lambda line: print(line, flush=True),
    )
    try:
        return serve(options)
    except InputError as error:
        print(f"barnraise-coordinator: error: {error}", file=sys.stderr)
        return 2
    except BarnraiseError as error:
        print(f"barnraise-coordinator: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # e.g. the HTTP port is taken
        print(f"barnraise-coordinator: error: {error.strerror or error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
