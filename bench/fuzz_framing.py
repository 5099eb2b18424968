"""Structure-aware mutations of framed formats, for ``bench.fuzz`` (see ``bench.fuzz_inputs``).

    payload_mutator      header fields set to edge values, body bytes and float32 words
                         (NaN, inf, negative, 3.4e38) overwritten, bodies of other payloads
    safetensors_mutator  header JSON: dtypes, shapes (empty ones with a dimension past int64),
                         data offsets, metadata; the header length
    http_mutator         status line, headers (lengths, chunking, redirects, 100+ headers,
                         long lines), then the body through the body's own mutator
"""

from __future__ import annotations

import copy
import json
import math
import random
import struct
from collections.abc import Sequence

from bench.fuzz_inputs import Mutator

__all__ = ["payload_mutator", "safetensors_mutator", "http_mutator"]

_PAYLOAD_HEADER = struct.Struct("<4sBBHQ")


def payload_mutator() -> Mutator:
    """A codec payload with its framing kept (mostly) and its body edited where checks live."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        buf = bytearray(seed)
        body_at = min(len(buf), _PAYLOAD_HEADER.size + struct.unpack_from("<H", buf, 6)[0])
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            op, body_at = rng.randrange(10), min(body_at, len(buf))
            at = rng.randrange(body_at, len(buf)) if len(buf) > body_at else body_at
            if op <= 1 and at < len(buf):
                buf[at] = rng.choice((0x00, 0xFF, 0x80, 0x7F, 0x7C, 0xFC, rng.randrange(256)))
            elif op == 2:
                word = struct.pack("<f", rng.choice((math.nan, math.inf, -math.inf, -1.0, -0.0, 3.4028235e38, 1e-45,
                                                     1e38, 2.0**-126, 65504.0)))
                at -= (at - body_at) % 4
                buf[at : at + 4] = word
            elif op == 3 and at < len(buf):
                buf[at] ^= 1 << rng.randrange(8)
            elif op == 4:
                start = rng.randrange(body_at, len(buf) + 1)
                buf[start:] = bytes([rng.choice((0x00, 0xFF, 0x55, 0xAA))]) * (len(buf) - start)
            elif op == 5 and len(buf) >= 16:
                field, size = rng.choice(((8, 8), (6, 2), (4, 1), (5, 1), (0, 4)))
                edge = rng.choice((0, 1, 2**(8 * size) - 1, 2**(8 * size - 1), rng.randrange(2**(8 * size))))
                buf[field : field + size] = edge.to_bytes(size, "little")
            elif op == 6 and len(buf) >= 16:
                numel = struct.unpack_from("<Q", buf, 8)[0] + rng.choice((-1, 1, 64, -64))
                buf[8:16] = struct.pack("<Q", min(max(0, numel), 2**64 - 1))
            elif op == 7 and len(buf) >= 16:
                other = rng.choice(seeds)
                other_at = min(len(other), _PAYLOAD_HEADER.size + struct.unpack_from("<H", other, 6)[0])
                buf[body_at:] = other[other_at:]
            elif op == 8:
                cut = rng.randrange(body_at, len(buf) + 1) if rng.random() < 0.5 else at
                del buf[cut : len(buf) if cut != at else at + 1]
            else:
                buf[at:at] = rng.randbytes(rng.choice((1, 4, 8)))
        return bytes(buf)
    return mutate


_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64",
           "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "C64", "X", "", 1, None, ["F32"])
_SHAPES = ([], [0], [-1], [1], [2**63], [2**64 - 1], [2**64], [1] * 64, [2**32, 2**32], [3.5], ["1"], None, 1,
           [0, 2**64 - 1], [2**62, 4])


def safetensors_mutator(metadata: dict[str, str] | None = None) -> Mutator:
    """A safetensors file with its header JSON edited: dtypes, shapes, offsets, metadata, length."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        length = int.from_bytes(seed[:8], "little")
        header, data = json.loads(seed[8 : 8 + length]), bytearray(seed[8 + length :])
        names = [n for n in header if n != "__metadata__"]
        for _ in range(rng.choice((1, 1, 2, 3))):
            name, op = rng.choice(names) if names else "t", rng.randrange(11)
            entry = header.setdefault(name, {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]})
            if not isinstance(entry, dict):
                header[name] = entry = {}
            offsets = entry.get("data_offsets")
            start, stop = offsets[:2] if isinstance(offsets, list) and len(offsets) >= 2 else (0, 0)
            span = stop - start if isinstance(start, int) and isinstance(stop, int) and stop >= start else 1
            if op == 0:
                entry["dtype"] = rng.choice(_DTYPES)
            elif op == 1:
                entry["shape"] = rng.choice((*_SHAPES, [span], [span // 2, 2], [span + 1]))
            elif op == 2:
                end = len(data)
                entry["data_offsets"] = rng.choice(([0, end], [0, 2**64 - 1], [stop, start], [0, end + 1], [end, end],
                                                    [-1, 0], [0], [0, 1, 2], None, "0", [1.5, 2], [2**64, 2**64]))
            elif op == 3:
                entry.pop(rng.choice(("dtype", "shape", "data_offsets")), None)
                if rng.random() < 0.5:
                    entry[rng.choice(("x", "dtype_", "offsets"))] = 1
            elif op == 4:
                fields = dict(metadata or {}, **{"x": "y"}) if rng.random() < 0.5 else {}
                header["__metadata__"] = rng.choice((fields, {"run_id": 1}, {"a": None}, "x", [], {"a": {"b": "c"}},
                                                      dict(metadata or {}, round="1" * 5000)))
            elif op == 5:
                header[rng.choice(("copy", name + "_", "", "\x00", "__metadata__", "é" * 300))] = copy.deepcopy(entry)
            elif op == 6:
                del header[name]
            elif op == 7 and data:
                at = rng.randrange(len(data))
                data[at : at + 4] = struct.pack("<f", rng.choice((math.nan, math.inf, -0.0, 3.4028235e38)))
            elif op == 8:
                del data[rng.randrange(len(data) + 1) :]
            elif op == 9:
                data += bytes(rng.choice((1, 4, 7, 4096)))
            else:  # the file holds one empty tensor whose other dimension overflows an int64
                header = {k: v for k, v in header.items() if k == "__metadata__"}
                header[name] = {"dtype": rng.choice(("F32", "U8", "BF16")), "data_offsets": [0, 0],
                                "shape": rng.choice(([0, 2**63], [0, 2**64 - 1], [2**64 - 1, 0], [0, 2**40, 2**40]))}
                names, data = [name], bytearray()
        text = json.dumps(header, separators=rng.choice(((",", ":"), (", ", ": ")))).encode()
        text += b" " * rng.choice((0, 0, 1, 7))  # safetensors pads its header with spaces to 8 bytes
        size = len(text)
        if rng.random() < 0.1:
            size = rng.choice((0, 1, size - 1, size + 1, 2**64 - 1, 2**63, 100_000_001, len(text) + len(data)))
        return size.to_bytes(8, "little") + text + bytes(data)
    return mutate


_STATUS_LINES = (b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 206 Partial",
                 b"HTTP/1.1 100 Continue", b"HTTP/1.1 101 Switching", b"HTTP/1.1 301 Moved", b"HTTP/1.1 302 Found",
                 b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 404 Not Found", b"HTTP/1.1 500 Oops", b"HTTP/1.1 999 X",
                 b"HTTP/1.1 0 X", b"HTTP/1.1 -1 X", b"HTTP/1.1 abc X", b"HTTP/0.9 200 OK", b"HTTP/2 200", b"FOO 200 OK",
                 b"HTTP/1.1 200", b"HTTP/1.1", b"", b"\x00\xff", b"HTTP/1.1 200 " + b"x" * 70000)
_LOCATIONS = (b"/x", b"/manifest", b"//127.0.0.1:1/x", b"ftp://127.0.0.1:1/x", b"file:///dev/null", b"http://[::1",
              b"http://127.0.0.1:abc/", b"http://127.0.0.1:99999/", b"", b"\x00", b"http://127.0.0.1:1/x", b"data:,x")
_HEADERS = (b"Content-Length: 0", b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 18446744073709551616",
            b"Content-Length: 99999999999", b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
            b"Connection: keep-alive", b"Connection: close", b"Content-Encoding: gzip", b"Content-Type: text/plain",
            b"no colon here", b" folded continuation", b"X: " + b"a" * 70000, b"X\x00: y", b":", b"X: \xff\xfe")


def _chunked(rng: random.Random, body: bytes) -> bytes:
    out, at = bytearray(), 0
    while at < len(body):
        size = rng.randrange(1, 4096)
        out += b"%x\r\n" % size + body[at : at + size] + b"\r\n"
        at += size
    out += rng.choice((b"0\r\n\r\n", b"", b"zz\r\n", b"fffffffffffffffff\r\n", b"0;ext=1\r\nX: y\r\n\r\n", b"-1\r\n",
                       b"5\r\nab", b"0\r\n" + b"T: x\r\n" * 200 + b"\r\n"))
    return bytes(out)


def http_mutator(body_mutate: Mutator) -> Mutator:
    """An HTTP response with its status line, headers and body edited; framing mostly kept valid."""

    def mutate(rng: random.Random, seed: bytes, seeds: Sequence[bytes]) -> bytes:
        head, _, body = seed.partition(b"\r\n\r\n")
        status, *headers = head.split(b"\r\n")
        headers = [h for h in headers if not h.lower().startswith(b"content-length")]
        length: bytes | None = None
        for _ in range(rng.choice((1, 1, 2, 3))):
            op = rng.randrange(8)
            if op <= 2:
                bodies = [s.partition(b"\r\n\r\n")[2] for s in seeds]
                body = body_mutate(rng, body, bodies)
            elif op == 3:
                status = rng.choice(_STATUS_LINES)
            elif op == 4:
                headers.append(rng.choice(_HEADERS))
            elif op == 5:
                status = rng.choice((b"HTTP/1.1 301 Moved", b"HTTP/1.1 302 Found", b"HTTP/1.1 307 Temp"))
                headers.append(b"Location: " + rng.choice(_LOCATIONS))
            elif op == 6:
                headers.append(b"Transfer-Encoding: chunked")
                body = _chunked(rng, body)
                length = b""
            else:
                headers += [b"X-%d: y" % i for i in range(rng.choice((50, 99, 101, 1000)))]
        if length is None:
            length = str(len(body) + rng.choice((0, 0, 0, -1, 1, 1000))).encode()
        lines = [status, *headers] + ([b"Content-Length: " + length] if length else [])
        response = b"\r\n".join(lines) + b"\r\n\r\n" + body
        return response[: rng.randrange(len(response) + 1)] if rng.random() < 0.05 else response
    return mutate
