"""The round-protocol simulator (bench/protocol_sim.py): its decision rule, its accounting, its forks.

    pytest -q tests/test_protocol_sim.py

Small swarms (10 to 40 peers, a few rounds): seconds in all.
"""

from __future__ import annotations

import math
import random

import pytest

from bench.protocol_sim import PAYLOAD_BYTES_1B, Announcement, SimConfig, _Swarm, decide, rank, simulate
from protocol.codecs import parse_codec, payload_size
from protocol.errors import ConfigError

SMALL = dict(rounds=4, payload_bytes=2_000_000, pieces=4)  # 2 MB payloads: fast, same mechanics


def _record(peer: int, *, round_: int = 7, signed_time: float = 100.0, base_root: int = 5) -> Announcement:
    return Announcement(round=round_, peer=peer, signed_time=signed_time, base_root=base_root, weight=1.0,
                        stored_at=0.0)


def test_payload_size_of_a_1b_model_at_the_default_codec():
    assert PAYLOAD_BYTES_1B == payload_size(parse_codec("bmax-c4096-b64-s2"), 1_000_000_000)


def test_decide_keeps_the_smallest_ranks_of_timely_records_on_the_plurality_root():
    records = [_record(peer) for peer in range(8)]
    records.append(_record(8, signed_time=100.5))  # signed after the deadline
    records += [_record(peer, base_root=4) for peer in (9, 10)]  # a minority root
    records.append(_record(11, round_=6))  # another round's record
    chosen = decide(records, round_=7, latest=100.0, group=3)
    expected = sorted(range(8), key=lambda peer: rank(7, peer))[:3]
    assert chosen == tuple(expected)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert decide(shuffled, round_=7, latest=100.0, group=3) == chosen  # order of arrival does not matter
    assert decide([], round_=7, latest=100.0, group=3) == ()


def test_decide_rotates_so_every_peer_gets_in():
    records = {peer: None for peer in range(10)}
    entered = {peer for round_ in range(40) for peer in
               decide([_record(p, round_=round_) for p in records], round_=round_, latest=100.0, group=2)}
    assert entered == set(records)


def test_config_is_checked_once_at_the_edge():
    with pytest.raises(ConfigError, match="peers"):
        SimConfig(peers=0)
    with pytest.raises(ConfigError, match="settle_s"):
        SimConfig(settle_s=400.0)
    with pytest.raises(ConfigError, match="upload_cap"):
        SimConfig(upload_cap=0.0)


def test_the_same_seed_gives_the_same_result():
    config = SimConfig(peers=20, seed=3, churn_per_hour=1.0, **SMALL)
    assert simulate(config) == simulate(config)
    assert simulate(config).summary() != simulate(SimConfig(peers=20, seed=4, churn_per_hour=1.0, **SMALL)).summary()


def test_no_fork_with_a_sane_settle_even_with_late_announcers():
    plain = simulate(SimConfig(peers=40, **SMALL))
    assert [r.distinct_sets for r in plain.rounds] == [1] * 4
    assert all(r.selected == plain.config.group for r in plain.rounds)
    late = simulate(SimConfig(peers=40, late_share=0.3, late_s=60.0, **SMALL))
    assert sum(r.distinct_sets > 1 for r in late.rounds) == 0
    assert sum(r.late for r in late.rounds) > 0


def test_forks_are_counted_when_stores_straddle_the_reads():
    # no deadline, settle 0: reads land 0.04-0.3 s after the close, stores 0.08-1.5 s after it
    config = SimConfig(peers=40, settle_s=0.0, encode_s=0.05, late_share=0.5, late_s=1.0, deadline_share=None,
                       **SMALL)
    result = simulate(config)
    assert result.summary()["forks"] > 0
    assert all(r.fork_peers > 0 for r in result.rounds if r.distinct_sets > 1)


def test_every_peer_downloads_the_set_and_the_records_and_bytes_balance():
    n, group, size = 30, 4, SMALL["payload_bytes"]
    swarm = _Swarm(SimConfig(peers=n, group=group, churn_per_hour=0.0, upload_cap=None, **SMALL))
    swarm.run()
    for window in range(1, 4):  # round window-1 is exchanged in this window
        chosen = swarm.canonical[window - 1]
        for peer in swarm.peers.values():
            own = size if peer.id in chosen else 0
            records = n * swarm.c.record_bytes  # everyone announced, everyone read all
            stores = 500 * n if peer in swarm.replicas[window - 1] else 0  # one store RPC per announcer
            assert peer.down_bytes[window] == pytest.approx(group * size - own + records + stores, abs=1.0)
    total_up = sum(sum(p.up_bytes.values()) for p in swarm.peers.values())
    total_down = sum(sum(p.down_bytes.values()) for p in swarm.peers.values())
    assert total_up == pytest.approx(total_down, rel=1e-9)


def test_an_upload_never_runs_past_its_uplink():
    # every 5th peer has a 1 Mbit/s uplink and no cap: it is asked for more than it can send
    config = SimConfig(peers=20, reference_share=0.2, reference_mbit=(1.0, 100.0), upload_cap=None,
                       churn_per_hour=1.0, **SMALL)
    swarm = _Swarm(config)
    reshare = swarm.reshare

    def checked(source, now, **change):
        reshare(source, now, **change)
        assert sum(flow.rate for flow in source.flowing) <= source.up * (1 + 1e-9)

    swarm.reshare = checked
    swarm.run()
    slow = [p for p in swarm.peers.values() if p.reference]
    assert slow and all(p.up == 1e6 / 8 for p in slow)
    for peer in slow:
        served = sum(peer.up_bytes.values()) - sum(peer.dht_serve.values())
        stores = 2500 * config.rounds
        alive = min(peer.left, swarm.horizon + swarm.W) - peer.joined
        assert served - stores <= peer.up * alive


def test_joiners_catch_up_from_holders_and_every_round_completes():
    result = simulate(SimConfig(peers=30, churn_per_hour=1.0, checkpoint_every=4, **{**SMALL, "rounds": 10}))
    assert result.joins > 0 and result.leaves > 0
    assert result.catchup_bytes_mean > 0
    assert all(math.isfinite(r.round_time_s) for r in result.rounds)
    assert 0.5 < result.compute_fraction <= 1.0
