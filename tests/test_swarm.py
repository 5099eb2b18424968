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
import time
from concurrent.futures import ThreadPoolExecutor
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

from peer.rounds import RoundExchanger, RoundWork, clock_of
from peer.swarm import SwarmNode
from protocol.codecs import compress_with_feedback, decode, parse_codec, payload_size
from protocol.ledger import entries_from_jsonl
from protocol.manifest import AveragingConfig, RunConfig, RunManifest
from protocol.policy import CLIP_RATIO, clip_scales
from protocol.records import LedgerEntry
from protocol.signing import SigningKey, key_id

pytestmark = pytest.mark.swarm

PEERS = 3


EXCHANGE_PEERS = 4
EXCHANGE_ROUNDS = 3
VECTOR_SIZE = 100_000
CODEC = "topk-c1024-k32-q2"


def _exchange_manifest(aggregation: str = "mean", decay: float = 1.0):
    config = RunConfig(name="exchange", averaging=AveragingConfig(
        codec=CODEC, round_seconds=4.0, settle_seconds=1.0, aggregation=aggregation, error_feedback_decay=decay))
    return RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=time.time())


@pytest.mark.parametrize(("aggregation", "decay"), [("mean", 1.0), ("senders", 0.95)])
def test_four_peers_apply_the_mean_of_the_decoded_payloads_every_round(tmp_path, aggregation, decay):
    """4 SwarmNodes on loopback run the peer's round (codec, error feedback, announcement in the
    DHT, payloads fetched by sha256, combine) for several rounds: every peer's update must be the
    weighted mean of all 4 decoded payloads (per coordinate over all peers, or over the peers that
    sent it) and bit-identical across peers, so a silent fallback to a peer's own values cannot
    pass. Then a payload is fetched from a peer that is not its author."""
    p2pd_before = our_p2pd()
    manifest = _exchange_manifest(aggregation, decay)
    clock = clock_of(manifest)
    codec = parse_codec(CODEC)
    nodes: list[SwarmNode] = []
    try:
        keys = [SigningKey.generate() for _ in range(EXCHANGE_PEERS)]  # each one's libp2p identity too
        nodes.append(SwarmNode(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=keys[0]))
        for key in keys[1:]:
            nodes.append(SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=key))
        for node in nodes:
            node.start_averager(prefix="test_exchange", payload_limit=payload_size(codec, VECTOR_SIZE),
                                averaging=manifest.config.averaging)
        exchangers = [RoundExchanger(node, manifest, k, key_id(k.public_key_hex), tmp_path / f"p{i}", VECTOR_SIZE)
                      for i, (node, k) in enumerate(zip(nodes, keys, strict=True))]
        for i in range(EXCHANGE_PEERS):
            (tmp_path / f"p{i}").mkdir()
        generator = torch.Generator().manual_seed(0)
        for _ in range(EXCHANGE_ROUNDS):
            round_ = clock.round_at(time.time()) + 1
            time.sleep(max(0.0, clock.opens(round_) - time.time()))
            deltas = [torch.randn(VECTOR_SIZE, generator=generator) * (1 + i / 4) for i in range(EXCHANGE_PEERS)]
            works = [RoundWork(round_, 1.0, 16 * (i + 1), 0.1) for i in range(EXCHANGE_PEERS)]
            residuals_before = [e.residual.clone() for e in exchangers]
            announced = [e.announce(w, d, base_root="ab" * 32) for e, w, d in zip(exchangers, works, deltas, strict=True)]
            with ThreadPoolExecutor(max_workers=EXCHANGE_PEERS) as pool:  # at once, as live peers settle
                futures = [pool.submit(e.settle, round_, "ab" * 32, a) for e, a in zip(exchangers, announced, strict=True)]
                results = [f.result(timeout=120) for f in futures]

            # What each peer sent, recomputed independently: codec(Δ + residual) and its decoding.
            decoded = [decode(compress_with_feedback(codec, d, r.clone(), decay=decay)[0], codec, VECTOR_SIZE)
                       for d, r in zip(deltas, residuals_before, strict=True)]
            weights = [float(w.samples) for w in works]
            # each payload clipped to CLIP_RATIO times the median norm (protocol.policy.clip_scales)
            scales = clip_scales([float(x.double().norm()) for x in decoded])
            assert max(scales) == 1.0 and (min(scales) < 1.0 or CLIP_RATIO >= 1.75)  # the rule is exercised
            expected = sum(w * c * x.double() for w, c, x in zip(weights, scales, decoded, strict=True))
            if aggregation == "mean":
                expected = expected / sum(weights)
            else:  # q2 levels are never 0: a coordinate is sent exactly where its decoding is not 0
                senders = sum(w * (x != 0).double() for w, x in zip(weights, decoded, strict=True))
                expected = expected / senders.clamp(min=1.0)
            for index, settled in enumerate(results):
                assert settled.failure is None and settled.entered, f"round {round_}, peer {index}: {settled}"
                assert settled.members == EXCHANGE_PEERS, f"round {round_}, peer {index}: {settled}"
                assert announced[index].payload_bytes == payload_size(codec, VECTOR_SIZE)
                update = settled.update
                assert torch.allclose(update.double(), expected, rtol=1e-5, atol=1e-6), (
                    f"round {round_}, peer {index}: off the mean of the decoded payloads by "
                    f"{float((update.double() - expected).abs().max()):.3g}"
                )
                assert torch.equal(update, results[0].update), f"round {round_}: peers 0 and {index} differ"
                # the check can fail: a peer's own decoded payload is far from the group's mean
                assert not torch.allclose(decoded[index].double(), expected, rtol=1e-5, atol=1e-6)
            for exchanger, before, delta, sent in zip(exchangers, residuals_before, deltas, decoded, strict=True):
                assert torch.allclose(exchanger.residual, decay * before + delta - sent, atol=1e-5), "error feedback lost"
        # content-addressed: peer 2 holds peer 0's payload after fetching it, and serves it to a newcomer
        member = results[0].decision.members[0]
        author = next(n for n in nodes if n.p2p_id == member.p2p_id)
        other = next(n for n in nodes if n is not author)
        newcomer = SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        nodes.append(newcomer)
        newcomer.start_averager(prefix="test_exchange", payload_limit=payload_size(codec, VECTOR_SIZE),
                                averaging=manifest.config.averaging)
        got = newcomer.fetch_payloads([(member.payload_sha256, member.payload_size, [other.p2p_id])], timeout=20.0)
        assert hashlib.sha256(got[member.payload_sha256]).hexdigest() == member.payload_sha256
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
    return sum(1 for r in rounds[start:] if r["failure"] is None and r["contributors"] >= 2)


def test_three_peers_average_every_round(run: Run):
    wait_until(lambda: all(len(read_rounds(run.peer_dir(i))) >= 4 for i in range(1, PEERS + 1)), 120,
               "4 rounds on every peer", must_run=[run.coordinator, *run.peers])
    for index in range(1, PEERS + 1):
        rounds = read_rounds(run.peer_dir(index))
        numbers = [r["round"] for r in rounds]
        assert numbers == sorted(set(numbers)), f"p{index}: rounds out of order: {numbers}"
        # The first round may close before the other peers have joined; from the second on every
        # round holds all 3 payloads, this peer's included.
        later = rounds[1:]
        full = [r for r in later if r["failure"] is None and r["entered"] and r["contributors"] == PEERS]
        assert full == later, f"p{index}: {len(full)} of {len(later)} rounds with all 3: {later}"
    # One consensus per round: every peer holds the same root after every round (the same
    # payloads, combined in the same order, the same outer step).
    logs = [read_rounds(run.peer_dir(i)) for i in range(1, PEERS + 1)]
    roots: dict[int, set[str]] = {}
    for log in logs:
        for r in log:
            roots.setdefault(r["state_round"], set()).add(r["state_root"])
    assert all(len(found) == 1 for found in roots.values()), f"the consensus forked: {roots}"
    line = wait_for_line(run.peers[0], "3 contributors", 5)
    assert "OUT OF STEP" not in line

    # "Averaged" must mean an outer step on a real outer gradient: a checkpoint past genesis holds
    # the outer momentum, the running sum of the averaged Δs, which is zero only if every Δ was.
    wait_until(lambda: len(run.ledger()) >= 2, 60, "the first checkpoint", must_run=[run.coordinator, *run.peers])
    first = run.ledger()[1]
    momentum = load_file(str(run.coord_dir / "checkpoints" / f"r{first.round:06d}" / "outer.safetensors"))
    norm = float(torch.cat([t.reshape(-1) for t in momentum.values()]).norm())
    assert math.isfinite(norm) and norm > 0.0, f"outer momentum at round {first.round} is {norm}: every Δ was zero"


_JOINED = re.compile(
    r"joined run \S+ \([0-9a-f]{16}\) at round (\d+): checkpoint of round (\d+) \(ledger entry \d+, root [0-9a-f]{16}"
    r" verified\)(?:, then (\d+) round\(s\) replayed from their payloads)?$"
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
        # follow by replay: the joiner loads the ledger's checkpoint and replays the rounds since
        # from their payloads; no volunteer uploads a full state to it
        joined_round, checkpoint_round, replayed = (int(g or 0) for g in match.groups())
        assert joined_round == checkpoint_round + replayed > 0, line
        wait_until(lambda: _averaged_rounds_since(read_rounds(late_dir), 0) >= 1, 90,
                   "an averaged round on the late peer", must_run=[late])
        rounds = read_rounds(late_dir)
        assert rounds[0]["round"] >= joined_round > 0
        assert all(r["failure"] is None for r in rounds), rounds
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
    assert "lapsed" not in relaunched.output(), "the relaunched coordinator loaded a peer's state instead of replaying"
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
