"""Files a peer (or coordinator) keeps in its working folder."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.errors import InputError
from protocol.signing import SigningKey

__all__ = ["load_or_create_key", "write_atomic", "fsync_folder"]


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a power loss cannot undo it)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def load_or_create_key(path: Path) -> SigningKey:
    """The Ed25519 key at ``path`` (PEM), created with mode 0600 if missing."""
    if path.exists():
        try:
            return SigningKey.from_pem(path.read_bytes())
        except InputError as error:
            raise InputError(f"{path}: {error}") from None
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, key.to_pem(), mode=0o600)
    return key
