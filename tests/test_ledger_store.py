"""LedgerStore on real SQLite files: reopen, refused links, tampering, and SIGKILL mid-append.

Run: pytest -q tests/test_ledger_store.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import os
import random
import select
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from coordinator.ledger_store import LedgerStore
from protocol.errors import ChainError, InputError, MalformedRecord, SignatureError
from protocol.ledger import entries_from_jsonl, next_entry, verify_chain
from protocol.records import Contribution, FileRecord, LedgerEntry
from protocol.signing import SigningKey
from protocol.wire import canonical_bytes

RUN_ID = "0123456789abcdef"


def _made_up_hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _next(key: SigningKey, previous: LedgerEntry | None) -> LedgerEntry:
    round_ = 0 if previous is None else previous.round + 1
    model = FileRecord(
        name="model.safetensors",
        sha256=_made_up_hash("file", round_),
        size=1000 + round_,
        root=_made_up_hash("root", round_),
        tensors={"wte.weight": _made_up_hash("wte", round_)},
    )
    return next_entry(
        key,
        previous,
        run_id=RUN_ID,
        round=round_,
        created_at=1_700_000_000.0 + round_,
        files=[model],
        contributors=[Contribution(peer_id="ab" * 8, samples=64 * round_), Contribution(peer_id="cd" * 8, samples=7)],
        heldout_loss=None if previous is None else 2.5 / round_,
    )


def _chain(key: SigningKey, length: int) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    for _ in range(length):
        entries.append(_next(key, entries[-1] if entries else None))
    return entries


def _resign(key: SigningKey, entry: LedgerEntry, **changes: object) -> LedgerEntry:
    """``entry`` with ``changes``, validly signed by ``key`` (a forger holding the key)."""
    draft = dataclasses.replace(entry, signer=key.public_key_hex, signature="", **changes)
    return dataclasses.replace(draft, signature=key.sign(canonical_bytes(draft.unsigned_wire())))


def _row_count(path: Path) -> int:
    connection = sqlite3.connect(path)
    try:
        return connection.execute("SELECT count(*) FROM entries").fetchone()[0]
    finally:
        connection.close()


def _tamper(path: Path, sql: str, *params: object) -> None:
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.execute(sql, params)
    finally:
        connection.close()


@pytest.fixture
def key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def ledger(tmp_path: Path, key: SigningKey) -> tuple[Path, list[LedgerEntry]]:
    """A closed ledger db holding a genesis entry and four checkpoints."""
    path = tmp_path / "ledger.db"
    entries = _chain(key, 5)
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        for entry in entries:
            store.append(entry)
    return path, entries


def test_new_store_is_empty(tmp_path: Path, key: SigningKey) -> None:
    with LedgerStore.open(tmp_path / "ledger.db", key.public_key_hex, RUN_ID) as store:
        assert len(store) == 0
        assert store.head() is None
        assert store.entries() == []
        assert store.export_jsonl() == ""


def test_append_and_reopen_gives_same_entries_and_hashes(ledger, key: SigningKey) -> None:
    path, entries = ledger
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        assert store.entries() == entries
        assert [e.entry_hash for e in store.entries()] == [e.entry_hash for e in entries]
        assert store.head() == entries[-1]
        assert len(store) == 5
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = connection.execute("SELECT seq, entry_hash, record FROM entries ORDER BY seq").fetchall()
    finally:
        connection.close()
    assert rows == [(e.seq, e.entry_hash, e.to_bytes()) for e in entries]


def test_append_continues_after_reopen(ledger, key: SigningKey) -> None:
    path, entries = ledger
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        store.append(_next(key, store.head()))
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        assert len(store) == 6
        assert store.entries()[:5] == entries


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("wrong prev", ChainError, "ledger entry 5: prev does not match"),
        ("wrong key", SignatureError, "ledger entry 5: signed by key"),
        ("skipped seq", ChainError, "ledger entry 6: follows entry 4"),
        ("round not advancing", ChainError, "ledger entry 5: round 4"),
        ("other run id", ChainError, "ledger entry 5: run id"),
        ("second genesis", ChainError, "only the first entry may be a genesis"),
    ],
)
def test_bad_link_is_refused_and_nothing_is_written(ledger, key, case, error, message) -> None:
    path, entries = ledger
    good = _next(key, entries[-1])
    bad = {
        "wrong prev": lambda: _resign(key, good, prev=_made_up_hash("not the head")),
        "wrong key": lambda: _next(SigningKey.generate(), entries[-1]),
        "skipped seq": lambda: _resign(key, good, seq=6),
        "round not advancing": lambda: _resign(key, good, round=entries[-1].round),
        "other run id": lambda: _resign(key, good, run_id="f" * 16),
        "second genesis": lambda: _resign(key, good, kind="genesis"),
    }[case]()
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        with pytest.raises(error, match=message):
            store.append(bad)
        assert store.entries() == entries
    assert _row_count(path) == 5
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        assert store.entries() == entries
        store.append(good)  # the refused entry left the store usable


def test_first_entry_must_be_genesis_of_this_run(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "ledger.db"
    genesis, checkpoint = _chain(key, 2)
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        with pytest.raises(ChainError, match="ledger entry 1: the first entry must be the genesis"):
            store.append(checkpoint)
        with pytest.raises(ChainError, match="run id ffffffffffffffff is not this ledger's"):
            store.append(_resign(key, genesis, run_id="f" * 16))
        assert len(store) == 0
    assert _row_count(path) == 0


def test_second_writer_on_stale_head_is_refused(ledger, key: SigningKey) -> None:
    path, entries = ledger
    with (
        LedgerStore.open(path, key.public_key_hex, RUN_ID) as first,
        LedgerStore.open(path, key.public_key_hex, RUN_ID) as second,
    ):
        first.append(_next(key, entries[-1]))
        fork = _resign(key, _next(key, entries[-1]), heldout_loss=0.125)
        with pytest.raises(ChainError, match="ledger entry 5: seq 5 is already in the db"):
            second.append(fork)
        assert len(second) == 5
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        assert store.head() == first.head()


@pytest.mark.parametrize(
    ("what", "message"),
    [("run_id", r"ledger is for run 0123456789abcdef, not run ffffffffffffffff"), ("key", r"ledger is signed by key")],
)
def test_reopen_with_other_run_or_key_is_refused(ledger, key: SigningKey, what: str, message: str) -> None:
    path, _ = ledger
    public_key = SigningKey.generate().public_key_hex if what == "key" else key.public_key_hex
    run_id = "f" * 16 if what == "run_id" else RUN_ID
    with pytest.raises(ChainError, match=message) as raised:
        LedgerStore.open(path, public_key, run_id)
    assert "\n" not in str(raised.value)


def _edited(key: SigningKey, entries: list[LedgerEntry]) -> LedgerEntry:
    """Entry 2 with a different checkpoint, re-signed: valid on its own, but not what was stored."""
    original = entries[2]
    file = dataclasses.replace(original.files[0], root=_made_up_hash("forged root"))
    return _resign(key, original, files=[file], checkpoint_root=file.root)


def _replace_row_2(path: Path, entry: LedgerEntry) -> None:
    """Overwrite row 2's record and its entry_hash column consistently."""
    _tamper(path, "UPDATE entries SET record = ?, entry_hash = ? WHERE seq = 2", entry.to_bytes(), entry.entry_hash)


@pytest.mark.parametrize(
    ("tampering", "error", "message"),
    [
        ("edit record, keep hash column", ChainError, "ledger entry 2: stored entry_hash does not match"),
        ("edit record and hash column", ChainError, "ledger entry 3: prev does not match the hash of entry 2"),
        ("edit without re-signing", SignatureError, "ledger entry 2: signature does not verify"),
        ("delete a middle row", ChainError, "ledger entry 2 is missing from the db"),
        ("garbage record", MalformedRecord, "ledger entry 2 in the db"),
        ("swap seq column", ChainError, "ledger entry 2: its record says seq 4"),
    ],
)
def test_tampered_db_is_refused_on_open(ledger, key: SigningKey, tampering: str, error: type, message: str) -> None:
    path, entries = ledger
    if tampering == "edit record, keep hash column":
        _tamper(path, "UPDATE entries SET record = ? WHERE seq = 2", _edited(key, entries).to_bytes())
    elif tampering == "edit record and hash column":
        _replace_row_2(path, _edited(key, entries))
    elif tampering == "edit without re-signing":
        _replace_row_2(path, dataclasses.replace(entries[2], total_samples=entries[2].total_samples + 1))
    elif tampering == "delete a middle row":
        _tamper(path, "DELETE FROM entries WHERE seq = 2")
    elif tampering == "garbage record":
        _tamper(path, "UPDATE entries SET record = ? WHERE seq = 2", b"\x93not a map")
    else:
        _tamper(path, "UPDATE entries SET seq = 99 WHERE seq = 2")
        _tamper(path, "UPDATE entries SET seq = 2 WHERE seq = 4")
    with pytest.raises(error, match=message) as raised:
        LedgerStore.open(path, key.public_key_hex, RUN_ID)
    assert "\n" not in str(raised.value)


def test_file_that_is_not_sqlite_is_an_input_error(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is a ledger, honest\n" * 100)
    with pytest.raises(InputError, match="is not a readable ledger db") as raised:
        LedgerStore.open(path, key.public_key_hex, RUN_ID)
    assert "\n" not in str(raised.value)
    assert path.read_bytes() == b"this is a ledger, honest\n" * 100


def test_other_sqlite_db_is_an_input_error(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "other.db"
    _tamper(path, "CREATE TABLE peers(id TEXT)")
    with pytest.raises(InputError, match="not a Barnraise ledger"):
        LedgerStore.open(path, key.public_key_hex, RUN_ID)


def test_export_jsonl_parses_and_verifies(ledger, key: SigningKey, tmp_path: Path) -> None:
    path, entries = ledger
    out = tmp_path / "export" / "ledger.jsonl"
    out.parent.mkdir()
    out.write_text("an older export\n")
    with LedgerStore.open(path, key.public_key_hex, RUN_ID) as store:
        text = store.export_jsonl()
        store.write_jsonl(out)
    parsed = entries_from_jsonl(text)
    verify_chain(parsed, key.public_key_hex, run_id=RUN_ID)
    assert parsed == entries
    assert [e.entry_hash for e in parsed] == [e.entry_hash for e in entries]
    assert out.read_text() == text
    assert sorted(p.name for p in out.parent.iterdir()) == ["ledger.jsonl"]  # no temp file left


def _append_until_killed(db: Path, key_pem: bytes, acks: int) -> None:
    """Child process body: append forever (within a bound), acknowledging each committed seq."""
    key = SigningKey.from_pem(key_pem)
    with LedgerStore.open(db, key.public_key_hex, RUN_ID) as store:
        os.write(acks, b"ready\n")
        for _ in range(1_000_000):
            entry = _next(key, store.head())
            store.append(entry)
            os.write(acks, f"{entry.seq}\n".encode())  # one small write: atomic on a pipe


def _read_until_ready(fd: int, deadline: float) -> bytes:
    received = b""
    while b"ready\n" not in received:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if readable else b""
        if not chunk:
            pytest.fail("the ledger writer died or hung before opening the ledger")
        received += chunk
    return received


def _read_to_end(fd: int) -> bytes:
    received = b""
    while chunk := os.read(fd, 65536):
        received += chunk
    return received


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigkill_mid_append_leaves_a_verified_ledger(tmp_path: Path, key: SigningKey) -> None:
    # Forked, not exec'd: importing `protocol` pulls in torch (~1.5 s), which would blow the
    # time budget for ten kills. The kill is a real SIGKILL of a separate process either way.
    fork = multiprocessing.get_context("fork")
    db = tmp_path / "ledger.db"
    rng = random.Random(1234)
    deadline = time.monotonic() + 15.0
    stored = 0
    for _ in range(10):
        read_fd, write_fd = os.pipe()
        child = fork.Process(target=_append_until_killed, args=(db, key.to_pem(), write_fd))
        child.start()
        os.close(write_fd)  # the child now holds the only write end: EOF once it is dead
        received = b""
        try:
            received = _read_until_ready(read_fd, deadline)
            time.sleep(rng.uniform(0.0, 0.12))
        finally:
            child.kill()
            child.join(timeout=5)
            received += _read_to_end(read_fd)
            os.close(read_fd)
        assert child.exitcode == -signal.SIGKILL
        assert not _alive(child.pid), "the killed writer was not reaped"
        with LedgerStore.open(db, key.public_key_hex, RUN_ID) as store:
            entries = store.entries()
        verify_chain(entries, key.public_key_hex, run_id=RUN_ID)
        assert len(entries) >= stored, "a SIGKILL lost committed entries"
        acknowledged = received.split()[1:]
        if acknowledged:
            assert len(entries) > int(acknowledged[-1]), "an acknowledged append was lost"
        stored = len(entries)
    assert stored >= 10, "the writer barely appended: the kills tested nothing"
