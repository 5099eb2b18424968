"""protocol.policy and combine's robust rule: one test per hostile input, no network."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from coordinator.tracker import Tracker
from peer.progress import SwarmView
from peer.state import RoundState, outer_step
from protocol.averaging import GroupMember, combine, payload_norm
from protocol.codecs import encode, parse_codec, parse_payload
from protocol.consensus import RoundClock
from protocol.multiaddr import libp2p_id_of
from protocol.policy import (
    CLOCK_SKEW,
    MAX_PARAMETER,
    MAX_SAMPLES,
    clip_scales,
    dht_record_problem,
    plausible_samples,
    progress_problem,
    quorum_state,
    state_problem,
    swarm_round,
)
from protocol.records import PeerProgress, RoundAnnouncement
from protocol.signing import SigningKey, key_id

NOW = 1_800_000_000.0
CLOCK = RoundClock(start=NOW - 800.0, seconds=8.0, settle=1.5)  # round 100 is open at NOW
KEYS = [SigningKey.generate() for _ in range(6)]
RUN = "0123456789abcdef"
ROOT_A, ROOT_B = "aa" * 32, "bb" * 32


def progress(key: SigningKey, *, round_: int = 100, root: str = ROOT_A, time_: float = NOW, samples: int = 100,
             p2p: str | None = None) -> PeerProgress:
    return PeerProgress.signed(
        key, run_id=RUN, round=round_, samples=samples, loss=3.0, samples_per_second=10.0, averaged_with=4,
        averaged=True, network_seconds=0.5, state_root=root, p2p_id=p2p or libp2p_id_of(key.public_key_hex),
        maddrs=[], time=time_,
    )


# --- bounded records


def test_a_record_signed_in_the_future_is_not_believed():
    assert progress_problem(progress(KEYS[0], time_=NOW + CLOCK_SKEW - 1), now=NOW, clock=CLOCK) is None
    problem = progress_problem(progress(KEYS[0], time_=NOW + 3600), now=NOW, clock=CLOCK)
    assert problem is not None and "future" in problem


@pytest.mark.parametrize("claimed", [10**9, 2**63 - 1, 110])
def test_a_round_beyond_the_runs_clock_is_not_believed(claimed):
    assert progress_problem(progress(KEYS[0], round_=101), now=NOW, clock=CLOCK) is None  # at the boundary
    problem = progress_problem(progress(KEYS[0], round_=claimed), now=NOW, clock=CLOCK)
    assert problem is not None and f"claims round {claimed}" in problem


def test_samples_are_clamped_to_what_the_rounds_hold_and_never_overflow():
    assert plausible_samples(progress(KEYS[0], round_=3, samples=10**6), samples_per_round=100) == 400
    assert plausible_samples(progress(KEYS[0], round_=3, samples=250), samples_per_round=100) == 250
    huge = progress(KEYS[0], round_=2**40, samples=2**64 - 1)
    assert plausible_samples(huge, samples_per_round=2**30) == MAX_SAMPLES


def test_the_swarm_round_is_a_median_that_one_forged_record_cannot_move():
    honest = [progress(k, round_=100) for k in KEYS[:4]]
    forged = progress(KEYS[4], round_=10**9)
    assert swarm_round([*honest, forged]) == 100
    assert swarm_round([]) == -1


# --- quorum state


def test_the_quorum_state_is_the_majoritys_and_only_its_vouchers_are_donors():
    honest = [progress(k, round_=100, root=ROOT_A) for k in KEYS[:3]]
    hostile = progress(KEYS[3], round_=101, root=ROOT_B)  # a higher round does not win by itself
    quorum = quorum_state([*honest, hostile])
    assert quorum is not None and (quorum.round, quorum.root, quorum.vouchers) == (100, ROOT_A, 3)
    assert set(quorum.donors) == {r.p2p_id for r in honest}
    assert hostile.p2p_id not in quorum.donors


def test_no_quorum_without_a_majority_and_one_libp2p_id_vouches_once():
    split = [progress(KEYS[0], root=ROOT_A), progress(KEYS[1], root=ROOT_B)]
    assert quorum_state(split) is None
    # three keys behind one libp2p id: one voice, so the two honest peers are the majority
    sybils = [progress(k, root=ROOT_B, p2p="p2p-sybil") for k in KEYS[:3]]
    honest = [progress(k, root=ROOT_A) for k in KEYS[3:5]]
    quorum = quorum_state([*sybils, *honest])
    assert quorum is not None and quorum.root == ROOT_A


def test_peers_asked_that_did_not_answer_do_not_vouch():
    one = [progress(KEYS[0], root=ROOT_A)]
    assert quorum_state(one, asked=3) is None  # one answer of three asked: no majority
    assert quorum_state(one, asked=1) is not None  # the only peer asked (a swarm of two)
    two = [progress(k, root=ROOT_A) for k in KEYS[:2]]
    assert quorum_state(two, asked=3) is not None and quorum_state(two, asked=4) is None


def test_the_reader_does_not_vouch_for_itself():
    own = progress(KEYS[0], root=ROOT_B)
    others = [progress(k, root=ROOT_A) for k in KEYS[1:3]]
    quorum = quorum_state([own, *others], exclude=key_id(KEYS[0].public_key_hex))
    assert quorum is not None and quorum.root == ROOT_A and quorum.vouchers == 2


@pytest.mark.parametrize(("poison", "needle"), [(float("nan"), "not finite"), (float("inf"), "not finite"),
                                                (1e38, "magnitude"), (-2 * MAX_PARAMETER, "magnitude")])
def test_a_poisoned_state_is_refused(poison, needle):
    parameters, momentum = torch.randn(64), torch.zeros(64)
    assert state_problem(parameters, momentum) is None
    parameters[7] = poison
    problem = state_problem(parameters, momentum)
    assert problem is not None and needle in problem
    assert state_problem(momentum, parameters) is not None  # the momentum is checked too


def test_an_outer_step_that_would_poison_the_state_voids_the_round():
    state = RoundState(5, torch.ones(32), torch.zeros(32))
    honest = outer_step(state, torch.full((32,), 0.01), lr=0.7, momentum=0.9, nesterov=True)
    assert honest.round == 6 and not torch.equal(honest.parameters, state.parameters) and honest.void is None
    for update in (torch.full((32,), 1e30), torch.full((32,), float("nan"))):
        voided = outer_step(state, update, lr=0.7, momentum=0.9, nesterov=True)
        assert voided.round == 6 and voided.void is not None  # said, so the peer reports a void round
        assert torch.equal(voided.parameters, state.parameters) and torch.equal(voided.momentum, state.momentum)


# --- robust aggregation


def test_clip_scales_bring_every_norm_down_to_the_ceiling():
    scales = clip_scales([1.0, 2.0, 3.0, 2000.0], ratio=2.0)  # lower median 2: ceiling 4
    assert scales[:3] == [1.0, 1.0, 1.0]
    assert 0 < scales[3] <= 4.0 / 2000.0 and 2000.0 * scales[3] > 4.0 * (1 - 1e-3)  # rounded down to 2**-20
    assert clip_scales([1.0, 2000.0], ratio=0.0) == [1.0, 1.0]
    assert clip_scales([1.0, 1.0, math.inf], ratio=2.0)[2] == 0.0
    assert clip_scales([], ratio=2.0) == []


CODEC = parse_codec("fp16")
NUMEL, BASE = 512, "ab" * 32


def _entry(index: int, vector: torch.Tensor, weight: float = 100.0):
    payload = encode(CODEC, vector)
    member = GroupMember.for_payload(peer_id=f"{index:016x}", round=3, weight=weight, codec=CODEC, payload=payload,
                                     base_root=BASE)
    return member.to_wire(), payload


def _honest(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    direction = torch.randn(NUMEL, generator=generator)
    return [direction + 0.3 * torch.randn(NUMEL, generator=generator) for _ in range(count)]


def _update(vectors, clip=2.0) -> torch.Tensor:
    entries = [_entry(i, v) for i, v in enumerate(vectors)]
    return combine(entries, codec=CODEC, numel=NUMEL, round=3, max_weight=1e6, base_root=BASE, clip=clip).update


@pytest.mark.parametrize("attack", ["scale", "flip", "noise"])
def test_one_hostile_payload_of_five_cannot_move_the_update_far(attack):
    honest = _honest(4)
    clean = _update(honest)
    norm = float(honest[0].norm())
    hostile = {"scale": honest[0] * 1000, "flip": -honest[0] * 1000,
               "noise": torch.randn(NUMEL, generator=torch.Generator().manual_seed(9)) * norm * 1000 / math.sqrt(NUMEL)}
    attacked = _update([*honest, hostile[attack]])
    unclipped = _update([*honest, hostile[attack]], clip=0.0)
    # clipped: the hostile member weighs at most CLIP_RATIO honest norms among five
    assert float((attacked - clean).norm()) < 0.8 * float(clean.norm())
    # the same payload without the rule drags the update by hundreds of honest norms: the check can fail
    assert float((unclipped - clean).norm()) > 50 * float(clean.norm())
    cosine = float(torch.nn.functional.cosine_similarity(attacked, clean, dim=0))
    assert cosine > 0.6, cosine


def test_payloads_of_equal_norms_are_not_clipped_and_the_mean_is_plain():
    base = _honest(1)[0]
    generator = torch.Generator().manual_seed(4)
    # sign flips of one vector: the same squares in the same order, so exactly the same norm
    vectors = [base * (torch.randint(0, 2, (NUMEL,), generator=generator) * 2 - 1) for _ in range(5)]
    entries = [_entry(i, v) for i, v in enumerate(vectors)]
    group = combine(entries, codec=CODEC, numel=NUMEL, round=3, max_weight=1e6, base_root=BASE)
    assert group.scales == (1.0,) * 5
    assert torch.equal(group.update, _update(vectors, clip=0.0))


def test_at_the_default_ratio_payloads_above_the_median_norm_are_brought_down_to_it():
    honest = _honest(5)
    entries = [_entry(i, v) for i, v in enumerate(honest)]
    group = combine(entries, codec=CODEC, numel=NUMEL, round=3, max_weight=1e6, base_root=BASE)
    norms = [float(payload_norm(parse_payload(p, CODEC, NUMEL))) for _, p in entries]
    median = sorted(norms)[2]
    for norm, scale in zip(norms, group.scales, strict=True):
        assert (scale == 1.0) == (norm <= median)
        if scale < 1.0:  # brought down to the median, the factor rounded down to 2**-20
            assert median * (1 - 1e-5) < norm * scale <= median * (1 + 1e-9)
    assert sum(scale < 1.0 for scale in group.scales) == 2


def test_the_clipped_update_is_the_same_bits_in_any_order():
    vectors = [*_honest(4), _honest(1)[0] * 777]
    entries = [_entry(i, v) for i, v in enumerate(vectors)]
    first = combine(entries, codec=CODEC, numel=NUMEL, round=3, max_weight=1e6, base_root=BASE)
    again = combine(entries[::-1], codec=CODEC, numel=NUMEL, round=3, max_weight=1e6, base_root=BASE)
    assert torch.equal(first.update, again.update) and first.scales == again.scales and first.scales[-1] < 1.0


# --- DHT records


def _announcement(key: SigningKey) -> RoundAnnouncement:
    return RoundAnnouncement.signed(key, run_id=RUN, round=3, weight=100.0, codec="fp32", payload_size=10,
                                    payload_sha256=hashlib.sha256(b"x").hexdigest(), base_root=BASE, loss=1.0,
                                    p2p_id=libp2p_id_of(key.public_key_hex), time=NOW)


def test_a_record_naming_another_peers_libp2p_id_is_not_believed():
    spoofed = progress(KEYS[0], p2p=libp2p_id_of(KEYS[1].public_key_hex))
    problem = progress_problem(spoofed, now=NOW, clock=CLOCK)
    assert problem is not None and "names libp2p id" in problem
    own = key_id(KEYS[0].public_key_hex)
    assert "names libp2p id" in dht_record_problem(own, spoofed.to_bytes(), NOW + 100, NOW)
    assert libp2p_id_of("ab" * 32) == "12D3KooWMNViDdDTJu4EGNHDDgXTXV4HEV24CZUhWNLELypLeusp"  # base58 of the multihash


def test_the_dht_keeps_only_signed_records_under_their_signers_id_for_a_bounded_time():
    record, announcement = progress(KEYS[0]), _announcement(KEYS[0])  # both signed at NOW
    own = key_id(KEYS[0].public_key_hex)
    assert dht_record_problem(own, record.to_bytes(), NOW + 120, NOW) is None
    assert dht_record_problem(own, announcement.to_bytes(), NOW + 600, NOW) is None
    assert "subkey" in dht_record_problem(key_id(KEYS[1].public_key_hex), record.to_bytes(), NOW + 100, NOW)
    assert "kept" in dht_record_problem(own, record.to_bytes(), NOW + 10**7, NOW)
    # an old record re-stored with a fresh expiry: refused, and the same on a reader whose clock
    # runs a minute behind (the bound is from the signed time, not the reader's clock)
    assert "signed at" in dht_record_problem(own, record.to_bytes(), NOW + 1000, NOW + 900)
    assert dht_record_problem(own, record.to_bytes(), NOW + 140, NOW - 60) is None
    assert "not a valid signed record" in dht_record_problem(own, b"\x81\xa1x\x01", NOW + 100, NOW)
    assert dht_record_problem(own, 12345, NOW + 100, NOW) == "not bytes"
    tampered = bytearray(record.to_bytes())
    tampered[-3] ^= 1
    assert dht_record_problem(own, bytes(tampered), NOW + 100, NOW) is not None
    assert "not a valid signed record" in dht_record_problem(None, record.to_bytes(), NOW + 100, NOW)  # not a manifest


# --- the coordinator's tracker


def test_a_forged_far_future_record_does_not_move_the_trackers_round_or_liveness():
    tracker = Tracker(RUN, samples_per_round=100)
    honest = {key_id(k.public_key_hex): progress(k, round_=100, time_=NOW - 5) for k in KEYS[:3]}
    tracker.update(SwarmView(honest, 0, NOW))
    forged = progress(KEYS[3], round_=101, time_=NOW - 5, samples=2**63)
    tracker.update(SwarmView({forged.peer_id: forged}, 0, NOW))
    assert tracker.global_round == 100
    assert tracker.totals[forged.peer_id] == 102 * 100  # clamped to the rounds it could have done
    # liveness is judged by arrival: a record read long ago is gone, whatever time it claims
    assert len(tracker.alive(now=NOW + 1)) == 4
    assert tracker.alive(now=NOW + 10_000) == []


# --- transport


def test_a_stream_message_longer_than_the_cap_is_refused_before_it_is_read():
    import asyncio

    from hivemind.p2p import P2P

    import peer.swarm  # noqa: F401  (installs the cap)
    from peer.transport_caps import MAX_STREAM_MESSAGE, StreamMessageTooLarge, receive_capped

    assert P2P.receive_raw_data is receive_capped

    async def read(length: int, body: bytes) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body)
        reader.feed_eof()
        return await P2P.receive_raw_data(reader)

    assert asyncio.run(read(5, b"hello")) == b"hello"
    with pytest.raises(StreamMessageTooLarge):
        asyncio.run(read(2**63, b"x" * 16))  # a reader without the cap would wait for 2**63 bytes
    with pytest.raises(StreamMessageTooLarge):
        asyncio.run(read(MAX_STREAM_MESSAGE + 1, b""))


# --- the coordinator serves recorded checkpoints only


def test_a_checkpoint_folder_not_in_the_ledger_is_never_served(tmp_path):
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from coordinator.http import HttpView, build_app

    for folder in ("r000004", "r000008"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "model.safetensors").write_bytes(b"weights of " + folder.encode())
    view = HttpView(manifest_bytes=b"", manifest_json={}, public_key_pem=b"", checkpoints=tmp_path,
                    ledger_jsonl=lambda: "", status=dict, bootstrap=list, recorded=lambda folder: folder == "r000004")

    async def fetch() -> tuple[int, bytes, int]:
        async with TestClient(TestServer(build_app(view))) as client:
            recorded = await client.get("/checkpoints/r000004/model.safetensors")
            body = await recorded.read()
            unrecorded = await client.get("/checkpoints/r000008/model.safetensors")
            return recorded.status, body, unrecorded.status

    status, body, unrecorded = asyncio.run(fetch())
    assert (status, body) == (200, b"weights of r000004")
    assert unrecorded == 404  # written (a checkpoint in the making) but not in the ledger
