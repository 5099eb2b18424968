"""A harness for tests that run Barnraise's real processes (coordinator, peers, auditor).

Each child is ``sys.executable -m MODULE ...`` in its own session (so one signal to its
process group reaches hivemind's helper processes and its ``p2pd``), with stdout and stderr
written to files under the test's tmp folder. Every wait has a deadline and fails with the
tail of the logs that explain it.

Teardown stops every child the way a user would (SIGINT, then a bounded wait) and FAILS the
test when a child had to be killed, when a child left processes behind in its group, or when
a ``p2pd`` started during the test is still alive: a leak is a bug, not something to clean up
quietly. ``p2pd`` daemons are told apart from other runs' on the same machine by an
environment marker that every process started from this pytest session inherits (hivemind
copies the environment into the daemon).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.children import group_alive, kill_group

MARKER = "BARNRAISE_TEST_SESSION"
TOKEN = uuid.uuid4().hex
# Set for this process too: the in-process swarm tests start p2pd daemons from here.
os.environ[MARKER] = TOKEN
os.environ.setdefault("OMP_NUM_THREADS", "1")

SMALL_RUN = """\
[run]
name = "t"

[training]
inner_steps = 10

[averaging]
round_seconds = 6.0
round_deadline_seconds = 20.0

[checkpoints]
every_rounds = 3
"""
"""The run every swarm test uses: rounds of 6 s, 3 peers on 2 cores."""

P2PD_EXIT_SECONDS = 8.0
"""How long a p2pd may outlive its owner before it counts as leaked."""


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **{MARKER: TOKEN})


def our_p2pd() -> set[int]:
    """Live p2pd daemons started from this pytest session (by us or by our children)."""
    found = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True, timeout=10).stdout.split()
    mark = f"{MARKER}={TOKEN}".encode()
    ours = set()
    for pid in map(int, found):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # exited meanwhile, or not ours to read
            continue
        if mark in environ.split(b"\0"):
            ours.add(pid)
    return ours


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no output yet)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


class Child:
    """One running ``python -m MODULE ...``; stdout in ``NAME.out``, stderr in ``NAME.err``."""

    def __init__(self, name: str, module: str, args: Sequence[str], folder: Path):
        self.name = name
        self.out_path = folder / f"{name}.out"
        self.err_path = folder / f"{name}.err"
        self.killed_on_purpose = False
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module, *map(str, args)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=folder, env=child_env(),
                start_new_session=True,
            )
        self.pid = self.process.pid

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def tail(self, lines: int = 25) -> str:
        return (f"--- {self.name} (pid {self.pid}, exit {self.process.poll()}) stdout:\n{_tail(self.out_path, lines)}\n"
                f"--- {self.name} stderr:\n{_tail(self.err_path, lines)}")

    def p2pd(self) -> set[int]:
        """This child's p2pd daemons (they share its process group)."""
        pids = set()
        for pid in our_p2pd():
            try:
                if os.getpgid(pid) == self.pid:
                    pids.add(pid)
            except ProcessLookupError:
                continue
        return pids

    def interrupt(self) -> None:
        if self.running:
            self.process.send_signal(signal.SIGINT)


def wait_until(condition: Callable[[], object], timeout: float, what: str, watch: Iterable[Child] = (),
               must_run: Iterable[Child] = (), poll: float = 0.5):
    """Poll ``condition`` until it returns something truthy (returned); fail with logs at the deadline.

    Fails early, with its log, if a child in ``must_run`` exits meanwhile.
    """
    watch, must_run = list(watch), list(must_run)
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        for child in must_run:
            if not child.running:
                pytest.fail(f"{child.name} exited while waiting for {what}\n{child.tail()}")
        if time.monotonic() > deadline:
            logs = "\n".join(child.tail() for child in [*must_run, *watch])
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
        time.sleep(poll)


def wait_for_line(child: Child, needle: str, timeout: float, *, must_run: bool = True) -> str:
    """The first stdout line of ``child`` containing ``needle``."""

    def find() -> str | None:
        return next((line for line in child.output().splitlines() if needle in line), None)

    return wait_until(find, timeout, f"{needle!r} in {child.name}'s output", watch=[child],
                      must_run=[child] if must_run else [])


def read_rounds(workdir: Path) -> list[dict]:
    """A peer's ``rounds.jsonl`` (complete lines only)."""
    path = workdir / "rounds.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


@dataclass(frozen=True)
class Finished:
    """A command that ran to its end."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def assert_one_line_error(self, code: int, *needles: str) -> str:
        """Exit ``code``, one stderr line that names each needle, no traceback anywhere."""
        shown = f"exit {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        assert self.returncode == code, shown
        assert "Traceback" not in self.stdout + self.stderr, shown
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, shown
        for needle in needles:
            assert needle in lines[0], shown
        return lines[0]


class Processes:
    """Starts children, and on ``close()`` stops them and reports every leak."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.children: list[Child] = []
        self.p2pd_before = our_p2pd()
        self.problems: list[str] = []

    def start(self, name: str, module: str, *args: object) -> Child:
        child = Child(name, module, [str(a) for a in args], self.folder)
        self.children.append(child)
        return child

    def coordinator(self, name: str, run_toml: Path, workdir: Path) -> Child:
        return self.start(name, "coordinator.cli", "launch", run_toml, "--workdir", workdir, "--http-port", "0")

    def peer(self, name: str, url: str, workdir: Path, *extra: object) -> Child:
        return self.start(name, "peer.cli", "join", "--coordinator", url, "--workdir", workdir,
                          "--host", "127.0.0.1", "--threads", "1", *extra)

    def run(self, module: str, *args: object, timeout: float = 60.0) -> Finished:
        """Run a command to its end (in its own session); fail if it hangs or leaves processes."""
        argv = [sys.executable, "-m", module, *map(str, args)]
        started = time.monotonic()
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   text=True, cwd=self.folder, env=child_env(), start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(process.pid)
            stdout, stderr = process.communicate(timeout=30)
            pytest.fail(f"{module} {' '.join(map(str, args))} did not finish within {timeout:.0f} s "
                        f"(killed)\nstdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}")
        seconds = time.monotonic() - started
        deadline = time.monotonic() + P2PD_EXIT_SECONDS  # hivemind's helpers may take a moment to follow
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(process.pid):
            kill_group(process.pid)
            pytest.fail(f"{module} exited ({process.returncode}) but left processes in its group\nstderr:\n{stderr}")
        return Finished(argv, process.returncode, stdout, stderr, seconds)

    def kill(self, child: Child) -> None:
        """SIGKILL a child's whole group on purpose (a crash the test means to cause)."""
        child.killed_on_purpose = True
        kill_group(child.pid)
        child.process.wait(timeout=30)

    def stop(self, *children: Child, grace: float = 60.0) -> list[int]:
        """SIGINT each, wait up to ``grace`` seconds in all; kill (and record as a failure) any still up."""
        for child in children:
            child.interrupt()
        deadline = time.monotonic() + grace
        codes = []
        for child in children:
            try:
                codes.append(child.process.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.problems.append(f"{child.name} did not stop within {grace:.0f} s of SIGINT: killed\n{child.tail()}")
                kill_group(child.pid)
                codes.append(child.process.wait(timeout=30))
        for child in children:
            self._reap_group(child)
        return codes

    def _reap_group(self, child: Child) -> None:
        """A child that exited must not leave its hivemind helpers behind (a few seconds allowed)."""
        deadline = time.monotonic() + P2PD_EXIT_SECONDS
        while group_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(child.pid):
            self.problems.append(f"{child.name} exited but left processes in its group: killed them\n{child.tail()}")
            kill_group(child.pid)

    def close(self) -> list[str]:
        """Stop every child still running; return every leak or forced kill seen."""
        running = [c for c in self.children if c.running]
        if running:
            self.stop(*running, grace=60.0)
        for child in self.children:
            if not child.running:
                self._reap_group(child)
        deadline = time.monotonic() + P2PD_EXIT_SECONDS
        while (leaked := our_p2pd() - self.p2pd_before) and time.monotonic() < deadline:
            time.sleep(0.3)
        if leaked:
            self.problems.append(f"p2pd still alive after the test: pids {sorted(leaked)}")
            for pid in leaked:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.problems


def close_or_fail(processes: Processes) -> None:
    if problems := processes.close():
        pytest.fail("process leak or forced kill:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture
def procs(tmp_path: Path):
    """Processes for one test; teardown fails the test on any leak or forced kill."""
    processes = Processes(tmp_path)
    yield processes
    close_or_fail(processes)


@pytest.fixture
def run_toml(tmp_path: Path) -> Path:
    path = tmp_path / "RUN.toml"
    path.write_text(SMALL_RUN)
    return path


def endpoint(child: Child, workdir: Path, timeout: float = 90.0) -> dict:
    """The coordinator's ``endpoint.json`` once ``child`` (not an earlier process) serves."""

    def current() -> dict | None:
        try:
            found = json.loads((workdir / "endpoint.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return found if found.get("pid") == child.pid else None

    return wait_until(current, timeout, f"{child.name} to serve ({workdir}/endpoint.json)", must_run=[child])


def serve_coordinator(processes: Processes, root: Path, run_text: str) -> tuple[Child, str]:
    """Write ``root/RUN.toml``, launch a coordinator in ``root/coord``; (its process, its URL)."""
    (root / "RUN.toml").write_text(run_text)
    coordinator = processes.coordinator("coord", root / "RUN.toml", root / "coord")
    return coordinator, endpoint(coordinator, root / "coord")["url"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "swarm: starts a real swarm of processes on loopback (slow)")
    config.addinivalue_line("markers", "chaos: kills and restarts peers for minutes (slow; skip with -m \"not chaos\")")
