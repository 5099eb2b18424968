"""One consensus per round: the pure decision over a round's announcements, and many peers'
``RoundExchanger``s over one in-memory DHT and payload store agreeing on every round's update."""

from __future__ import annotations

import hashlib
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from peer.rounds import RoundExchanger, RoundWork
from peer.state import RoundState, outer_step
from protocol.codecs import parse_codec, payload_size
from protocol.consensus import RoundClock, available, decide, priority, receipt_key
from protocol.manifest import AveragingConfig, RunConfig, RunManifest, TrainingConfig
from protocol.multiaddr import libp2p_id_of
from protocol.records import PayloadReceipt, RoundAnnouncement
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


def _receipt(key: SigningKey, held, *, round_: int = 3, base_root: str = ROOT_A, time_: float = 115.0, **changes):
    fields = dict(run_id=RUN, round=round_, base_root=base_root, held=sorted(held),
                  p2p_id=libp2p_id_of(key.public_key_hex), time=time_)
    fields.update(changes)
    return PayloadReceipt.signed(key, **fields)


def _available(decision, receipts, raw=None):
    raw = raw if raw is not None else {r.peer_id: r.to_bytes() for r in receipts}
    return available(decision, raw, run_id=RUN, latest_time=120.0)


def test_a_member_stays_only_if_a_peer_other_than_its_author_holds_its_payload():
    records = [_record(k) for k in KEYS[:4]]
    decision = _decide(records)
    digests = [r.payload_sha256 for r in records]
    receipts = [_receipt(KEYS[0], digests[:3]), _receipt(KEYS[1], digests[:3]), _receipt(KEYS[3], [digests[3]])]
    result = _available(decision, receipts)
    assert {m.peer_id for m in result.members} == {r.peer_id for r in records[:3]}, "the fourth: only its author"
    assert len(result.dropped) == 1 and records[3].peer_id in result.dropped[0]
    assert set(result.holders[digests[2]]) == {records[0].p2p_id, records[1].p2p_id}
    assert _available(decision, list(reversed(receipts))).members == result.members, "order-free"
    assert result.witnessed == {r.peer_id for r in records[:3]}, "credit rests on another peer's receipt"
    alone = _decide(records[:1])
    assert _available(alone, []).members == alone.members, "the round's only announcer needs no receipt"
    assert _available(alone, []).witnessed == frozenset(), "but nobody witnessed it: no credit"


@pytest.mark.parametrize(("change", "why"), [
    (dict(base_root=ROOT_B), "not the round's"),
    (dict(round_=4), "round 4"),
    (dict(run_id="cd" * 8), "of run"),
    (dict(time_=121.0), "after the round's receipts were due"),
    (dict(p2p_id="12D3KooWforged"), "libp2p id"),
])
def test_a_bad_receipt_is_not_counted_and_named(change, why):
    records = [_record(k) for k in KEYS[:2]]
    decision = _decide(records)
    bad = _receipt(KEYS[1], [records[0].payload_sha256], **change)
    result = _available(decision, [_receipt(KEYS[0], [records[1].payload_sha256]), bad])
    assert [m.peer_id for m in result.members] == [records[1].peer_id]
    assert len(result.rejected) == 1 and why in result.rejected[0]


def test_receipts_forged_misfiled_or_from_outsiders_do_not_count():
    records = [_record(k) for k in KEYS[:2]]
    decision = _decide(records)
    target = records[0].payload_sha256
    outsider = _receipt(KEYS[7], [target])  # signed, but it announced nothing this round
    honest = _receipt(KEYS[1], [target])
    forged = PayloadReceipt(**{**honest.to_wire(), "held": sorted([target, "c" * 64])})
    raw = {outsider.peer_id: outsider.to_bytes(), "f" * 16: honest.to_bytes(), KEYS[1].public_key_hex[:16]: b"\x81"}
    result = _available(decision, [], raw=raw)
    assert not result.members and len(result.rejected) == 3
    assert not _available(decision, [], raw={honest.peer_id: forged.to_bytes()}).members
    announcement_bytes = records[1].to_bytes()  # another record kind does not pass as a receipt
    assert not _available(decision, [], raw={records[1].peer_id: announcement_bytes}).members


def test_a_receipt_signature_does_not_verify_as_another_kind():
    receipt = _receipt(KEYS[0], ["d" * 64])
    from protocol.signing import verify_signature
    from protocol.wire import canonical_bytes
    with pytest.raises(Exception, match="does not verify"):
        verify_signature(receipt.peer_key, canonical_bytes(receipt.unsigned_wire()), receipt.signature, what="x")


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
    settle time (settle); a settle waiting for the round's receipts spins (briefly, really) until
    the test moves the time on (``_settle_all``)."""

    def __init__(self):
        self.now = 0.0
        self.monotonic = time.monotonic

    def time(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        time.sleep(0.002)

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


def _settle_all(peers, round_: int, roots, announced, clock: _Clock, swarm: _Swarm) -> list:
    """Every peer settles round ``round_`` at once, as live peers do: each fetches and signs its
    receipt at the decision; once every announcer's receipt is in, the time moves on to the
    receipts' read. Returns the ``Settled`` of each peer, in order."""
    clock.decided(round_)
    decision = peers[0].decide(round_)
    announcers = {a.peer_id for a in (*decision.members, *decision.waiting)}
    signers = len(announcers & {p.peer_id for p in peers if p.peer_id in announced})
    with ThreadPoolExecutor(max_workers=len(peers)) as pool:
        futures = [pool.submit(p.settle, round_, roots[p.peer_id], announced.get(p.peer_id)) for p in peers]
        deadline = time.monotonic() + 30
        key = receipt_key(peers[0].run_id, round_)
        while len(swarm.dht.get(key, {})) < signers and len(announcers) > 1:
            assert time.monotonic() < deadline, "the peers' receipts did not come in"
            time.sleep(0.005)
        clock.now = 10.0 * (round_ + 1) + 6.0  # past the receipts' read (close + 1 + 2.5 + 0.5)
        return [f.result(timeout=30) for f in futures]


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
        for peer, settled in zip(peers, _settle_all(peers, round_, roots, announced, clock, swarm), strict=True):
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
    befores = [p.residual.clone() for p in peers]
    roots = {p.peer_id: ROOT_A for p in peers}
    outcomes = _settle_all(peers, 0, roots, {p.peer_id: a for p, a in zip(peers, announced, strict=True)}, clock, swarm)
    for peer, delta, before, settled in zip(peers, deltas, befores, outcomes, strict=True):
        if settled.entered:
            assert torch.equal(peer.residual, before)
        else:  # nothing lost: β·e_old + Δ is back in the residual (e_old was 0)
            assert torch.allclose(peer.residual, delta, atol=1e-6)
    assert sum(p.settle(0, ROOT_A).members for p in peers) == 12


def test_a_peer_on_another_consensus_is_out_of_step(clock):
    swarm = _Swarm()
    peers = _peers(3, 16, swarm)
    clock.at_close(0)
    for peer in peers:
        peer.announce(RoundWork(0, 1.0, 16, 1.0), torch.ones(NUMEL) * 0.01, base_root=ROOT_A)
    clock.decided(0)
    assert "the round built on consensus" in peers[0].settle(0, ROOT_B).failure


def _round_with_a_withheld_payload(clock, *, receipted_then_lost: bool):
    swarm = _Swarm()
    peers = _peers(4, 16, swarm)
    clock.at_close(0)
    announced = {p.peer_id: p.announce(RoundWork(0, 1.0, 16, 1.0), torch.ones(NUMEL) * 0.01 * (i + 1), base_root=ROOT_A)
                 for i, p in enumerate(peers)}
    hostile = peers[0]
    withheld = hostile.decide(0).members[[m.peer_id for m in hostile.decide(0).members].index(hostile.peer_id)]
    if not receipted_then_lost:
        swarm.lost.add(withheld.payload_sha256)  # announced, never served to anyone
    honest = peers[1:]
    roots = {p.peer_id: ROOT_A for p in peers}
    if receipted_then_lost:  # a peer's receipt names it, then every copy vanishes before the others fetch it
        original = _Node.fetch_payloads

        def fetch_then_lose(node, wanted, timeout):
            got = original(node, wanted, timeout)
            if node is honest[0].node:
                swarm.lost.add(withheld.payload_sha256)
            return got if node is honest[0].node else {d: b for d, b in got.items() if d != withheld.payload_sha256}

        _Node.fetch_payloads = fetch_then_lose
        try:
            outcomes = _settle_all(honest, 0, roots, {p.peer_id: announced[p.peer_id] for p in honest}, clock, swarm)
        finally:
            _Node.fetch_payloads = original
        return honest, withheld, outcomes, swarm
    outcomes = _settle_all(honest, 0, roots, {p.peer_id: announced[p.peer_id] for p in honest}, clock, swarm)
    return honest, withheld, outcomes, swarm


def test_a_payload_announced_and_withheld_is_left_out_by_every_peer_and_the_round_goes_on(clock):
    honest, withheld, outcomes, swarm = _round_with_a_withheld_payload(clock, receipted_then_lost=False)
    assert all(o.failure is None and o.void is None and o.update is not None for o in outcomes)
    assert all(o.members == 3 and o.entered for o in outcomes), "the three honest payloads are in"
    assert all(not o.decision.holds(withheld.peer_id) for o in outcomes)
    assert all(any("held by nobody else" in line for line in o.decision.rejected) for o in outcomes)
    assert all(o.dropped == 1 and {p for p, _ in o.credit} == {h.peer_id for h in honest} for o in outcomes)
    updates = {hashlib.sha256(o.update.numpy().tobytes()).hexdigest() for o in outcomes}
    assert len(updates) == 1
    follower = _peers(1, 16, swarm)[0]  # a replay later reads the same receipts: the same update
    replayed = follower.settle(0, ROOT_A)
    assert hashlib.sha256(replayed.update.numpy().tobytes()).hexdigest() in updates


def test_a_payload_one_peer_held_but_nobody_could_fetch_voids_the_round_for_those_without_it(clock):
    honest, withheld, outcomes, _ = _round_with_a_withheld_payload(clock, receipted_then_lost=True)
    holder, others = outcomes[0], outcomes[1:]
    assert holder.void is None and holder.update is not None and holder.members == 4
    assert all("did not arrive" in o.void and not o.entered for o in others), "they repair to the holder's side later"


def test_the_rounds_only_announcer_needs_no_receipt(clock):
    swarm = _Swarm()
    peer = _peers(1, 16, swarm)[0]
    clock.at_close(0)
    own = peer.announce(RoundWork(0, 1.0, 16, 1.0), torch.ones(NUMEL) * 0.01, base_root=ROOT_A)
    clock.decided(0)
    settled = peer.settle(0, ROOT_A, own)
    assert settled.entered and settled.update is not None and receipt_key(peer.run_id, 0) not in swarm.dht
    assert settled.credit == (), "a round nobody else could witness earns no ledger credit"
