"""peer.lifeline: a process tree forked from a bound process dies with it, and only then.

    pytest -q tests/test_lifeline.py      # ~15 s on 2 cores (the hivemind ones are marked swarm)

Each test starts a small Python program in its own session that builds a process tree, prints the
tree's pids once it is complete, then sleeps. The test SIGKILLs only that program (as the OOM
killer would), never its group, and checks that every process of the tree is gone within
``GONE_SECONDS``; a zombie counts as gone (init reaps it when it gets to it). Teardown SIGKILLs the
program's group and every recorded pid still alive, so a failing test leaks nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MARKER, TOKEN, child_env, our_p2pd

from coordinator.children import kill_group

REPO = Path(__file__).resolve().parents[1]
GONE_SECONDS = 10.0
"""How long the orphans may take to die (pdeathsig takes milliseconds; the watcher 0.5 s)."""
ALIVE_SECONDS = 3.0
"""How long the tree must stay whole while its parent lives."""

TREE = """\
import json, os

def tree(pid):
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for task in tasks:
        try:  # a thread (a task) may end between the listing and the read
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                children = listing.read().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found += [child, *tree(child)]
    return found

def report(**extra):
    import time
    pids = sorted(tree(os.getpid()))
    for _ in range(100):  # until two reads agree: an ended thread's children move to another thread
        time.sleep(0.05)
        again = sorted(tree(os.getpid()))
        if again == pids:
            break
        pids = again
    names = {pid: open(f"/proc/{pid}/comm").read().strip() for pid in pids}
    print(json.dumps({"ready": [[pid, names[pid]] for pid in pids], **extra}), flush=True)
"""

FORKS = TREE + """\
import asyncio, multiprocessing as mp, sys, threading, time
import uvloop

if sys.argv[1] == "bind":
    from peer.lifeline import bind_children_to_this_process
    bind_children_to_this_process()

def grandchild():
    time.sleep(600)

def child(started):
    # a forked grandchild, and an exec'd one spawned the way hivemind spawns p2pd (asyncio on uvloop)
    mp.get_context("fork").Process(target=grandchild, daemon=False).start()
    async def spawn():
        return await asyncio.create_subprocess_exec("sleep", "600")
    uvloop.install()
    asyncio.new_event_loop().run_until_complete(spawn())
    started.set()
    time.sleep(600)

def from_thread():
    mp.get_context("fork").Process(target=grandchild, daemon=False).start()
    time.sleep(0.5)  # long enough for the child to be set up before this thread ends

started = mp.get_context("fork").Event()
mp.get_context("fork").Process(target=child, args=(started,), daemon=False).start()
thread = threading.Thread(target=from_thread)
thread.start()
thread.join()  # the thread that forked the second child has ended
started.wait(30)
report()
time.sleep(600)
"""

HIVEMIND = TREE + """\
import time
from peer.lifeline import bind_children_to_this_process
bind_children_to_this_process()

import hivemind, torch
from hivemind.averaging import DecentralizedAverager

dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
averager = DecentralizedAverager([torch.zeros(1)], dht, prefix="lifeline", target_group_size=2, start=True)
report(dht=dht.pid, averager=averager.pid)
time.sleep(600)
"""


def _state(pid: int) -> str | None:
    """The process's state letter (``Z`` for a zombie), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _live(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _state(pid) not in (None, "Z")]


def _ours(pid: int) -> bool:
    """Whether ``pid`` still is a process started from this pytest session (not a reused pid)."""
    try:
        return f"{MARKER}={TOKEN}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class Tree:
    """A program (own session) that builds a process tree and reports it on stdout."""

    def __init__(self, folder: Path, source: str, *args: str):
        script = folder / "tree_program.py"
        script.write_text(source)
        self.out_path, self.err_path = folder / "tree.out", folder / "tree.err"
        env = dict(child_env(), PYTHONPATH=str(REPO))
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.process = subprocess.Popen([sys.executable, str(script), *args], stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, cwd=folder, env=env, start_new_session=True)
        self.pid = self.process.pid
        self.pids: list[int] = []
        self.names: dict[int, str] = {}
        self.extra: dict = {}

    def logs(self) -> str:
        return (f"--- stdout:\n{self.out_path.read_text(errors='replace')[-3000:]}\n"
                f"--- stderr:\n{self.err_path.read_text(errors='replace')[-3000:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.out_path.read_text().splitlines():
                if line.startswith("{"):
                    report = json.loads(line)
                    self.names = {pid: name for pid, name in report.pop("ready")}
                    self.pids, self.extra = list(self.names), report
                    return
            if self.process.poll() is not None:
                pytest.fail(f"the tree program exited ({self.process.returncode}) before it was ready\n{self.logs()}")
            time.sleep(0.1)
        pytest.fail(f"the tree program was not ready within {timeout:.0f} s\n{self.logs()}")

    def kill_parent(self) -> None:
        """SIGKILL the program alone, as the OOM killer would (not its group)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait_gone(self, timeout: float = GONE_SECONDS) -> float:
        """Seconds until every process of the tree is gone; fails, naming the survivors, past ``timeout``."""
        started = time.monotonic()
        while (alive := _live(self.pids)) and time.monotonic() - started < timeout:
            time.sleep(0.05)
        if alive:
            named = ", ".join(f"{pid} ({self.names[pid]})" for pid in alive)
            pytest.fail(f"still alive {timeout:.0f} s after their parent was killed: {named}\n{self.logs()}")
        return time.monotonic() - started

    def cleanup(self) -> None:
        kill_group(self.pid)  # orphans keep their process group (none of them starts a session)
        for pid in _live(self.pids):
            if _ours(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)


@pytest.fixture
def trees(tmp_path: Path):
    started: list[Tree] = []

    def start(source: str, *args: str) -> Tree:
        tree = Tree(tmp_path, source, *args)
        started.append(tree)
        return tree

    yield start
    for tree in started:
        tree.cleanup()


def _check_forks_tree(tree: Tree) -> None:
    """The FORKS program's tree: a child forked from the main thread, with a forked and an exec'd
    (``sleep``) child of its own; and a child forked from a thread that has ended since."""
    names = sorted(tree.names.values())
    assert names.count("sleep") == 1 and len(names) == 4, f"unexpected tree {tree.names}\n{tree.logs()}"


def test_a_forked_tree_dies_with_its_parent(trees):
    tree = trees(FORKS, "bind")
    tree.wait_ready()
    _check_forks_tree(tree)
    tree.kill_parent()
    seconds = tree.wait_gone()
    assert seconds < GONE_SECONDS


def test_a_forked_tree_lives_while_its_parent_lives(trees):
    """Including the child forked from a thread that has ended (pdeathsig would have killed it)."""
    tree = trees(FORKS, "bind")
    tree.wait_ready()
    _check_forks_tree(tree)
    deadline = time.monotonic() + ALIVE_SECONDS
    while time.monotonic() < deadline:
        dead = [f"{pid} ({tree.names[pid]})" for pid in tree.pids if pid not in _live([pid])]
        assert not dead, f"died while their parent lives: {', '.join(dead)}\n{tree.logs()}"
        assert tree.process.poll() is None, tree.logs()
        time.sleep(0.2)


def test_without_the_lifeline_the_tree_outlives_its_parent(trees):
    """The control: what the tests above would see if the lifeline did nothing."""
    tree = trees(FORKS, "unbound")
    tree.wait_ready()
    _check_forks_tree(tree)
    tree.kill_parent()
    time.sleep(2.0)
    assert sorted(_live(tree.pids)) == sorted(tree.pids)


@pytest.mark.swarm
def test_hivemind_dht_averager_and_p2pd_die_with_their_parent(trees):
    p2pd_before = our_p2pd()
    tree = trees(HIVEMIND)
    tree.wait_ready()
    assert {tree.extra["dht"], tree.extra["averager"]} <= set(tree.pids), f"{tree.names}\n{tree.logs()}"
    p2pd = [pid for pid, name in tree.names.items() if name == "p2pd"]
    assert len(p2pd) == 1, f"expected one p2pd in {tree.names}"
    # alive and whole while the parent lives
    time.sleep(ALIVE_SECONDS)
    assert sorted(_live(tree.pids)) == sorted(tree.pids), f"died early: {tree.names}\n{tree.logs()}"
    tree.kill_parent()
    seconds = tree.wait_gone()
    assert seconds < GONE_SECONDS
    assert not (our_p2pd() - p2pd_before)
