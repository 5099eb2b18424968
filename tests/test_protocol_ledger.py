"""Ledger chain rules, tamper detection and the JSON Lines export.

A 4-entry chain signed by a fixed key is edited in every way an attacker or a bug could
edit it; ``verify_chain`` must refuse each edit with a ``VerificationError`` that names
the entry. The worked example of docs/protocol.md is pinned here as a known answer.

    pytest -q tests/test_protocol_ledger.py
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import ChainError, MalformedRecord, SignatureError, VerificationError
from protocol.hashing import checkpoint_root, tensor_digests
from protocol.ledger import (
    MAX_LINE_CHARS,
    checkpoint_dir_name,
    entries_from_jsonl,
    entry_to_json,
    next_entry,
    verify_chain,
    verify_link,
)
from protocol.manifest import RunConfig, RunManifest
from protocol.records import GENESIS_PREV, Contribution, FileRecord, LedgerEntry
from protocol.signing import SigningKey
from protocol.wire import MAX_RECORD_BYTES, canonical_bytes

COORDINATOR = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
STRANGER = SigningKey(Ed25519PrivateKey.from_private_bytes(bytes([0x5A] * 32)))
PUBLIC = COORDINATOR.public_key_hex
RUN_ID = "0123456789abcdef"
PEER_A = "00000000000000a1"
PEER_B = "00000000000000b2"


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _model_file(index: int) -> FileRecord:
    return FileRecord(
        name="model.safetensors",
        sha256=_h(f"file {index}"),
        size=1000 + index,
        root=_h(f"root {index}"),
        tensors={"wte.weight": _h(f"wte {index}"), "lm_head.weight": _h(f"head {index}")},
    )


def build_chain(key: SigningKey = COORDINATOR, length: int = 4) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for index in range(length):
        files = [_model_file(index)]
        if index == 3:
            files.append(FileRecord(name="outer_state.safetensors", sha256=_h("o"), size=7, root=_h("or"), tensors={}))
        contributors = (
            []
            if index == 0
            else [
                Contribution(peer_id=PEER_B, samples=50 * index),
                Contribution(peer_id=PEER_A, samples=100 * index),
            ]
        )
        entries.append(
            next_entry(
                key,
                entries[-1] if entries else None,
                run_id=RUN_ID,
                round=5 * index,
                created_at=1700000000.0 + 60 * index,
                files=files,
                contributors=contributors,
                heldout_loss=None if index == 0 else 5.0 - index,
            )
        )
    return entries


CHAIN = build_chain()


def resign(entry: LedgerEntry, key: SigningKey = COORDINATOR, **changes) -> LedgerEntry:
    """A validly signed copy of ``entry`` with ``changes`` (the signer is ``key``)."""
    fields = {f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)}
    for name in ("version", "signer", "signature"):
        del fields[name]
    fields.update(changes)
    return LedgerEntry.signed(key, **fields)


def relink(entries: list[LedgerEntry], start: int) -> list[LedgerEntry]:
    """Re-sign entries after ``start`` so each ``prev`` is right: only the edit at ``start`` is wrong."""
    out = list(entries)
    for index in range(start + 1, len(out)):
        out[index] = resign(out[index], prev=out[index - 1].entry_hash)
    return out


def jsonl(entries: list[LedgerEntry]) -> str:
    return "".join(entry_to_json(entry) + "\n" for entry in entries)


# ---------------------------------------------------------------------------------------
# A good chain
# ---------------------------------------------------------------------------------------


def test_built_chain_verifies_and_links():
    verify_chain(CHAIN, PUBLIC)
    verify_chain(CHAIN, PUBLIC, run_id=RUN_ID)
    assert [e.seq for e in CHAIN] == [0, 1, 2, 3]
    assert [e.kind for e in CHAIN] == ["genesis", "checkpoint", "checkpoint", "checkpoint"]
    assert CHAIN[0].prev == GENESIS_PREV == "0" * 64
    for before, after in zip(CHAIN, CHAIN[1:], strict=False):
        assert after.prev == before.entry_hash == hashlib.sha256(before.to_bytes()).hexdigest()


def test_next_entry_fills_in_what_follows_from_its_inputs():
    entry = CHAIN[2]
    assert [c.peer_id for c in entry.contributors] == [PEER_A, PEER_B]  # given unsorted
    assert entry.total_samples == 300
    assert entry.checkpoint_root == entry.files[0].root
    assert entry.signer == PUBLIC


def test_next_entry_refuses_an_entry_that_would_not_verify():
    with pytest.raises(ChainError, match="does not advance"):
        next_entry(
            COORDINATOR,
            CHAIN[1],
            run_id=RUN_ID,
            round=CHAIN[1].round,
            created_at=1.0,
            files=[_model_file(9)],
            contributors=[],
            heldout_loss=None,
        )
    with pytest.raises(ChainError, match="run id"):
        next_entry(
            COORDINATOR,
            CHAIN[1],
            run_id="f" * 16,
            round=99,
            created_at=1.0,
            files=[_model_file(9)],
            contributors=[],
            heldout_loss=None,
        )
    with pytest.raises(ChainError, match="two files share a name"):
        next_entry(
            COORDINATOR,
            CHAIN[1],
            run_id=RUN_ID,
            round=99,
            created_at=1.0,
            files=[_model_file(9), _model_file(8)],
            contributors=[],
            heldout_loss=None,
        )


def test_a_prefix_of_a_valid_ledger_is_valid():
    # Truncation is not visible in the chain itself: an auditor compares the last entry
    # with the head the coordinator publishes (see docs/protocol.md).
    for length in range(1, 4):
        verify_chain(CHAIN[:length], PUBLIC)


def test_checkpoint_dir_name():
    assert checkpoint_dir_name(CHAIN[1]) == "r000005"
    assert checkpoint_dir_name(resign(CHAIN[1], round=1234567)) == "r1234567"


# ---------------------------------------------------------------------------------------
# Tampering with one field of one entry, then re-serialising (JSON Lines)
# ---------------------------------------------------------------------------------------


def _flip_hex(text: str) -> str:
    return text[:-1] + ("0" if text[-1] != "0" else "1")


def _edit_contributors(wire: dict) -> None:
    if wire["contributors"]:
        wire["contributors"][0]["samples"] += 1
    else:
        wire["contributors"].append({"peer_id": PEER_A, "samples": 0})


TAMPERS: dict[str, Callable[[dict], None]] = {
    "run_id": lambda w: w.update(run_id="f" * 16),
    "seq": lambda w: w.update(seq=w["seq"] + 10),
    "kind": lambda w: w.update(kind="checkpoint" if w["kind"] == "genesis" else "genesis"),
    "prev": lambda w: w.update(prev=_flip_hex(w["prev"])),
    "round": lambda w: w.update(round=w["round"] + 1),
    "created_at": lambda w: w.update(created_at=w["created_at"] + 0.5),
    "checkpoint_root": lambda w: w.update(checkpoint_root=_flip_hex(w["checkpoint_root"])),
    "files": lambda w: w["files"][0].update(sha256=_flip_hex(w["files"][0]["sha256"])),
    "files.size": lambda w: w["files"][0].update(size=w["files"][0]["size"] + 1),
    "files.name": lambda w: w["files"][0].update(name="model2.safetensors"),
    "files.root": lambda w: w["files"][0].update(root=_flip_hex(w["files"][0]["root"])),
    "files.tensors": lambda w: w["files"][0]["tensors"].update({"wte.weight": "00" * 32}),
    "files.tensor_name": lambda w: w["files"][0].update(
        tensors={("wte" if k == "wte.weight" else k): d for k, d in w["files"][0]["tensors"].items()}
    ),
    "files.added": lambda w: w["files"].append(dict(w["files"][0], name="copy.safetensors")),
    "contributors": _edit_contributors,
    "total_samples": lambda w: w.update(total_samples=w["total_samples"] + 1),
    "heldout_loss": lambda w: w.update(heldout_loss=1.0 if w["heldout_loss"] is None else w["heldout_loss"] + 0.25),
    "signer": lambda w: w.update(signer=STRANGER.public_key_hex),
    "signature": lambda w: w.update(signature=_flip_hex(w["signature"])),
}


def test_tampers_cover_every_field_but_version():
    covered = {name.split(".")[0] for name in TAMPERS}
    assert covered == {f.name for f in LedgerEntry.FIELDS} - {"version"}


@pytest.mark.parametrize("index", range(4))
@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_any_edit_of_any_entry_is_detected_and_named(index, tamper):
    wires = [copy.deepcopy(entry.to_wire()) for entry in CHAIN]
    TAMPERS[tamper](wires[index])
    assert wires[index] != CHAIN[index].to_wire()
    text = "".join(json.dumps(w) + "\n" for w in wires)
    entries = entries_from_jsonl(text)
    if index:
        verify_chain(entries[:index], PUBLIC)  # the entries before it still verify
    with pytest.raises(VerificationError) as caught:
        verify_chain(entries, PUBLIC)
    assert isinstance(caught.value, (SignatureError, ChainError))
    message = str(caught.value)
    if tamper == "seq":
        assert f"seq is {index + 10}, expected {index}" in message
    else:
        assert message.startswith(f"ledger entry {index}: ")


def test_editing_the_version_is_refused_at_parse_time():
    wire = CHAIN[1].to_wire()
    wire["version"] = 2
    with pytest.raises(MalformedRecord, match="ledger line 1: .*'version'"):
        entries_from_jsonl(json.dumps(wire))
    with pytest.raises(SignatureError, match="ledger entry 1"):
        verify_chain([CHAIN[0], dataclasses.replace(CHAIN[1], version=2)], PUBLIC)


def test_verify_chain_checks_the_expected_run_id():
    with pytest.raises(ChainError, match="ledger entry 0: run id 0123456789abcdef is not the manifest's"):
        verify_chain(CHAIN, PUBLIC, run_id="f" * 16)


# ---------------------------------------------------------------------------------------
# Whole-entry edits: delete, swap, reorder, duplicate, re-sign
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(3))
def test_deleting_an_entry_is_a_chain_error(index):
    entries = CHAIN[:index] + CHAIN[index + 1 :]
    with pytest.raises(ChainError, match=f"line {index + 1}: seq is {index + 1}, expected {index}"):
        verify_chain(entries, PUBLIC)


@pytest.mark.parametrize(("i", "j"), [(0, 1), (1, 2), (2, 3), (0, 3), (1, 3)])
def test_swapping_two_entries_is_a_chain_error(i, j):
    entries = list(CHAIN)
    entries[i], entries[j] = entries[j], entries[i]
    with pytest.raises(ChainError, match=f"line {i + 1}: seq is {j}, expected {i}"):
        verify_chain(entries, PUBLIC)


def test_reordering_is_a_chain_error():
    with pytest.raises(ChainError):
        verify_chain(list(reversed(CHAIN)), PUBLIC)
    with pytest.raises(ChainError):
        verify_chain(CHAIN[1:] + CHAIN[:1], PUBLIC)


@pytest.mark.parametrize("index", range(4))
def test_duplicating_an_entry_is_a_chain_error(index):
    entries = CHAIN[: index + 1] + [CHAIN[index]] + CHAIN[index + 1 :]
    with pytest.raises(ChainError, match=f"expected {index + 1}"):
        verify_chain(entries, PUBLIC)


def test_a_duplicate_with_its_seq_renumbered_is_a_chain_error():
    # Re-signed by the right key, correct seq, but prev points past the previous entry.
    copy_of_two = resign(CHAIN[2], seq=3)
    entries = CHAIN[:3] + [copy_of_two]
    with pytest.raises(ChainError, match="ledger entry 3: prev does not match the hash of entry 2"):
        verify_chain(entries, PUBLIC)


def test_a_chain_signed_by_another_key_is_a_signature_error():
    with pytest.raises(SignatureError, match="ledger entry 0: signed by key"):
        verify_chain(build_chain(STRANGER), PUBLIC)


@pytest.mark.parametrize("index", range(4))
def test_one_entry_re_signed_by_another_key_is_a_signature_error(index):
    entries = list(CHAIN)
    entries[index] = resign(CHAIN[index], key=STRANGER)
    with pytest.raises(SignatureError, match=f"ledger entry {index}: signed by key"):
        verify_chain(entries, PUBLIC)


@pytest.mark.parametrize("index", range(4))
def test_a_stranger_signature_under_the_right_signer_field_is_a_signature_error(index):
    entry = CHAIN[index]
    forged = dataclasses.replace(entry, signature=STRANGER.sign(canonical_bytes(entry.unsigned_wire())))
    entries = list(CHAIN)
    entries[index] = forged
    with pytest.raises(SignatureError, match=f"ledger entry {index}: signature does not verify"):
        verify_chain(entries, PUBLIC)


def test_empty_ledger_is_a_chain_error():
    with pytest.raises(ChainError, match="empty"):
        verify_chain([], PUBLIC)


# ---------------------------------------------------------------------------------------
# Validly signed by the right key, yet breaking a chain rule
# ---------------------------------------------------------------------------------------


def _broken(index: int, **changes) -> list[LedgerEntry]:
    entries = list(CHAIN)
    entries[index] = resign(CHAIN[index], **changes)
    return relink(entries, index)


@pytest.mark.parametrize(
    ("index", "changes", "match"),
    [
        (2, {"prev": "ee" * 32}, "ledger entry 2: prev does not match the hash of entry 1"),
        (2, {"round": 5}, "ledger entry 2: round 5 does not advance past round 5"),
        (2, {"round": 1}, "ledger entry 2: round 1 does not advance past round 5"),
        (1, {"total_samples": 151}, "ledger entry 1: total_samples is not the sum"),
        (0, {"total_samples": 1}, "ledger entry 0: total_samples is not the sum"),
        (2, {"kind": "genesis"}, "ledger entry 2: only the first entry may be a genesis entry"),
        (0, {"kind": "checkpoint"}, "ledger entry 0: the first entry must be the genesis entry"),
        (0, {"prev": "11" * 32}, "ledger entry 0: the first entry must be the genesis entry"),
        (2, {"run_id": "f" * 16}, "ledger entry 2: run id ffffffffffffffff differs from entry 1's"),
        (1, {"checkpoint_root": "dd" * 32}, "ledger entry 1: checkpoint_root is not the root of its first file"),
        (
            1,
            {"contributors": [Contribution(peer_id=PEER_B, samples=50), Contribution(peer_id=PEER_A, samples=100)]},
            "ledger entry 1: contributors must be sorted",
        ),
        (
            1,
            {"contributors": [Contribution(peer_id=PEER_A, samples=100), Contribution(peer_id=PEER_A, samples=50)]},
            "ledger entry 1: contributors must be sorted by peer id without repeats",
        ),
        (3, {"files": [_model_file(3), _model_file(3)]}, "ledger entry 3: two files share a name"),
    ],
)
def test_validly_signed_rule_breaks_are_chain_errors(index, changes, match):
    entries = _broken(index, **changes)
    entries[index].verify_signature(PUBLIC)  # the signature is fine; the rule is not
    with pytest.raises(ChainError, match=match):
        verify_chain(entries, PUBLIC)


def test_seq_gap_is_a_chain_error_in_both_checks():
    entries = _broken(2, seq=3)
    with pytest.raises(ChainError, match="line 3: seq is 3, expected 2"):
        verify_chain(entries, PUBLIC)
    with pytest.raises(ChainError, match="ledger entry 3: follows entry 1, so its seq must be 2"):
        verify_link(CHAIN[1], entries[2], PUBLIC)


# ---------------------------------------------------------------------------------------
# JSON Lines
# ---------------------------------------------------------------------------------------


def test_entry_to_json_is_one_compact_sorted_line_of_the_wire_map():
    line = entry_to_json(CHAIN[1])
    assert "\n" not in line and ", " not in line and ": " not in line
    assert json.loads(line) == CHAIN[1].to_wire()
    assert list(json.loads(line)) == sorted(CHAIN[1].to_wire())


def test_jsonl_round_trip_of_the_chain():
    text = jsonl(CHAIN)
    entries = entries_from_jsonl(text)
    assert entries == CHAIN
    assert [e.entry_hash for e in entries] == [e.entry_hash for e in CHAIN]
    verify_chain(entries, PUBLIC)
    assert entries_from_jsonl("\n\n" + text.replace("\n", "\r\n") + "\n   \n") == CHAIN


@st.composite
def chains(draw) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    round_ = 0
    peers = sorted(draw(st.sets(st.text(alphabet="0123456789abcdef", min_size=16, max_size=16), max_size=4)))
    for _ in range(draw(st.integers(1, 4))):
        names = draw(st.lists(st.text(min_size=1, max_size=10), min_size=1, max_size=3, unique=True))
        tensors = {name: hashlib.sha256(name.encode()).hexdigest() for name in names}
        root = hashlib.sha256(repr(sorted(tensors)).encode()).hexdigest()
        files = [
            FileRecord(
                name="model.safetensors", sha256=_h(root), size=draw(st.integers(0, 2**40)), root=root, tensors=tensors
            )
        ]
        contributors = [Contribution(peer_id=p, samples=draw(st.integers(0, 2**40))) for p in peers]
        entries.append(
            next_entry(
                COORDINATOR,
                entries[-1] if entries else None,
                run_id=RUN_ID,
                round=round_,
                created_at=draw(st.floats(0, 4e9)),
                files=files,
                contributors=contributors,
                heldout_loss=draw(st.none() | st.floats(-1e6, 1e6)),
            )
        )
        round_ += draw(st.integers(1, 1000))
    return entries


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=chains())
def test_jsonl_round_trip_keeps_records_hashes_and_signatures(entries):
    again = entries_from_jsonl(jsonl(entries))
    assert again == entries
    assert [e.entry_hash for e in again] == [e.entry_hash for e in entries]
    verify_chain(again, PUBLIC, run_id=RUN_ID)
    for before, after in zip(entries, again, strict=True):
        assert after.to_bytes() == before.to_bytes()


def _good_line() -> dict:
    return CHAIN[1].to_wire()


def _good_json() -> str:
    return entry_to_json(CHAIN[1])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{", "not valid|Expecting"),
        ("[]", "expected a map"),
        ("null", "expected a map"),
        ("42", "expected a map"),
        (_good_json().replace('"heldout_loss":4.0', '"heldout_loss":NaN'), "NaN is not allowed"),
        (_good_json().replace('"heldout_loss":4.0', '"heldout_loss":Infinity'), "Infinity is not allowed"),
        (_good_json().replace('"heldout_loss":4.0', '"heldout_loss":1e999'), "not finite"),
        (_good_json().replace('"round":5', '"round":' + str(2**64)), "64-bit"),
        (_good_json().replace('"round":5', '"round":5.0'), "'round' has type float"),
        (_good_json().replace('"round":5', '"round":true'), "'round' has type bool"),
        (_good_json().replace('"model.safetensors"', '"\\ud800"'), "UTF-8"),
        (_good_json().replace('"wte.weight"', '"\\udfff"'), "UTF-8"),
        (
            _good_json().replace('"contributors":[', '"contributors":[' + "[" * 50_000 + "]" * 50_000 + ","),
            "nested too deeply",
        ),
        (
            json.dumps({k: v for k, v in _good_line().items() if k != "signer"}, separators=(",", ":")),
            "missing field 'signer'",
        ),
        (json.dumps(dict(_good_line(), extra=1)), "unknown field 'extra'"),
        (json.dumps(dict(_good_line(), signature="not hex")), "'signature'"),
    ],
)
def test_bad_json_lines_are_malformed_and_name_the_line(line, match):
    assert line != entry_to_json(CHAIN[1])
    text = entry_to_json(CHAIN[0]) + "\n\n" + line + "\n"
    with pytest.raises(MalformedRecord, match=f"^ledger line 3: .*({match})"):
        entries_from_jsonl(text)


def test_jsonl_line_limit():
    with pytest.raises(MalformedRecord, match="ledger line 3: more than 2 entries"):
        entries_from_jsonl(jsonl(CHAIN), max_lines=2)


def test_a_line_longer_than_any_entry_is_refused_before_it_is_parsed():
    # 32 MiB of "[[],[],...]" took 19 s and 1 GiB to parse before it was refused as "expected a map"
    line = "[" + ",".join(["[]"] * (MAX_LINE_CHARS // 3 + 1)) + "]"
    with pytest.raises(MalformedRecord, match=f"^ledger line 2: {len(line)} characters, more than an entry takes"):
        entries_from_jsonl(entry_to_json(CHAIN[0]) + "\n" + line)
    assert len(canonical_bytes(CHAIN[1].to_wire())) < MAX_RECORD_BYTES
    assert len(entry_to_json(CHAIN[1])) <= MAX_LINE_CHARS


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=300))
def test_random_text_is_never_a_bare_exception(text):
    try:
        entries_from_jsonl(text)
    except MalformedRecord:
        pass


# ---------------------------------------------------------------------------------------
# The worked example of docs/protocol.md, pinned
# ---------------------------------------------------------------------------------------

EXAMPLE_TENSORS = {
    "wte.weight": torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float32),
    "step": torch.tensor(3, dtype=torch.int64),
}
EXAMPLE_DIGESTS = {
    "step": "19edcd1ea4d2fa521bffc27699e6095d626407d7c691fc0d1eddc87a12aa6eb1",
    "wte.weight": "665f549f853f016c87efa7913fa9b2adff2a1985d9a3140c9365017a031ff530",
}
EXAMPLE_ROOT = "3079c988bc29ea318fbfa57c0128f777a4cd8cb443dffdebfb925b14812f19d8"
EXAMPLE_FILE_SHA256 = "f239814109b316c6a1a7b2d88bc8348438cf6eda0952f6d2f1f451b25569a469"
"""sha256 of ``safetensors.torch.save(EXAMPLE_TENSORS)`` (160 bytes, safetensors 0.8); pinned, not recomputed."""
EXAMPLE_RUN_ID = "bb054797f17400bb"
EXAMPLE_JSON_LINE = (
    "{\"checkpoint_root\":\"3079c988bc29ea318fbfa57c0128f777a4cd8cb443dffdebfb925b14812f19d8\",\"contributors"
    "\":[],\"created_at\":1700000060.0,\"files\":[{\"name\":\"model.safetensors\",\"root\":\"3079c988bc29ea31"
    "8fbfa57c0128f777a4cd8cb443dffdebfb925b14812f19d8\",\"sha256\":\"f239814109b316c6a1a7b2d88bc8348438cf6eda"
    "0952f6d2f1f451b25569a469\",\"size\":160,\"tensors\":{\"step\":\"19edcd1ea4d2fa521bffc27699e6095d626407d7"
    "c691fc0d1eddc87a12aa6eb1\",\"wte.weight\":\"665f549f853f016c87efa7913fa9b2adff2a1985d9a3140c9365017a031f"
    "f530\"}}],\"heldout_loss\":5.545177444479562,\"kind\":\"genesis\",\"prev\":\"000000000000000000000000000"
    "0000000000000000000000000000000000000\",\"round\":0,\"run_id\":\"bb054797f17400bb\",\"seq\":0,\"signatur"
    "e\":\"e152e302724d66d6b007ad91f70b47556159b7c207836a8b6fc2800c67fb431f4febbe66b42aa88cac572269a93edb85b0"
    "bdacf1121c677b442904298371c80d\",\"signer\":\"03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc866412"
    "5531b8\",\"total_samples\":0,\"version\":1}"
)
EXAMPLE_ENTRY_HASH = "1ea404bca014c7d78549214d353db35357e9d3aeeac549b3ee0cf05fd9349885"


def example_manifest() -> RunManifest:
    return RunManifest(
        config=RunConfig(name="demo"), coordinator_key=PUBLIC, genesis_root=EXAMPLE_ROOT, created_at=1700000000.0
    )


def example_genesis() -> LedgerEntry:
    model = FileRecord(
        name="model.safetensors",
        sha256=EXAMPLE_FILE_SHA256,
        size=160,
        root=checkpoint_root(EXAMPLE_TENSORS),
        tensors=tensor_digests(EXAMPLE_TENSORS),
    )
    return next_entry(
        COORDINATOR,
        None,
        run_id=example_manifest().run_id,
        round=0,
        created_at=1700000060.0,
        files=[model],
        contributors=[],
        heldout_loss=5.545177444479562,  # ln 256: a uniform guess over bytes
    )


def test_worked_example_digests_root_and_entry():
    assert tensor_digests(EXAMPLE_TENSORS) == EXAMPLE_DIGESTS
    assert checkpoint_root(EXAMPLE_TENSORS) == EXAMPLE_ROOT
    assert example_manifest().run_id == EXAMPLE_RUN_ID
    entry = example_genesis()
    assert entry_to_json(entry) == EXAMPLE_JSON_LINE
    assert entry.entry_hash == EXAMPLE_ENTRY_HASH
    assert entries_from_jsonl(EXAMPLE_JSON_LINE) == [entry]
    verify_chain([entry], PUBLIC, run_id=EXAMPLE_RUN_ID)
    assert entry.checkpoint_root == example_manifest().genesis_root
