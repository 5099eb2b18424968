"""The one msgpack codec: canonical encoding, strict decoding, schema checks, size limits.

Every record is a msgpack map whose values are drawn from a JSON-compatible data model
(str, int, float, bool, None, list, map with str keys): hashes, keys and signatures travel
as lowercase hex strings. So the same record can be exported as JSON (the ledger's JSON
Lines, the HTTP manifest) and re-encoded to the exact bytes that were signed.

Canonical form: maps with keys sorted by their UTF-8 bytes, floats always as float64,
``use_bin_type``. ``canonical_bytes(obj)`` is what signatures and entry hashes cover.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from protocol.errors import MalformedRecord

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_RECORD_BYTES",
    "canonical_bytes",
    "decode_map",
    "Field",
    "check_fields",
    "is_hex",
    "is_wire_int",
]

PROTOCOL_VERSION = 1
MAX_RECORD_BYTES = 256 * 1024
"""No record of this protocol is larger; anything bigger is rejected before decoding."""

_MAX_STR = 64 * 1024
_MAX_CONTAINER = 4096
_HEX = re.compile(r"\A[0-9a-f]*\Z")
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
"""msgpack's integer range: an int outside it has no wire encoding."""


def is_wire_int(value: Any) -> bool:
    """True for an int (not a bool) that msgpack can encode: -2**63 .. 2**64 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and _INT_MIN <= value <= _INT_MAX


def _utf8(text: str, path: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedRecord(f"{path}: string is not valid UTF-8 (lone surrogate)") from None


def _canonical(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        out = {}
        for key in value:
            if not isinstance(key, str):
                raise MalformedRecord(f"{path}: map key {key!r} is not a string")
        for key in sorted(value, key=lambda k: _utf8(k, path)):
            out[key] = _canonical(value[key], f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MalformedRecord(f"{path}: {value} is not a finite number")
        return value
    if isinstance(value, int) and not isinstance(value, bool) and not is_wire_int(value):
        raise MalformedRecord(f"{path}: {value} is outside the 64-bit integer range")
    if isinstance(value, str):
        _utf8(value, path)
        return value
    if value is None or isinstance(value, (int, bool)):
        return value
    raise MalformedRecord(f"{path}: type {type(value).__name__} is not part of the wire data model")


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The canonical msgpack encoding of a record (sorted keys, float64, str keys only)."""
    return msgpack.packb(_canonical(record, "record"), use_bin_type=True, use_single_float=False)


def _reject_ext(code: int, data: bytes) -> Any:
    raise MalformedRecord(f"msgpack extension type {code} is not allowed")


def decode_map(raw: bytes, *, what: str, max_bytes: int = MAX_RECORD_BYTES,
               max_container: int = _MAX_CONTAINER) -> dict[str, Any]:
    """Decode untrusted bytes into a plain map, enforcing size limits; no object hooks."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise MalformedRecord(f"{what}: expected bytes, got {type(raw).__name__}")
    if len(raw) > max_bytes:
        raise MalformedRecord(f"{what}: {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        value = msgpack.unpackb(
            bytes(raw),
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            max_str_len=_MAX_STR,
            max_bin_len=0,
            max_array_len=max_container,
            max_map_len=_MAX_CONTAINER,
            max_ext_len=0,
        )
    except MalformedRecord:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData) as error:
        raise MalformedRecord(f"{what}: not valid msgpack ({type(error).__name__}: {error})") from None
    if not isinstance(value, dict):
        raise MalformedRecord(f"{what}: expected a map, got {type(value).__name__}")
    return value


def is_hex(value: Any, length: int | None = None) -> bool:
    """True for a lowercase hex string (of ``length`` characters when given)."""
    return (
        isinstance(value, str)
        and _HEX.match(value) is not None
        and (length is None or len(value) == length)
    )


@dataclass(frozen=True)
class Field:
    """One field of a schema: its wire type and an optional extra check."""

    name: str
    kind: type | tuple[type, ...]
    check: Callable[[Any], bool] | None = None
    describe: str = ""


def _type_ok(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int) and float in kinds and int not in kinds:
        return True  # a float field may carry an integral value written as an int (JSON)
    return isinstance(value, kinds)


def check_fields(mapping: Mapping[str, Any], fields: tuple[Field, ...], *, what: str) -> dict[str, Any]:
    """Check that ``mapping`` has exactly ``fields``, each of the right type; return a copy."""
    if not all(isinstance(key, str) for key in mapping):
        raise MalformedRecord(f"{what}: a field name is not a string")
    expected = {f.name for f in fields}
    present = set(mapping)
    if missing := sorted(expected - present):
        raise MalformedRecord(f"{what}: missing field {missing[0]!r}")
    if extra := sorted(present - expected):
        raise MalformedRecord(f"{what}: unknown field {extra[0]!r}")
    out = {}
    for field in fields:
        value = mapping[field.name]
        if not _type_ok(value, field.kind):
            raise MalformedRecord(
                f"{what}: field {field.name!r} has type {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise MalformedRecord(f"{what}: field {field.name!r} is not finite")
        if isinstance(value, int) and not isinstance(value, bool) and not is_wire_int(value):
            raise MalformedRecord(f"{what}: field {field.name!r} is outside the 64-bit integer range")
        if field.check is not None and not field.check(value):
            hint = f" ({field.describe})" if field.describe else ""
            raise MalformedRecord(f"{what}: field {field.name!r} has a bad value{hint}")
        out[field.name] = float(value) if field.kind is float and not isinstance(value, float) else value
    return out
