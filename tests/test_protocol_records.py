"""Wire codec, Ed25519 signing and the signed records (PeerProgress, LedgerEntry).

Known-answer vectors pin the canonical msgpack encoding and the signatures; hypothesis
checks round trips and that malformed bytes always raise ``MalformedRecord``.

    pytest -q tests/test_protocol_records.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import InputError, MalformedRecord, SignatureError
from protocol.records import Contribution, FileRecord, LedgerEntry, PeerProgress
from protocol.signing import SigningKey, key_id, public_key_from_pem, public_key_to_pem, verify_signature
from protocol.wire import MAX_RECORD_BYTES, canonical_bytes, decode_map

HEX = "0123456789abcdef"
PEER_SEED = bytes(range(32, 64))
OTHER_SEED = bytes([0xA5] * 32)


def key_from_seed(seed: bytes) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


PEER_KEY = key_from_seed(PEER_SEED)
OTHER_KEY = key_from_seed(OTHER_SEED)


def progress_fields(**overrides) -> dict:
    fields = dict(
        run_id="0123456789abcdef",
        round=7,
        samples=1120,
        loss=2.5,
        samples_per_second=123.25,
        averaged_with=3,
        averaged=True,
        network_seconds=0.75,
        state_root="ab" * 32,
        p2p_id="12D3KooWExamplePeer",
        maddrs=["/ip4/127.0.0.1/tcp/4001"],
        time=1700000000.5,
    )
    fields.update(overrides)
    return fields


def signed_progress(**overrides) -> PeerProgress:
    return PeerProgress.signed(PEER_KEY, **progress_fields(**overrides))


def signed_entry(key: SigningKey = PEER_KEY, **overrides) -> LedgerEntry:
    fields = dict(
        run_id="0123456789abcdef",
        seq=1,
        kind="checkpoint",
        prev="11" * 32,
        round=5,
        created_at=1700000100.25,
        checkpoint_root="22" * 32,
        files=[
            FileRecord(name="model.safetensors", sha256="33" * 32, size=1024, root="22" * 32, tensors={"w": "44" * 32})
        ],
        contributors=[Contribution(peer_id="00000000000000aa", samples=10)],
        total_samples=10,
        heldout_loss=3.5,
    )
    fields.update(overrides)
    return LedgerEntry.signed(key, **fields)


# ---------------------------------------------------------------------------------------
# Canonical encoding: known answers
# ---------------------------------------------------------------------------------------

CANONICAL_KAT_RECORD = {"b": 1, "é": {"z": 0.25, "y": ""}, "a": [True, None, -1, 1.5, "ü"], "aa": 2**40}
CANONICAL_KAT_HEX = (
    "84a16195c3c0ffcb3ff8000000000000a2c3bca26161cf0000010000000000a16201a2c3a982a179a0a17acb3fd0000000000000"
)


def test_canonical_bytes_known_answer():
    assert canonical_bytes(CANONICAL_KAT_RECORD).hex() == CANONICAL_KAT_HEX


def test_canonical_bytes_small_maps_by_hand():
    assert canonical_bytes({"a": 1}).hex() == "81a16101"
    # Floats are always float64 (0xcb), even when float32 would hold them exactly.
    assert canonical_bytes({"x": 1.0}).hex() == "81a178cb3ff0000000000000"
    # Keys sort by UTF-8 bytes: "B" (0x42) < "a" (0x61) < "aa" < "é" (0xc3 0xa9).
    assert canonical_bytes({"é": 0, "aa": 0, "a": 0, "B": 0}).hex() == "84a14200a16100a2616100a2c3a900"


@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.text(max_size=6), min_size=1, max_size=8, unique=True), data=st.data())
def test_canonical_bytes_ignores_insertion_order(keys, data):
    record = {key: i for i, key in enumerate(keys)}
    shuffled = data.draw(st.permutations(keys))
    assert canonical_bytes({key: record[key] for key in shuffled}) == canonical_bytes(record)
    decoded = msgpack.unpackb(canonical_bytes(record), raw=False)
    assert [key.encode("utf-8") for key in decoded] == sorted(key.encode("utf-8") for key in keys)


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        b"bytes",
        {1, 2},
        2**64,
        -(2**63) - 1,
        "\ud800",
        {"\ud800": 1},
        {1: "int key"},
        object(),
    ],
)
def test_canonical_bytes_refuses_what_is_not_in_the_data_model(value):
    with pytest.raises(MalformedRecord):
        canonical_bytes({"field": value})


def test_canonical_bytes_accepts_the_ends_of_the_integer_range():
    for value in (2**64 - 1, -(2**63)):
        assert msgpack.unpackb(canonical_bytes({"n": value}))["n"] == value


# ---------------------------------------------------------------------------------------
# Ed25519: known answers
# ---------------------------------------------------------------------------------------

# RFC 8032, section 7.1, TEST 1 and TEST 2.
RFC8032 = [
    (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        b"",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        b"\x72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
]


@pytest.mark.parametrize(("seed", "public", "message", "signature"), RFC8032)
def test_ed25519_rfc8032_vectors(seed, public, message, signature):
    key = key_from_seed(bytes.fromhex(seed))
    assert key.public_key_hex == public
    assert key.sign(message) == signature
    verify_signature(public, message, signature, what="rfc8032")


FIXED_SEED = bytes(range(32))
FIXED_PUBLIC = "03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
FIXED_SIGNATURE = "995580a4c1dfaa59bfdec690c54f5d81f9a223da7a000bedc61da4dcfa61344cf14527d64e1d31f98d9c4912e2385843a7232e230a873aa00e20622406b23708"


def test_fixed_key_signs_a_fixed_message_deterministically():
    key = key_from_seed(FIXED_SEED)
    assert key.public_key_hex == FIXED_PUBLIC
    assert key.sign(b"barnraise") == FIXED_SIGNATURE
    assert key.sign(b"barnraise") == FIXED_SIGNATURE
    assert key_id(FIXED_PUBLIC) == hashlib.sha256(bytes.fromhex(FIXED_PUBLIC)).hexdigest()[:16]


def test_pem_round_trip():
    key = key_from_seed(FIXED_SEED)
    again = SigningKey.from_pem(key.to_pem())
    assert again.public_key_hex == key.public_key_hex
    pem = public_key_to_pem(key.public_key_hex)
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert public_key_from_pem(pem) == key.public_key_hex
    assert public_key_from_pem(key.public_key_hex.encode() + b"\n") == key.public_key_hex


@pytest.mark.parametrize("pem", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_bad_pem_is_an_input_error(pem):
    with pytest.raises(InputError):
        SigningKey.from_pem(pem)
    with pytest.raises(InputError):
        public_key_from_pem(pem)


def test_verify_signature_refusals_are_signature_errors():
    key = key_from_seed(FIXED_SEED)
    message = b"barnraise"
    signature = key.sign(message)
    good_key = key.public_key_hex
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    cases = [
        (good_key, message + b"!", signature),
        (good_key, message, flipped),
        (OTHER_KEY.public_key_hex, message, signature),
        (good_key, message, signature.upper()),
        (good_key, message, signature[:-2]),
        (good_key, message, "zz" * 64),
        (good_key.upper(), message, signature),
        (good_key[:-2], message, signature),
    ]
    for public, text, sig in cases:
        with pytest.raises(SignatureError, match="^thing: "):
            verify_signature(public, text, sig, what="thing")


# ---------------------------------------------------------------------------------------
# PeerProgress
# ---------------------------------------------------------------------------------------

PROGRESS_SIGNATURE = "80c863de1847cda3b8fc8fdf51252a943cf8971af22c332c99c980f440a90d71e0d4620c0aa290d6cbbaf5316b675c65b160e5751d5993b09cc328eb9617a20f"
PROGRESS_BYTES_SHA256 = "9be86b49cc872d1197e73da7a851c2f70aa77c8df315e1ef8375f1d72ce47cc9"


def test_peer_progress_known_answer():
    progress = signed_progress()
    assert progress.peer_key == PEER_KEY.public_key_hex
    assert progress.peer_id == key_id(PEER_KEY.public_key_hex)
    assert progress.signature == PROGRESS_SIGNATURE
    assert hashlib.sha256(progress.to_bytes()).hexdigest() == PROGRESS_BYTES_SHA256


def test_peer_progress_signature_covers_canonical_bytes_without_signature():
    progress = signed_progress()
    wire = progress.to_wire()
    assert wire["signature"] == progress.signature
    del wire["signature"]
    verify_signature(progress.peer_key, canonical_bytes(wire), progress.signature, what="progress")
    assert progress.verify() is progress


def hex_str(n: int) -> st.SearchStrategy[str]:
    return st.text(alphabet=HEX, min_size=n, max_size=n)


finite = st.floats(min_value=0.0, max_value=1e300, allow_nan=False, allow_infinity=False)
wire_uint = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def progress_overrides(draw):
    averaged_with = draw(st.integers(min_value=1, max_value=4096))
    return dict(
        run_id=draw(hex_str(16)),
        round=draw(wire_uint),
        samples=draw(wire_uint),
        loss=draw(finite),
        samples_per_second=draw(finite),
        averaged_with=averaged_with,
        averaged=averaged_with >= 2,
        network_seconds=draw(finite),
        state_root=draw(hex_str(64)),
        p2p_id=draw(st.text(min_size=1, max_size=128)),
        maddrs=draw(st.lists(st.text(min_size=1, max_size=64), max_size=16)),
        time=draw(finite | st.integers(min_value=0, max_value=2**53)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=progress_overrides())
def test_peer_progress_round_trips_and_still_verifies(overrides):
    progress = PeerProgress.signed(PEER_KEY, **progress_fields(**overrides))
    again = PeerProgress.from_bytes(progress.to_bytes())
    assert again == progress
    assert again.to_bytes() == progress.to_bytes()
    again.verify()


def test_float_field_built_from_an_int_signs_as_float64():
    progress = signed_progress(time=5, loss=0)
    assert PeerProgress.from_bytes(progress.to_bytes()).verify().time == 5.0
    assert b"\xa4time\xcb" + struct.pack(">d", 5.0) in progress.to_bytes()


@pytest.mark.parametrize(
    "field",
    [f.name for f in PeerProgress.FIELDS if f.name not in ("version", "signature", "peer_id", "peer_key")],
)
def test_peer_progress_any_edited_field_breaks_the_signature(field):
    progress = signed_progress()
    wire = progress.to_wire()
    wire[field] = {
        "run_id": "f" * 16,
        "round": 8,
        "samples": 1121,
        "loss": 2.25,
        "samples_per_second": 1.0,
        "averaged_with": 2,
        "averaged": False,
        "network_seconds": 0.5,
        "state_root": "cd" * 32,
        "p2p_id": "12D3KooWOther",
        "maddrs": [],
        "time": 1700000001.0,
    }[field]
    if field == "averaged":
        wire["averaged_with"] = 1
    edited = PeerProgress.from_bytes(canonical_bytes(wire))
    with pytest.raises(SignatureError, match="peer progress"):
        edited.verify()


def test_peer_progress_signed_by_another_key_does_not_verify():
    progress = signed_progress()
    forged = dataclasses.replace(
        progress,
        signature=OTHER_KEY.sign(canonical_bytes(progress.unsigned_wire())),
    )
    with pytest.raises(SignatureError):
        forged.verify()
    wire = progress.to_wire()
    wire["peer_key"] = OTHER_KEY.public_key_hex
    wire["peer_id"] = key_id(OTHER_KEY.public_key_hex)
    with pytest.raises(SignatureError):
        PeerProgress.from_wire(wire).verify()


# ---------------------------------------------------------------------------------------
# Malformed input: always MalformedRecord (an InputError), never a bare exception
# ---------------------------------------------------------------------------------------


def _progress_wire() -> dict:
    return signed_progress().to_wire()


def _entry_wire() -> dict:
    return signed_entry().to_wire()


def _raises_malformed(decode, raw) -> MalformedRecord:
    with pytest.raises(MalformedRecord) as caught:
        decode(raw)
    assert isinstance(caught.value, InputError)
    return caught.value


@pytest.mark.parametrize("cls", [PeerProgress, LedgerEntry])
def test_every_truncation_is_malformed(cls):
    raw = (signed_progress() if cls is PeerProgress else signed_entry()).to_bytes()
    for cut in range(len(raw)):
        _raises_malformed(cls.from_bytes, raw[:cut])


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_malformed(raw):
    for cls in (PeerProgress, LedgerEntry):
        try:
            cls.from_bytes(raw)
        except MalformedRecord:
            pass


def test_oversize_input_is_refused_before_decoding():
    raw = msgpack.packb({"pad": "x" * MAX_RECORD_BYTES})
    error = _raises_malformed(PeerProgress.from_bytes, raw)
    assert "exceeds the limit" in str(error)


@pytest.mark.parametrize("raw", [b"\x92\x01\x02", b"\xa3abc", b"\x01", b"\xc0", b"\x81\xa1a\x01\x01"])
def test_not_a_single_map_is_malformed(raw):
    _raises_malformed(PeerProgress.from_bytes, raw)


@pytest.mark.parametrize("value", [None, "bytes", 3, ["list"]])
def test_non_bytes_input_is_malformed(value):
    with pytest.raises(MalformedRecord, match="expected bytes"):
        decode_map(value, what="x")


@pytest.mark.parametrize(("make", "cls"), [(_progress_wire, PeerProgress), (_entry_wire, LedgerEntry)])
def test_wrong_version_missing_and_extra_fields(make, cls):
    for version in (0, 2, True, 1.0, "1"):
        wire = make()
        wire["version"] = version
        assert "version" in str(_raises_malformed(cls.from_bytes, canonical_bytes(wire)))
    for field in make():
        wire = make()
        del wire[field]
        assert repr(field) in str(_raises_malformed(cls.from_bytes, canonical_bytes(wire)))
    wire = make()
    wire["extra"] = 1
    assert "'extra'" in str(_raises_malformed(cls.from_bytes, canonical_bytes(wire)))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("round", True),  # bool where int
        ("round", 1.0),  # float where int
        ("round", "1"),
        ("round", -1),
        ("samples", None),
        ("loss", "0.5"),  # str where float
        ("loss", True),
        ("loss", -0.5),
        ("averaged", 1),  # int where bool
        ("averaged_with", 0),
        ("averaged_with", 4097),
        ("run_id", "0123456789ABCDEF"),  # upper-case hex
        ("run_id", "0123"),
        ("state_root", "g" * 64),
        ("peer_id", "0" * 16),  # not the key id of peer_key
        ("peer_key", "ab" * 31),
        ("p2p_id", ""),
        ("p2p_id", "x" * 129),
        ("maddrs", "not a list"),
        ("maddrs", ["ok"] * 17),
        ("maddrs", [""]),
        ("maddrs", [1]),
        ("time", {"nested": 1.0}),
        ("signature", "zz" * 64),  # non-hex signature
        ("signature", "ab" * 63),
        ("signature", ""),
    ],
)
def test_peer_progress_wrong_types_and_values_are_malformed(field, value):
    wire = _progress_wire()
    wire[field] = value
    error = _raises_malformed(PeerProgress.from_bytes, canonical_bytes(wire))
    assert field in str(error)


def test_averaged_must_agree_with_group_size():
    wire = _progress_wire()
    wire["averaged"] = False  # averaged_with is 3
    assert "averaged" in str(_raises_malformed(PeerProgress.from_bytes, canonical_bytes(wire)))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("field", ["loss", "time", "network_seconds"])
def test_non_finite_floats_are_malformed(field, value):
    wire = _progress_wire()
    wire[field] = value
    raw = msgpack.packb(wire, use_bin_type=True)  # canonical_bytes would refuse to write it
    assert "not finite" in str(_raises_malformed(PeerProgress.from_bytes, raw))


def test_float32_on_the_wire_is_read_but_re_encoded_canonically():
    progress = signed_progress(time=1024.5)  # every float of it is exact in float32
    raw = msgpack.packb(progress.to_wire(), use_bin_type=True, use_single_float=True)
    assert len(raw) < len(progress.to_bytes())
    again = PeerProgress.from_bytes(raw)
    assert again.to_bytes() == progress.to_bytes()
    again.verify()


@pytest.mark.parametrize(
    "value",
    [
        msgpack.ExtType(5, b"payload"),
        msgpack.ExtType(5, b""),
        msgpack.Timestamp(1, 0),
        b"binary",
        b"",
        bytearray(b"x"),
    ],
)
def test_ext_and_bin_types_are_malformed(value):
    wire = _progress_wire()
    wire["p2p_id"] = value
    raw = msgpack.packb(wire, use_bin_type=True)
    _raises_malformed(PeerProgress.from_bytes, raw)


def test_nested_too_deep_is_malformed():
    deep = b"\x81\xa6maddrs" + b"\x91" * 5000 + b"\xc0"
    _raises_malformed(PeerProgress.from_bytes, deep)


@pytest.mark.parametrize(
    "value",
    [
        ["a"] * 4097,  # array over the container limit
        {f"k{i}": i for i in range(4097)},  # map over the container limit
        "x" * (64 * 1024 + 1),  # string over the string limit
    ],
)
def test_containers_and_strings_too_big_are_malformed(value):
    wire = _progress_wire()
    wire["maddrs"] = value
    raw = msgpack.packb(wire, use_bin_type=True)
    assert len(raw) <= MAX_RECORD_BYTES
    _raises_malformed(PeerProgress.from_bytes, raw)


def test_non_string_map_key_is_malformed():
    raw = msgpack.packb({1: "x"}, use_bin_type=True)
    _raises_malformed(PeerProgress.from_bytes, raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from([f.name for f in LedgerEntry.FIELDS]), value=json_values)
def test_any_field_replaced_by_any_value_is_accepted_or_malformed(field, value):
    wire = _entry_wire()
    wire[field] = value
    try:
        entry = LedgerEntry.from_wire(wire)
    except MalformedRecord:
        return
    # Whatever the schema let through must still encode, or the record was not checked.
    entry.to_bytes()


@settings(max_examples=100, deadline=None)
@given(field=st.sampled_from([f.name for f in PeerProgress.FIELDS]), value=json_values)
def test_any_progress_field_replaced_by_any_value_is_accepted_or_malformed(field, value):
    wire = _progress_wire()
    wire[field] = value
    try:
        progress = PeerProgress.from_wire(wire)
    except MalformedRecord:
        return
    progress.to_bytes()


def test_integer_outside_the_wire_range_is_malformed_at_decode():
    wire = _entry_wire()
    wire["round"] = 2**64
    with pytest.raises(MalformedRecord, match="64-bit"):
        LedgerEntry.from_wire(wire)


# ---------------------------------------------------------------------------------------
# LedgerEntry as a record (chain rules are in test_protocol_ledger.py)
# ---------------------------------------------------------------------------------------


@st.composite
def entry_overrides(draw):
    peer_ids = sorted(draw(st.sets(hex_str(16), max_size=5)))
    contributors = [Contribution(peer_id=p, samples=draw(st.integers(0, 2**40))) for p in peer_ids]
    names = draw(st.lists(st.text(alphabet="abcxyz._-", min_size=3, max_size=20), min_size=1, max_size=3, unique=True))
    files = [
        FileRecord(
            name=name,
            sha256=draw(hex_str(64)),
            size=draw(wire_uint),
            root=draw(hex_str(64)),
            tensors=draw(st.dictionaries(st.text(min_size=1, max_size=12), hex_str(64), max_size=4)),
        )
        for name in names
        if name not in (".", "..")
    ] or [FileRecord(name="model.safetensors", sha256="0" * 64, size=0, root="1" * 64, tensors={})]
    return dict(
        run_id=draw(hex_str(16)),
        seq=draw(wire_uint),
        kind=draw(st.sampled_from(["genesis", "checkpoint"])),
        prev=draw(hex_str(64)),
        round=draw(wire_uint),
        created_at=draw(finite),
        checkpoint_root=files[0].root,
        files=files,
        contributors=contributors,
        total_samples=sum(c.samples for c in contributors),
        heldout_loss=draw(st.none() | st.floats(allow_nan=False, allow_infinity=False)),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=entry_overrides())
def test_ledger_entry_round_trips_and_still_verifies(overrides):
    entry = LedgerEntry.signed(PEER_KEY, **overrides)
    again = LedgerEntry.from_bytes(entry.to_bytes())
    assert again == entry
    assert again.entry_hash == entry.entry_hash == hashlib.sha256(entry.to_bytes()).hexdigest()
    again.verify_signature(PEER_KEY.public_key_hex)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("kind",), "snapshot"),
        (("files",), []),
        (("files",), [_entry_wire()["files"][0]] * 65),
        (("files",), ["not a map"]),
        (("files", 0, "name"), "a/b"),
        (("files", 0, "name"), "a\\b"),
        (("files", 0, "name"), ".."),
        (("files", 0, "name"), ""),
        (("files", 0, "size"), -1),
        (("files", 0, "sha256"), "x"),
        (("files", 0, "tensors"), {"w": "nothex"}),
        (("files", 0, "tensors"), ["w"]),
        (("contributors",), [{"peer_id": "0" * 16}]),
        (("contributors",), [{"peer_id": "0" * 15, "samples": 1}]),
        (("contributors",), [{"peer_id": "0" * 16, "samples": True}]),
        (("heldout_loss",), "3.5"),
        (("heldout_loss",), float("nan")),
        (("signer",), "ab"),
    ],
)
def test_ledger_entry_bad_values_are_malformed(path, value):
    wire = _entry_wire()
    target = wire
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    raw = msgpack.packb(wire, use_bin_type=True)
    _raises_malformed(LedgerEntry.from_bytes, raw)


def test_ledger_entry_heldout_loss_may_be_none_or_int_valued():
    assert LedgerEntry.from_bytes(signed_entry(heldout_loss=None).to_bytes()).heldout_loss is None
    entry = signed_entry(heldout_loss=3)
    again = LedgerEntry.from_bytes(entry.to_bytes())
    assert again.heldout_loss == 3.0 and isinstance(again.heldout_loss, float)
    again.verify_signature(PEER_KEY.public_key_hex)


def test_ledger_entry_signer_must_be_the_expected_key():
    entry = signed_entry()
    with pytest.raises(SignatureError, match="ledger entry 1: signed by key"):
        entry.verify_signature(OTHER_KEY.public_key_hex)


def test_entry_hash_covers_the_signature():
    entry = signed_entry()
    resigned = dataclasses.replace(entry, signature=OTHER_KEY.sign(canonical_bytes(entry.unsigned_wire())))
    assert resigned.entry_hash != entry.entry_hash
