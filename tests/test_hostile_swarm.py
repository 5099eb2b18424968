"""Hostile peers against real SwarmNodes on loopback (in-process hivemind nodes, no training).

    pytest -q tests/test_hostile_swarm.py        # ~1 minute on 2 cores

A joiner that must load a state takes the one a majority of live peers vouches for, from those
peers only: a donor serving a poisoned state, an outsized stream or another root is passed over.
The DHT's validators refuse junk and records stored under another peer's id, and a forged far-future
progress record, stored as an attacker would, is not believed by readers.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import our_p2pd, wait_until

from peer.join import state_from_quorum
from peer.progress import PROGRESS_TTL, progress_key, read_progress
from peer.rounds import RoundExchanger, RoundWork, clock_of
from peer.state import RoundState, StateLayout
from peer.swarm import SwarmNode
from protocol.codecs import parse_codec, payload_size
from protocol.errors import VerificationError
from protocol.manifest import AveragingConfig, RunConfig, RunManifest
from protocol.records import PeerProgress
from protocol.signing import SigningKey, key_id

pytestmark = pytest.mark.swarm

NUMEL = 4096
_silent = "12D3KooWA1111111111111111111111111111111111111111111"
"""A well-formed libp2p id nobody holds: asked, it never answers."""
LAYOUT = StateLayout(("w",), (torch.Size([NUMEL]),))


def _manifest() -> RunManifest:
    config = RunConfig(name="hostile", averaging=AveragingConfig(round_seconds=4.0, settle_seconds=1.0))
    return RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=time.time() - 40)


def _record(key: SigningKey, manifest: RunManifest, node: SwarmNode, state: RoundState, **overrides) -> PeerProgress:
    fields = dict(run_id=manifest.run_id, round=state.round, samples=64, loss=3.0, samples_per_second=5.0,
                  averaged_with=4, averaged=True, network_seconds=0.2, state_root=state.root(LAYOUT),
                  p2p_id=node.p2p_id, maddrs=[], time=time.time())
    return PeerProgress.signed(key, **fields | overrides)


def _first(monkeypatch, p2p_id: str) -> None:
    """Donors are drawn at random: put ``p2p_id`` first, so the test sees it tried and passed over."""
    monkeypatch.setattr("peer.join.random.sample", lambda seq, k: sorted(seq, key=lambda p: p != p2p_id)[:k])


def test_a_joiner_takes_the_quorum_state_and_passes_over_hostile_donors(monkeypatch):
    p2pd_before = our_p2pd()
    manifest = _manifest()
    clock = clock_of(manifest)
    generator = torch.Generator().manual_seed(3)
    honest_state = RoundState(9, torch.randn(NUMEL, generator=generator), torch.randn(NUMEL, generator=generator))
    poisoned = RoundState(9, honest_state.parameters.clone(), honest_state.momentum.clone())
    poisoned.parameters[5] = float("nan")
    other = RoundState(10, honest_state.parameters + 1.0, honest_state.momentum.clone())
    nodes: list[SwarmNode] = []
    served: dict[int, tuple[bytes | None, list[torch.Tensor]]] = {}
    try:
        keys = [SigningKey.generate() for _ in range(6)]  # each one's libp2p identity too
        nodes.append(SwarmNode(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=keys[0]))
        for key in keys[1:]:
            nodes.append(SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=key))
        for index, node in enumerate(nodes):
            node.start_averager(prefix="test_hostile", payload_limit=1024, averaging=manifest.config.averaging,
                                state_source=lambda index=index: served.get(index, (None, [])))
        # nodes 0-2 honest; 3 claims the honest root but serves NaNs; 4 serves a root of its own at a
        # higher round; 5 is the joiner
        for index in range(3):
            record = _record(keys[index], manifest, nodes[index], honest_state)
            served[index] = (record.to_bytes(), [honest_state.parameters, honest_state.momentum])
        liar = _record(keys[3], manifest, nodes[3], honest_state)
        served[3] = (liar.to_bytes(), [poisoned.parameters, poisoned.momentum])
        loner = _record(keys[4], manifest, nodes[4], other)
        served[4] = (loner.to_bytes(), [other.parameters, other.momentum])
        for index in range(5):
            nodes[index].publish_state(served[index][0])
        candidates = [node.p2p_id for node in nodes[:5]]
        joiner = nodes[5]
        _first(monkeypatch, nodes[3].p2p_id)  # the liar is asked first, and passed over
        start = state_from_quorum(joiner, manifest, LAYOUT, clock, own_peer_id=key_id(keys[5].public_key_hex),
                                  candidates=candidates, timeout=30.0)
        assert start.state.round == 9 and start.state.root(LAYOUT) == honest_state.root(LAYOUT)
        assert torch.equal(start.state.parameters, honest_state.parameters)
        assert "vouched for by 4 of 5 peers asked" in start.source, start.source
        assert start.source.startswith("round 9 from peer ") and key_id(keys[3].public_key_hex) not in start.source
        # the liar alone as donor: its NaNs hash to another root, so nothing is adopted
        with pytest.raises(VerificationError):
            state_from_quorum(joiner, manifest, LAYOUT, clock, own_peer_id="", candidates=[nodes[3].p2p_id,
                              nodes[4].p2p_id], timeout=10.0)
        # a donor that serves more bytes than a state holds is cut off: only the honest ones remain
        served[0] = (served[0][0], [honest_state.parameters, torch.cat([honest_state.momentum] * 4)])
        _first(monkeypatch, nodes[0].p2p_id)
        start = state_from_quorum(joiner, manifest, LAYOUT, clock, own_peer_id="", candidates=candidates[:3],
                                  timeout=30.0)
        assert start.state.root(LAYOUT) == honest_state.root(LAYOUT)
        assert key_id(keys[0].public_key_hex) not in start.source, start.source
        # a donor that vouches for the quorum's round but serves the right tensors under a record of a
        # far later round (the root covers the tensors, not the round): passed over too
        forged_round = _record(keys[1], manifest, nodes[1], honest_state, round=10**6)
        served[1] = (forged_round.to_bytes(), [honest_state.parameters, honest_state.momentum])
        monkeypatch.setattr("peer.join.random.sample", lambda seq, k: sorted(seq, key=lambda p: (
            p != nodes[0].p2p_id, p != nodes[1].p2p_id))[:k])
        start = state_from_quorum(joiner, manifest, LAYOUT, clock, own_peer_id="", candidates=candidates[:3],
                                  timeout=30.0)
        assert start.state.round == 9 and key_id(keys[2].public_key_hex) in start.source, start.source
        # one answer of three asked is no majority: not even an honest donor's word is enough
        with pytest.raises(VerificationError, match="majority of the 3 peers asked"):
            state_from_quorum(joiner, manifest, LAYOUT, clock, own_peer_id="",
                              candidates=[nodes[2].p2p_id, "12D3KooWMNViDdDTJu4EGNHDDgXTXV4HEV24CZUhWNLELypLeusp",
                                          _silent], timeout=10.0)
    finally:
        for node in nodes:
            node.shutdown()
    wait_until(lambda: not (our_p2pd() - p2pd_before), 15.0, "the in-process nodes' p2pd to exit")


def test_the_dht_refuses_junk_and_readers_refuse_a_forged_far_future_record():
    p2pd_before = our_p2pd()
    manifest = _manifest()
    clock = clock_of(manifest)
    nodes: list[SwarmNode] = []
    try:
        honest_key, hostile_key = SigningKey.generate(), SigningKey.generate()
        nodes.append(SwarmNode(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        nodes.append(SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=honest_key))
        attacker = SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=hostile_key)
        nodes.append(attacker)
        honest_id, hostile_id = key_id(honest_key.public_key_hex), key_id(hostile_key.public_key_hex)
        state = RoundState(9, torch.zeros(NUMEL), torch.zeros(NUMEL))
        key = progress_key(manifest.run_id)
        honest = _record(honest_key, manifest, nodes[1], state)
        assert nodes[1].store(key, honest.to_bytes(), ttl=PROGRESS_TTL, subkey=honest_id)
        # junk, and an honest peer's record re-stored under the attacker's id: refused by every node
        assert not attacker.store(key, b"\x00" * 100, ttl=60.0, subkey=hostile_id)
        assert not attacker.store(key, honest.to_bytes(), ttl=60.0, subkey=hostile_id)
        # validly signed under its own id, but naming the honest peer's libp2p id: refused
        spoofed = _record(hostile_key, manifest, nodes[1], state)
        assert not attacker.store(key, spoofed.to_bytes(), ttl=60.0, subkey=hostile_id)
        # kept for a day: refused
        assert not attacker.store(key, _record(hostile_key, manifest, attacker, state).to_bytes(), ttl=86400.0,
                                  subkey=hostile_id)
        # validly signed, under its own id, but claiming round 10**9 and a time a year ahead
        forged = _record(hostile_key, manifest, attacker, state, round=10**9, time=time.time() + 3.2e7)
        assert attacker.store(key, forged.to_bytes(), ttl=60.0, subkey=hostile_id)
        view = read_progress(nodes[0], manifest.run_id, clock=clock)
        assert set(view.records) == {honest_id}, view
        assert view.rejected == 1 and "future" in view.reasons[0], view.reasons
        assert [r.peer_id for r in view.alive()] == [honest_id]
    finally:
        for node in nodes:
            node.shutdown()
    wait_until(lambda: not (our_p2pd() - p2pd_before), 15.0, "the in-process nodes' p2pd to exit")


def test_a_round_leaves_out_a_withheld_payload_clips_a_poisoned_one_and_equivocation_forks_nobody(tmp_path):
    """5 real nodes settle one round at once: peer 0 announces and then leaves without serving its
    payload to anyone (withholding), peer 1 sends Δ×1000 and then stores a second announcement of
    another payload (poisoned payload, equivocation). Every honest peer must leave peer 0 out (its
    payload held by nobody else), weigh peer 1 at most like the median, and compute the same update."""
    p2pd_before = our_p2pd()
    config = RunConfig(name="hostile", averaging=AveragingConfig(codec="topk-c1024-k32-q2", round_seconds=8.0,
                                                                 settle_seconds=1.5))
    manifest = RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=time.time())
    clock = clock_of(manifest)
    codec = parse_codec(config.averaging.codec)
    nodes: list[SwarmNode] = []
    try:
        keys = [SigningKey.generate() for _ in range(5)]
        nodes.append(SwarmNode(initial_peers=[], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=keys[0]))
        for key in keys[1:]:
            nodes.append(SwarmNode(initial_peers=nodes[0].maddrs, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=key))
        for node in nodes:
            node.start_averager(prefix="test_round", payload_limit=payload_size(codec, NUMEL),
                                averaging=config.averaging)
        exchangers = [RoundExchanger(n, manifest, k, key_id(k.public_key_hex), None, NUMEL)
                      for n, k in zip(nodes, keys, strict=True)]
        round_ = clock.round_at(time.time()) + 1
        time.sleep(max(0.0, clock.opens(round_) + 1.0 - time.time()))
        generator = torch.Generator().manual_seed(5)
        deltas = [torch.randn(NUMEL, generator=generator) for _ in range(5)]
        deltas[1] = deltas[1] * 1000.0
        announced = [e.announce(RoundWork(round_, 1.0, 16, 0.5), d, base_root="ab" * 32)
                     for e, d in zip(exchangers, deltas, strict=True)]
        assert all(a.failure is None for a in announced)
        second = exchangers[1].announce(RoundWork(round_, 1.0, 16, 0.5), -deltas[1], base_root="ab" * 32)
        assert second.failure is None  # two signed announcements of one round under one subkey
        honest = exchangers[2:]
        with ThreadPoolExecutor(max_workers=len(honest)) as pool:  # they wait for the round's decision
            futures = [pool.submit(e.settle, round_, "ab" * 32, a) for e, a in zip(honest, announced[2:], strict=True)]
            nodes.pop(0).shutdown()  # meanwhile the withholder leaves: its payload was served to nobody
            assert time.time() < clock.closes(round_), "the test's own set-up outlasted the round"
            results = [f.result(timeout=120) for f in futures]
        for settled in results:
            assert settled.failure is None and settled.void is None and settled.update is not None, settled
            assert not settled.decision.holds(exchangers[0].peer_id), "the withheld payload is left out"
            assert any("held by nobody else" in line for line in settled.decision.rejected)
            assert settled.members == 4 and settled.entered
            assert torch.equal(settled.update, results[0].update), "every honest peer computes the same update"
        # clipped to the median norm: the ×1000 payload weighs no more than an honest one
        assert float(results[0].update.norm()) < 2 * max(float(d.norm()) for d in deltas[2:])
    finally:
        for node in nodes:
            node.shutdown()
    wait_until(lambda: not (our_p2pd() - p2pd_before), 15.0, "the in-process nodes' p2pd to exit")
