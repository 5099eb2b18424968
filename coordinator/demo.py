"""``barnraise-demo``: a coordinator and 3 peers on loopback train the demo model, then an audit.

    barnraise-demo --peers 3 --minutes 2 --workdir barnraise-demo
    barnraise-demo --run examples/tiny-llama/RUN.toml    # any run config, on loopback

Everything lands in the workdir: ``coordinator/`` (key, ledger, checkpoints, ledger.jsonl),
``peer-N/`` (key, rounds.jsonl) and each process's log. Exits non-zero if the audit fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from coordinator.children import Child
from protocol.errors import BarnraiseError
from protocol.extras import require_extra

__all__ = ["main", "DEMO_RUN"]

DEMO_RUN = """\
# The demo run: a ~0.45M-parameter byte-level GPT-2 on the Python standard library.
[run]
name = "demo"

[model]
n_embd = 128
n_layer = 2
n_head = 4

# H, the codec, the outer step and the rounds are the manifest's defaults, chosen by
# measurement in docs/benchmarks.md (H 15, bmax-c4096-b64-s2, error feedback decayed 0.95,
# a mean over each coordinate's senders, outer SGD at 1.0, asynchronous rounds of 8 s).
[averaging]
round_deadline_seconds = 20.0

[checkpoints]
every_rounds = 4
"""
_MARKER = ".barnraise-demo"
_START_DEADLINE = 180.0
_MIN_CHECKPOINTS = 2
_EXTRA_MINUTES = 3.0


def _prepare_workdir(workdir: Path, run: Path | None) -> Path:
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / _MARKER).exists():
            raise SystemExit(f"barnraise-demo: error: {workdir} is not empty and holds no earlier demo; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / _MARKER).write_text("made by barnraise-demo; removed and remade by the next demo in this folder\n")
    if run is not None:
        return run.resolve()  # its relative paths start from its own folder
    (workdir / "RUN.toml").write_text(DEMO_RUN)
    return workdir / "RUN.toml"


def _wait_for_endpoint(coordinator: Child, path: Path) -> str:
    deadline = time.monotonic() + _START_DEADLINE
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())["url"]
        if not coordinator.running:
            raise RuntimeError("the coordinator exited before serving; see coordinator.log")
        time.sleep(0.5)
    raise RuntimeError(f"the coordinator did not start within {_START_DEADLINE:.0f} s")


def _checkpoints(url: str) -> int:
    """Checkpoint entries after genesis so far (0 when the coordinator does not answer)."""
    try:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as response:
            last = json.loads(response.read())["last_checkpoint"]
    except (OSError, ValueError, KeyError):
        return 0
    return last["seq"] if last else 0


def _train(url: str, peers: list[Child], minutes: float) -> None:
    started = time.monotonic()
    while time.monotonic() - started < minutes * 60 or (
        _checkpoints(url) < _MIN_CHECKPOINTS and time.monotonic() - started < (minutes + _EXTRA_MINUTES) * 60
    ):
        if not any(p.running for p in peers):
            raise RuntimeError("every peer has exited; see the peer-N.log files")
        time.sleep(2.0)


def _peer_id(folder: Path) -> str:
    """The id the peer's own lines show (``[peer 1a2b3c4d]``): its key id, first 8 hex digits."""
    from protocol.signing import SigningKey, key_id

    try:
        return key_id(SigningKey.from_pem((folder / "peer.key").read_bytes()).public_key_hex)[:8]
    except (OSError, ValueError, BarnraiseError):
        return "no key"


def _round_summary(workdir: Path, peers: int) -> list[str]:
    lines = []
    for index in range(1, peers + 1):
        log = workdir / f"peer-{index}" / "rounds.jsonl"
        rounds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        full = sum(1 for r in rounds if r["failure"] is None and r["contributors"] >= peers)
        partial = sum(1 for r in rounds if r["failure"] is None and r["contributors"] < peers)
        out = sum(1 for r in rounds if r["failure"] is not None)
        lines.append(f"peer-{index} ({_peer_id(workdir / f'peer-{index}')}): {len(rounds)} rounds: {full} with all {peers} contributions, {partial} with fewer,"
                     f" {out} out of step")
    return lines


def _report(workdir: Path, peers: int) -> None:
    from protocol.ledger import entries_from_jsonl

    entries = entries_from_jsonl((workdir / "coordinator" / "ledger.jsonl").read_text())
    print("[demo] held-out loss by checkpoint (nats per token):")
    for entry in entries:
        loss = "n/a" if entry.heldout_loss is None else f"{entry.heldout_loss:.3f}"
        print(f"[demo]   entry {entry.seq}  round {entry.round:3d}  held-out loss {loss}  samples {entry.total_samples}")
    for line in _round_summary(workdir, peers):
        print(f"[demo] {line}")


def run_demo(workdir: Path, peer_count: int, minutes: float, run: Path | None = None) -> int:
    run_config = _prepare_workdir(workdir, run)
    children: list[Child] = []
    coordinator_dir = workdir / "coordinator"
    try:
        coordinator = Child("coordinator", "coordinator.cli",
                            ["launch", str(run_config), "--workdir", str(coordinator_dir), "--http-port", "0"],
                            workdir / "coordinator.log")
        children.append(coordinator)
        url = _wait_for_endpoint(coordinator, coordinator_dir / "endpoint.json")
        peers = []
        for i in range(1, peer_count + 1):
            peers.append(Child(f"peer-{i}", "peer.cli",
                               ["join", "--coordinator", url, "--workdir", str(workdir / f"peer-{i}"),
                                "--host", "127.0.0.1", "--threads", "1"],
                               workdir / f"peer-{i}.log"))
            children.append(peers[-1])
        _train(url, peers, minutes)
        print("[demo] stopping the peers", flush=True)
        for peer in peers:
            peer.interrupt()
        for peer in peers:
            peer.stop(grace=60)
        coordinator.stop(grace=30)
    finally:
        for child in children:
            if child.running or child.process.returncode is None:
                child.stop(grace=10)
    _report(workdir, peer_count)
    audit = Child("audit", "coordinator.audit", [
        "verify", "--ledger", str(coordinator_dir / "ledger.jsonl"),
        "--public-key", str(coordinator_dir / "coordinator.pub"),
        "--checkpoints", str(coordinator_dir / "checkpoints"),
    ], workdir / "audit.log")
    code = audit.process.wait(timeout=600)
    audit.stop(grace=1)
    print(f"[demo] audit {'passed' if code == 0 else 'FAILED'}; everything is in {workdir}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    require_extra("swarm", "barnraise-demo")
    parser = argparse.ArgumentParser(prog="barnraise-demo", description="A local demo swarm, then an audit.")
    parser.add_argument("--peers", type=int, default=3, help="peer processes (default 3)")
    parser.add_argument("--minutes", type=float, default=2.0, help="minutes of training (default 2)")
    parser.add_argument("--workdir", type=Path, default=Path("barnraise-demo"), help="folder for everything")
    parser.add_argument("--run", type=Path, metavar="RUN.toml",
                        help="run this run config instead of the built-in demo (its paths are relative to its folder)")
    args = parser.parse_args(argv)
    if args.peers < 1 or args.minutes <= 0:
        parser.error("--peers must be at least 1 and --minutes positive")
    if args.run is not None and not args.run.is_file():
        parser.error(f"--run {args.run}: no such file")
    try:
        return run_demo(args.workdir, args.peers, args.minutes, args.run)
    except RuntimeError as error:
        print(f"barnraise-demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
