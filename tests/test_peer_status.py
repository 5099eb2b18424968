"""What a peer says about itself, and the small decisions around starting, stopping and pausing it,
as pure units (no swarm): ``barnraise-peer status`` over a workdir made here, the progress record
after a round, the starting state a coordinator's ledger gives, the Ctrl+C flag, the pause file,
and the one-line errors of ``--coordinator-key`` and ``--initial-peers``.

    pytest -q tests/test_peer_status.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.audit import file_record
from peer.cli import _dispatch, _initial_peers, _parser, _pinned_key, _status_lines
from peer.join import state_from_checkpoint
from peer.model import build_model
from peer.rounds import Announced, RoundWork, Settled
from peer.runner import PeerOptions, PeerProcess, _InFlight, _PauseSwitch, _StopFlag
from peer.state import RoundState, StateLayout
from peer.workdir import PAUSE_FILE, pause_reason, round_outcome, summarise_workdir, write_run_file
from protocol.cli import run_command
from protocol.errors import HashMismatch, InputError
from protocol.hashing import checkpoint_root
from protocol.ledger import next_entry
from protocol.manifest import ModelConfig, RunConfig, RunManifest
from protocol.multiaddr import multiaddr_problem
from protocol.records import PeerProgress
from protocol.signing import SigningKey, key_id, public_key_to_pem

RSA_ID = "QmSGygx5JKs2aEv7bKvbdSRfrYtXBW5MXjAT5ZV3knkPoe"


def _round_line(round_: int, **changes) -> dict:
    line = {"round": round_, "loss": 3.0 - round_ / 10, "samples": 160, "samples_per_second": 25.0,
            "contributors": 3, "entered": True, "waiting": False, "void": None, "failure": None,
            "compute_seconds": 6.0, "network_seconds": 0.1, "wait_seconds": 0.0, "payload_bytes": 7000,
            "averaged": True, "state_round": round_ + 1, "state_root": "9c" * 32}
    return line | changes


def _workdir(folder: Path) -> tuple[Path, str]:
    """A peer's workdir as a run leaves it: key, run.json, contribution.json, rounds.jsonl (whose
    last line a crash cut short)."""
    folder.mkdir()
    key = SigningKey.generate()
    (folder / "peer.key").write_bytes(key.to_pem())
    write_run_file(folder, run_id="287360a265a1c043", run_name="demo", coordinator_url="http://127.0.0.1:1",
                   maddrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{RSA_ID}"], joined_at=1.0)
    (folder / "contribution.json").write_text(json.dumps({"run_id": "287360a265a1c043", "samples": 480}))
    lines = [_round_line(3), _round_line(4, entered=False, waiting=True), _round_line(5),
             _round_line(6, entered=False, void="1 of the round's 3 payloads did not arrive"),
             _round_line(7, entered=False, failure="payload fetch failed: x"), _round_line(8, entered=False),
             _round_line(9)]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"round": 10, "lo'
    (folder / "rounds.jsonl").write_text(text)
    return folder, key_id(key.public_key_hex)


def test_round_outcomes_name_each_ending_once():
    assert round_outcome(_round_line(1)) == "entered"
    assert round_outcome(_round_line(1, entered=False, waiting=True)) == "waiting"
    assert round_outcome(_round_line(1, entered=False)) == "not_in_round"
    assert round_outcome(_round_line(1, entered=False, void="x")) == "void"
    assert round_outcome(_round_line(1, entered=False, failure="x", void="y")) == "out_of_step"
    assert round_outcome({"round": 1}) == "not_in_round"  # a line of an older peer: no void field


def test_status_of_a_workdir_as_json(tmp_path: Path, capsys):
    folder, peer_id = _workdir(tmp_path / "p")
    assert _dispatch(_parser().parse_args(["status", "--workdir", str(folder), "--format", "json"])) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["peer_id"] == peer_id and status["run_id"] == "287360a265a1c043" and status["run_name"] == "demo"
    assert status["coordinator_url"] == "http://127.0.0.1:1"
    assert status["rounds"] == {"total": 7, "entered": 3, "waiting": 1, "not_in_round": 1, "void": 1, "out_of_step": 1}
    assert status["unreadable_lines"] == 1
    assert status["samples"] == 480
    assert (status["last_round"], status["last_loss"], status["state_round"]) == (9, pytest.approx(2.1), 10)
    assert abs(status["last_written"] - (folder / "rounds.jsonl").stat().st_mtime) < 1e-6
    assert status["paused"] is False
    assert "coordinator_status" not in status
    assert sorted(p.name for p in folder.iterdir()) == ["contribution.json", "peer.key", "rounds.jsonl", "run.json"]


def test_status_as_aligned_text(tmp_path: Path, capsys):
    folder, peer_id = _workdir(tmp_path / "p")
    (folder / PAUSE_FILE).touch()
    assert _dispatch(_parser().parse_args(["status", "--workdir", str(folder)])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line[:14] for line in lines} == {f"{name:<13} " for name in (
        "workdir", "peer id", "run", "joined via", "rounds", "credit", "last round", "last written", "paused")}
    text = "\n".join(lines)
    assert f"peer id       {peer_id}" in text
    assert "run           demo (287360a265a1c043)" in text
    assert "rounds        7: 3 entered, 1 left for a later round, 1 not in the round, 1 void, 1 out of step" in text
    assert "credit        480 samples" in text
    assert "last round    9, loss 2.100 (consensus at round 10 after it)" in text


def test_status_of_a_fresh_key_only_workdir_says_what_it_does_not_know(tmp_path: Path):
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "peer.key").write_bytes(SigningKey.generate().to_pem())
    summary = summarise_workdir(folder)
    lines = dict(_status_lines(summary, time.time()))
    assert lines["rounds"] == "0" and lines["credit"] == "unknown (no contribution.json)"
    assert "run" not in lines and "last round" not in lines and "last written" not in lines


def test_status_of_a_missing_or_empty_workdir_is_one_line_and_exit_2(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    for folder, needle in ((tmp_path / "nope", "no such folder"), (tmp_path / "empty", "not a peer's workdir")):
        code = run_command("barnraise-peer", lambda f=folder: _dispatch(_parser().parse_args(
            ["status", "--workdir", str(f)])))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and err.startswith("barnraise-peer: error: ") and needle in err, err
    assert not (tmp_path / "nope").exists(), "status must not create the workdir"


def test_status_says_in_one_line_that_the_coordinator_is_unreachable(tmp_path: Path, capsys):
    folder, _ = _workdir(tmp_path / "p")  # its run.json names http://127.0.0.1:1: nothing listens there
    started = time.monotonic()
    assert _dispatch(_parser().parse_args(["status", "--workdir", str(folder), "--coordinator"])) == 0
    assert time.monotonic() - started < 10
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("coordinator ")]
    assert "http://127.0.0.1:1: unreachable (cannot reach the coordinator" in line


# --- the progress record after a round -------------------------------------------------------


class _Node:
    """What ``PeerProcess._publish`` asks of the swarm: records it would store, kept here."""

    p2p_id = "12D3KooWtest"
    maddrs = [f"/ip4/127.0.0.1/tcp/4001/p2p/{RSA_ID}"]

    def __init__(self):
        self.stored: list[bytes] = []

    def publish_state(self, record: bytes) -> None:
        pass

    def store(self, key, value, *, ttl, subkey=None) -> bool:
        self.stored.append(value)
        return True

    def stored_expiration(self, key):
        return time.time() + 3600


class _Trainer:
    def __init__(self):
        self.layout = StateLayout(("w",), (torch.Size([4]),))
        self.state = RoundState(3, torch.ones(4), torch.zeros(4))

    def advance(self, update, *, in_flight=False):
        self.state = RoundState(self.state.round + 1, self.state.parameters - update, self.state.momentum)
        return None


def test_the_progress_record_after_a_round_carries_that_rounds_samples(tmp_path: Path):
    """The ledger and /status credit a peer from the samples its records carry: the record signed
    once round 3 is settled must count round 3's samples (and say round 4, the consensus it holds)."""
    process = object.__new__(PeerProcess)  # the round's bookkeeping only: no swarm, no model
    key, node, lines = SigningKey.generate(), _Node(), []
    process.options = PeerOptions(workdir=tmp_path, on_line=lines.append)
    process.key, process.node, process.trainer = key, node, _Trainer()
    process.peer_id, process.run_id = key_id(key.public_key_hex), "287360a265a1c043"
    process.samples, process.contribution_path = 320, tmp_path / "contribution.json"
    process.log_path = tmp_path / "rounds.jsonl"
    process.last, process.announce_failure, process.before, process.metrics = None, None, None, None
    process.served, process.served_root, process.published_root = (None, []), "", ""
    process.progress_stored, process.manifest_checked = -float("inf"), -float("inf")
    announced = Announced(RoundWork(3, 2.5, 160, 4.0), own=torch.zeros(4), payload_bytes=100, base_root="0" * 64)
    settled = Settled(None, torch.full((4,), 0.5), None, 0.2, entered=True)

    process._settled(_InFlight(3, announced, None), settled, in_flight=False)

    record = PeerProgress.from_bytes(node.stored[-1]).verify()
    assert (record.round, record.samples) == (4, 480)
    assert json.loads(process.contribution_path.read_text()) == {"run_id": "287360a265a1c043", "samples": 480}
    (logged,) = [json.loads(line) for line in process.log_path.read_text().splitlines()]
    assert logged["samples"] == 160 and logged["entered"] and logged["state_round"] == 4
    assert "contributed 480 samples" in lines[-1]


# --- the starting state a coordinator's ledger gives ---------------------------------------------


class _Coordinator:
    """A coordinator's ledger and checkpoint files, served from a folder; downloads are counted."""

    def __init__(self, entries, folder: Path):
        self.entries, self.folder, self.downloads = entries, folder, []

    def ledger(self):
        return self.entries

    def download(self, path: str, destination: Path, max_bytes: int) -> None:
        self.downloads.append(path)
        shutil.copyfile(self.folder / Path(path).name, destination)


def _genesis(tmp_path: Path, *, manifest_root: str | None = None):
    """A manifest whose genesis this machine rebuilds bit for bit, and its ledger's genesis entry."""
    model = build_model(ModelConfig(), None)
    named = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    served = tmp_path / "served"
    served.mkdir()
    save_file(named, str(served / "model.safetensors"), metadata={"round": "0"})
    save_file({n: torch.zeros_like(t) for n, t in named.items()}, str(served / "outer.safetensors"))
    key = SigningKey.generate()
    config = RunConfig.from_toml('[run]\nname = "t"\n')
    manifest = RunManifest(config=config, coordinator_key=key.public_key_hex,
                           genesis_root=manifest_root or checkpoint_root(named), created_at=0.0)
    records = [file_record(served / "model.safetensors"), file_record(served / "outer.safetensors")]
    genesis = next_entry(key, None, run_id=manifest.run_id, round=0, created_at=1.0, files=records, contributors=[],
                         heldout_loss=None)
    return manifest, StateLayout.of(model), _Coordinator([genesis], served)


def test_a_coordinators_genesis_is_downloaded_and_checked_not_rebuilt(tmp_path: Path):
    manifest, layout, coordinator = _genesis(tmp_path)
    start, ledger = state_from_checkpoint(coordinator, manifest, layout, tmp_path / "checkpoints")
    assert coordinator.downloads == ["/checkpoints/r000000/model.safetensors", "/checkpoints/r000000/outer.safetensors"]
    assert start.state.round == 0 and start.source.startswith("checkpoint of round 0 (ledger entry 0, root ")
    assert checkpoint_root(layout.views(start.state.parameters)) == manifest.genesis_root
    again, _ = state_from_checkpoint(coordinator, manifest, layout, tmp_path / "checkpoints")
    assert len(coordinator.downloads) == 2, "files already there that still match are not downloaded again"


def test_a_ledger_genesis_that_is_not_the_manifests_is_refused(tmp_path: Path):
    manifest, layout, coordinator = _genesis(tmp_path, manifest_root="ab" * 32)
    with pytest.raises(HashMismatch, match="genesis root .* is not the signed manifest's abababab"):
        state_from_checkpoint(coordinator, manifest, layout, tmp_path / "checkpoints")
    assert coordinator.downloads == []


# --- Ctrl+C and pause ---------------------------------------------------------------------------


def test_ctrl_c_before_training_leaves_at_once_and_the_first_one_after_says_so():
    said = threading.Event()
    flag = _StopFlag(said.set)
    with pytest.raises(KeyboardInterrupt, match="interrupted while joining, before training started"):
        flag(signal.SIGINT, None)
    assert not flag.requested
    flag.open()
    try:
        flag(signal.SIGTERM, None)
        assert flag.requested and said.wait(5), "the first Ctrl+C must be acknowledged at once"
        flag(signal.SIGTERM, None)  # a second SIGTERM does not cut the round short
        with pytest.raises(KeyboardInterrupt, match="interrupted again"):
            flag(signal.SIGINT, None)
    finally:
        flag.close()
    assert not [t for t in threading.enumerate() if t.name == "stop-notice"], "close() ends the notice thread"


def test_a_stop_flag_closed_without_a_signal_says_nothing_and_leaves_no_thread():
    said = threading.Event()
    flag = _StopFlag(said.set)
    flag.open()
    flag.close()
    assert not said.is_set() and not [t for t in threading.enumerate() if t.name == "stop-notice"]
    flag(signal.SIGINT, None)  # once the loop is over (the last publish): no notice, no error
    assert flag.requested and not said.is_set()


def test_run_command_turns_ctrl_c_into_one_line_and_130(capsys):
    def interrupted(message: str = "") -> int:
        raise KeyboardInterrupt(message) if message else KeyboardInterrupt

    assert run_command("barnraise-peer", interrupted) == 130
    assert capsys.readouterr().err == "barnraise-peer: interrupted\n"
    assert run_command("barnraise-peer", lambda: interrupted("interrupted again: left")) == 130
    assert capsys.readouterr().err == "barnraise-peer: interrupted again: left\n"


def test_the_pause_file_and_sigusr1_pause_and_neither_resumes(tmp_path: Path):
    (tmp_path / "contribution.json").write_text('{"run_id": "x", "samples": 0}')
    assert pause_reason(tmp_path, signalled=False) is None and not summarise_workdir(tmp_path).paused
    (tmp_path / PAUSE_FILE).touch()
    assert pause_reason(tmp_path, signalled=False) == f"{tmp_path / PAUSE_FILE} exists (remove it to resume)"
    assert summarise_workdir(tmp_path).paused
    assert pause_reason(tmp_path, signalled=True).startswith("SIGUSR1")
    os.remove(tmp_path / PAUSE_FILE)
    switch = _PauseSwitch()
    switch(signal.SIGUSR1, None)
    assert pause_reason(tmp_path, signalled=switch.on).startswith("SIGUSR1")
    switch(signal.SIGUSR1, None)
    assert pause_reason(tmp_path, signalled=switch.on) is None


# --- one-line errors of join's flags --------------------------------------------------------------


def test_a_coordinator_key_that_is_no_file_names_the_flag_and_the_file(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError) as caught:
        _pinned_key("nosuch.pub")
    assert str(caught.value) == "--coordinator-key nosuch.pub: no such file, and not a PEM or hex public key"
    (tmp_path / "garbage.pub").write_text("not a key\n")
    with pytest.raises(InputError, match=r"^--coordinator-key garbage.pub: not a PEM public key"):
        _pinned_key("garbage.pub")
    with pytest.raises(InputError, match="not a file, and not a PEM or hex public key"):
        _pinned_key(str(tmp_path))
    public = SigningKey.generate().public_key_hex
    (tmp_path / "coordinator.pub").write_bytes(public_key_to_pem(public))
    assert _pinned_key("coordinator.pub") == public == _pinned_key(public)


@pytest.mark.parametrize(("address", "problem"), [
    ("/ip4/203.0.113.5/tcp/41337", "it has no /p2p/<peer id> part"),
    ("203.0.113.5:41337", "it must start with /ip4/, /ip6/, /dns/, /dns4/ or /dns6/"),
    ("/ip4/203.0.113.500/tcp/41337/p2p/" + RSA_ID, "/ip4 must be followed by a valid host"),
    ("/ip4/203.0.113.5/udp/41337/p2p/" + RSA_ID, "the host must be followed by /tcp/PORT (1 to 65535)"),
    ("/ip4/203.0.113.5/tcp/41337/p2p/Qm", "'Qm' is not a libp2p peer id"),
    (f"/ip4/203.0.113.5/tcp/1/p2p/{RSA_ID}/p2p-circuit", "only /p2p/<peer id> may follow the port"),
])
def test_a_malformed_initial_peer_is_named_in_one_line(address: str, problem: str):
    assert multiaddr_problem(address) == problem
    with pytest.raises(InputError) as caught:
        _initial_peers([f"/ip4/127.0.0.1/tcp/4001/p2p/{RSA_ID}", address])
    assert str(caught.value).startswith(f"--initial-peers {address}: not a usable multiaddr ({problem})")
    assert multiaddr_problem(f"/dns/peer.example.org/tcp/4001/p2p/{RSA_ID}") is None
