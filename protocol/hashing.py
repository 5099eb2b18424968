"""Canonical checkpoint hash (digest name ``barnraise-ckpt-v1-sha256``) and file sha256.

The canonical hash is independent of the file format, so a state received from a peer,
a safetensors file and an in-memory model can all be checked against one ledger entry.

    tensor_digest = sha256( b"barnraise.tensor.v1\\0"
                            || u32le(len(name)) || name (UTF-8)
                            || u32le(len(dtype)) || dtype (ASCII, safetensors name: F32, BF16, ...)
                            || u32le(ndim) || u64le(dim_0) || ... || u64le(dim_{ndim-1})
                            || u64le(nbytes) || the tensor's elements, row-major, little-endian )
    checkpoint_root = sha256( b"barnraise.root.v1\\0" || u64le(number of tensors)
                              || for each tensor in order of its name's UTF-8 bytes:
                                   u32le(len(name)) || name || tensor_digest (32 raw bytes) )

Roots and digests travel as 64 lowercase hex digits.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import torch

from protocol.errors import InputError

__all__ = [
    "CHECKPOINT_DIGEST",
    "DTYPE_NAMES",
    "tensor_digest",
    "checkpoint_root",
    "root_from_digests",
    "tensor_digests",
    "sha256_stream",
]

CHECKPOINT_DIGEST = "barnraise-ckpt-v1-sha256"
_TENSOR_TAG = b"barnraise.tensor.v1\x00"
_ROOT_TAG = b"barnraise.root.v1\x00"

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _name_bytes(name: str) -> bytes:
    if not isinstance(name, str) or not name:
        raise InputError(f"tensor name {name!r} must be a non-empty string")
    try:
        return name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"tensor name {name!r} is not valid UTF-8") from None


def _little_endian_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as a flat uint8 tensor in little-endian order."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() <= 1:
        # contiguous() ignores the stride of a dim of size 0 or 1 (x[::5] of 3 elements,
        # numpy's empty arrays), and view() below needs stride 1: take a fresh copy.
        flat = flat.clone(memory_format=torch.contiguous_format)
    raw = flat.view(torch.uint8) if flat.dtype != torch.bool else flat.to(torch.uint8)
    if sys.byteorder == "big" and flat.element_size() > 1:
        raw = raw.reshape(-1, flat.element_size()).flip(1).reshape(-1)
    return raw


def tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """sha256 over a tensor's name, dtype, shape and little-endian bytes (32 raw bytes)."""
    dtype_name = DTYPE_NAMES.get(tensor.dtype)
    if dtype_name is None:
        raise InputError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    raw = _little_endian_bytes(tensor)
    name_raw = _name_bytes(name)
    digest = hashlib.sha256(_TENSOR_TAG)
    digest.update(struct.pack("<I", len(name_raw)) + name_raw)
    digest.update(struct.pack("<I", len(dtype_name)) + dtype_name.encode("ascii"))
    digest.update(struct.pack("<I", tensor.dim()) + b"".join(struct.pack("<Q", d) for d in tensor.shape))
    digest.update(struct.pack("<Q", raw.numel()))
    digest.update(raw.numpy())
    return digest.digest()


def root_from_digests(digests: Iterable[tuple[str, bytes]]) -> str:
    """Combine (name, tensor digest) pairs into the checkpoint root (hex)."""
    items = sorted(((_name_bytes(name), d) for name, d in digests), key=lambda item: item[0])
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise InputError("checkpoint has two tensors with the same name")
    root = hashlib.sha256(_ROOT_TAG)
    root.update(struct.pack("<Q", len(items)))
    for name_raw, digest in items:
        if len(digest) != 32:
            raise InputError("a tensor digest must be 32 bytes")
        root.update(struct.pack("<I", len(name_raw)) + name_raw + digest)
    return root.hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Each tensor's digest as hex, by name."""
    return {name: tensor_digest(name, tensor).hex() for name, tensor in tensors.items()}


def checkpoint_root(tensors: Mapping[str, torch.Tensor]) -> str:
    """The canonical root (hex) of a named set of tensors."""
    return root_from_digests((name, tensor_digest(name, t)) for name, t in tensors.items())


def sha256_stream(stream: BinaryIO, chunk_bytes: int = 1 << 20) -> str:
    """Plain sha256 of a byte stream, as ``sha256sum`` prints it."""
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_bytes):
        digest.update(chunk)
    return digest.hexdigest()
