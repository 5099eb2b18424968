"""Wire codecs for a flat float32 outer-gradient vector: fp16, block int8, top-k and block max.

A codec turns a 1-D float32 CPU tensor of ``numel`` elements into a payload and back. Its name
encodes every parameter that changes the bytes, and is parsed by one strict grammar:

    fp16                  IEEE half precision of every element
    int8-b{B}             blocks of B elements, one float32 scale and B int8 values per block
                          B: a power of two, 16..65536
    topk-c{C}-k{K}-q{Q}   chunks of C elements, the K largest |x| of each kept with Q bits:
                          fixed-width indices, uniform levels
    topk-c{C}-k{K}-s{Q}   the same selection; Elias-Fano indices, Q-bit table levels
    topk-c{C}-k{K}-f32    the same selection; Elias-Fano indices, float32 values
    bmax-c{C}-b{B}-s{Q}   every block of B elements keeps its largest |x|; Q-bit table levels
                          with one scale per chunk of C elements
    bmax-c{C}-b{B}-f32    the same selection; float32 values
                          C: a power of two, 64..65536; K: 1..C; Q: 1..8;
                          bmax B: a power of two, 2..C

Numbers are decimal without leading zeros, so every codec has exactly one name.

Payload = header + codec name + body. The header is ``struct`` ``"<4sBBHQ"`` (16 bytes):
magic ``b"BRNC"``, format version 1 (u8), a reserved u8 that must be 0, the length of the
ASCII codec name (u16), then ``numel`` (u64); the codec name follows, then the body. All
multi-byte numbers are little-endian. ``payload_size(codec, numel)`` is the exact length.

Bit streams are little-endian: bit j of the i-th value is bit ``i * width + j`` of the stream,
stream bit n is bit ``n % 8`` of byte ``n // 8``, and every stream's last byte is padded with
zero bits on its own (non-zero padding is rejected).

fp16 body: ``numel`` IEEE binary16 values, rounded to nearest even. An input element whose
half rounds to infinity (|x| >= 65520) is refused; a payload holding inf or NaN is rejected.

int8-b{B} body: the scales of all ``ceil(numel / B)`` blocks (float32), then ``numel`` int8
values. Blocks are consecutive; the last one may be shorter. Per block, in float32,
``s = max|x| / 127`` (0 for an all-zero block) and ``q = round(x / s)`` (half to even),
clamped to -127..127 (-128 is rejected); a block whose ``s`` underflows to 0 sends zeros.
Decoded: ``float32(q) * s``. A scale whose ``127 * s`` overflows float32 is rejected (every
decoded value must be finite); of finite inputs, only max|x| = 3.4028235e38 (the float32
maximum) would need one, and is refused.

Top-k selection (every ``topk-``): chunks of C consecutive elements; the last may be shorter
and keeps ``min(K, its length)`` entries. Each chunk keeps its K largest |x| (of equal |x|,
the lower index), listed in ascending index order; an index is the position within its chunk.
Block-max selection (``bmax-``): every block of B consecutive elements keeps exactly one
entry, its largest |x| (of equal |x|, the lowest index); the last block may be shorter and
still keeps one; an index is the position within its block. Its chunks of C elements (C / B
blocks, the last ``ceil(length / B)``) only group the kept values under one scale. Entries
are listed in ascending position order throughout; an element not kept decodes as 0.

topk-c{C}-k{K}-q{Q} body: the scales of all ``ceil(numel / C)`` chunks (float32), then ONE
bit stream of every kept index (log2(C) bits each), then ONE bit stream of every kept level.
With ``L = 2**Q`` and ``s = max |x|`` of the chunk's kept values, a kept value has level
``q = round((x / s + 1) * (L - 1) / 2)`` (float32, half to even; q = round((L - 1) / 2)
when s = 0) on L uniform levels over [-s, s]; it decodes as ``float32(2q / (L - 1) - 1) * s``
(Q = 1 sends ±s).

Elias-Fano indices (``topk-...-s{Q}`` and ``topk-...-f32``): with ``l = max(0, floor(log2(C /
K)))`` low bits, two streams. The low stream holds ``index & (2**l - 1)`` of every kept entry
(l bits each). The high stream is every chunk's high vector, concatenated: a chunk of n
elements keeping k has ``k + ceil(n / 2**l)`` bits, and its i-th kept index (i from 0) sets
bit ``(index >> l) + i`` (the last, shorter chunk uses the same l). C = 4096, K = 64: l = 6,
8 bits per index.

Table levels (``s{Q}``), with ``M = 2**(Q - 1)`` magnitude classes:
  - per chunk, ``s = float32(sqrt(S / n))``: S = the sum of ``float64(v)**2`` over its n kept
    values, added from 0.0 in ascending position order; the float64 sqrt rounded to float32
    (s = 0 when every kept value is 0, or when it underflows);
  - ``u = float32(v / s)``, one float32 division (u = 0 when s = 0);
  - ``class = min(M - 1, floor(|u| * M / 2))`` (float32; M / 2 is a power of two, so exact);
    level ``q = 2 * class + (1 if v < 0 else 0)`` (-0.0 counts as positive);
  - the payload's table: ``table[q] = float32(T / n)``, T the sum of ``float64(u)`` over the
    payload's entries at level q, added from 0.0 in entry order, n their count; a level with no
    entry gets its class's centre ``(class + 0.5) * 2 / M``, negated for odd q;
  - a kept value decodes as ``float32(table[q] * s)``, one float32 multiplication. An input
    for which some chunk's ``float32(s * max|table|)`` overflows is refused (InputError):
    only possible when |x| is beyond about 2**120.

Bodies, part after part (every stream zero-padded to a byte on its own):
    topk-c{C}-k{K}-s{Q}   table (2**Q float32), scales (ceil(numel / C) float32), low stream,
                          high stream, level stream (Q bits per entry)
    topk-c{C}-k{K}-f32    low stream, high stream, kept values (float32)
    bmax-c{C}-b{B}-s{Q}   table, scales, index stream (log2(B) bits per block), level stream
    bmax-c{C}-b{B}-f32    index stream, kept values (float32)

``parse_payload`` checks the type, length, magic, version, reserved byte, codec name, element
count and exact size, then the content, all before it builds any vector-sized tensor; any
failure raises ``PayloadError``, a ``MalformedRecord``. Content checks: scales finite and
non-negative; fp16 no inf/NaN; int8 no -128 and ``127 * s`` finite; fixed-width top-k
indices strictly increasing within a chunk and inside it; Elias-Fano high vectors holding
exactly their chunk's kept count of ones, and the indices they give strictly increasing and
below the chunk's length; a bmax last block's index below its length; table entries finite
and of their level's sign (even q: >= 0, odd q: <= 0), and ``float32(s * max|table|)`` finite;
float32 values finite; zero padding. ``decode`` is ``parse_payload`` then materializing the
dense vector; ``ParsedPayload.entries`` lists (positions, values) window by window instead.
``encode`` refuses a tensor that is not a finite 1-D float32 CPU vector with ``InputError``.
All work through the vector in slices, so their memory stays within a few times the input.

``compress_with_feedback`` adds what earlier rounds failed to send (the residual, times a
decay) before it encodes, and ``aggregate`` is the weighted mean every peer computes
bit-identically: float64 sums in the given order, cast to float32 once. ``accumulate`` (or
``ParsedPayload.add_to``) then ``finish`` compute the same bits straight from payloads, into
one float64 sum: each element gets the same float64 product ``float64(x) * w`` and addition,
in the same order, but no dense float32 vector is built, and a sparse codec adds only its kept
entries (the others add +0.0, which changes nothing in a sum started from +0.0).
``protocol.averaging.combine`` goes further and never builds a dense float64 sum for a sparse
codec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol import codec_core as core
from protocol.codec_core import HEADER, HEADER_SIZE, PAYLOAD_MAGIC, PAYLOAD_VERSION, Codec, PayloadError
from protocol.codec_core import check_count as _check_count
from protocol.codec_core import checked_vector as _checked_vector
from protocol.dense_codecs import Fp16Codec, Int8Codec
from protocol.errors import ConfigError, InputError
from protocol.sparse_codecs import BlockMaxCodec, EliasFanoTopKCodec, TopKCodec

__all__ = [
    "PAYLOAD_MAGIC",
    "PAYLOAD_VERSION",
    "HEADER_SIZE",
    "PayloadError",
    "Codec",
    "Fp16Codec",
    "Int8Codec",
    "TopKCodec",
    "EliasFanoTopKCodec",
    "BlockMaxCodec",
    "parse_codec",
    "payload_size",
    "encode",
    "decode",
    "ParsedPayload",
    "parse_payload",
    "accumulate",
    "finish",
    "compress_with_feedback",
    "aggregate",
]

_NUMBER = r"(0|[1-9][0-9]{0,5})"
_BITS = r"(?:([qs])(0|[1-9][0-9]?)|(f32))"
_FP16_NAME = re.compile(r"fp16")
_INT8_NAME = re.compile(rf"int8-b{_NUMBER}")
_TOPK_NAME = re.compile(rf"topk-c{_NUMBER}-k{_NUMBER}-{_BITS}")
_BMAX_NAME = re.compile(rf"bmax-c{_NUMBER}-b{_NUMBER}-{_BITS}")
_EXPECTED = "fp16, int8-b<B>, topk-c<C>-k<K>-q<Q>|s<Q>|f32 or bmax-c<C>-b<B>-s<Q>|f32"


def parse_codec(name: str) -> Codec:
    """The codec a name denotes (see the module docstring), or ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(f"codec name must be a string, got {type(name).__name__}")
    if _FP16_NAME.fullmatch(name):
        return Fp16Codec()
    if match := _INT8_NAME.fullmatch(name):
        return Int8Codec(block=int(match[1]))
    if match := _TOPK_NAME.fullmatch(name):
        chunk, k, kind, bits = int(match[1]), int(match[2]), match[3], match[4]
        if kind == "q":
            return TopKCodec(chunk=chunk, k=k, bits=int(bits))
        return EliasFanoTopKCodec(chunk=chunk, k=k, bits=None if match[5] else int(bits))
    if (match := _BMAX_NAME.fullmatch(name)) and match[3] != "q":
        return BlockMaxCodec(chunk=int(match[1]), block=int(match[2]), bits=None if match[5] else int(match[4]))
    raise ConfigError(f"codec {name!r} is not a codec name: expected {_EXPECTED}")


def _as_codec(codec: Codec | str) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        return parse_codec(codec)
    raise ConfigError(f"expected a Codec or a codec name, got {type(codec).__name__}")


def payload_size(codec: Codec | str, numel: int) -> int:
    """Exact payload bytes (header included) that ``encode`` writes for ``numel`` elements."""
    return _as_codec(codec).payload_size(numel)


def _payload(codec: Codec, numel: int, parts: list[bytes | np.ndarray]) -> bytes:
    name = codec.name.encode("ascii")
    return b"".join([HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, 0, len(name), numel), name, *parts])


def encode(codec: Codec | str, x: torch.Tensor) -> bytes:
    """The payload of a finite 1-D float32 CPU vector; the same input gives the same bytes."""
    codec = _as_codec(codec)
    x = _checked_vector(x, f"codec {codec.name!r}", finite=not codec.checks_finite)
    return _payload(codec, x.numel(), codec._encode_body(x))


def _body(payload: object, codec: Codec, numel: int) -> memoryview:
    """The body of a payload whose framing, codec, element count and size all check out."""
    what = f"codec payload ({codec.name})"
    if not isinstance(payload, bytes):
        raise PayloadError(f"{what}: expected bytes, got {type(payload).__name__}")
    if len(payload) < HEADER_SIZE:
        raise PayloadError(f"{what}: {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, reserved, name_length, count = HEADER.unpack_from(payload)
    if magic != PAYLOAD_MAGIC:
        raise PayloadError(f"{what}: magic {magic!r} is not {PAYLOAD_MAGIC!r}")
    if version != PAYLOAD_VERSION:
        raise PayloadError(f"{what}: format version {version} is not supported (expected {PAYLOAD_VERSION})")
    if reserved != 0:
        raise PayloadError(f"{what}: reserved byte is {reserved}, not 0")
    name = payload[HEADER_SIZE : HEADER_SIZE + name_length]
    if name != codec.name.encode("ascii"):
        raise PayloadError(f"{what}: payload is for codec {name.decode('ascii', 'replace')!r}")
    if count != numel:
        raise PayloadError(f"{what}: payload holds {count} elements, expected {numel}")
    if len(payload) != codec.payload_size(numel):
        raise PayloadError(f"{what}: {len(payload)} bytes, expected {codec.payload_size(numel)} for {numel} elements")
    return memoryview(payload)[HEADER_SIZE + name_length :]


@dataclass(frozen=True, eq=False)
class ParsedPayload:
    """A payload that ``parse_payload`` checked through: decoding or adding it cannot fail."""

    codec: Codec
    numel: int
    _parts: tuple = field(repr=False)

    @property
    def sparse(self) -> bool:
        """True when ``entries`` lists only the kept positions (top-k, block max)."""
        return self.codec.sparse

    def decode(self) -> torch.Tensor:
        """The float32 vector [numel]."""
        return self.codec._materialize(self._parts, self.numel)

    def entries(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions, values) slice by slice: int64 positions, ascending, and their float32
        decoded values. A dense codec lists every position; a sparse one lists the entries it
        kept (a kept entry may decode to 0), every other position decodes as 0.

        There is one pair per window of ``window`` elements of the vector, in order: the i-th
        lists positions ``i * window`` to ``i * window + window - 1`` (a pair may be empty).
        """
        return self.codec._entries(self._parts, self.numel)

    @property
    def window(self) -> int:
        """Elements of the vector per pair of ``entries`` (the same for every payload of a codec)."""
        return self.codec.entry_window()

    def add_to(self, out: torch.Tensor, weight: float) -> None:
        """``out += float64(decoded) * weight``, element by element, with no dense float32 copy.

        ``out`` is a float64 CPU vector [numel]; each element gets the one product and the one
        float64 addition that ``aggregate`` performs for it (a sparse codec adds its kept
        entries only).
        """
        weight = _weight("accumulate: weight", weight)
        _check_sum(out, self.numel, "accumulate")
        self.codec._add_weighted(self._parts, self.numel, out, weight)


def parse_payload(payload: bytes, codec: Codec | str, numel: int) -> ParsedPayload:
    """Every check ``decode`` makes (framing, size, then content), without decoding: PayloadError
    for anything malformed, raised before any vector-sized tensor is built."""
    codec = _as_codec(codec)
    numel = _check_count(numel, f"codec payload ({codec.name})")
    return ParsedPayload(codec, numel, codec._parse_body(_body(payload, codec, numel), numel))


def decode(payload: bytes, codec: Codec | str, numel: int) -> torch.Tensor:
    """The float32 vector [numel] in a payload of ``codec``; anything malformed raises PayloadError."""
    return parse_payload(payload, codec, numel).decode()


def accumulate(out: torch.Tensor, payload: bytes, codec: Codec | str, numel: int, weight: float) -> None:
    """Add ``weight`` times the payload's vector into the float64 sum ``out`` [numel].

    The payload is checked as ``decode`` checks it before ``out`` is touched: a PayloadError
    leaves ``out`` as it was. Started from zeros, accumulating payloads in some order and then
    ``finish`` gives the bits of ``aggregate`` over their decoded vectors in that order.
    """
    parse_payload(payload, codec, numel).add_to(out, weight)


def finish(out: torch.Tensor, total_weight: float) -> torch.Tensor:
    """The float32 weighted mean from a float64 sum: ``out / total_weight``, rounded once to
    float32, exactly as ``aggregate`` divides. ``total_weight`` is the weights' sum, taken left
    to right in the order they were accumulated."""
    _check_sum(out, None, "finish")
    total = _weight("finish: total weight", total_weight)
    mean = torch.empty(out.numel(), dtype=torch.float32)
    for start in range(0, out.numel(), core.SUM_SLICE):
        _store_mean(mean, start, out[start : start + core.SUM_SLICE], total)
    return mean


def compress_with_feedback(
    codec: Codec | str, update: torch.Tensor, residual: torch.Tensor, *, decay: float = 1.0
) -> tuple[bytes, torch.Tensor]:
    """Error feedback: encode ``corrected = decay * residual + update``; the new residual is
    ``corrected - decode(payload)``, what the payload lost. Returns (payload, new residual).

    In float32, element by element: ``corrected = float32(float32(decay) * residual) + update``
    (for decay 1.0 the product is skipped, so it is ``residual + update``: the same bits as
    ``update + residual``). ``decay`` must be finite and in [0, 1] (InputError otherwise).

    ``residual`` is reused: it is overwritten in place with the new residual, which is also
    what is returned (a residual that is not a contiguous tensor of its own, or that shares
    memory with ``update``, is copied first). A sparse codec subtracts the decoded values at
    its kept positions only (elsewhere the payload decodes to 0, and ``x - 0.0 == x``). If the
    corrected vector is not finite (an input holds inf or NaN, or the sum overflows), InputError
    is raised and ``residual`` may already hold part of the corrected vector.

    Over rounds (decay 1.0) the decoded payloads add up to the updates' sum minus the last
    residual, so what a lossy codec drops is sent later instead of being lost.
    """
    codec = _as_codec(codec)
    decay = _decay(decay)
    update = _checked_vector(update, f"codec {codec.name!r} update", finite=False)
    residual = _checked_vector(residual, f"codec {codec.name!r} residual", finite=False)
    if update.shape != residual.shape:
        raise InputError(f"codec {codec.name!r}: update has {update.numel()} elements, residual {residual.numel()}")
    if update.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
        residual = residual.clone()
    return _payload(codec, residual.numel(), codec._encode_feedback(update, residual, decay)), residual


def _decay(decay: object) -> float:
    if isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0.0 <= decay <= 1.0:
        return float(decay)
    raise InputError(f"compress_with_feedback: decay {decay!r} is not a number in [0, 1]")


def aggregate(decoded: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean of decoded vectors, summed in float64 in the given order, then float32.

    Every peer that sums the same payloads in the same canonical order gets the same bits:
    each product and sum is one IEEE float64 operation, in a fixed order.
    """
    if len(decoded) == 0 or len(decoded) != len(weights):
        raise InputError(f"aggregate: {len(decoded)} vectors and {len(weights)} weights (need as many, at least one)")
    vectors = [_checked_vector(vector, f"aggregate: vector {i}") for i, vector in enumerate(decoded)]
    for i, vector in enumerate(vectors):
        if vector.shape != vectors[0].shape:
            raise InputError(f"aggregate: vector {i} has {vector.numel()} elements, vector 0 {vectors[0].numel()}")
    factors = [_weight(f"aggregate: weight {i}", weight) for i, weight in enumerate(weights)]
    total = sum(factors)  # left to right, like the vectors
    if not math.isfinite(total):
        raise InputError("aggregate: the weights add up to more than a float64 holds")
    out = torch.empty_like(vectors[0])
    for start in range(0, out.numel(), core.SLICE):
        stop = start + core.SLICE
        acc = torch.zeros(len(out[start:stop]), dtype=torch.float64)
        for vector, factor in zip(vectors, factors, strict=True):
            acc += vector[start:stop].double() * factor
        _store_mean(out, start, acc, total)
    return out


def _store_mean(mean: torch.Tensor, start: int, acc: torch.Tensor, total: float) -> None:
    """``mean[start:]`` = the float64 sums ``acc`` over ``total``, rounded to float32: the one
    division both ``aggregate`` and ``finish`` use."""
    mean[start : start + len(acc)] = acc / total


def _check_sum(out: object, numel: int | None, what: str) -> None:
    """``out`` is a float64 CPU vector (of ``numel`` elements, when given), or InputError."""
    if not isinstance(out, torch.Tensor):
        raise InputError(f"{what}: expected a torch.Tensor sum, got {type(out).__name__}")
    if out.dtype != torch.float64 or out.dim() != 1 or out.device.type != "cpu":
        raise InputError(f"{what}: expected a 1-D float64 CPU sum, got {out.dtype} {list(out.shape)} on {out.device}")
    if numel is not None and out.numel() != numel:
        raise InputError(f"{what}: the sum has {out.numel()} elements, the payload {numel}")


def _weight(what: str, weight: object) -> float:
    """An averaging weight as a float64: a finite positive int or float (not a bool)."""
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        value = float(weight) if not isinstance(weight, int) or weight.bit_length() <= 1023 else math.inf
        if 0 < value < math.inf:
            return value
    raise InputError(f"{what} is {weight!r}, not a finite positive number")
