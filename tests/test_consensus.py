"""One consensus per round: the pure decision over a round's announcements, and many peers'
``RoundExchanger``s over one in-memory DHT and payload store agreeing on every round's update."""

from __future__ import annotations

import hashlib
import random
import time

import pytest
import torch

from peer.rounds import RoundExchanger, RoundWork
from peer.state import RoundState, outer_step
from protocol.codecs import parse_codec, payload_size
from protocol.consensus import RoundClock, decide, priority
from protocol.manifest import AveragingConfig, RunConfig, RunManifest, TrainingConfig
from protocol.multiaddr import libp2p_id_of
from protocol.records import RoundAnnouncement
from protocol.signing import SigningKey, key_id

CODEC = "bmax-c256-b16-s2"
NUMEL = 1000
RUN = "ab" * 8
SIZE = payload_size(parse_codec(CODEC), NUMEL)
ROOT_A, ROOT_B = "a" * 64, "b" * 64
KEYS = [SigningKey.generate() for _ in range(12)]


def _record(key: SigningKey, *, round_: int = 3, base_root: str = ROOT_A, weight: float = 16.0,
            time_: float = 100.0, **changes) -> RoundAnnouncement:
    fields = dict(run_id=RUN, round=round_, weight=weight, codec=CODEC, payload_size=SIZE,
                  payload_sha256=hashlib.sha256(key.public_key_hex.encode()).hexdigest(), base_root=base_root,
                  loss=1.0, p2p_id=libp2p_id_of(key.public_key_hex), time=time_)
    fields.update(changes)
    return RoundAnnouncement.signed(key, **fields)


def _decide(records, *, g: int = 16, round_: int = 3):
    raw = {r.peer_id: r.to_bytes() for r in records}
    return decide(raw, round_=round_, run_id=RUN, codec=CODEC, payload_size=SIZE, max_weight=160.0,
                  max_contributors=g, latest_time=110.0)


def test_the_clock_splits_time_into_windows():
    clock = RoundClock(start=1000.0, seconds=10.0, settle=2.0)
    assert clock.round_at(999.0) == 0 and clock.round_at(1000.0) == 0 and clock.round_at(1019.99) == 1
    assert clock.opens(2) == 1020.0 and clock.closes(2) == 1030.0 and clock.decided(2) == 1032.0
    assert clock.latest_announcement(2) == 1031.0


def test_the_decision_depends_on_the_records_only_never_on_their_order():
    records = [_record(k) for k in KEYS[:6]]
    first = _decide(records)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    again = _decide(shuffled)
    assert first.digest == again.digest and [m.peer_id for m in first.members] == sorted(r.peer_id for r in records)
    assert first.base_root == ROOT_A and not first.waiting and not first.rejected


def test_at_most_g_enter_and_who_enters_rotates_with_the_round():
    chosen = {}
    for round_ in (3, 4):
        records = [_record(k, round_=round_) for k in KEYS]
        decision = _decide(records, g=4, round_=round_)
        assert len(decision.members) == 4 and len(decision.waiting) == 8
        by_priority = sorted(records, key=lambda r: priority(round_, r.peer_id))[:4]
        assert {m.peer_id for m in decision.members} == {r.peer_id for r in by_priority}
        chosen[round_] = {m.peer_id for m in decision.members}
    assert chosen[3] != chosen[4]


def test_the_base_root_most_records_name_wins_and_a_tie_goes_to_the_smaller():
    records = [_record(k, base_root=ROOT_B) for k in KEYS[:3]] + [_record(k) for k in KEYS[3:5]]
    decision = _decide(records)
    assert decision.base_root == ROOT_B and len(decision.members) == 3
    assert sum("another consensus" in line for line in decision.rejected) == 2
    tie = _decide([_record(k, base_root=ROOT_B) for k in KEYS[:2]] + [_record(k) for k in KEYS[2:4]])
    assert tie.base_root == ROOT_A


@pytest.mark.parametrize(("change", "why"), [
    (dict(run_id="cd" * 8), "run"),
    (dict(round_=4), "round 4"),
    (dict(weight=1e6), "weight"),
    (dict(time_=111.0), "after the round's last moment"),
    (dict(codec="bmax-c4096-b64-s2"), "codec"),
    (dict(payload_size=SIZE + 1), "codec"),
])
def test_a_bad_record_is_left_out_and_named(change, why):
    good = [_record(k) for k in KEYS[:2]]
    bad = _record(KEYS[5], **change)
    decision = _decide([*good, bad])
    assert len(decision.members) == 2 and len(decision.rejected) == 1 and why in decision.rejected[0]


def test_forged_and_misfiled_records_are_left_out():
    good = _record(KEYS[0])
    other = _record(KEYS[1])
    raw = {good.peer_id: good.to_bytes(), "f" * 16: other.to_bytes(), other.peer_id: b"\x81\xa1x\x01"}
    forged = RoundAnnouncement(**{**other.to_wire(), "weight": 32.0})  # signature no longer matches
    raw[KEYS[2].public_key_hex[:16]] = forged.to_bytes()
    decision = decide(raw, round_=3, run_id=RUN, codec=CODEC, payload_size=SIZE, max_weight=160.0,
                      max_contributors=16, latest_time=110.0)
    assert [m.peer_id for m in decision.members] == [good.peer_id] and len(decision.rejected) == 3


def test_nobody_announced_is_an_empty_round():
    decision = _decide([])
    assert decision.empty and decision.base_root is None


# ---------------------------------------------------------------------------------------
# Many peers' exchangers over one in-memory swarm
# ---------------------------------------------------------------------------------------


class _Swarm:
    """The DHT (one dictionary per key) and every peer's payload store, in memory. ``lost``
    payload digests are never served (a holder that vanished)."""

    def __init__(self):
        self.dht: dict[str, dict[str, bytes]] = {}
        self.payloads: dict[str, bytes] = {}
        self.lost: set[str] = set()


class _Node:
    def __init__(self, swarm: _Swarm, name: str):
        self.swarm, self.p2p_id = swarm, name

    def hold_payload(self, payload: bytes, notify=()) -> str:
        digest = hashlib.sha256(payload).hexdigest()
        self.swarm.payloads[digest] = payload
        return digest

    def store(self, key, value, *, ttl, subkey=None) -> bool:
        self.swarm.dht.setdefault(key, {})[subkey] = value
        return True

    def fetch(self, key):
        return dict(self.swarm.dht.get(key, {}))

    def fetch_payloads(self, wanted, timeout):
        return {d: self.swarm.payloads[d] for d, _, _ in wanted if d in self.swarm.payloads and d not in self.swarm.lost}


class _Clock:
    """The time ``peer.rounds`` sees: set by the test to a round's close (announce) or past its
    settle time (settle), so no test sleeps."""

    def __init__(self):
        self.now = 0.0
        self.monotonic, self.sleep = time.monotonic, time.sleep

    def time(self) -> float:
        return self.now

    def at_close(self, round_: int) -> None:
        self.now = 10.0 * (round_ + 1) - 0.5

    def decided(self, round_: int) -> None:
        self.now = 10.0 * (round_ + 1) + 1.5


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr("peer.rounds.time", fake)
    return fake


def _manifest(g: int) -> RunManifest:
    config = RunConfig(
        name="consensus",
        training=TrainingConfig(inner_steps=10, batch_size=16),
        averaging=AveragingConfig(codec=CODEC, round_seconds=10.0, settle_seconds=1.0, max_contributors=g),
    )
    return RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=0.0)


def _peers(count: int, g: int, swarm: _Swarm) -> list[RoundExchanger]:
    manifest = _manifest(g)
    peers = []
    for _ in range(count):
        key = SigningKey.generate()
        peers.append(RoundExchanger(_Node(swarm, libp2p_id_of(key.public_key_hex)), manifest, key, key_id(key.public_key_hex), None, NUMEL))
    return peers


@pytest.mark.parametrize(("count", "g"), [(2, 16), (6, 4), (40, 8)])
def test_every_peer_applies_the_same_update_to_the_same_state_every_round(count, g, clock):
    """A swarm larger than G, and peers of uneven speed (weights): one consensus root per round."""
    swarm = _Swarm()
    peers = _peers(count, g, swarm)
    generator = torch.Generator().manual_seed(0)
    state = RoundState(0, torch.randn(NUMEL, generator=generator), torch.zeros(NUMEL))
    states = {p.peer_id: state.copy() for p in peers}
    entered = {p.peer_id: 0 for p in peers}
    for round_ in range(6):
        roots = {pid: hashlib.sha256(s.parameters.numpy().tobytes()).hexdigest() for pid, s in states.items()}
        announced = {}
        clock.at_close(round_)
        for index, peer in enumerate(peers):
            work = RoundWork(round_, 1.0, 16 * (1 + index % 10), 1.0)  # 10x spread of samples
            delta = torch.randn(NUMEL, generator=generator) * 0.01
            announced[peer.peer_id] = peer.announce(work, delta, base_root=roots[peer.peer_id])
        updates = set()
        clock.decided(round_)
        for peer in peers:
            settled = peer.settle(round_, roots[peer.peer_id], announced[peer.peer_id])
            assert settled.failure is None
            assert settled.members == min(count, g)
            entered[peer.peer_id] += settled.entered
            states[peer.peer_id] = outer_step(states[peer.peer_id], settled.update, lr=1.0, momentum=0.0, nesterov=False)
            updates.add(hashlib.sha256(settled.update.numpy().tobytes()).hexdigest())
        assert len(updates) == 1, f"round {round_}: peers computed {len(updates)} different updates"
        assert len({hashlib.sha256(s.parameters.numpy().tobytes()).hexdigest() for s in states.values()}) == 1
    assert sum(entered.values()) == 6 * min(count, g)


def test_work_left_out_of_a_round_goes_back_to_the_residual(clock):
    swarm = _Swarm()
    clock.at_close(0)
    peers = _peers(6, 2, swarm)
    deltas = [torch.full((NUMEL,), 0.01 * (i + 1)) for i in range(6)]
    announced = [p.announce(RoundWork(0, 1.0, 16, 1.0), d, base_root=ROOT_A) for p, d in zip(peers, deltas, strict=True)]
    clock.decided(0)
    for peer, delta, own in zip(peers, deltas, announced, strict=True):
        before = peer.residual.clone()
        settled = peer.settle(0, ROOT_A, own)
        if settled.entered:
            assert torch.equal(peer.residual, before)
        else:  # nothing lost: β·e_old + Δ is back in the residual (e_old was 0)
            assert torch.allclose(peer.residual, delta, atol=1e-6)
    assert sum(p.settle(0, ROOT_A).members for p in peers) == 12


def test_a_peer_on_another_consensus_is_out_of_step_and_a_lost_payload_voids_the_round(clock):
    swarm = _Swarm()
    peers = _peers(3, 16, swarm)
    clock.at_close(0)
    for peer in peers:
        peer.announce(RoundWork(0, 1.0, 16, 1.0), torch.ones(NUMEL) * 0.01, base_root=ROOT_A)
    clock.decided(0)
    assert "the round built on consensus" in peers[0].settle(0, ROOT_B).failure
    swarm.lost.add(peers[1].decide(0).members[0].payload_sha256)
    missing = peers[2].settle(0, ROOT_A)
    assert missing.failure is None and missing.update is None and "did not arrive" in missing.void
    assert not missing.entered, "a void round holds nobody's payload"
    follower = _peers(1, 16, swarm)[0]
    swarm.lost.clear()
    assert follower.settle(0, ROOT_A).members == 3, "a follower with no work of its own replays the round"
