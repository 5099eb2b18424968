"""One process per peer ("rank"): start them, watch them under a deadline, always reap them.

Parent side: ``run_ranks`` starts ``python -m MODULE ARGS`` once per rank, each in its own
session (so one ``killpg`` reaches the rank and everything it spawned: hivemind's DHT process
and its ``p2pd`` daemon), optionally wrapped by a ``launcher`` (e.g. ``ip netns exec ns{rank}``),
waits for all of them under one deadline, and kills every group on the way out, success or
not. A rank reports by writing ``rank{r}.json`` in the run's work folder.

Rank side: ``write_result``, ``file_barrier`` (ranks share a filesystem even when each lives
in its own network namespace) and ``arm_watchdog``, a hard exit at the rank's deadline:
hivemind calls can block past any timeout (``load_state_from_peers`` retries forever) and its
averager ignores SIGINT, so only leaving the process is a deadline that always holds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from coordinator.children import group_alive, kill_group
from protocol.errors import BarnraiseError, DeadlineExceeded

__all__ = [
    "Launcher",
    "RankFailed",
    "run_ranks",
    "child_env",
    "write_result",
    "arrive",
    "file_barrier",
    "rendezvous_dir",
    "arm_watchdog",
    "WATCHDOG_EXIT_CODE",
]

Launcher = Callable[[int, list[str]], list[str]]
"""``launcher(rank, argv) -> argv``: wraps a rank's command, e.g. ``["ip", "netns", "exec", f"ns{rank}", *argv]``."""

WATCHDOG_EXIT_CODE = 124
"""Exit code of a rank that its own watchdog stopped at its deadline."""

_REPO_ROOT = Path(__file__).resolve().parents[1]
_POLL_SECONDS = 0.2
_REAP_SECONDS = 10.0


class RankFailed(BarnraiseError):
    """A rank exited with an error, or without writing its result."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a rank: one compute thread, unbuffered output, this repo importable."""
    path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    env.update(extra or {})
    return env


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def _start(rank: int, argv: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_all(processes: list[subprocess.Popen[bytes]], workdir: Path, deadline: float) -> None:
    """Return when every rank exited 0; raise as soon as one fails or the deadline passes."""
    while True:
        codes = [p.poll() for p in processes]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                why = "stopped by its watchdog" if code == WATCHDOG_EXIT_CODE else f"exited with code {code}"
                raise RankFailed(f"rank {rank} {why}: {_log_tail(workdir / f'rank{rank}.log')}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            waiting = [rank for rank, code in enumerate(codes) if code is None]
            raise DeadlineExceeded(f"ranks {waiting} still running at the deadline; see the logs in {workdir}")
        time.sleep(_POLL_SECONDS)


def _reap(processes: list[subprocess.Popen[bytes]]) -> int:
    """Kill every rank's process group; return how many groups still had processes."""
    leftovers = 0
    grace = time.monotonic() + _REAP_SECONDS
    for process in processes:
        # A rank that exited cleanly may leave hivemind's daemons a moment to exit by themselves.
        while process.poll() is not None and group_alive(process.pid) and time.monotonic() < grace:
            time.sleep(_POLL_SECONDS)
        if group_alive(process.pid):
            leftovers += 1
            kill_group(process.pid)
        try:
            process.wait(timeout=_REAP_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"[bench] process {process.pid} survived SIGKILL for {_REAP_SECONDS:.0f} s", file=sys.stderr)
    return leftovers


def run_ranks(
    module: str,
    rank_args: Callable[[int], Sequence[str]],
    *,
    peers: int,
    workdir: Path,
    timeout_s: float,
    launcher: Launcher | None = None,
    env: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Run ``python -m module *rank_args(r)`` for r in 0..peers-1; return (their results, leftover groups).

    Logs go to ``workdir/rank{r}.log``. Raises ``RankFailed`` or ``DeadlineExceeded``; in
    every case each rank's process group is killed before this returns.
    """
    _clear(workdir, peers)
    child = child_env(env)
    processes: list[subprocess.Popen[bytes]] = []
    leftovers = 0
    try:
        for rank in range(peers):
            argv = [sys.executable, "-m", module, *rank_args(rank)]
            argv = launcher(rank, argv) if launcher is not None else argv
            processes.append(_start(rank, argv, workdir / f"rank{rank}.log", child))
        _wait_all(processes, workdir, time.monotonic() + timeout_s)
    finally:
        leftovers = _reap(processes)
    return [_read_result(workdir, rank) for rank in range(peers)], leftovers


def rendezvous_dir(workdir: Path) -> Path:
    """Where ranks leave barrier marks and addresses for each other; emptied before every run."""
    return workdir / "rendezvous"


def _clear(workdir: Path, peers: int) -> None:
    """Remove what an earlier run in ``workdir`` left, so no stale mark or result is read."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(rendezvous_dir(workdir), ignore_errors=True)
    rendezvous_dir(workdir).mkdir()
    for rank in range(peers):
        (workdir / f"rank{rank}.json").unlink(missing_ok=True)


def _read_result(workdir: Path, rank: int) -> dict[str, Any]:
    path = workdir / f"rank{rank}.json"
    if not path.exists():
        raise RankFailed(f"rank {rank} exited without writing {path}: {_log_tail(workdir / f'rank{rank}.log')}")
    return json.loads(path.read_text())


def write_result(workdir: Path, rank: int, result: dict[str, Any]) -> None:
    """Write this rank's result atomically (the parent never reads half a file)."""
    path = workdir / f"rank{rank}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(result))
    partial.replace(path)


def arrive(workdir: Path, name: str, *, rank: int) -> None:
    """Mark this rank as arrived at barrier ``name`` without waiting for the others."""
    (rendezvous_dir(workdir) / f"{name}.{rank}").touch()


def file_barrier(workdir: Path, name: str, *, rank: int, peers: int, timeout_s: float) -> None:
    """Mark this rank as arrived at barrier ``name`` and wait until every rank has."""
    folder = rendezvous_dir(workdir)
    arrive(workdir, name, rank=rank)
    deadline = time.monotonic() + timeout_s
    while not all((folder / f"{name}.{r}").exists() for r in range(peers)):
        if time.monotonic() > deadline:
            missing = [r for r in range(peers) if not (folder / f"{name}.{r}").exists()]
            raise DeadlineExceeded(f"barrier {name!r}: ranks {missing} did not arrive within {timeout_s:.0f} s")
        time.sleep(0.05)


def arm_watchdog(timeout_s: float, what: str) -> threading.Timer:
    """Exit this process with ``WATCHDOG_EXIT_CODE`` if it still runs after ``timeout_s``; cancel() to disarm."""

    def expire() -> None:
        print(f"[bench] {what} ran past its {timeout_s:.0f} s deadline: exiting", file=sys.stderr, flush=True)
        os._exit(WATCHDOG_EXIT_CODE)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    return timer
