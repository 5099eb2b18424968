"""The coordinator's ledger, kept in one SQLite file and re-verified every time it is opened.

Crash safety: the database runs in WAL mode with ``synchronous=FULL``, and every append is
one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) that inserts exactly one row. SQLite
makes a transaction durable and visible only once its commit record is in the WAL and the
WAL is fsynced, so a crash at any moment (process killed, power lost) leaves the database at
the last committed entry: a half-written append is discarded on the next open, and an append
whose ``append()`` returned is never lost. ``open()`` then re-checks the whole chain, so a
store that opens is one an auditor would accept.

Two writers: ``seq`` is the primary key, so a second process appending on a stale head
collides with the row the first one wrote and gets ``ChainError`` instead of forking the chain.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from peer.workdir import write_atomic
from protocol.errors import ChainError, InputError, MalformedRecord
from protocol.ledger import entry_to_json, verify_chain, verify_link
from protocol.records import LedgerEntry
from protocol.signing import key_id
from protocol.wire import is_hex

__all__ = ["LedgerStore", "SCHEMA_VERSION"]

SCHEMA_VERSION = "1"
"""Bumped whenever the tables change; a store written under another version is refused."""

_SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE entries(seq INTEGER PRIMARY KEY, entry_hash TEXT NOT NULL UNIQUE, record BLOB NOT NULL);
"""


class LedgerStore:
    """An append-only, verified ledger in SQLite. Use ``LedgerStore.open``; close when done."""

    def __init__(self, connection: sqlite3.Connection, path: Path, public_key_hex: str, run_id: str,
                 entries: list[LedgerEntry]) -> None:
        self._connection = connection
        self.path = path
        self.public_key_hex = public_key_hex
        self.run_id = run_id
        self._entries = entries

    @classmethod
    def open(cls, path: Path, public_key_hex: str, run_id: str) -> LedgerStore:
        """Open (creating if missing) the ledger at ``path`` and verify every stored entry."""
        if not is_hex(run_id, 16) or not is_hex(public_key_hex, 64):
            raise InputError("ledger store: run id must be 16 and public key 64 lowercase hex digits")
        try:
            # isolation_level=None: no implicit transactions; every transaction below is explicit.
            # check_same_thread=False: the coordinator appends from its worker thread; appends are serial.
            connection = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
        except sqlite3.Error as error:
            raise InputError(f"cannot open ledger db {path}: {error}") from None
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            _initialise(connection, public_key_hex, run_id)
            _check_meta(connection, path, public_key_hex, run_id)
            entries = _load_verified(connection, public_key_hex, run_id)
        except sqlite3.DatabaseError as error:
            connection.close()
            raise InputError(f"{path} is not a readable ledger db ({error})") from None
        except BaseException:
            connection.close()
            raise
        return cls(connection, path, public_key_hex, run_id, entries)

    def entries(self) -> list[LedgerEntry]:
        return list(self._entries)

    def head(self) -> LedgerEntry | None:
        return self._entries[-1] if self._entries else None

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: LedgerEntry) -> None:
        """Verify ``entry`` against the head, then store it in one transaction; or write nothing."""
        verify_link(self.head(), entry, self.public_key_hex)
        # refuse now what the next open() could not decode (e.g. past a size limit)
        if LedgerEntry.from_bytes(entry.to_bytes()) != entry:
            raise MalformedRecord(f"ledger entry {entry.seq}: does not survive its own encoding")
        if entry.run_id != self.run_id:
            raise ChainError(f"ledger entry {entry.seq}: run id {entry.run_id} is not this ledger's {self.run_id}")
        connection = self._connection
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.execute(
                "INSERT INTO entries(seq, entry_hash, record) VALUES (?, ?, ?)",
                (entry.seq, entry.entry_hash, entry.to_bytes()),
            )
            connection.execute("COMMIT")
        except sqlite3.IntegrityError:
            connection.execute("ROLLBACK")
            raise ChainError(
                f"ledger entry {entry.seq}: seq {entry.seq} is already in the db "
                "(did another process append?); reopen the ledger"
            ) from None
        except BaseException:
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        self._entries.append(entry)

    def export_jsonl(self) -> str:
        """The ledger as JSON Lines, one entry per line, for auditors."""
        return "".join(entry_to_json(entry) + "\n" for entry in self._entries)

    def write_jsonl(self, path: Path) -> None:
        """Write ``export_jsonl()`` to ``path`` atomically: readers see the old file or the new one."""
        write_atomic(Path(path), self.export_jsonl().encode("utf-8"))

    def close(self) -> None:
        self._connection.close()

    def __enter__(self) -> LedgerStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _initialise(connection: sqlite3.Connection, public_key_hex: str, run_id: str) -> None:
    """Create the tables and meta rows in one transaction if the db has no tables yet."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            for statement in filter(str.strip, _SCHEMA.split(";")):
                connection.execute(statement)
            connection.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("schema_version", SCHEMA_VERSION), ("run_id", run_id), ("public_key", public_key_hex)],
            )
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def _check_meta(connection: sqlite3.Connection, path: Path, public_key_hex: str, run_id: str) -> None:
    try:
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.OperationalError:
        raise InputError(f"{path} is a SQLite db but not a Barnraise ledger (no meta table)") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{path}: ledger schema version {meta.get('schema_version')}, expected {SCHEMA_VERSION}")
    if meta.get("run_id") != run_id:
        raise ChainError(f"{path}: ledger is for run {meta.get('run_id')}, not run {run_id}")
    if meta.get("public_key") != public_key_hex:
        stored = meta.get("public_key") or ""
        stored_id = key_id(stored) if is_hex(stored, 64) else repr(stored)
        raise ChainError(f"{path}: ledger is signed by key {stored_id}, not key {key_id(public_key_hex)}")


def _load_verified(connection: sqlite3.Connection, public_key_hex: str, run_id: str) -> list[LedgerEntry]:
    """Decode every row and check it against its columns, then verify the whole chain."""
    entries = []
    for expected_seq, (seq, entry_hash, record) in enumerate(
        connection.execute("SELECT seq, entry_hash, record FROM entries ORDER BY seq")
    ):
        if seq != expected_seq:
            raise ChainError(f"ledger entry {expected_seq} is missing from the db (next stored seq is {seq})")
        try:
            entry = LedgerEntry.from_bytes(record)
        except MalformedRecord as error:
            raise MalformedRecord(f"ledger entry {seq} in the db: {error}") from None
        if entry.seq != seq:
            raise ChainError(f"ledger entry {seq}: its record says seq {entry.seq}")
        if entry.to_bytes() != bytes(record):
            raise ChainError(f"ledger entry {seq}: stored record is not in canonical form")
        if entry.entry_hash != entry_hash:
            raise ChainError(f"ledger entry {seq}: stored entry_hash does not match the hash of its record")
        entries.append(entry)
    if entries:
        verify_chain(entries, public_key_hex, run_id=run_id)
    return entries
