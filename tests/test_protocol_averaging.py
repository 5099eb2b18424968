"""combine(): the group's update from untrusted (record, payload) pairs, checked and canonical."""

from __future__ import annotations

import random
import struct

import pytest
import torch

from protocol.averaging import GroupMember, combine
from protocol.codecs import HEADER_SIZE, aggregate, decode, encode, parse_codec
from protocol.errors import MalformedRecord

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


def _combine(entries):
    return combine(entries, codec=CODEC, numel=NUMEL, round=ROUND, max_weight=MAX_WEIGHT, base_root=BASE)


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
