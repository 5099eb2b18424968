"""The ledger's rules: how an entry follows the one before it, and ``verify_chain``.

Storage lives elsewhere (the coordinator keeps SQLite, auditors read JSON Lines); this
module only says what a valid chain is, so every reader applies the same rules.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from protocol.errors import ChainError, MalformedRecord
from protocol.records import GENESIS_PREV, Contribution, FileRecord, LedgerEntry, SpotCheck
from protocol.signing import SigningKey
from protocol.wire import MAX_RECORD_BYTES

__all__ = [
    "next_entry",
    "verify_chain",
    "verify_link",
    "entries_from_jsonl",
    "entry_to_json",
    "checkpoint_dir_name",
    "MAX_LINE_CHARS",
]

MAX_LINE_CHARS = 6 * MAX_RECORD_BYTES
"""No JSON line of an entry is longer: its msgpack is at most ``MAX_RECORD_BYTES``, and JSON
writes each byte of it as at most six characters (``\\u0001`` for a control character). A longer
line is refused before it is parsed: parsing JSON can take 20 times its size in memory."""


def next_entry(
    key: SigningKey,
    previous: LedgerEntry | None,
    *,
    run_id: str,
    round: int,
    created_at: float,
    files: Sequence[FileRecord],
    contributors: Iterable[Contribution],
    heldout_loss: float | None,
    checks: Iterable[SpotCheck] = (),
) -> LedgerEntry:
    """Sign the entry that follows ``previous`` (or the genesis entry when it is None)."""
    ordered = sorted(contributors, key=lambda c: c.peer_id)
    entry = LedgerEntry.signed(
        key,
        run_id=run_id,
        seq=0 if previous is None else previous.seq + 1,
        kind="genesis" if previous is None else "checkpoint",
        prev=GENESIS_PREV if previous is None else previous.entry_hash,
        round=round,
        created_at=created_at,
        checkpoint_root=files[0].root,
        files=list(files),
        contributors=ordered,
        total_samples=sum(c.samples for c in ordered),
        heldout_loss=heldout_loss,
        checks=sorted(checks, key=lambda c: (c.round, c.peer_id)),
    )
    verify_link(previous, entry, key.public_key_hex)
    return entry


def verify_link(previous: LedgerEntry | None, entry: LedgerEntry, public_key_hex: str) -> None:
    """Check one entry against the one before it; raise naming the entry and the rule broken."""
    what = f"ledger entry {entry.seq}"
    entry.verify_signature(public_key_hex)
    if previous is None:
        if entry.seq != 0 or entry.kind != "genesis" or entry.prev != GENESIS_PREV:
            raise ChainError(f"{what}: the first entry must be the genesis entry (seq 0, prev all zeros)")
    else:
        if entry.seq != previous.seq + 1:
            raise ChainError(f"{what}: follows entry {previous.seq}, so its seq must be {previous.seq + 1}")
        if entry.kind != "checkpoint":
            raise ChainError(f"{what}: only the first entry may be a genesis entry")
        if entry.prev != previous.entry_hash:
            raise ChainError(f"{what}: prev does not match the hash of entry {previous.seq}")
        if entry.run_id != previous.run_id:
            raise ChainError(f"{what}: run id {entry.run_id} differs from entry {previous.seq}'s")
        if entry.round <= previous.round:
            raise ChainError(f"{what}: round {entry.round} does not advance past round {previous.round}")
    if entry.checkpoint_root != entry.files[0].root:
        raise ChainError(f"{what}: checkpoint_root is not the root of its first file")
    if [c.peer_id for c in entry.contributors] != sorted({c.peer_id for c in entry.contributors}):
        raise ChainError(f"{what}: contributors must be sorted by peer id without repeats")
    if entry.total_samples != sum(c.samples for c in entry.contributors):
        raise ChainError(f"{what}: total_samples is not the sum of its contributors' samples")
    if len({f.name for f in entry.files}) != len(entry.files):
        raise ChainError(f"{what}: two files share a name")
    keys = [(c.round, c.peer_id) for c in entry.checks]
    if keys != sorted(set(keys)):
        raise ChainError(f"{what}: spot checks must be sorted by round and peer id without repeats")
    if entry.checks and (entry.kind == "genesis" or entry.checks[-1].round >= entry.round):
        raise ChainError(f"{what}: a spot check must be of a round before the checkpoint's")


def verify_chain(entries: Sequence[LedgerEntry], public_key_hex: str, *, run_id: str | None = None) -> None:
    """Verify a whole ledger: signatures, links, order. Raises at the first bad entry."""
    if not entries:
        raise ChainError("ledger is empty: it must start with a genesis entry")
    previous = None
    for index, entry in enumerate(entries):
        if entry.seq != index:
            raise ChainError(f"ledger entry at line {index + 1}: seq is {entry.seq}, expected {index}")
        if run_id is not None and entry.run_id != run_id:
            raise ChainError(f"ledger entry {entry.seq}: run id {entry.run_id} is not the manifest's {run_id}")
        verify_link(previous, entry, public_key_hex)
        previous = entry


def entry_to_json(entry: LedgerEntry) -> str:
    """One JSON Lines line (no newline) holding exactly the entry's wire map."""
    return json.dumps(entry.to_wire(), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def entries_from_jsonl(text: str, *, max_lines: int = 1_000_000) -> list[LedgerEntry]:
    """Parse a JSON Lines ledger; a bad line raises ``MalformedRecord`` naming its line number."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(entries) >= max_lines:
            raise MalformedRecord(f"ledger line {number}: more than {max_lines} entries")
        if len(line) > MAX_LINE_CHARS:
            raise MalformedRecord(f"ledger line {number}: {len(line)} characters, more than an entry takes ({MAX_LINE_CHARS})")
        try:
            mapping = json.loads(line, parse_constant=_reject_constant)
            entry = LedgerEntry.from_wire(mapping)
            entry.to_bytes()  # JSON allows what msgpack cannot carry (huge ints, lone surrogates)
            entries.append(entry)
        except RecursionError:
            raise MalformedRecord(f"ledger line {number}: nested too deeply") from None
        except (ValueError, MalformedRecord) as error:
            raise MalformedRecord(f"ledger line {number}: {error}") from None
    return entries


def checkpoint_dir_name(entry: LedgerEntry) -> str:
    """The folder, under a checkpoints directory, that holds an entry's files: ``r000042``."""
    return f"r{entry.round:06d}"
