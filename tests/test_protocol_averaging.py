"""combine(): the group's update from untrusted (record, payload) pairs, checked and canonical.

Both aggregation rules ("mean" over every accepted member, "senders" over the members that
kept a coordinate) are checked bit for bit against a slow dense float64 reference, for sparse
and dense codecs, overlapping and disjoint supports, kept zeros, and every arrival order.

    pytest -q tests/test_protocol_averaging.py
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.averaging import GroupMember, combine
from protocol.codecs import HEADER_SIZE, aggregate, decode, encode, parse_codec, parse_payload
from protocol.errors import ConfigError, InputError, MalformedRecord

CODEC = parse_codec("topk-c64-k8-q2")
NUMEL = 300
ROUND = 5
MAX_WEIGHT = 1000.0
BASE = "ab" * 32


def _entries(count: int = 3, seed: int = 0) -> list[tuple[dict, bytes]]:
    generator = torch.Generator().manual_seed(seed)
    entries = []
    for index in range(count):
        payload = encode(CODEC, torch.randn(NUMEL, generator=generator) * (index + 1))
        member = GroupMember.for_payload(peer_id=f"{index:016x}", round=ROUND, weight=16.0 * (index + 1),
                                         codec=CODEC, payload=payload, base_root=BASE)
        entries.append((member.to_wire(), payload))
    return entries


def _combine(entries, clip=0.0):  # 0: the plain mean, whose arithmetic these tests pin
    return combine(entries, codec=CODEC, numel=NUMEL, round=ROUND, max_weight=MAX_WEIGHT, base_root=BASE, clip=clip)


def test_the_update_is_the_weighted_mean_of_the_decoded_payloads_in_peer_id_order():
    entries = _entries()
    group = _combine(entries)
    expected = aggregate([decode(p, CODEC, NUMEL) for _, p in entries], [r["weight"] for r, _ in entries])
    assert torch.equal(group.update, expected)
    assert [m.peer_id for m in group.members] == sorted(r["peer_id"] for r, _ in entries)
    assert group.rejected == ()


def test_every_arrival_order_gives_the_same_bits():
    entries = _entries(4, seed=3)
    reference = _combine(entries).update
    for seed in range(5):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        assert torch.equal(_combine(shuffled).update, reference)


def _tampered(index: int, **changes) -> list[tuple[dict, bytes]]:
    entries = _entries()
    record, payload = entries[index]
    payload = changes.pop("payload", payload)
    entries[index] = ({**record, **changes}, payload)
    return entries


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"round": ROUND + 1}, "sent round 6, not 5"),
        ({"codec": "fp16"}, "used codec 'fp16'"),
        ({"weight": MAX_WEIGHT * 10}, "claims weight 10000, more than 1000"),
        ({"payload_sha256": "0" * 64}, "does not match its sha256"),
        ({"payload": b"short"}, "payload is not the"),
        ({"peer_id": "not hex"}, "group member"),
    ],
)
def test_a_bad_member_is_left_out_by_name(changes, reason):
    entries = _tampered(1, **changes)
    group = _combine(entries)
    assert len(group.members) == 2 and "0000000000000001" not in {m.peer_id for m in group.members}
    assert len(group.rejected) == 1 and reason in group.rejected[0], group.rejected
    kept = [entries[0], entries[2]]
    expected = aggregate([decode(p, CODEC, NUMEL) for _, p in kept], [r["weight"] for r, _ in kept])
    assert torch.equal(group.update, expected)


def test_a_payload_that_fails_decoding_is_left_out():
    entries = _entries()
    record, payload = entries[2]
    broken = bytearray(payload)
    first_scale = HEADER_SIZE + len(CODEC.name)
    broken[first_scale : first_scale + 4] = struct.pack("<f", float("nan"))  # a NaN chunk scale
    forged = GroupMember.for_payload(peer_id=record["peer_id"], round=ROUND, weight=record["weight"], codec=CODEC,
                                     payload=bytes(broken), base_root=BASE)
    entries[2] = (forged.to_wire(), bytes(broken))
    group = _combine(entries)
    assert "0000000000000002" not in {m.peer_id for m in group.members}
    assert len(group.rejected) == 1 and "scale" in group.rejected[0], group.rejected


def test_a_duplicate_peer_id_counts_once():
    entries = _entries()
    group = _combine([*entries, entries[0]])
    assert len(group.members) == 3 and any("twice" in r for r in group.rejected)


def test_no_usable_member_is_an_error():
    with pytest.raises(MalformedRecord, match="no groupmate's payload was usable"):
        _combine([({"round": 1}, b"x")])


def test_a_member_of_another_consensus_is_left_out_and_counted():
    entries = _tampered(2, base_root="cd" * 32)
    group = _combine(entries)
    assert [m.peer_id for m in group.members] == ["0000000000000000", "0000000000000001"]
    assert group.other_bases == ("cd" * 32,) and "holds another consensus" in group.rejected[0]


# ---------------------------------------------------------------------------------------
# Aggregation rules: "mean" and "senders", against a slow dense reference
# ---------------------------------------------------------------------------------------


def _group(codec, vectors: list[torch.Tensor], weights: list[float], peers: list[int] | None = None):
    """(record, payload) entries of ``vectors`` encoded with ``codec``, by peer id and weight."""
    peers = peers if peers is not None else list(range(len(vectors)))
    entries = []
    for peer, x, weight in zip(peers, vectors, weights, strict=True):
        payload = encode(codec, x)
        member = GroupMember.for_payload(peer_id=f"{peer:016x}", round=ROUND, weight=weight, codec=codec,
                                         payload=payload, base_root=BASE)
        entries.append((member.to_wire(), payload))
    return entries


def _combine_as(entries, codec, numel, aggregation):
    return combine(entries, codec=codec, numel=numel, round=ROUND, max_weight=float("inf"), base_root=BASE,
                   aggregation=aggregation, clip=0.0)


def reference_update(entries, codec, numel: int, aggregation: str) -> tuple[torch.Tensor, int]:
    """The rule written out densely: members by ascending peer id, per coordinate float64
    ``sum += float64(x) * w`` and ``weight += w`` over the members that list it ("senders") or
    all members ("mean"); float32(sum / weight), 0 where no member lists the coordinate."""
    members = sorted(entries, key=lambda entry: entry[0]["peer_id"])
    sums, senders = np.zeros(numel), np.zeros(numel)
    listed = np.zeros(numel, dtype=bool)
    total = 0.0
    for record, payload in members:
        weight = record["weight"]
        total += weight
        for positions, values in parse_payload(payload, codec, numel).entries():
            for position, value in zip(positions.tolist(), values.tolist(), strict=True):
                sums[position] += value * weight
                senders[position] += weight
                listed[position] = True
    out = np.zeros(numel, dtype=np.float32)
    divisor = senders if aggregation == "senders" else np.full(numel, total)
    out[listed] = sums[listed] / divisor[listed]
    return torch.from_numpy(out), int(listed.sum())


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32)


@st.composite
def groups(draw):
    """A codec (sparse or dense), a vector size and 1-4 members' vectors and weights: random,
    rounded or mostly zero vectors, so supports overlap in part and kept entries may be 0."""
    name = draw(st.sampled_from(["topk-c64-k4-q2", "topk-c64-k5-s2", "topk-c128-k3-f32", "bmax-c64-b8-s2",
                                 "bmax-c64-b4-f32", "bmax-c128-b2-s1", "int8-b16", "fp16"]))  # fmt: skip
    numel = draw(st.integers(0, 700) | st.sampled_from([1, 63, 64, 65, 127, 129]))
    vectors, weights = [], []
    for _ in range(draw(st.integers(1, 4))):
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        x = torch.randn(numel, generator=generator)
        if draw(st.booleans()):
            x = torch.round(x)
        x[torch.rand(numel, generator=generator) < draw(st.sampled_from([0.0, 0.5, 0.99]))] = 0.0
        vectors.append(x * draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3])))
        weights.append(draw(st.floats(1e-3, 1e6) | st.sampled_from([1.0, 3.0, 1e-300, 1e300])))
    peers = draw(st.permutations(range(len(vectors))))
    return parse_codec(name), numel, vectors, weights, list(peers)


@settings(max_examples=150, deadline=None)
@given(group=groups(), aggregation=st.sampled_from(["mean", "senders"]))
def test_both_rules_match_the_dense_reference_bit_for_bit(group, aggregation):
    codec, numel, vectors, weights, peers = group
    entries = _group(codec, vectors, weights, peers)
    result = _combine_as(entries, codec, numel, aggregation)
    expected, touched = reference_update(entries, codec, numel, aggregation)
    assert result.update.dtype == torch.float32 and result.update.shape == (numel,)
    assert torch.equal(_bits(result.update), _bits(expected))
    assert result.touched == touched
    if aggregation == "mean":  # the rule of codecs.aggregate over the decoded vectors
        ordered = sorted(entries, key=lambda entry: entry[0]["peer_id"])
        decoded = [decode(payload, codec, numel) for _, payload in ordered]
        weights_in_order = [record["weight"] for record, _ in ordered]
        assert torch.equal(_bits(result.update), _bits(aggregate(decoded, weights_in_order)))
    if not codec.sparse:  # every member lists every coordinate: both rules agree
        assert result.touched == numel
        assert torch.equal(_bits(result.update), _bits(_combine_as(entries, codec, numel, "mean").update))


@pytest.mark.parametrize("aggregation", ["mean", "senders"])
def test_disjoint_supports(aggregation):
    codec = parse_codec("topk-c64-k4-f32")
    vectors = []
    for member in range(3):  # member m's 4 largest in every chunk sit at 4m .. 4m + 3
        x = torch.zeros(640)
        x.view(10, 64)[:, 4 * member : 4 * member + 4] = float(member + 1)
        vectors.append(x)
    group = _combine_as(_group(codec, vectors, [1.0, 2.0, 5.0]), codec, 640, aggregation)
    chunk = group.update.view(10, 64)[0]
    if aggregation == "senders":  # each coordinate has one sender: its own value, exactly
        assert chunk[:12].tolist() == [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    else:
        assert chunk[:12].tolist() == [float(np.float32(1 / 8))] * 4 + [0.5] * 4 + [float(np.float32(15 / 8))] * 4
    assert not chunk[12:].any() and group.touched == 120


def test_a_kept_zero_counts_as_a_sender():
    codec = parse_codec("bmax-c64-b8-f32")
    silent, loud, absent = torch.zeros(64), torch.zeros(64), torch.zeros(64)
    loud[0] = 6.0  # member 1 keeps 6.0 at 0; member 0 keeps its 0.0 there (first of its block)
    absent[0], absent[1] = 0.0, 1.0  # member 2 keeps position 1 of that block, not 0
    entries = _group(codec, [silent, loud, absent], [1.0, 2.0, 3.0])
    senders = _combine_as(entries, codec, 64, "senders").update
    mean = _combine_as(entries, codec, 64, "mean").update
    assert senders[0] == float(np.float32(12.0 / 3.0))  # (0 x 1 + 6 x 2) / (1 + 2)
    assert mean[0] == float(np.float32(12.0 / 6.0))  # / (1 + 2 + 3)
    assert senders[1] == 1.0 and mean[1] == float(np.float32(3.0 / 6.0))


@pytest.mark.parametrize("name", ["bmax-c64-b8-s2", "topk-c64-k8-s2", "topk-c64-k8-q2", "int8-b16"])
@pytest.mark.parametrize("aggregation", ["mean", "senders"])
def test_every_arrival_order_gives_the_same_bits_under_both_rules(name, aggregation):
    codec = parse_codec(name)
    generator = torch.Generator().manual_seed(6)
    vectors = [torch.randn(3000, generator=generator) * (i + 1) for i in range(4)]
    entries = _group(codec, vectors, [3.0, 1.0, 0.25, 7.0], peers=[8, 3, 5, 1])
    reference = _combine_as(entries, codec, 3000, aggregation)
    for seed in range(4):
        shuffled = entries[:]
        random.Random(seed).shuffle(shuffled)
        again = _combine_as(shuffled, codec, 3000, aggregation)
        assert torch.equal(_bits(again.update), _bits(reference.update)) and again.touched == reference.touched


@pytest.mark.parametrize("aggregation", ["mean", "senders"])
def test_windows_of_a_long_vector(monkeypatch, aggregation):
    from protocol import codec_core

    monkeypatch.setattr(codec_core, "SLICE", 1024)  # many windows, the last one short,
    monkeypatch.setattr(codec_core, "SUM_SLICE", 256)  # each summed in spans of 256
    codec = parse_codec("bmax-c256-b16-s2")
    generator = torch.Generator().manual_seed(2)
    entries = _group(codec, [torch.randn(5000, generator=generator) for _ in range(3)], [1.0, 2.0, 4.0])
    expected, touched = reference_update(entries, codec, 5000, aggregation)
    group = _combine_as(entries, codec, 5000, aggregation)
    assert torch.equal(_bits(group.update), _bits(expected)) and group.touched == touched


def test_an_unknown_rule_is_refused():
    with pytest.raises(ConfigError, match="aggregation 'median'"):
        _combine_as(_entries(), CODEC, NUMEL, "median")


@pytest.mark.parametrize("name", ["bmax-c64-b8-s2", "fp16"])
def test_weights_that_overflow_are_an_input_error(name):
    codec = parse_codec(name)
    entries = _group(codec, [torch.ones(100), torch.ones(100)], [1e308, 1e308])
    with pytest.raises(InputError):
        _combine_as(entries, codec, 100, "senders")
