"""``barnraise-audit``: check a run's signed ledger, and its checkpoint files, offline.

    barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --checkpoints checkpoints/
    barnraise-audit verify --ledger https://coordinator.example/ledger.jsonl --public-key coordinator.pub
    barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --export exported-model/
    barnraise-audit hash checkpoints/r000042 --tensors

Exit status: 0 when everything checked holds; 1 when a check fails (one stderr line, ``audit failed:
...``, names the first failure); 2 when the input is unusable (a missing file, an unreachable URL,
a malformed ledger, an unreadable key), also one line.

Imports only ``protocol``, the standard library and ``safetensors``: auditors need nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import NamedTuple

from safetensors import SafetensorError, safe_open

from protocol.cli import OneLineParser
from protocol.errors import (
    BarnraiseError,
    DeadlineExceeded,
    HashMismatch,
    InputError,
    SignatureError,
    TransportError,
    VerificationError,
)
from protocol.hashing import root_from_digests, sha256_stream, tensor_digest
from protocol.ledger import checkpoint_dir_name, entries_from_jsonl, verify_chain
from protocol.records import FileRecord, LedgerEntry
from protocol.signing import key_id, public_key_from_pem

__all__ = [
    "LEDGER_MAX_BYTES", "FETCH_TIMEOUT_S", "FETCH_DEADLINE_S", "FileHashes", "AuditSummary",
    "hash_safetensors_file", "file_record", "verify_recorded_roots", "verify_checkpoint_files",
    "read_ledger", "read_public_key", "audit", "verify_export", "main",
]

LEDGER_MAX_BYTES = 256 * 1024 * 1024  # from a URL; an entry holds every tensor's digest, tens of KiB
FETCH_TIMEOUT_S = 30.0  # deadline to connect to a ledger URL, and for each read from it
FETCH_DEADLINE_S = 600.0  # deadline for the whole download


class FileHashes(NamedTuple):
    """What the ledger records about a safetensors file, measured from its bytes (hex digests)."""

    root: str  # canonical root of the file's tensors
    sha256: str  # plain sha256 of the file, as sha256sum prints it
    size: int  # bytes
    tensors: dict[str, str]  # each tensor's canonical digest, by name


@dataclass(frozen=True, kw_only=True)
class AuditSummary:
    """What a successful ``audit`` checked; files, tensors, bytes are 0 without a checkpoints folder."""

    entries: int
    run_id: str
    last_round: int
    key_id: str
    files: int
    tensors: int
    bytes: int


def _measure(path: Path) -> FileHashes:
    """Hash a safetensors file; ``InputError`` (without the path) if it is not valid safetensors."""
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        sha256 = sha256_stream(stream)
    try:
        # One tensor at a time, so a file larger than memory can still be checked.
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: tensor_digest(name, handle.get_tensor(name)).hex() for name in handle.keys()}
    except (SafetensorError, TypeError, RuntimeError) as error:  # odd shapes surface as TypeError/RuntimeError
        raise InputError(f"not a valid safetensors file ({error})") from None
    root = root_from_digests((name, bytes.fromhex(digest)) for name, digest in tensors.items())
    return FileHashes(root=root, sha256=sha256, size=size, tensors=tensors)


def hash_safetensors_file(path: str | os.PathLike[str]) -> FileHashes:
    """Measure a safetensors file. ``InputError`` naming the path if it is not valid safetensors
    (or holds a dtype the canonical hash does not cover); ``OSError`` if it cannot be read."""
    try:
        return _measure(Path(path))
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def file_record(path: str | os.PathLike[str]) -> FileRecord:
    """The ledger's record of a safetensors file, named by its file name."""
    hashes = hash_safetensors_file(path)
    return FileRecord(name=Path(path).name, **hashes._asdict())


def verify_recorded_roots(entry: LedgerEntry) -> None:
    """Check that each file's recorded tensor digests combine to its recorded root (no files read)."""
    for record in entry.files:
        where = f"ledger entry {entry.seq}, file {record.name}"
        try:
            root = root_from_digests((name, bytes.fromhex(digest)) for name, digest in record.tensors.items())
        except (InputError, ValueError) as error:
            raise HashMismatch(f"{where}: recorded tensor digests are invalid ({error})") from None
        if root != record.root:
            raise HashMismatch(f"{where}: recorded tensor digests do not combine to the recorded root")


def _compare_tensors(recorded: dict[str, str], measured: dict[str, str], where: str) -> None:
    if missing := recorded.keys() - measured.keys():
        raise HashMismatch(f"{where}, tensor {min(missing, key=str.encode)}: in the ledger but not in the file")
    if extra := measured.keys() - recorded.keys():
        raise HashMismatch(f"{where}, tensor {min(extra, key=str.encode)}: in the file but not in the ledger")
    for name in sorted(recorded, key=str.encode):
        if measured[name] != recorded[name]:
            raise HashMismatch(f"{where}, tensor {name}: digest does not match the ledger")


def _verify_file(record: FileRecord, path: Path, where: str, shown: str) -> None:
    if Path(record.name).name != record.name or record.name in ("", ".", ".."):
        raise HashMismatch(f"{where}: the file name is not a plain file name")
    if not path.is_file():
        raise HashMismatch(f"{where}: missing (expected {shown})")
    if (size := path.stat().st_size) != record.size:
        raise HashMismatch(f"{where}: size is {size} bytes, the ledger says {record.size}")
    try:
        measured = _measure(path)
    except InputError as error:
        raise HashMismatch(f"{where}: {error}") from None
    # Tensors first: a changed byte inside a tensor is then reported by the tensor's name.
    _compare_tensors(record.tensors, measured.tensors, where)
    if measured.root != record.root:
        raise HashMismatch(f"{where}: root of its tensors does not match the ledger")
    if measured.sha256 != record.sha256:
        raise HashMismatch(f"{where}: sha256 does not match the ledger")


def verify_checkpoint_files(entry: LedgerEntry, folder: str | os.PathLike[str]) -> None:
    """Check each file ``entry`` records against ``folder/r000042/<name>``: size, every tensor's digest,
    the roots, the sha256. Raises ``HashMismatch`` naming the entry, the file and any tensor to blame."""
    subfolder = checkpoint_dir_name(entry)
    for index, record in enumerate(entry.files):
        where = f"ledger entry {entry.seq}, file {record.name}"
        _verify_file(record, Path(folder) / subfolder / record.name, where, f"{subfolder}/{record.name}")
        if index == 0 and record.root != entry.checkpoint_root:
            raise HashMismatch(f"{where}: its root is not the entry's checkpoint_root")


def _fetch(url: str, max_bytes: int) -> bytes:
    deadline = time.monotonic() + FETCH_DEADLINE_S
    body = bytearray()
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            while chunk := response.read(1 << 20):
                body += chunk
                if len(body) > max_bytes:
                    raise InputError(f"ledger {url} is larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise DeadlineExceeded(f"ledger {url}: download took longer than {FETCH_DEADLINE_S:.0f} s")
    except BarnraiseError:
        raise
    except urllib.error.HTTPError as error:
        error.close()
        raise TransportError(f"cannot fetch ledger {url}: HTTP {error.code} {error.reason}") from None
    except (OSError, HTTPException) as error:  # refused, unknown host, a timeout, a reset, a bad response
        reason = getattr(error, "reason", None) or error or type(error).__name__
        raise TransportError(f"cannot fetch ledger {url}: {reason}") from None
    return bytes(body)


def read_ledger(source: str, *, max_bytes: int | None = None) -> list[LedgerEntry]:
    """Parse a JSON Lines ledger from a local file or an http(s) URL. ``InputError`` (or
    ``TransportError``) when it cannot be read or a line is malformed; nothing is verified."""
    if source.startswith(("http://", "https://")):
        raw = _fetch(source, LEDGER_MAX_BYTES if max_bytes is None else max_bytes)
    else:
        try:
            raw = Path(source).read_bytes()
        except OSError as error:
            raise InputError(f"cannot read ledger {source}: {error.strerror or error}") from None
    try:
        return entries_from_jsonl(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"ledger {source} is not UTF-8 text") from None


def read_public_key(path: str | os.PathLike[str]) -> str:
    """The coordinator's public key (hex) from a PEM SubjectPublicKeyInfo or a 64-hex-digit file."""
    try:
        return public_key_from_pem(Path(path).read_bytes())
    except OSError as error:
        raise InputError(f"cannot read public key {path}: {error.strerror or error}") from None
    except InputError as error:
        raise InputError(f"public key {path}: {error}") from None


def audit(entries: list[LedgerEntry], public_key_hex: str, checkpoints: Path | None = None, *,
          last_only: bool = False) -> AuditSummary:
    """Verify the chain, each entry's recorded roots, then (given ``checkpoints``) every file of
    every entry, or of the last entry only. Raises a ``VerificationError`` at the first failure."""
    if entries and entries[0].signer != public_key_hex:
        raise SignatureError(f"ledger entry {entries[0].seq}: signature is by key {key_id(entries[0].signer)}, "
                             f"not by the given public key {key_id(public_key_hex)}")
    verify_chain(entries, public_key_hex)
    for entry in entries:
        verify_recorded_roots(entry)
    checked: list[LedgerEntry] = []
    if checkpoints is not None:
        checked = entries[-1:] if last_only else entries
        for entry in checked:
            verify_checkpoint_files(entry, checkpoints)
    records = [record for entry in checked for record in entry.files]
    return AuditSummary(entries=len(entries), run_id=entries[-1].run_id, last_round=entries[-1].round,
                        key_id=key_id(public_key_hex), files=len(records),
                        tensors=sum(len(r.tensors) for r in records), bytes=sum(r.size for r in records))


_EXPORT_RECORD_MAX_BYTES = 64 * 1024


def verify_export(entries: list[LedgerEntry], folder: str | os.PathLike[str]) -> LedgerEntry:
    """The ledger entry whose signed checkpoint root is the root of ``folder/model.safetensors`` (a
    ``barnraise-coordinator export``). Its ``barnraise.json``, when present, names the entry; without
    it any entry may match. ``HashMismatch`` naming the export when none does."""
    folder = Path(folder)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise InputError(f"export {folder} has no model.safetensors")
    measured = hash_safetensors_file(weights)
    root = measured.root
    claimed = None
    record_path = folder / "barnraise.json"
    if record_path.is_file():
        if record_path.stat().st_size > _EXPORT_RECORD_MAX_BYTES:
            raise InputError(f"export {folder}: barnraise.json is larger than {_EXPORT_RECORD_MAX_BYTES} bytes")
        try:
            claimed = json.loads(record_path.read_text(encoding="utf-8"))["entry_seq"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"export {folder}: barnraise.json does not name an entry_seq") from None
        if not isinstance(claimed, int) or isinstance(claimed, bool) or not 0 <= claimed < len(entries):
            raise HashMismatch(f"export {folder}: barnraise.json names entry {claimed!r}, which the ledger does not hold")
        entry = entries[claimed]
        if entry.checkpoint_root != root:
            recorded = next((r.tensors for r in entry.files if r.root == entry.checkpoint_root), None)
            where = f"export {folder}: its weights hash to root {root[:16]}, ledger entry {entry.seq} signed root " \
                    f"{entry.checkpoint_root[:16]}"
            if recorded is not None:
                _compare_tensors(recorded, measured.tensors, where)  # names the first tensor that differs
            raise HashMismatch(where)
        return entry
    for entry in reversed(entries):
        if entry.checkpoint_root == root:
            return entry
    raise HashMismatch(f"export {folder}: its weights hash to root {root[:16]}, which no ledger entry signed")


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="barnraise-audit", description="Check a Barnraise ledger and its checkpoints offline.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="verify the signed ledger and, optionally, checkpoint files")
    verify.add_argument("--ledger", required=True, help="ledger.jsonl: a local file or an http(s) URL")
    verify.add_argument("--public-key", required=True, help="the coordinator's public key: PEM or 64 hex digits")
    verify.add_argument("--checkpoints", type=Path, help="folder holding r000042/<file> for every ledger entry")
    verify.add_argument("--export", type=Path, metavar="DIR",
                        help="a Hugging Face folder from barnraise-coordinator export: its weights must be a signed entry's")
    verify.add_argument("--last-only", action="store_true",
                        help="with --checkpoints, check only the newest entry's files (the chain is still checked)")
    verify.set_defaults(run=_run_verify)
    hash_ = commands.add_parser("hash", help="print a safetensors file's checkpoint root and sha256")
    hash_.add_argument("path", type=Path, help="a .safetensors file, or a folder of them")
    hash_.add_argument("--tensors", action="store_true", help="also print each tensor's digest")
    hash_.set_defaults(run=_run_hash)
    return parser


def _run_verify(args: argparse.Namespace) -> int:
    if args.checkpoints is not None and not args.checkpoints.is_dir():
        raise InputError(f"checkpoints folder {args.checkpoints} does not exist")
    public_key_hex = read_public_key(args.public_key)
    entries = read_ledger(args.ledger)
    summary = audit(entries, public_key_hex, args.checkpoints, last_only=args.last_only)
    exported = verify_export(entries, args.export) if args.export is not None else None
    print(f"ledger ok: {summary.entries} entries of run {summary.run_id}, last round {summary.last_round}, "
          f"signed by key {summary.key_id}")
    print("checkpoints: not checked (give --checkpoints DIR to check the files)" if args.checkpoints is None
          else f"checkpoints ok: {summary.files} files, {summary.tensors} tensors, {summary.bytes} bytes")
    if exported is not None:
        print(f"export ok: {args.export}/model.safetensors is ledger entry {exported.seq} (round {exported.round}, "
              f"root {exported.checkpoint_root[:16]})")
    return 0


def _run_hash(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists():
        raise InputError(f"{path} does not exist")
    files = sorted((p for p in path.iterdir() if p.name.endswith(".safetensors") and p.is_file()),
                   key=lambda p: p.name.encode()) if path.is_dir() else [path]
    if not files:
        raise InputError(f"no .safetensors files in {path}")
    for file in files:
        hashes = hash_safetensors_file(file)
        print(f"file {file}\nsize {hashes.size}\nsha256 {hashes.sha256}\ncheckpoint_root {hashes.root}")
        if args.tensors:
            for name in sorted(hashes.tensors, key=str.encode):
                print(f"{hashes.tensors[name]} {name}")
    return 0


def _fail(status: int, line: str) -> int:
    print(" ".join(line.split()), file=sys.stderr)  # always exactly one line
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``barnraise-audit``; return the exit status (0 ok, 1 a check failed, 2 bad input)."""
    try:
        args = _build_parser().parse_args(argv)
        return args.run(args)
    except VerificationError as error:
        return _fail(1, f"audit failed: {error}")
    except (BarnraiseError, OSError) as error:
        return _fail(2, f"barnraise-audit: error: {error}")
    except KeyboardInterrupt:
        return _fail(130, "barnraise-audit: interrupted")


if __name__ == "__main__":
    sys.exit(main())
