"""A real swarm on loopback: hivemind averaging in-process, then a coordinator and 3 peer processes.

    pytest -q tests/test_swarm.py        # ~1.5 minutes on 2 cores

After the in-process averaging check, the tests share one run and follow it in order: 3 peers
average every round; a 4th peer joins late from verified state; the coordinator is killed and
relaunched while the peers train on; the ledger and checkpoints then pass the auditor, and a
flipped byte does not.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import (
    SMALL_RUN,
    Child,
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
from safetensors.torch import load_file

from peer.swarm import AverageOutcome, SwarmNode
from protocol.averaging import GroupMember, check_average, probe, probe_signs
from protocol.ledger import entries_from_jsonl
from protocol.manifest import AveragingConfig
from protocol.records import LedgerEntry

pytestmark = pytest.mark.swarm

PEERS = 3
VECTOR_SIZE = 100_000


def test_swarm_nodes_average_to_the_weighted_mean():
    """Three SwarmNodes average fp16-compressed vectors; check_average accepts it and catches a fallback."""
    p2pd_before = our_p2pd()
    nodes: list[SwarmNode] = []
    try:
        nodes.append(SwarmNode(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        for _ in range(PEERS - 1):
            nodes.append(SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        for node in nodes:
            node.start_averager(prefix="test_avg", vector_size=VECTOR_SIZE, averaging=AveragingConfig(
                compression="fp16", target_group_size=4, min_group_size=2, matchmaking_seconds=2.0))
        generator = torch.Generator().manual_seed(0)
        vectors = [torch.randn(VECTOR_SIZE, generator=generator) * scale for scale in (1.0, 3.0, 0.5)]
        weights = [1.0, 2.5, 4.0]
        round_ = 7
        signs = probe_signs(round_, VECTOR_SIZE)
        members = []
        for index, vector in enumerate(vectors):
            own_probes, own_norm = probe(vector, signs)
            members.append(GroupMember(peer_id=f"{index:016x}", round=round_, weight=weights[index],
                                       probes=own_probes, norm=own_norm))
        outcomes: list[AverageOutcome | None] = [None] * PEERS

        def average(index: int) -> None:
            outcomes[index] = nodes[index].average(vectors[index], gather=members[index].to_wire(),
                                                   weight=weights[index], timeout=40.0)

        threads = [threading.Thread(target=average, args=(i,)) for i in range(PEERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60.0)
        assert not any(thread.is_alive() for thread in threads), "average() did not return within its deadline"

        expected = sum(w * v for w, v in zip(weights, vectors, strict=True)) / sum(weights)
        largest = max(float(v.abs().max()) for v in vectors)
        for index, outcome in enumerate(outcomes):
            assert outcome is not None and outcome.failure is None, f"node {index}: {outcome}"
            gathered = sorted((GroupMember.from_wire(v) for v in outcome.gathered.values()), key=lambda m: m.peer_id)
            assert gathered == members, f"node {index} averaged with {[m.peer_id for m in gathered]}"
            assert torch.allclose(outcome.averaged, expected, rtol=1e-3, atol=1e-3 * largest), (
                f"node {index}: off by up to {float((outcome.averaged - expected).abs().max()):.3g}"
            )
            assert check_average(gathered, outcome.averaged, vectors[index], signs, "fp16") is None
            # A silent fallback: a third of the vector kept this node's own values.
            fallback = outcome.averaged.clone()
            fallback[: VECTOR_SIZE // 3] = vectors[index][: VECTOR_SIZE // 3]
            reason = check_average(gathered, fallback, vectors[index], signs, "fp16")
            assert reason is not None and "not the group's mean" in reason
    finally:
        for node in nodes:
            node.shutdown()
    wait_until(lambda: not (our_p2pd() - p2pd_before), 15.0, "the in-process nodes' p2pd to exit")


@dataclass
class Run:
    """The shared run: its folders and processes, and what earlier tests learned."""

    root: Path
    processes: Processes
    coordinator: Child
    url: str
    peers: list[Child] = field(default_factory=list)

    @property
    def run_toml(self) -> Path:
        return self.root / "RUN.toml"

    @property
    def coord_dir(self) -> Path:
        return self.root / "coord"

    def peer_dir(self, index: int) -> Path:
        return self.root / f"p{index}"

    def ledger(self) -> list[LedgerEntry]:
        return entries_from_jsonl(http_get(f"{self.url}/ledger.jsonl").decode())

    def audit(self, ledger: str | Path, checkpoints: Path):
        return self.processes.run("coordinator.audit", "verify", "--ledger", ledger,
                                  "--public-key", self.coord_dir / "coordinator.pub",
                                  "--checkpoints", checkpoints, timeout=120)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A coordinator and 3 peers, shared by the tests below (in file order)."""
    root = tmp_path_factory.mktemp("swarm")
    processes = Processes(root)
    try:
        coordinator, url = serve_coordinator(processes, root, SMALL_RUN)
        shared = Run(root, processes, coordinator, url)
        shared.peers = [processes.peer(f"p{i}", url, shared.peer_dir(i)) for i in range(1, PEERS + 1)]
    except BaseException:
        processes.close()  # the setup failure is the news; do not mask it with the leak report
        raise
    yield shared
    close_or_fail(processes)


def _averaged_rounds_since(rounds: list[dict], start: int) -> int:
    return sum(1 for r in rounds[start:] if r["averaged"] and r["group_size"] >= 2)


def test_three_peers_average_every_round(run: Run):
    wait_until(lambda: all(len(read_rounds(run.peer_dir(i))) >= 4 for i in range(1, PEERS + 1)), 120,
               "4 rounds on every peer", must_run=[run.coordinator, *run.peers])
    for index in range(1, PEERS + 1):
        rounds = read_rounds(run.peer_dir(index))
        numbers = [r["round"] for r in rounds]
        assert numbers == sorted(set(numbers)), f"p{index}: rounds out of order: {numbers}"
        # Whatever a group averages must be outer gradients of one and the same round.
        for r in rounds:
            if r["averaged"]:
                assert r["group_rounds"] == [r["round"]] * r["group_size"], f"p{index} mixed rounds: {r}"
        # The first round may run while the swarm is still forming (alone, or with fewer peers);
        # every later one must average all 3 peers' outer gradients.
        for r in rounds[1:]:
            assert r["averaged"] and r["failure"] is None and r["group_size"] == PEERS, f"p{index}: {r}"
    line = wait_for_line(run.peers[0], "averaged with 3 peers", 5)
    assert "LOCAL ROUND" not in line

    # "Averaged" must mean an outer step on a real outer gradient: a checkpoint past genesis holds
    # the outer momentum, the running sum of the averaged Δs, which is zero only if every Δ was.
    wait_until(lambda: len(run.ledger()) >= 2, 60, "the first checkpoint", must_run=[run.coordinator, *run.peers])
    first = run.ledger()[1]
    momentum = load_file(str(run.coord_dir / "checkpoints" / f"r{first.round:06d}" / "outer.safetensors"))
    norm = float(torch.cat([t.reshape(-1) for t in momentum.values()]).norm())
    assert math.isfinite(norm) and norm > 0.0, f"outer momentum at round {first.round} is {norm}: every Δ was zero"


_JOINED = re.compile(
    r"joined run \S+ \([0-9a-f]{16}\) at (?:round (\d+) from peer [0-9a-f]{16} \(root [0-9a-f]{16} matches its signed"
    r" record\)|checkpoint of round (\d+) \(ledger entry \d+, root [0-9a-f]{16} verified\))"
)


def test_late_joiner_starts_from_verified_state(run: Run):
    wait_until(lambda: len(run.ledger()) >= 2, 120, "the first checkpoint in the ledger",
               must_run=[run.coordinator, *run.peers])
    late_dir = run.peer_dir(PEERS + 1)
    late = run.processes.peer("late", run.url, late_dir)
    try:
        line = wait_for_line(late, "joined run", 90)
        match = _JOINED.search(line)
        assert match, line
        joined_round = int(match.group(1) or match.group(2))
        assert joined_round > 0, line
        wait_until(lambda: _averaged_rounds_since(read_rounds(late_dir), 0) >= 1, 90,
                   "an averaged round on the late peer", must_run=[late])
        rounds = read_rounds(late_dir)
        assert rounds[0]["round"] >= joined_round > 0
        averaged = [r for r in rounds if r["averaged"]]
        assert averaged and all(r["group_size"] >= 2 and r["failure"] is None for r in averaged), rounds
    finally:
        codes = run.processes.stop(late, grace=45)
    assert codes == [0], late.tail()
    assert "stopped at round" in late.output()


def test_peers_train_on_without_the_coordinator_and_it_resumes(run: Run):
    before = run.ledger()
    at_kill = [len(read_rounds(run.peer_dir(i))) for i in range(1, PEERS + 1)]
    run.processes.kill(run.coordinator)
    assert not run.coordinator.p2pd(), "the killed coordinator's p2pd survived its group's SIGKILL"

    def two_more_averaged_rounds() -> bool:
        return all(_averaged_rounds_since(read_rounds(run.peer_dir(i)), at_kill[i - 1]) >= 2
                   for i in range(1, PEERS + 1))

    wait_until(two_more_averaged_rounds, 90, "2 more averaged rounds on every peer without the coordinator",
               must_run=run.peers)

    relaunched = run.processes.coordinator("coord-2", run.run_toml, run.coord_dir)
    run.coordinator, run.url = relaunched, endpoint(relaunched, run.coord_dir)["url"]
    assert re.search(r"\[coordinator\] resumed run t \([0-9a-f]{16}\); ledger at entry \d+", relaunched.output()), (
        relaunched.tail())
    after = run.ledger()
    assert [e.entry_hash for e in after[: len(before)]] == [e.entry_hash for e in before]
    wait_until(lambda: len(run.ledger()) > len(after), 90, "a checkpoint recorded after the relaunch",
               must_run=[relaunched, *run.peers])
    newest = run.ledger()
    assert newest[-1].round > after[-1].round
    assert [e.entry_hash for e in newest[: len(before)]] == [e.entry_hash for e in before]
    audited = run.audit(f"{run.url}/ledger.jsonl", run.coord_dir / "checkpoints")
    assert audited.returncode == 0, audited.stderr
    checked = re.search(r"ledger ok: (\d+) entries", audited.stdout)
    assert checked and int(checked.group(1)) >= len(newest), audited.stdout  # the ledger may have grown since


def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the first tensor's data (after the safetensors header)."""
    raw = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + header_size
    position = data_start + (len(raw) - data_start) // 2
    raw[position] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_audit_accepts_the_run_and_names_a_flipped_file(run: Run):
    codes = run.processes.stop(*run.peers, grace=60)
    assert codes == [0] * PEERS, "\n".join(p.tail() for p in run.peers)
    ledger_text = http_get(f"{run.url}/ledger.jsonl").decode()
    entries = entries_from_jsonl(ledger_text)
    assert len(entries) >= 3 and entries[0].kind == "genesis"
    (run.root / "ledger.jsonl").write_text(ledger_text)
    assert run.processes.stop(run.coordinator, grace=60) == [0], run.coordinator.tail()

    audited = run.audit(run.root / "ledger.jsonl", run.coord_dir / "checkpoints")
    assert audited.returncode == 0, audited.stderr
    assert f"ledger ok: {len(entries)} entries" in audited.stdout
    assert f"checkpoints ok: {2 * len(entries)} files" in audited.stdout

    copy = run.root / "checkpoints-copy"
    shutil.copytree(run.coord_dir / "checkpoints", copy)
    target = copy / f"r{entries[-1].round:06d}" / "model.safetensors"
    before = hashlib.sha256(target.read_bytes()).hexdigest()
    _flip_tensor_byte(target)
    assert hashlib.sha256(target.read_bytes()).hexdigest() != before
    tampered = run.audit(run.root / "ledger.jsonl", copy)
    tampered.assert_one_line_error(1, "audit failed", f"ledger entry {entries[-1].seq}", "model.safetensors")
