"""Wire codecs for a flat float32 outer-gradient vector: fp16, block int8 and chunked top-k.

A codec turns a 1-D float32 CPU tensor of ``numel`` elements into a payload and back. Its name
encodes every parameter that changes the bytes, and is parsed by one strict grammar:

    fp16                  IEEE half precision of every element
    int8-b{B}             blocks of B elements, one float32 scale and B int8 values per block
                          B: a power of two, 16..65536
    topk-c{C}-k{K}-q{Q}   chunks of C elements, the K largest |x| of each kept with Q bits
                          C: a power of two, 64..65536; K: 1..C; Q: 1..8

Numbers are decimal without leading zeros, so every codec has exactly one name.

Payload = header + codec name + body. The header is ``struct`` ``"<4sBBHQ"`` (16 bytes):
magic ``b"BRNC"``, format version 1 (u8), a reserved u8 that must be 0, the length of the
ASCII codec name (u16), then ``numel`` (u64); the codec name follows, then the body. All
multi-byte numbers are little-endian. ``payload_size(codec, numel)`` is the exact length.

fp16 body: ``numel`` IEEE binary16 values, rounded to nearest even. An input element whose
half rounds to infinity (|x| >= 65520) is refused; a payload holding inf or NaN is rejected.

int8-b{B} body: the scales of all ``ceil(numel / B)`` blocks (float32), then ``numel`` int8
values. Blocks are consecutive; the last one may be shorter. Per block, in float32,
``s = max|x| / 127`` (0 for an all-zero block) and ``q = round(x / s)`` (half to even),
clamped to -127..127 (-128 is rejected); a block whose ``s`` underflows to 0 sends zeros.
Decoded: ``float32(q) * s``. A scale whose ``127 * s`` overflows float32 is rejected (every
decoded value must be finite); of finite inputs, only max|x| = 3.4028235e38 (the float32
maximum) would need one, and is refused.

topk-c{C}-k{K}-q{Q} body: the scales of all ``ceil(numel / C)`` chunks (float32), then ONE
bit-packed stream of every kept index, then ONE bit-packed stream of every kept level.
Chunks are consecutive; the last may be shorter and keeps ``min(K, its length)`` entries.
Each chunk keeps its K largest |x| (of equal |x|, the lower index), listed in ascending
index order; an index is the position within its chunk, written in log2(C) bits. With
``L = 2**Q`` and ``s = max |x|`` of the chunk, a kept value has level
``q = round((x / s + 1) * (L - 1) / 2)`` (float32, half to even; q = round((L - 1) / 2)
when s = 0) on L uniform levels over [-s, s]; it decodes as ``float32(2q / (L - 1) - 1) * s``
(Q = 1 sends ±s). Every element not kept decodes as 0. Bit streams are little-endian: bit j
of the i-th value is bit ``i * width + j`` of the stream, stream bit n is bit ``n % 8`` of
byte ``n // 8``, and the last byte is padded with zero bits (non-zero padding is rejected).

``parse_payload`` checks the type, length, magic, version, reserved byte, codec name, element
count and exact size, then the content (finite non-negative scales; indices strictly increasing
within a chunk and inside it; no inf/NaN half, no -128), all before it builds any vector-sized
tensor; any failure raises ``PayloadError``, a ``MalformedRecord``. ``decode`` is
``parse_payload`` then materializing the dense vector. ``encode`` refuses a tensor that is not
a finite 1-D float32 CPU vector with ``InputError``. All work through the vector in slices, so
their memory stays within a few times the input.

``compress_with_feedback`` adds what earlier rounds failed to send (the residual) before it
encodes, and ``aggregate`` is the weighted mean every peer computes bit-identically: float64
sums in the given order, cast to float32 once. ``accumulate`` (or ``ParsedPayload.add_to``)
then ``finish`` compute the same bits straight from payloads, into one float64 sum: each
element gets the same float64 product ``float64(x) * w`` and addition, in the same order, but
no dense float32 vector is built, and top-k adds only its kept entries (the others add +0.0,
which changes nothing in a sum started from +0.0).
"""

from __future__ import annotations

import math
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.errors import ConfigError, InputError, MalformedRecord

__all__ = [
    "PAYLOAD_MAGIC",
    "PAYLOAD_VERSION",
    "HEADER_SIZE",
    "PayloadError",
    "Codec",
    "Fp16Codec",
    "Int8Codec",
    "TopKCodec",
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

PAYLOAD_MAGIC = b"BRNC"
PAYLOAD_VERSION = 1
_HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = _HEADER.size
"""Bytes before the codec name: magic, version, reserved, name length, element count."""

_SLICE = 1 << 22
"""Elements handled at once: a multiple of every block and chunk; bounds the temporaries."""
_SUM_SLICE = 1 << 18
"""Elements per float64 temporary when adding into a sum or dividing it: a multiple of every
block, small enough to stay in cache (and below malloc's mmap threshold)."""
_SLACK = 2.0**-20
"""Relative float32 rounding allowed on top of a codec's quantization step."""
_TINY = 2.0**-126
"""Absolute error allowed for subnormal scales (the smallest normal float32)."""

_FP16_NAME = re.compile(r"fp16")
_INT8_NAME = re.compile(r"int8-b(0|[1-9][0-9]{0,5})")
_TOPK_NAME = re.compile(r"topk-c(0|[1-9][0-9]{0,5})-k(0|[1-9][0-9]{0,5})-q(0|[1-9][0-9]?)")


class PayloadError(MalformedRecord):
    """Codec payload bytes do not decode: wrong framing, size, codec, element count or content."""


def _is_power_of_two(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def _check_count(numel: object, what: str) -> int:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise InputError(f"{what}: element count {numel!r} is not a non-negative integer")
    return numel


def _packed_size(count: int, width: int) -> int:
    return (count * width + 7) // 8


class Codec(ABC):
    """A wire codec: ``name`` says everything that changes its bytes."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The codec's one name, as ``parse_codec`` reads it and the payload header carries it."""

    @property
    @abstractmethod
    def nominal_bits_per_element(self) -> float:
        """Body bits per element for a long vector (headers and partial blocks left out)."""

    @abstractmethod
    def body_size(self, numel: int) -> int:
        """Exact body bytes for ``numel`` elements."""

    @abstractmethod
    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound (float64) on ``|decode(encode(x)) - x|`` for this input."""

    @abstractmethod
    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        """The body of a checked vector, as parts to concatenate."""

    @abstractmethod
    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        """Checks the content of a body whose size is already checked (PayloadError) and returns
        the parts that ``_materialize`` and ``_add_weighted`` read; builds nothing vector-sized."""

    @abstractmethod
    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        """The float32 vector [numel] of a parsed body."""

    @abstractmethod
    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        """``out[i] += float64(x[i]) * weight`` for the elements ``x[i]`` of a parsed body; those
        that decode as +0.0 may be skipped (adding +0.0 changes nothing but a -0.0 to +0.0)."""

    def payload_size(self, numel: int) -> int:
        """Exact payload bytes (header, name and body) for ``numel`` elements."""
        numel = _check_count(numel, f"codec {self.name!r}")
        return HEADER_SIZE + len(self.name) + self.body_size(numel)

    def __str__(self) -> str:
        return self.name


class _SlicedCodec(Codec):
    """A codec whose body decodes slice by slice into dense float32 values."""

    @abstractmethod
    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, float32 values of elements start .. start + step - 1), slice after slice, in
        order; ``step`` is a multiple of every block."""

    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        for start, values in self._dense_slices(parts, numel, _SLICE):
            out[start : start + len(values)] = values
        return out

    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        for start, values in self._dense_slices(parts, numel, _SUM_SLICE):
            product = values.double()
            product *= weight  # the same float64 product as ``values.double() * weight``
            out[start : start + len(values)] += product


@dataclass(frozen=True)
class Fp16Codec(_SlicedCodec):
    """IEEE half precision of every element: 16 bits, relative error 2**-11."""

    @property
    def name(self) -> str:
        return "fp16"

    @property
    def nominal_bits_per_element(self) -> float:
        return 16.0

    def body_size(self, numel: int) -> int:
        return 2 * numel

    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        # Half an ulp: 2**-11 relative for normal halves, 2**-25 absolute for subnormal ones.
        return (_checked_vector(x, f"codec {self.name!r}").double().abs() * 2.0**-11).clamp_(min=2.0**-25)

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        half = x.to(torch.float16)
        if torch.isinf(half).any():
            where = int(torch.isinf(half).nonzero()[0])
            raise InputError(f"codec 'fp16': element {where} ({float(x[where])}) is beyond the fp16 range (65504)")
        return [half.numpy().astype("<f2", copy=False)]

    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        raw = np.frombuffer(body, dtype="<i2", count=numel)
        for start in range(0, numel, _SLICE):
            not_finite = (raw[start : start + _SLICE] & 0x7C00) == 0x7C00  # all-ones exponent: inf or NaN
            if not_finite.any():
                raise PayloadError(f"codec payload (fp16): element {start + int(not_finite.argmax())} is not finite")
        return (raw,)

    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        (raw,) = parts
        for start in range(0, numel, step):
            yield start, torch.from_numpy(raw[start : start + step].astype(np.int16)).view(torch.float16).float()


@dataclass(frozen=True, kw_only=True)
class Int8Codec(_SlicedCodec):
    """Blocks of ``block`` elements: a float32 scale ``max|x| / 127`` and one int8 per element."""

    block: int
    """Elements per block: a power of two, 16..65536."""

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or not _is_power_of_two(self.block, 16, 65536):
            raise ConfigError(f"codec {self.name!r}: block {self.block} is not a power of two in 16..65536")

    @property
    def name(self) -> str:
        return f"int8-b{self.block}"

    @property
    def nominal_bits_per_element(self) -> float:
        return 8.0 + 32.0 / self.block

    def body_size(self, numel: int) -> int:
        return 4 * -(-numel // self.block) + numel

    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        x = _checked_vector(x, f"codec {self.name!r}")
        amax = _padded(x.abs(), self.block).view(-1, self.block).amax(1).double()
        scale = (amax.float() / 127).double()  # the scale as encode computes it
        per_block = 0.5 * scale + _SLACK * amax + _TINY
        return per_block.repeat_interleave(self.block)[: x.numel()]

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        scales = np.empty(-(-x.numel() // self.block), dtype="<f4")
        values = np.empty(x.numel(), dtype=np.int8)
        for start in range(0, x.numel(), _SLICE):
            part = x[start : start + _SLICE]
            rows = _padded(part, self.block).view(-1, self.block)
            scale = rows.abs().amax(1) / 127
            if torch.isinf(scale * 127).any():
                where = start + self.block * int(torch.isinf(scale * 127).nonzero()[0])
                raise InputError(f"codec {self.name!r}: block at {where} holds a value too large for an int8 scale")
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
            quantized = torch.round(rows / divisor[:, None]).clamp_(-127, 127).to(torch.int8)
            scales[start // self.block : start // self.block + len(scale)] = scale.numpy()
            values[start : start + len(part)] = quantized.view(-1)[: len(part)].numpy()
        return [scales, values]

    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        blocks = -(-numel // self.block)
        scales = torch.from_numpy(_read_scales(body, blocks, self.name, top_level=127.0))
        values = np.frombuffer(body, dtype=np.int8, count=numel, offset=4 * blocks)
        for start in range(0, numel, _SLICE):
            part = values[start : start + _SLICE]
            if (part == -128).any():
                where = start + int((part == -128).argmax())
                raise PayloadError(f"codec payload ({self.name}): value {where} is -128, outside -127..127")
        return scales, values

    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        scales, values = parts
        for start in range(0, numel, step):
            part = values[start : start + step]
            rows = _padded(torch.from_numpy(part.copy()), self.block).view(-1, self.block).float()
            rows *= scales[start // self.block : start // self.block + len(rows), None]
            yield start, rows.view(-1)[: len(part)]


@dataclass(frozen=True, kw_only=True)
class TopKCodec(Codec):
    """Chunks of ``chunk`` elements; each keeps its ``k`` largest |x|, quantized to ``bits`` bits."""

    chunk: int
    """Elements per chunk: a power of two, 64..65536."""
    k: int
    """Entries kept per chunk: 1..chunk."""
    bits: int
    """Bits per kept value: 1..8, on 2**bits uniform levels over [-scale, scale]."""

    def __post_init__(self) -> None:
        if not isinstance(self.chunk, int) or not _is_power_of_two(self.chunk, 64, 65536):
            raise ConfigError(f"codec {self.name!r}: chunk {self.chunk} is not a power of two in 64..65536")
        if not isinstance(self.k, int) or not 1 <= self.k <= self.chunk:
            raise ConfigError(f"codec {self.name!r}: k {self.k} is not in 1..{self.chunk} (the chunk)")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"codec {self.name!r}: bits {self.bits} is not in 1..8")

    @property
    def name(self) -> str:
        return f"topk-c{self.chunk}-k{self.k}-q{self.bits}"

    @property
    def nominal_bits_per_element(self) -> float:
        return (32 + self.k * (self.index_bits + self.bits)) / self.chunk

    @property
    def index_bits(self) -> int:
        """Bits per index: log2(chunk)."""
        return self.chunk.bit_length() - 1

    def _layout(self, numel: int) -> tuple[int, int]:
        """(chunks, kept entries) for ``numel`` elements."""
        full, rest = divmod(numel, self.chunk)
        return full + (rest > 0), full * self.k + min(self.k, rest)

    def body_size(self, numel: int) -> int:
        chunks, kept = self._layout(numel)
        return 4 * chunks + _packed_size(kept, self.index_bits) + _packed_size(kept, self.bits)

    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        x = _checked_vector(x, f"codec {self.name!r}")
        bound = x.double().abs()  # an element that is not kept decodes as 0
        steps = (1 << self.bits) - 1
        for offset, rows, k in _chunk_rows(x, self.chunk, self.k):
            index = _top_indices(rows, k)
            scale = rows.gather(1, index).abs().amax(1, keepdim=True).double()
            kept = scale / steps + _SLACK * scale + _TINY  # half of the level spacing 2s/(L-1)
            positions = offset + torch.arange(len(rows))[:, None] * self.chunk + index
            bound[positions.view(-1)] = kept.expand_as(index).reshape(-1)
        return bound

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        # Every slice but the last keeps a multiple of 8 entries, so its bit streams fill whole
        # bytes and the per-slice streams concatenate into the payload's two streams.
        scales, indices, levels = [], [], []
        half_steps = ((1 << self.bits) - 1) / 2
        for start in range(0, x.numel(), _SLICE):
            part_scales, part_indices, part_levels = [], [], []
            for _, rows, k in _chunk_rows(x[start : start + _SLICE], self.chunk, self.k):
                index = _top_indices(rows, k)
                kept = rows.gather(1, index)
                scale = kept.abs().amax(1)
                divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
                level = torch.round((kept / divisor[:, None] + 1) * half_steps).clamp_(0, 2 * half_steps)
                part_scales.append(scale.numpy())
                part_indices.append(index.reshape(-1).numpy())
                part_levels.append(level.view(-1).to(torch.uint8).numpy())
            scales.extend(part_scales)
            indices.append(_pack_bits(np.concatenate(part_indices), self.index_bits))
            levels.append(_pack_bits(np.concatenate(part_levels), self.bits))
        return [np.concatenate(scales).astype("<f4", copy=False), *indices, *levels] if scales else []

    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        chunks, kept = self._layout(numel)
        scales = _read_scales(body, chunks, self.name)
        what = f"codec payload ({self.name})"
        index_start = 4 * chunks
        level_start = index_start + _packed_size(kept, self.index_bits)
        index_stream = _bit_stream(body[index_start:level_start], self.index_bits, kept, f"{what} index stream")
        level_stream = _bit_stream(body[level_start:], self.bits, kept, f"{what} level stream")
        for first, count in self._kept_slices(numel):
            index = _unpack_bits(index_stream, self.index_bits, first, count)
            self._check_indices(index, (first + np.arange(count, dtype=np.int64)) // self.k, numel, what)
        return scales, index_stream, level_stream

    def _kept_slices(self, numel: int) -> Iterator[tuple[int, int]]:
        """(entries kept before the slice, entries kept in it) for each slice of the vector."""
        kept = self._layout(numel)[1]
        for start in range(0, numel, _SLICE):
            first = start // self.chunk * self.k
            yield first, min(_SLICE // self.chunk * self.k, kept - first)

    def _entries(self, parts: tuple, numel: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions in the vector, float32 values) of the kept entries, slice after slice."""
        scales, index_stream, level_stream = parts
        steps = (1 << self.bits) - 1
        table = (2 * np.arange(steps + 1) / steps - 1).astype(np.float32)
        for first, count in self._kept_slices(numel):
            index = _unpack_bits(index_stream, self.index_bits, first, count)
            level = _unpack_bits(level_stream, self.bits, first, count)
            chunk_of = (first + np.arange(count, dtype=np.int64)) // self.k
            yield chunk_of * self.chunk + index, table[level] * scales[chunk_of]

    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        out = torch.zeros(numel, dtype=torch.float32)  # written in order: cheaper than lazy pages
        for positions, values in self._entries(parts, numel):
            out.numpy()[positions] = values
        return out

    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        # Only the kept entries: every other element decodes as 0, and out[i] + 0.0 == out[i]
        # (-0.0 aside). Positions are unique, so index_add_ is one float64 addition per entry.
        for positions, values in self._entries(parts, numel):
            out.index_add_(0, torch.from_numpy(positions), torch.from_numpy(values).double() * weight)

    def _check_indices(self, index: np.ndarray, chunk_of: np.ndarray, numel: int, what: str) -> None:
        """Indices strictly increase within each chunk and stay inside the (last, shorter) chunk."""
        unordered = (np.diff(index) <= 0) & (chunk_of[1:] == chunk_of[:-1])
        if unordered.any():
            where = int(unordered.argmax()) + 1
            raise PayloadError(f"{what}: chunk {int(chunk_of[where])} indices do not strictly increase")
        full, rest = divmod(numel, self.chunk)
        if rest and (index[chunk_of == full] >= rest).any():
            raise PayloadError(f"{what}: an index of the last chunk is not below its length {rest}")


# ---------------------------------------------------------------------------------------
# Helpers: vectors, rows, scales, bit streams
# ---------------------------------------------------------------------------------------


def _checked_vector(x: object, what: str) -> torch.Tensor:
    """``x`` as a contiguous finite 1-D float32 CPU tensor, or InputError."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu":
        raise InputError(f"{what}: expected a 1-D float32 CPU tensor, got {x.dtype} {list(x.shape)} on {x.device}")
    x = x.detach().contiguous()
    for start in range(0, x.numel(), _SLICE):
        part = x[start : start + _SLICE]
        if not torch.isfinite(part.abs().amax()):  # amax propagates NaN: one cheap pass
            where = start + int((~torch.isfinite(part)).nonzero()[0])
            raise InputError(f"{what}: element {where} is {float(x[where])}, not finite")
    return x


def _padded(values: torch.Tensor, multiple: int) -> torch.Tensor:
    """``values`` with zeros appended up to a multiple of ``multiple``."""
    extra = -values.numel() % multiple
    return torch.cat([values, values.new_zeros(extra)]) if extra else values


def _chunk_rows(x: torch.Tensor, chunk: int, k: int) -> Iterator[tuple[int, torch.Tensor, int]]:
    """(offset, rows [m, chunk or less], entries to keep per row) over ``x``, slice by slice."""
    for start in range(0, x.numel(), _SLICE):
        part = x[start : start + _SLICE]
        full, rest = divmod(part.numel(), chunk)
        if full:
            yield start, part[: full * chunk].view(full, chunk), k
        if rest:
            yield start + full * chunk, part[full * chunk :].view(1, rest), min(k, rest)


def _top_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices [m, k] of each row's k largest |x|; of equal |x|, the lower index.

    The sort key (bits of |x|) << 16 | (0xFFFF - index) is unique, so the choice does not
    depend on how ``torch.topk`` breaks ties (finite non-negative floats order as their bits).
    """
    if k == rows.shape[1]:
        return torch.arange(k).expand(len(rows), k)
    keys = (rows.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    keys <<= 16
    keys |= 0xFFFF - torch.arange(rows.shape[1], dtype=torch.int64)
    top = torch.topk(keys, k, dim=1, sorted=False).values
    return torch.sort(0xFFFF - (top & 0xFFFF), dim=1).values


def _read_scales(body: memoryview, count: int, name: str, top_level: float = 1.0) -> np.ndarray:
    """The ``count`` float32 scales at the start of a body: finite, non-negative, and such that
    ``top_level * scale`` is finite in float32 (so every decoded value is)."""
    scales = np.frombuffer(body, dtype="<f4", count=count).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(scales * np.float32(top_level)) | np.signbit(scales)
    if bad.any():
        where = int(bad.argmax())
        raise PayloadError(
            f"codec payload ({name}): scale {where} is {scales[where]}, not a finite non-negative number"
        )
    return scales


def _pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Little-endian bit stream of ``width`` bits per value (values < 2**16), zero-padded."""
    bits = np.unpackbits(values.astype("<u2").view(np.uint8), bitorder="little").reshape(-1, 16)
    return np.packbits(bits[:, :width].reshape(-1), bitorder="little")


def _bit_stream(stream: memoryview, width: int, count: int, what: str) -> np.ndarray:
    """The bytes of a stream of ``count`` values of ``width`` bits; padding bits must be zero."""
    raw = np.frombuffer(stream, dtype=np.uint8, count=_packed_size(count, width))
    used = count * width % 8
    if used and raw[-1] >> used:
        raise PayloadError(f"{what}: padding bits of the last byte are not zero")
    return raw


def _unpack_bits(raw: np.ndarray, width: int, first: int, count: int) -> np.ndarray:
    """Values ``first .. first + count - 1`` (int64) of a bit stream; ``first * width`` is whole bytes."""
    part = raw[first * width // 8 : _packed_size(first + count, width)]
    bits = np.zeros((count, 16), dtype=np.uint8)
    bits[:, :width] = np.unpackbits(part, bitorder="little", count=count * width).reshape(count, width)
    return np.packbits(bits.reshape(-1), bitorder="little").view("<u2").astype(np.int64)


# ---------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------


def parse_codec(name: str) -> Codec:
    """The codec a name denotes (see the module docstring), or ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(f"codec name must be a string, got {type(name).__name__}")
    if _FP16_NAME.fullmatch(name):
        return Fp16Codec()
    if match := _INT8_NAME.fullmatch(name):
        return Int8Codec(block=int(match[1]))
    if match := _TOPK_NAME.fullmatch(name):
        return TopKCodec(chunk=int(match[1]), k=int(match[2]), bits=int(match[3]))
    raise ConfigError(f"codec {name!r} is not a codec name: expected fp16, int8-b<B> or topk-c<C>-k<K>-q<Q>")


def _as_codec(codec: Codec | str) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        return parse_codec(codec)
    raise ConfigError(f"expected a Codec or a codec name, got {type(codec).__name__}")


def payload_size(codec: Codec | str, numel: int) -> int:
    """Exact payload bytes (header included) that ``encode`` writes for ``numel`` elements."""
    return _as_codec(codec).payload_size(numel)


def encode(codec: Codec | str, x: torch.Tensor) -> bytes:
    """The payload of a finite 1-D float32 CPU vector; the same input gives the same bytes."""
    codec = _as_codec(codec)
    x = _checked_vector(x, f"codec {codec.name!r}")
    name = codec.name.encode("ascii")
    header = _HEADER.pack(PAYLOAD_MAGIC, PAYLOAD_VERSION, 0, len(name), x.numel())
    return b"".join([header, name, *codec._encode_body(x)])


def _body(payload: object, codec: Codec, numel: int) -> memoryview:
    """The body of a payload whose framing, codec, element count and size all check out."""
    what = f"codec payload ({codec.name})"
    if not isinstance(payload, bytes):
        raise PayloadError(f"{what}: expected bytes, got {type(payload).__name__}")
    if len(payload) < HEADER_SIZE:
        raise PayloadError(f"{what}: {len(payload)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, reserved, name_length, count = _HEADER.unpack_from(payload)
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

    def decode(self) -> torch.Tensor:
        """The float32 vector [numel]."""
        return self.codec._materialize(self._parts, self.numel)

    def add_to(self, out: torch.Tensor, weight: float) -> None:
        """``out += float64(decoded) * weight``, element by element, with no dense float32 copy.

        ``out`` is a float64 CPU vector [numel]; each element gets the one product and the one
        float64 addition that ``aggregate`` performs for it (top-k adds its kept entries only).
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
    for start in range(0, out.numel(), _SUM_SLICE):
        _store_mean(mean, start, out[start : start + _SUM_SLICE], total)
    return mean


def compress_with_feedback(
    codec: Codec | str, update: torch.Tensor, residual: torch.Tensor
) -> tuple[bytes, torch.Tensor]:
    """Error feedback: encode ``update + residual``; the new residual is what the payload lost.

    Over rounds the decoded payloads add up to the updates' sum minus the last residual, so
    what a lossy codec drops is sent later instead of being lost.
    """
    codec = _as_codec(codec)
    update = _checked_vector(update, f"codec {codec.name!r} update")
    residual = _checked_vector(residual, f"codec {codec.name!r} residual")
    if update.shape != residual.shape:
        raise InputError(f"codec {codec.name!r}: update has {update.numel()} elements, residual {residual.numel()}")
    corrected = update + residual
    payload = encode(codec, corrected)
    return payload, corrected.sub_(decode(payload, codec, corrected.numel()))


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
    for start in range(0, out.numel(), _SLICE):
        stop = start + _SLICE
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
