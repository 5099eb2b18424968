"""How the fuzzer makes hostile inputs (``bench.fuzz``): byte mutations, and mutations per format.

``generate`` mixes, per input: a valid seed as it is, random bytes, byte-level mutations of a
seed (bit flips, msgpack type bytes, huge length headers, little-endian extreme integers,
deletions, insertions, splices, truncation, repeats), and the target's structure-aware mutation:

    msgpack_mutator      decode the seed, replace / delete / add / move / wrap / nudge values
                         (extreme ints, NaN, inf, long and non-hex strings, bins, exts, maps
                         with int keys, nesting past the unpacker's stack), re-encode, re-sign
    json_lines_mutator   the same on one JSON line (huge digit strings, NaN, deep nesting,
                         lone surrogates), plus line edits: drop, repeat, swap, junk, U+2028
    toml_mutator         values swapped for other TOML types and extremes (datetimes, 5,000
                         digit ints, deep arrays and inline tables), keys and tables added

and, for framed binary formats (codec payloads, safetensors files, HTTP responses),
``bench.fuzz_framing``.

Every function takes a ``random.Random`` and is deterministic given it.
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

__all__ = [
    "Raw", "Mutator", "generate", "random_bytes", "mutate_bytes", "mutate_tree", "pack_msgpack", "dump_json",
    "msgpack_mutator", "json_mutator", "json_lines_mutator", "toml_mutator",
]

Mutator = Callable[[random.Random, bytes, Sequence[bytes]], bytes]
Tree = Any


class Raw:
    """Bytes (or text) spliced into an encoding where this value stands: what no encoder writes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | str):
        self.data = data


INTS = (0, 1, -1, 2, 7, 8, 15, 16, 17, 63, 64, 65, 127, 128, 255, 256, 4095, 4096, 4097, 65535, 65536,
        2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63))
"""Integers at the edges of every range a field or a length can have (all msgpack-encodable)."""
FLOATS = (0.0, -0.0, 0.5, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 3.4028235e38,
          1e-45, 65520.0, 2.0**53, 2.0**64, 1e6, 86400.0, 86400.5)
_HEX = "0123456789abcdef"
_TEXT = ("", "a", " ", "\x00", "é", "\u2028", "\ud7ff", "/", "..", ".", "a/b", "sha256:", "json:", "json:{",
         "bytes", "gpt2", "genesis", "checkpoint", "fp16", "bmax-c4096-b64-s2", "uint16", "uint32", "NaN")

# msgpack that no encoder would write: nesting past msgpack-python's stack (1024), lengths that
# promise more than follows, bytes that are not UTF-8, reserved 0xc1, ext and timestamps.
_RAW_MSGPACK: tuple[Callable[[random.Random], bytes], ...] = (
    lambda r: b"\x91" * r.choice((64, 511, 1023, 1024, 1025, 5000, 60000)) + b"\xc0",
    lambda r: b"\x81\xa1k" * r.choice((64, 1024, 1025, 20000)) + b"\xc0",
    lambda r: r.choice((b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xde\xff\xff",
                        b"\xdb\xff\xff\xff\xff", b"\xda\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xc9\xff\xff\xff\xff\x01",
                        b"\xdd\x00\x00\x10\x01", b"\xdf\x00\x00\x10\x01")),
    lambda r: b"\xdc" + (n := r.choice((16, 4096))).to_bytes(2, "big") + b"\x90" * n,
    lambda r: b"\xdd" + (4097).to_bytes(4, "big") + b"\xc0" * 4097,
    lambda r: b"\xdb" + (65537).to_bytes(4, "big") + b"x" * 65537,
    lambda r: r.choice((b"\xa2\xff\xfe", b"\xa3\xed\xa0\x80", b"\xa1\x80", b"\xc1", b"\xc4\x00", b"\xc4\x01x")),
    lambda r: r.choice((b"\xca\x7f\xc0\x00\x00", b"\xca\xff\x80\x00\x00", b"\xca\x80\x00\x00\x00",
                        b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x01", b"\xcf" + b"\xff" * 8, b"\xd3\x80" + b"\x00" * 7)),
    lambda r: r.choice((b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00", b"\xd7\xff" + b"\xff" * 8, b"\xc7\x00\x05",
                        b"\xc7\x0c\xff" + b"\xff" * 12, b"\xd8\x7f" + b"\x00" * 16)),
    lambda r: b"\x82\xa1a\x01\xa1a\x02",
)

# JSON text the json module would not write: digit strings past int()'s limit, overflowing
# exponents, nesting past the recursion limit, lone surrogates, NUL.
_RAW_JSON: tuple[Callable[[random.Random], str], ...] = (
    lambda r: "1" * r.choice((19, 20, 400, 4300, 4301, 5000)),
    lambda r: r.choice(("1e400", "-1e400", "1e-400", "-0", "-0.0", "0.1e1", "1E2", "123456789012345678901234567890")),
    lambda r: "[" * (d := r.choice((100, 999, 1000, 5000, 100000))) + "]" * d,
    lambda r: '{"a":' * (d := r.choice((100, 1000, 5000))) + "1" + "}" * d,
    lambda r: r.choice(('"\\ud800"', '"\\udfff\\ud800"', '"\\u0000"', '"a\\u2028b"', '"\\uffff"', '"\x7f"')),
    lambda r: '"' + "\u00e9" * r.choice((10, 40000)) + '"',
    lambda r: r.choice(("NaN", "Infinity", "-Infinity", "nan", "true", "null", "[]", "{}", '""')),
)

_TOML_VALUES = (
    "nan", "+inf", "-inf", "1e999", "-0.0", "0", "-1", "1", "0.5", "9223372036854775807", "-9223372036854775808",
    "18446744073709551615", "18446744073709551616", "0x7fffffffffffffff", "0b1", "1_000", "true", "false",
    "1979-05-27T07:32:00Z", "1979-05-27", "07:32:00", "1979-05-27T07:32:00", '""', '"x"', '"\\u0000"', "'lit'",
    '"""multi\nline"""', "[]", "[1, 2]", '["a", 1]', "[[1], [2]]", "[0.9, 0.95, 0.99]", "{}", "{ a = 1 }",
    '{ family = "gpt2" }', "[1979-05-27T07:32:00Z]", "{ x = 1979-05-27 }", '"sha256:' + "0" * 64 + '"',
    '"json:{}"', '"bmax-c4096-b64-s9"', '"fp16"', '"cosine"', '"files"', '"*.txt"', '["*.txt"]', '"a/b"',
)
_TOML_RAW: tuple[Callable[[random.Random], str], ...] = (
    lambda r: "1" * r.choice((4300, 4301, 5000)),
    lambda r: "0x" + "f" * r.choice((16, 17, 5000)),
    lambda r: "[" * (d := r.choice((50, 500, 1000, 3000))) + "]" * d,
    lambda r: "{a=" * (d := r.choice((50, 500, 1000, 3000))) + "1" + "}" * d,
    lambda r: '"' + "x" * r.choice((64, 65, 5000)) + '"',
    lambda r: "[" + ", ".join(["1"] * r.choice((4096, 4097))) + "]",
    lambda r: "{ config = { x = 1979-05-27T07:32:00Z } }",
)
_TOML_TABLES = ("[run]", "[model]", "[model.config]", "[model.config.inner]", "[[model]]", "[[run]]", "[data]",
                "[training]", "[averaging]", "[checkpoints]", "[unknown]", "[run.x]", "[training.inner_betas]", "[]")

_LE_WORDS = tuple(struct.pack("<I", v) for v in (0, 1, 0x7FFFFFFF, 0xFFFFFFFF)) + tuple(
    struct.pack("<Q", v) for v in (0, 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)) + tuple(
    struct.pack("<f", v) for v in (math.nan, math.inf, -math.inf, -1.0, -0.0, 3.4028235e38, 1e-45))
_TYPE_BYTES = bytes((0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xE0, 0xFF, *range(0xC0, 0xE0)))
_HUGE_HEADERS = (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                 b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\x91" * 2000)


def generate(rng: random.Random, seeds: Sequence[bytes], mutate: Mutator, max_bytes: int) -> bytes:
    """One input: 3% a seed as it is, 10% random bytes, 32% byte mutations, 55% structure-aware."""
    roll, seed = rng.random(), rng.choice(seeds)
    if roll < 0.03:
        raw = seed
    elif roll < 0.13:
        raw = random_bytes(rng, seeds)
    elif roll < 0.45:
        raw = mutate_bytes(rng, seed, seeds, max_bytes)
    else:
        raw = mutate(rng, seed, seeds)
        if rng.random() < 0.15:
            raw = mutate_bytes(rng, raw, seeds, max_bytes)
    return raw[:max_bytes]


def random_bytes(rng: random.Random, seeds: Sequence[bytes]) -> bytes:
    """Random bytes, sometimes after a valid seed's first bytes (so framing checks pass)."""
    length = rng.choice((0, 1, 2, 8, rng.randrange(64), rng.randrange(1024), rng.randrange(8192)))
    prefix = rng.choice(seeds)[: rng.randrange(64)] if rng.random() < 0.5 else b""
    return prefix + rng.randbytes(length)


def mutate_bytes(rng: random.Random, data: bytes, seeds: Sequence[bytes], max_bytes: int) -> bytes:
    """1 to 16 byte-level edits of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8, 16))):
        at = rng.randrange(len(buf) + 1)
        op = rng.randrange(12)
        if op == 0 and buf[at:]:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1 and buf[at:]:
            buf[at] = rng.randrange(256)
        elif op == 2 and buf[at:]:
            buf[at] = rng.choice(_TYPE_BYTES)
        elif op == 3:
            header = rng.choice(_HUGE_HEADERS)
            buf[at : at + (len(header) if rng.random() < 0.5 else 0)] = header
        elif op == 4:
            del buf[at : at + rng.randrange(1, 65)]
        elif op == 5:
            buf[at:at] = rng.randbytes(rng.randrange(1, 33))
        elif op == 6:
            start = rng.randrange(len(buf) + 1)
            buf[at:at] = buf[start : start + rng.randrange(1, 257)]
        elif op == 7:
            del buf[at:]
        elif op == 8:
            other = rng.choice(seeds)
            buf[at:] = other[rng.randrange(len(other) + 1) :]
        elif op == 9:
            word = rng.choice(_LE_WORDS)
            buf[at : at + len(word)] = word
        elif op == 10:
            start = rng.randrange(len(buf) + 1)
            chunk = bytes(buf[start : start + rng.randrange(1, 17)])
            buf[at:at] = chunk * min(rng.choice((2, 16, 1000, 100000)), max_bytes // max(1, len(chunk)))
        else:
            buf += rng.randbytes(rng.randrange(1, 9))
    return bytes(buf)


# ---------------------------------------------------------------------------------------------
# Trees (decoded msgpack or JSON): replace, delete, add, move, wrap and nudge values
# ---------------------------------------------------------------------------------------------

def _slots(tree: Tree) -> list[tuple[Any, Any]]:
    """(container, key) of every value below the root."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            out.append((node, key))
            stack.append(value)
    return out


def _nudge(rng: random.Random, value: Any, leaf: Callable[[random.Random], Any]) -> Any:
    """A value near ``value``: one past a bound, another case, one character more or less."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return rng.choice((value + 1, value - 1, -value, value * 2**32, value + 2**40, 0))
    if isinstance(value, float):
        return rng.choice((math.nextafter(value, math.inf), -value, value * 1e300, value + 1.0, round(value, 0)))
    if isinstance(value, str):
        cut = rng.randrange(len(value) + 1)
        return rng.choice((value[:cut], value + value[-1:], value.upper(), value[:cut] + rng.choice(_HEX + "gG")
                           + value[cut + 1 :], value * rng.choice((2, 64)), value + "\x00", " " + value))
    if isinstance(value, list):
        cut = rng.randrange(len(value) + 1)
        return rng.choice((value[:cut], value + value[-1:], value * (100 if len(value) <= 100 else 2), value[::-1], []))
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if rng.random() < 0.7}
    return leaf(rng)


def mutate_tree(rng: random.Random, tree: Tree, leaf: Callable[[random.Random], Any], keys: Sequence[Any]) -> Tree:
    """One to three edits of a decoded tree, in place where it is a container; returns the new root."""
    for _ in range(rng.choice((1, 1, 2, 3))):
        slots = _slots(tree)
        if not slots or rng.random() < 0.02:
            return leaf(rng)
        container, key = rng.choice(slots)
        op = rng.randrange(9)
        if op <= 2:
            container[key] = leaf(rng)
        elif op == 3:
            del container[key]
        elif op == 4 and isinstance(container, dict):
            container[rng.choice((*keys, "", "x", 1, str(key) + "_"))] = leaf(rng)
        elif op == 4:
            container.insert(rng.randrange(len(container) + 1), leaf(rng))
        elif op == 5:
            other, other_key = rng.choice(slots)
            try:
                container[key] = copy.deepcopy(other[other_key])
            except RecursionError:  # a value nested past the recursion limit: left where it is
                pass
        elif op == 6:
            value = container[key]
            container[key] = rng.choice(([value], {"x": value}, [value] * rng.choice((2, 17, 100)), {str(key): value}))
        else:
            container[key] = _nudge(rng, container[key], leaf)
    return tree


def _text(rng: random.Random) -> str:
    roll = rng.randrange(4)
    if roll == 0:
        return rng.choice(_TEXT)
    if roll == 1:
        return "".join(rng.choice(_HEX) for _ in range(rng.choice((15, 16, 17, 63, 64, 65, 127, 128, 129))))
    if roll == 2:
        return "x" * rng.choice((63, 64, 65, 128, 129, 256, 257, 4097, 65536))
    return rng.randbytes(rng.randrange(1, 40)).decode("latin-1")


def msgpack_leaf(rng: random.Random) -> Any:
    roll = rng.randrange(10)
    if roll == 0:
        return rng.choice(INTS)
    if roll == 1:
        return rng.choice(FLOATS)
    if roll == 2:
        return rng.choice((True, False, None))
    if roll in (3, 4):
        return _text(rng)
    if roll == 5:
        return rng.choice((b"", b"\x00", rng.randbytes(8)))
    if roll == 6:
        return rng.choice(([], {}, [None], {"": None}, {1: 2}, {b"k": 1}, [0] * rng.choice((16, 17, 64, 65, 4096, 4097)),
                           ["x"] * 17, {"a": [1, 2]}))
    if roll == 7:
        return rng.choice((msgpack.ExtType(rng.randrange(128), rng.randbytes(rng.randrange(5))),
                           msgpack.Timestamp(rng.randrange(2**34), rng.randrange(10**9))))
    return Raw(rng.choice(_RAW_MSGPACK)(rng))


def json_leaf(rng: random.Random) -> Any:
    roll = rng.randrange(9)
    if roll == 0:
        return rng.choice((*INTS, 2**64, -(2**63) - 1, 10**30))
    if roll == 1:
        return rng.choice(FLOATS)
    if roll == 2:
        return rng.choice((True, False, None))
    if roll in (3, 4):
        return _text(rng)
    if roll == 5:
        return rng.choice(([], {}, [None], {"": None}, [0] * rng.choice((16, 17, 65, 4097)), {"a": [1, 2]}))
    return Raw(rng.choice(_RAW_JSON)(rng))


def pack_msgpack(rng: random.Random, tree: Tree) -> bytes:
    """msgpack of a tree, ``Raw`` values spliced in; sometimes float32 or str-typed bytes."""
    raws: dict[str, bytes] = {}

    def default(value: Any) -> Any:
        if isinstance(value, Raw):
            token = f"\x00raw{len(raws)}\x00"
            raws[token] = value.data
            return token
        raise TypeError(f"cannot pack {type(value).__name__}")

    packed = msgpack.packb(tree, default=default, use_bin_type=rng.random() < 0.9, use_single_float=rng.random() < 0.1)
    for token, data in raws.items():
        packed = packed.replace(msgpack.packb(token), data, 1)
    return packed


def dump_json(rng: random.Random, tree: Tree) -> str:
    """JSON of a tree (NaN and Infinity allowed), ``Raw`` values spliced in."""
    raws: dict[str, str] = {}

    def default(value: Any) -> Any:
        if isinstance(value, Raw):
            token = f"\x00raw{len(raws)}\x00"
            raws[token] = value.data
            return token
        raise TypeError(f"cannot dump {type(value).__name__}")

    options = {"ensure_ascii": rng.random() < 0.7, "separators": rng.choice(((",", ":"), (", ", ": ")))}
    try:
        text = json.dumps(tree, default=default, sort_keys=rng.random() < 0.5, **options)
    except TypeError:  # int and str keys do not sort together
        raws.clear()
        text = json.dumps(tree, default=default, **options)
    for token, data in raws.items():
        text = text.replace(json.dumps(token), data, 1)
    return text


def msgpack_mutator(keys: Sequence[str] = (), resign: Callable[[Tree], Tree] | None = None) -> Mutator:
    """Decode the seed, edit the tree, maybe sign it again (``resign``: the real signing code), re-encode."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        try:
            tree = msgpack.unpackb(seed, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - an earlier edit (HTTP bodies are edited twice) broke it
            return mutate_bytes(rng, seed, seeds, len(seed) + 4096)
        tree = mutate_tree(rng, tree, msgpack_leaf, keys)
        if resign is not None and rng.random() < 0.5:
            tree = resign(tree)
        try:
            return pack_msgpack(rng, tree)
        except (TypeError, ValueError, OverflowError, RecursionError):  # what msgpack cannot write
            return seed
    return mutate


def json_mutator(keys: Sequence[str] = ()) -> Mutator:
    """A JSON document's tree edited (``json_leaf`` values)."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        try:
            tree = json.loads(seed)
        except (ValueError, RecursionError):  # an earlier edit broke it
            return mutate_bytes(rng, seed, seeds, len(seed) + 4096)
        tree = mutate_tree(rng, tree, json_leaf, keys)
        try:
            return dump_json(rng, tree).encode("utf-8", "surrogatepass")
        except RecursionError:  # nested past what json.dumps writes
            return seed
    return mutate


_JUNK_LINES = ("", "   ", "\r", "{}", "[]", "null", "\x00", "\ufeff{}", '{"a":1}\u2028', "\x1c", "\u2029")


def json_lines_mutator(keys: Sequence[str] = (), resign: Callable[[Tree], Tree] | None = None) -> Mutator:
    """One JSON line's tree edited (and maybe signed again), or whole lines dropped, repeated, swapped."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        lines = seed.decode("utf-8", "replace").split("\n")
        for _ in range(rng.choice((1, 1, 2))):
            op, at = rng.randrange(6), rng.randrange(len(lines))
            if op <= 2:
                i = rng.randrange(len(lines))
                try:
                    tree = mutate_tree(rng, json.loads(lines[i]), json_leaf, keys)
                except (ValueError, RecursionError):  # a line an earlier edit broke
                    continue
                if resign is not None and rng.random() < 0.5:
                    tree = resign(tree)
                try:
                    lines[i] = dump_json(rng, tree)
                except RecursionError:  # nested past what json.dumps writes
                    pass
            elif op == 3:
                del lines[at]
            elif op == 4:
                lines.insert(at, rng.choice((*_JUNK_LINES, rng.choice(lines))))
            else:
                other = rng.randrange(len(lines))
                lines[at], lines[other] = lines[other], lines[at]
            if not lines:
                lines = [""]
        return rng.choice(("\n", "\r\n", "\r")).join(lines).encode("utf-8", "surrogatepass")
    return mutate


def toml_mutator(keys: Sequence[str]) -> Mutator:
    """Values swapped for other TOML types and extremes, keys and tables added, lines moved."""

    def value(rng: random.Random) -> str:
        return rng.choice(_TOML_RAW)(rng) if rng.random() < 0.2 else rng.choice(_TOML_VALUES)

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        lines = seed.decode("utf-8").split("\n")
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(len(lines) + 1)
            assignments = [i for i, line in enumerate(lines) if " = " in line]
            op = rng.randrange(7)
            if op <= 2 and assignments:
                i = rng.choice(assignments)
                lines[i] = lines[i].split(" = ", 1)[0] + " = " + value(rng)
            elif op == 3:
                lines.insert(at, f"{rng.choice((*keys, 'x', 'name', ''))} = {value(rng)}")
            elif op == 4:
                lines.insert(at, rng.choice(_TOML_TABLES))
            elif op == 5 and lines:
                del lines[min(at, len(lines) - 1)]
            elif lines:
                lines.insert(at, rng.choice(lines))
        return "\n".join(lines).encode("utf-8", "surrogatepass")
    return mutate
