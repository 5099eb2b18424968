"""``barnraise-audit``: check a run's signed ledger, and its checkpoint files, offline.

    barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --checkpoints checkpoints/
    barnraise-audit verify --ledger https://coordinator.example/ledger.jsonl --public-key coordinator.pub
    barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --export exported-model/
    barnraise-audit verify --ledger ledger.jsonl --public-key coordinator.pub --format json
    barnraise-audit hash checkpoints/r000042 --tensors

Exit status: 0 when everything checked holds; 1 when a check fails (one stderr line, ``audit failed:
...``, names the first failure); 2 when the input is unusable (a missing file, an unreachable URL,
a malformed ledger, an unreadable key), also one line.

``--format json`` prints one JSON object on stdout instead (docs/auditor.md); the exit status and
the stderr line stay the same.

Imports only ``protocol``'s torch-free modules, the standard library and ``safetensors``: auditors
need nothing else (``tests/test_light_install.py`` runs it with torch and hivemind unimportable).
Tensor digests are therefore computed from the file's bytes, not through torch; they equal
``protocol.hashing.tensor_digest`` of the loaded tensor, which ``tests/test_audit.py`` checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

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
from protocol.ledger import checkpoint_dir_name, entries_from_jsonl, verify_chain
from protocol.records import FileRecord, LedgerEntry
from protocol.signing import key_id, public_key_from_pem

__all__ = [
    "LEDGER_MAX_BYTES", "FETCH_TIMEOUT_S", "FETCH_DEADLINE_S", "REPORT_VERSION", "FileHashes", "AuditSummary",
    "CheckpointResult", "hash_safetensors_file", "file_record", "verify_recorded_roots", "verify_checkpoint_files",
    "check_checkpoints", "read_ledger", "read_public_key", "audit", "verify_export", "main",
]

LEDGER_MAX_BYTES = 256 * 1024 * 1024  # from a URL; an entry holds every tensor's digest, tens of KiB
FETCH_TIMEOUT_S = 30.0  # deadline to connect to a ledger URL, and for each read from it
FETCH_DEADLINE_S = 600.0  # deadline for the whole download
REPORT_VERSION = 1  # of the --format json object; a change of its keys' meaning bumps it


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


@dataclass(frozen=True, kw_only=True)
class CheckpointResult:
    """One ledger entry's files checked against a checkpoints folder (``--format json`` lists these)."""

    seq: int
    round: int
    checkpoint_root: str
    problem: str | None  # the first mismatch, as ``audit failed: ...`` names it; None when every file holds
    files: int  # what the entry records: its files, their tensors and bytes
    tensors: int
    bytes: int


# The canonical hash (protocol/hashing.py's docstring), over a safetensors file's bytes.
_TENSOR_TAG = b"barnraise.tensor.v1\x00"
_ROOT_TAG = b"barnraise.root.v1\x00"
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_BOOL_BYTES = bytes([0] + [1] * 255)  # torch reads any non-zero byte of a BOOL tensor as True, hashed as 1
_CHUNK_BYTES = 1 << 20


class _TensorSpan(NamedTuple):
    """A tensor of a safetensors file: its header entry, its bytes at ``begin:end`` of the data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _name_bytes(name: str) -> bytes:
    if not name:
        raise InputError("a tensor name must be a non-empty string")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"tensor name {name!r} is not valid UTF-8") from None


def _root_from_digests(digests: dict[str, bytes]) -> str:
    root = hashlib.sha256(_ROOT_TAG + struct.pack("<Q", len(digests)))
    for name_raw, digest in sorted((_name_bytes(name), digest) for name, digest in digests.items()):
        if len(digest) != 32:
            raise InputError("a tensor digest must be 32 bytes")
        root.update(struct.pack("<I", len(name_raw)) + name_raw + digest)
    return root.hexdigest()


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError("a name appears twice in the header")
    return dict(pairs)


def _span(name: str, spec: Any) -> _TensorSpan:
    """Check one header entry; safetensors already did, this guards the reads that follow."""
    if not isinstance(spec, dict) or not name:
        raise ValueError(f"bad header entry for {name!r}")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in _ITEM_BYTES:
        raise InputError(f"tensor {name!r} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 64 for d in shape) \
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets) \
            or not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != math.prod(shape) * _ITEM_BYTES[dtype]:
        raise ValueError(f"bad header entry for {name!r}")
    return _TensorSpan(name, dtype, tuple(shape), offsets[0], offsets[1])


def _read_spans(path: Path, size: int) -> tuple[int, list[_TensorSpan]]:
    """Where each tensor's bytes lie: (offset of the data in the file, one span per tensor)."""
    try:
        # safetensors checks the header and that the tensors tile the data exactly; numpy, not torch.
        with safe_open(str(path), framework="numpy"):
            pass
        with path.open("rb") as stream:
            header_len = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(header_len), object_pairs_hook=_unique_keys)
        spans = [_span(name, spec) for name, spec in header.items() if name != "__metadata__"]
    except (SafetensorError, ValueError, AttributeError, RecursionError) as error:
        raise InputError(f"not a valid safetensors file ({error})") from None
    if any(8 + header_len + span.end > size for span in spans):
        raise InputError("not a valid safetensors file (a tensor ends past the end of the file)")
    return 8 + header_len, spans


def _span_digest(span: _TensorSpan, stream: BinaryIO, data_start: int) -> bytes:
    """``protocol.hashing.tensor_digest`` of the tensor, from its little-endian bytes in the file."""
    name_raw = _name_bytes(span.name)
    digest = hashlib.sha256(_TENSOR_TAG)
    digest.update(struct.pack("<I", len(name_raw)) + name_raw)
    digest.update(struct.pack("<I", len(span.dtype)) + span.dtype.encode("ascii"))
    digest.update(struct.pack("<I", len(span.shape)) + b"".join(struct.pack("<Q", d) for d in span.shape))
    digest.update(struct.pack("<Q", span.end - span.begin))
    stream.seek(data_start + span.begin)
    left = span.end - span.begin
    while left:  # a chunk at a time, so a file larger than memory can still be checked
        chunk = stream.read(min(left, _CHUNK_BYTES))
        if not chunk:
            raise InputError(f"not a valid safetensors file (it ends inside tensor {span.name!r})")
        digest.update(chunk.translate(_BOOL_BYTES) if span.dtype == "BOOL" else chunk)
        left -= len(chunk)
    return digest.digest()


def _measure(path: Path) -> FileHashes:
    """Hash a safetensors file; ``InputError`` (without the path) if it is not valid safetensors."""
    with path.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        digest = hashlib.sha256()
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    data_start, spans = _read_spans(path, size)
    with path.open("rb") as stream:
        digests = {span.name: _span_digest(span, stream, data_start) for span in spans}
    return FileHashes(root=_root_from_digests(digests), sha256=digest.hexdigest(), size=size,
                      tensors={name: raw.hex() for name, raw in digests.items()})


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
            root = _root_from_digests({name: bytes.fromhex(digest) for name, digest in record.tensors.items()})
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


def check_checkpoints(entries: list[LedgerEntry], folder: str | os.PathLike[str]) -> list[CheckpointResult]:
    """``verify_checkpoint_files`` for each entry, going on past a mismatch: one result per entry."""
    results = []
    for entry in entries:
        try:
            verify_checkpoint_files(entry, folder)
            problem = None
        except HashMismatch as error:
            problem = str(error)
        results.append(CheckpointResult(seq=entry.seq, round=entry.round, checkpoint_root=entry.checkpoint_root,
                                        problem=problem, files=len(entry.files),
                                        tensors=sum(len(r.tensors) for r in entry.files),
                                        bytes=sum(r.size for r in entry.files)))
    return results


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
    for command in (verify, hash_):
        command.add_argument("--format", choices=("text", "json"), default="text",
                             help="text (default) or one JSON object on stdout; exit status and stderr are the same")
    return parser


def _run_verify(args: argparse.Namespace) -> int:
    if args.checkpoints is not None and not args.checkpoints.is_dir():
        raise InputError(f"checkpoints folder {args.checkpoints} does not exist")
    public_key_hex = read_public_key(args.public_key)
    entries = read_ledger(args.ledger)
    if args.format == "json":
        report = _verify_report(entries, public_key_hex, args)
        _print_json(report)
        return _fail(1, f"audit failed: {report['problems'][0]}") if report["problems"] else 0
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


def _verify_report(entries: list[LedgerEntry], public_key_hex: str, args: argparse.Namespace) -> dict[str, Any]:
    """What ``verify --format json`` prints. Unlike the text report it goes on past a failed checkpoint
    (each entry gets its result); a ledger that fails leaves the checkpoints and the export unchecked."""
    problems: list[str] = []
    ledger = {"ok": True, "entries": len(entries), "run_id": entries[-1].run_id if entries else None,
              "last_round": entries[-1].round if entries else None, "key_id": key_id(public_key_hex)}
    checkpoints = export = None
    try:
        audit(entries, public_key_hex)  # the chain, the signatures, each entry's recorded roots
    except VerificationError as error:
        ledger["ok"] = False
        problems.append(str(error))
    if ledger["ok"] and args.checkpoints is not None:
        results = check_checkpoints(entries[-1:] if args.last_only else entries, args.checkpoints)
        checkpoints = [{"ok": r.problem is None, **dataclasses.asdict(r)} for r in results]
        problems += [r.problem for r in results if r.problem is not None]
    if ledger["ok"] and args.export is not None:
        export = {"ok": True, "path": str(args.export), "problem": None, "seq": None, "round": None,
                  "checkpoint_root": None}
        try:
            entry = verify_export(entries, args.export)
            export.update(seq=entry.seq, round=entry.round, checkpoint_root=entry.checkpoint_root)
        except VerificationError as error:
            export.update(ok=False, problem=str(error))
            problems.append(str(error))
    return {"version": REPORT_VERSION, "command": "verify", "ok": not problems, "error": None,
            "problems": problems, "ledger": ledger, "checkpoints": checkpoints, "export": export}


def _run_hash(args: argparse.Namespace) -> int:
    path: Path = args.path
    if not path.exists():
        raise InputError(f"{path} does not exist")
    files = sorted((p for p in path.iterdir() if p.name.endswith(".safetensors") and p.is_file()),
                   key=lambda p: p.name.encode()) if path.is_dir() else [path]
    if not files:
        raise InputError(f"no .safetensors files in {path}")
    reports = []
    for file in files:
        hashes = hash_safetensors_file(file)
        tensors = {name: hashes.tensors[name] for name in sorted(hashes.tensors, key=str.encode)}
        if args.format == "json":
            reports.append({"path": str(file), "size": hashes.size, "sha256": hashes.sha256,
                            "checkpoint_root": hashes.root, "tensors": tensors if args.tensors else None})
            continue
        print(f"file {file}\nsize {hashes.size}\nsha256 {hashes.sha256}\ncheckpoint_root {hashes.root}")
        if args.tensors:
            for name, digest in tensors.items():
                print(f"{digest} {name}")
    if args.format == "json":
        _print_json({"version": REPORT_VERSION, "command": "hash", "ok": True, "error": None, "files": reports})
    return 0


def _print_json(report: dict[str, Any]) -> None:
    print(json.dumps(report, indent=2))


def _fail(status: int, line: str) -> int:
    print(" ".join(line.split()), file=sys.stderr)  # always exactly one line
    return status


def main(argv: list[str] | None = None) -> int:
    """Run ``barnraise-audit``; return the exit status (0 ok, 1 a check failed, 2 bad input)."""
    args = None
    try:
        args = _build_parser().parse_args(argv)
        return args.run(args)
    except VerificationError as error:
        return _fail(1, f"audit failed: {error}")
    except (BarnraiseError, OSError) as error:
        if args is not None and args.format == "json":  # a usage error has no args, and prints no JSON
            _print_json({"version": REPORT_VERSION, "command": args.command, "ok": False,
                         "error": " ".join(str(error).split()), "problems": []})
        return _fail(2, f"barnraise-audit: error: {error}")
    except KeyboardInterrupt:
        return _fail(130, "barnraise-audit: interrupted")


if __name__ == "__main__":
    sys.exit(main())
