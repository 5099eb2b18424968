"""The command-line tools as a user meets them: real subprocesses, each with a deadline.

Every bad input must end the command with a non-zero status and exactly one stderr line that
names the problem (no traceback), and leave no process behind; Ctrl+C must stop a training
peer cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    SMALL_RUN,
    Processes,
    close_or_fail,
    endpoint,
    http_get,
    our_p2pd,
    read_rounds,
    serve_coordinator,
    wait_for_line,
    wait_until,
)

from protocol.ledger import entries_from_jsonl
from protocol.signing import SigningKey, key_id, public_key_from_pem, public_key_to_pem

# --- barnraise-coordinator launch -----------------------------------------------------------


def test_launch_without_run_toml(procs: Processes, tmp_path: Path):
    result = procs.run("coordinator.cli", "launch", tmp_path / "missing.toml", "--workdir", tmp_path / "c")
    result.assert_one_line_error(2, "barnraise-coordinator: error:", "missing.toml", "does not exist")
    assert not (tmp_path / "c").exists()


def test_launch_with_malformed_toml(procs: Processes, tmp_path: Path):
    (tmp_path / "RUN.toml").write_text('[run]\nname = "t"\n[training\ninner_steps = 10\n')
    result = procs.run("coordinator.cli", "launch", tmp_path / "RUN.toml", "--workdir", tmp_path / "c")
    result.assert_one_line_error(2, "malformed TOML", "line 3")
    assert not (tmp_path / "c").exists()


def test_launch_with_an_unknown_key(procs: Processes, tmp_path: Path):
    (tmp_path / "RUN.toml").write_text(SMALL_RUN.replace("inner_steps = 10", "inner_steps = 10\ninner_stpes = 5"))
    result = procs.run("coordinator.cli", "launch", tmp_path / "RUN.toml", "--workdir", tmp_path / "c")
    result.assert_one_line_error(2, "training: unknown key 'inner_stpes'")
    assert not (tmp_path / "c").exists()


def test_launch_serves_stops_on_ctrl_c_and_refuses_a_changed_run_toml(procs: Processes, run_toml: Path, tmp_path: Path):
    workdir = tmp_path / "c"
    coordinator = procs.coordinator("coord", run_toml, workdir)
    url = endpoint(coordinator, workdir)["url"]
    assert "launched run t" in wait_for_line(coordinator, "launched run", 10)
    assert json.loads(http_get(f"{url}/manifest.json"))["manifest"]["training"]["inner_steps"] == 10
    assert json.loads(http_get(f"{url}/status"))["last_checkpoint"]["seq"] == 0
    assert procs.stop(coordinator, grace=30) == [0], coordinator.tail()
    assert not (workdir / "endpoint.json").exists(), "a stopped coordinator must not leave its endpoint behind"
    ledger_before = (workdir / "ledger.sqlite").read_bytes()

    run_toml.write_text(SMALL_RUN.replace("inner_steps = 10", "inner_steps = 11"))
    result = procs.run("coordinator.cli", "launch", run_toml, "--workdir", workdir)
    result.assert_one_line_error(2, "training.inner_steps", str(workdir))
    assert (workdir / "ledger.sqlite").read_bytes() == ledger_before


# --- barnraise-peer join ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_join_an_unreachable_coordinator(procs: Processes, tmp_path: Path):
    url = f"http://127.0.0.1:{_closed_port()}"
    result = procs.run("peer.cli", "join", "--coordinator", url, "--workdir", tmp_path / "p", "--threads", "1",
                       timeout=60)
    result.assert_one_line_error(1, "barnraise-peer: error:", "cannot reach the coordinator", url)
    assert result.seconds < 30, f"took {result.seconds:.0f} s to give up on a closed port"


def test_join_usage_error_is_one_line(procs: Processes, tmp_path: Path):
    result = procs.run("peer.cli", "join", "--workdir", tmp_path / "p")
    result.assert_one_line_error(2, "--coordinator", "--initial-peers")


_UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmSGygx5JKs2aEv7bKvbdSRfrYtXBW5MXjAT5ZV3knkPoe"


def test_join_with_a_malformed_initial_peer_is_one_line_and_exit_2(procs: Processes, tmp_path: Path):
    result = procs.run("peer.cli", "join", "--initial-peers", "/ip4/127.0.0.1/tcp/4001", "--workdir", tmp_path / "p")
    result.assert_one_line_error(2, "barnraise-peer: error: --initial-peers /ip4/127.0.0.1/tcp/4001:",
                                 "no /p2p/<peer id> part")
    assert not (tmp_path / "p").exists()


def test_join_with_a_mistyped_coordinator_key_path_names_the_flag_and_file(procs: Processes, tmp_path: Path):
    result = procs.run("peer.cli", "join", "--coordinator", f"http://127.0.0.1:{_closed_port()}",
                       "--coordinator-key", "nosuch.pub", "--workdir", tmp_path / "p")
    result.assert_one_line_error(2, "--coordinator-key nosuch.pub: no such file, and not a PEM or hex public key")


def test_ctrl_c_while_joining_is_one_line_and_130(procs: Processes, tmp_path: Path):
    """Ctrl+C in a terminal reaches the whole process group: the peer and any helper it started."""
    peer = procs.start("joining", "peer.cli", "join", "--initial-peers", _UNREACHABLE_PEER.format(port=_closed_port()),
                       "--workdir", tmp_path / "p", "--host", "127.0.0.1", "--threads", "1")
    time.sleep(3.0)  # loading, or starting its DHT node: before any round
    assert peer.running, peer.tail()
    os.killpg(peer.pid, signal.SIGINT)
    try:
        code = peer.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the peer did not exit within 30 s of Ctrl+C while joining\n{peer.tail()}")
    lines = peer.stderr().strip().splitlines()
    assert code == 130 and len(lines) == 1 and lines[0].startswith("barnraise-peer: interrupted"), peer.tail()
    assert "Traceback" not in peer.output() + peer.stderr(), peer.tail()


# --- against one running coordinator -----------------------------------------------------------

SERVED_RUN = """\
[run]
name = "t"

[training]
inner_steps = 60

[averaging]
round_seconds = 8.0
round_deadline_seconds = 3.0
"""
"""A lone peer's round: windows of 8 s of inner steps (so a Ctrl+C lands in them)."""


class Served:
    def __init__(self, root: Path, url: str, processes: Processes):
        self.root, self.url, self.processes = root, url, processes
        self.workdir = root / "coord"
        self.public_key = self.workdir / "coordinator.pub"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One coordinator for the tests that need a live one; it must stop cleanly on Ctrl+C."""
    root = tmp_path_factory.mktemp("served")
    processes = Processes(root)
    try:
        coordinator, url = serve_coordinator(processes, root, SERVED_RUN)
    except BaseException:
        processes.close()
        raise
    yield Served(root, url, processes)
    codes = processes.stop(coordinator, grace=60)
    close_or_fail(processes)
    assert codes == [0], coordinator.tail()


def test_join_refuses_a_manifest_signed_by_another_key(procs: Processes, served: Served, tmp_path: Path):
    other = SigningKey.generate()
    pinned = tmp_path / "other.pub"
    pinned.write_bytes(public_key_to_pem(other.public_key_hex))
    real = public_key_from_pem(served.public_key.read_bytes())
    result = procs.run("peer.cli", "join", "--coordinator", served.url, "--coordinator-key", pinned,
                       "--workdir", tmp_path / "p", "--threads", "1", timeout=60)
    result.assert_one_line_error(1, "manifest is signed by key", key_id(real), key_id(other.public_key_hex))
    assert not (tmp_path / "p" / "rounds.jsonl").exists()


def test_ctrl_c_stops_a_training_peer(procs: Processes, served: Served, tmp_path: Path):
    workdir = tmp_path / "p"
    peer = procs.peer("peer", served.url, workdir, "--coordinator-key", served.public_key)
    wait_for_line(peer, "joined run t", 90)
    addresses = wait_for_line(peer, "this peer's addresses", 10)
    own = json.loads((workdir / "run.json").read_text())
    assert own["coordinator_url"] == served.url and own["maddrs"] and all("/p2p/" in a for a in own["maddrs"])
    assert addresses.endswith(" ".join(own["maddrs"])), addresses
    daemons = wait_until(peer.p2pd, 10, "the peer's p2pd", must_run=[peer])
    time.sleep(1.5)  # into the first round's inner steps
    assert peer.running, peer.tail()
    started = time.monotonic()
    peer.interrupt()
    # acknowledged at once, whatever the round in flight still takes
    notice = wait_for_line(peer, "stopping: ", 5, must_run=False)
    assert "Ctrl+C again to leave now" in notice, notice
    try:
        code = peer.process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the peer did not exit within 40 s of Ctrl+C\n{peer.tail()}")
    assert code == 0, peer.tail()
    assert re.search(r"stopped at round \d+ after contributing \d+ samples", peer.output()), peer.tail()
    assert "Traceback" not in peer.stderr(), peer.tail()
    print(f"peer exited {time.monotonic() - started:.1f} s after Ctrl+C")
    wait_until(lambda: not (daemons & our_p2pd()), 8, "the peer's p2pd to exit after Ctrl+C")


@pytest.fixture(scope="module")
def lone_round(served: Served):
    """A lone peer runs one round (it is the round's only contributor) and leaves by itself."""
    workdir = served.root / "lone"
    result = served.processes.run("peer.cli", "join", "--coordinator", served.url, "--workdir", workdir,
                                  "--host", "127.0.0.1", "--threads", "1", "--max-rounds", "1", timeout=120)
    return result, workdir


def test_a_lone_peer_reports_a_round_of_one_contributor(lone_round):
    result, workdir = lone_round
    assert result.returncode == 0, result.stderr
    (only,) = read_rounds(workdir)
    assert not only["averaged"] and only["contributors"] == 1 and only["entered"] and only["failure"] is None, only
    assert only["state_round"] == only["round"] + 1, only
    assert "| 1 contributor |" in result.stdout, result.stdout
    assert re.search(r"stopped at round \d+ after contributing \d+ samples", result.stdout), result.stdout
    assert "Traceback" not in result.stderr


def test_status_reads_back_what_a_lone_peer_wrote(procs: Processes, lone_round):
    _, workdir = lone_round
    (only,) = read_rounds(workdir)
    result = procs.run("peer.cli", "status", "--workdir", workdir, "--format", "json")
    assert result.returncode == 0 and not result.stderr, result.stderr
    status = json.loads(result.stdout)
    assert status["rounds"]["total"] == status["rounds"]["entered"] == 1, status
    assert status["samples"] == only["samples"] and status["last_round"] == only["round"], status
    assert status["run_name"] == "t" and status["coordinator_url"].startswith("http://127.0.0.1:"), status
    asked = procs.run("peer.cli", "status", "--workdir", workdir, "--coordinator")
    assert asked.returncode == 0 and not asked.stderr, asked.stderr
    (line,) = [line for line in asked.stdout.splitlines() if line.startswith("coordinator ")]
    assert re.match(rf"coordinator   {re.escape(status['coordinator_url'])}: round \d+, \d+ live peers; ", line), line


# --- barnraise-audit --------------------------------------------------------------------------


def test_audit_hash_matches_the_ledger(procs: Processes, served: Served):
    genesis = entries_from_jsonl(http_get(f"{served.url}/ledger.jsonl").decode())[0]
    path = served.workdir / "checkpoints" / "r000000" / "model.safetensors"
    result = procs.run("coordinator.audit", "hash", path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() == genesis.files[0].sha256
    assert lines["checkpoint_root"] == genesis.checkpoint_root
    assert int(lines["size"]) == path.stat().st_size


def test_audit_verify_a_live_ledger_and_its_bad_inputs(procs: Processes, served: Served, tmp_path: Path):
    public_key = served.public_key
    checkpoints = served.workdir / "checkpoints"
    ok = procs.run("coordinator.audit", "verify", "--ledger", f"{served.url}/ledger.jsonl",
                   "--public-key", public_key, "--checkpoints", checkpoints)
    assert ok.returncode == 0, ok.stderr
    assert "ledger ok: 1 entries" in ok.stdout and "checkpoints ok: 2 files" in ok.stdout

    missing = procs.run("coordinator.audit", "verify", "--ledger", tmp_path / "nope.jsonl", "--public-key", public_key)
    missing.assert_one_line_error(2, "barnraise-audit: error:", "nope.jsonl")

    other = tmp_path / "other.pub"
    other.write_bytes(public_key_to_pem(SigningKey.generate().public_key_hex))
    wrong_key = procs.run("coordinator.audit", "verify", "--ledger", f"{served.url}/ledger.jsonl", "--public-key", other)
    wrong_key.assert_one_line_error(1, "audit failed:", "ledger entry 0", "not by the given public key")


# --- pause and resume (last: its rounds may add a checkpoint to the ledger the tests above count) ---------------


def test_a_paused_peer_sits_rounds_out_and_rejoins_at_a_round_boundary(procs: Processes, served: Served,
                                                                      tmp_path: Path):
    workdir = tmp_path / "p"
    peer = procs.peer("pausing", served.url, workdir)
    wait_for_line(peer, "joined run t", 90)
    (workdir / "pause").touch()
    paused = wait_for_line(peer, "paused: ", 40)
    assert f"{workdir / 'pause'} exists" in paused, paused
    logged = len(read_rounds(workdir))  # the round in flight was settled (and logged) before the line
    time.sleep(10)  # more than a round: nothing is announced, nothing logged
    assert len(read_rounds(workdir)) == logged and peer.running, peer.tail()
    (workdir / "pause").unlink()
    rejoin = int(wait_for_line(peer, "resumed: ", 10).rsplit(" ", 1)[1])
    wait_until(lambda: len(read_rounds(workdir)) > logged, 60, "a round after the pause", must_run=[peer])
    assert all(r["round"] >= rejoin and r["failure"] is None for r in read_rounds(workdir)[logged:]), peer.tail()
    os.kill(peer.pid, signal.SIGUSR1)
    assert "SIGUSR1" in wait_for_line(peer, "paused: SIGUSR1", 40)
    os.kill(peer.pid, signal.SIGUSR1)
    assert procs.stop(peer, grace=60) == [0], peer.tail()
    assert "Traceback" not in peer.stderr(), peer.tail()
