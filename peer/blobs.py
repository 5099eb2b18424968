"""Content-addressed files: the run's model config, tokenizer, data index and token shards.

``BlobStore`` is a folder of files named by the sha256 of their bytes (the coordinator's
``WORKDIR/blobs``, a peer's cache in its workdir). ``read`` hashes a file every time it is read,
so a file changed on disk is never used. ``BlobCache`` fills a store on demand from sources tried
in turn (the coordinator's ``/blobs/<sha256>``, then peers that hold it) and refuses bytes that do
not hash to the name asked for, with one line naming the file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from protocol.errors import BarnraiseError, HashMismatch, InputError, TransportError
from protocol.hashing import sha256_stream
from protocol.wire import is_hex

__all__ = ["BlobStore", "BlobCache", "BlobSource"]

BlobSource = Callable[[str, int, Path], None]
"""Writes the blob ``sha256`` (of at most ``size`` bytes: its size when known, else a cap for its
kind; -1: the source's own cap) to a path, or raises ``BarnraiseError`` with one line; the cache
checks the bytes."""


class BlobStore:
    """A folder of files named by their sha256."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_hex(sha256, 64):
            raise InputError(f"{sha256!r} is not a sha256 (64 lowercase hex digits)")
        return self.folder / sha256

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Write ``data`` under its sha256 (always: a file already there may have been changed)."""
        digest = hashlib.sha256(data).hexdigest()
        target = self.path(digest)
        partial = target.with_name(f".{digest}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        return digest

    def put_file(self, source: Path) -> str:
        """Copy ``source`` in (streamed); returns its sha256."""
        digest = _file_sha256(source)
        target = self.path(digest)
        if not target.is_file():
            partial = target.with_name(f".{digest}.partial")
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        return digest

    def read(self, sha256: str, what: str) -> bytes:
        """The blob's bytes, checked against its name (``HashMismatch`` naming ``what`` if not)."""
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InputError(f"{what} (sha256 {sha256[:16]}) is not in {self.folder}: {error.strerror}") from None
        if (got := hashlib.sha256(data).hexdigest()) != sha256:
            raise HashMismatch(f"{what} in {self.folder} hashes to {got[:16]}, the run names {sha256[:16]}: refused")
        return data

    def verify(self, sha256: str, what: str) -> None:
        """Check the file on disk against its name, streamed (for files larger than memory)."""
        try:
            got = _file_sha256(self.path(sha256))
        except OSError as error:
            raise InputError(f"{what} (sha256 {sha256[:16]}) is not in {self.folder}: {error.strerror}") from None
        if got != sha256:
            raise HashMismatch(f"{what} in {self.folder} hashes to {got[:16]}, the run names {sha256[:16]}: refused")


class BlobCache(BlobStore):
    """A store that fetches what it lacks from ``sources`` (tried in turn), keeping only bytes that
    hash to the name asked for."""

    def __init__(self, folder: Path, sources: Sequence[tuple[str, BlobSource]] = ()):
        super().__init__(folder)
        self.sources = list(sources)
        """(name for messages, source) pairs, tried in this order."""

    def fetch(self, sha256: str, size: int, what: str) -> Path:
        """The blob's path here, fetched first if missing or changed. ``HashMismatch`` (one line naming
        ``what`` and the source) when a source's bytes do not match and no other source has it right;
        ``TransportError`` when no source could be reached."""
        target = self.path(sha256)
        if target.is_file():
            if _file_sha256(target) == sha256:
                return target
            target.unlink()  # changed on disk: fetched again
        mismatch: str | None = None
        failures = []
        partial = target.with_name(f".{sha256}.partial")
        for name, source in self.sources:
            try:
                source(sha256, size, partial)
                got = _file_sha256(partial)
                if size >= 0 and (got_size := partial.stat().st_size) != size:  # cut short: try the next source
                    failures.append(f"{name}: {got_size} of {size} bytes arrived")
                    continue
                if got == sha256:
                    os.replace(partial, target)
                    return target
                mismatch = mismatch or f"{what} from {name} hashes to {got[:16]}, the run names {sha256[:16]}: refused"
            except BarnraiseError as error:
                failures.append(f"{name}: {error}")
            except OSError as error:
                failures.append(f"{name}: {error.strerror or error}")
            finally:
                partial.unlink(missing_ok=True)
        if mismatch is not None:
            raise HashMismatch(mismatch)
        reasons = "; ".join(failures) if failures else "no source to fetch it from"
        raise TransportError(f"cannot fetch {what} (sha256 {sha256[:16]}): {reasons}")

    def read(self, sha256: str, what: str, size: int = -1) -> bytes:  # type: ignore[override]
        """The blob's bytes, read and hashed once when this cache holds it right; else fetched first."""
        try:
            return super().read(sha256, what)
        except (InputError, HashMismatch):  # missing, or changed on disk
            self.fetch(sha256, size, what)
            return super().read(sha256, what)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return sha256_stream(stream)
