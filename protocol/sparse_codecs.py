"""Sparse wire codecs: each chunk of the vector keeps some elements, the rest decode as 0.

    TopKCodec             topk-c{C}-k{K}-q{Q}   the K largest |x| per chunk, fixed-width indices
    EliasFanoTopKCodec    topk-c{C}-k{K}-s{Q}   the same selection, Elias-Fano indices
                          topk-c{C}-k{K}-f32
    BlockMaxCodec         bmax-c{C}-b{B}-s{Q}   the largest |x| of every block of B elements
                          bmax-c{C}-b{B}-f32

The formats are specified in ``protocol.codecs`` (its module docstring) and docs/protocol.md
10.1; how kept values are written is ``protocol.kept_values``. Selection is exact and the same
on every machine: of equal |x|, the lower index wins. It runs over the vector in steps of
``codec_core.SUM_SLICE`` elements (a whole number of chunks), so its temporaries stay in cache,
and ``compress_with_feedback`` computes each step of the corrected vector right before it
selects from it (``_encode_feedback``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from protocol import codec_core as core
from protocol.bitstreams import (
    checked_stream,
    elias_fano_low_bits,
    high_bits,
    pack_bits,
    pack_high,
    packed_size,
    unpack_bits,
    unpack_high,
)
from protocol.codec_core import Codec, PayloadError, checked_vector, correct_in_place, is_power_of_two
from protocol.errors import ConfigError, InputError
from protocol.kept_values import Float32Values, KeptValues, TableLevels, UniformLevels

__all__ = ["TopKCodec", "EliasFanoTopKCodec", "BlockMaxCodec", "top_k_select", "block_max_select"]

Selection = tuple[np.ndarray, np.ndarray]
"""(indices, values): per row, the kept entries' indices (int64) and float32 values."""


def top_k_select(rows: np.ndarray, k: int, magnitude: np.ndarray, work: np.ndarray) -> Selection | None:
    """Ascending indices [m, k] of each row's k largest |x| (of equal |x|, the lower index) and
    their values; None when a row holds inf or NaN. ``magnitude`` and ``work`` are float32
    scratch of at least ``rows.size`` elements.

    The k-th largest |x| of each row (``partition``) is its threshold t: a row keeps every
    |x| > t and, of those equal to t, the lowest indices that fill it up to k.
    """
    m, length = rows.shape
    mag = magnitude[: rows.size].reshape(m, length)
    np.abs(rows, out=mag)
    if k == length:
        if not np.isfinite(mag).all():
            return None
        return np.broadcast_to(np.arange(length, dtype=np.int64), (m, length)).copy(), rows.copy()
    part = work[: rows.size].reshape(m, length)
    np.copyto(part, mag)
    part.partition(length - k, axis=1)
    if not np.isfinite(part[:, length - k :]).all():  # inf and NaN sort last: the row's max is here
        return None
    threshold = part[:, length - k : length - k + 1]
    keep = mag >= threshold  # every row has at least k: exactly k unless |x| ties at its threshold
    flat = np.flatnonzero(keep)
    if len(flat) > m * k:  # of those equal to the threshold, the first ones
        tied = np.flatnonzero(np.count_nonzero(keep, axis=1) > k)
        sub, level = mag[tied], threshold[tied]
        above, equal = sub > level, sub == level
        room = k - np.count_nonzero(above, axis=1)
        keep[tied] = above | (equal & (np.cumsum(equal, axis=1) <= room[:, None]))
        flat = np.flatnonzero(keep)
    index = flat.reshape(m, k) - (np.arange(m, dtype=np.int64) * length)[:, None]
    return index, rows.reshape(-1)[flat].reshape(m, k)


def block_max_select(values: np.ndarray, block: int, magnitude: np.ndarray) -> Selection | None:
    """Per block of ``block`` consecutive elements of a 1-D array (the last may be shorter): the
    index of its largest |x| (of equal |x|, the lowest) and that value; None on inf or NaN."""
    count = len(values)
    whole = count // block * block
    mag = magnitude[:count]
    np.abs(values, out=mag)
    index = mag[:whole].reshape(-1, block).argmax(1)  # the first of equal maxima; NaN counts as max
    if whole < count:
        index = np.append(index, mag[whole:].argmax())
    kept = values[np.arange(len(index), dtype=np.int64) * block + index]
    if not np.isfinite(kept).all():
        return None
    return index, kept


@dataclass(frozen=True)
class _Kept:
    """What a sparse encoder selected: full chunks as rows, the last shorter chunk apart."""

    index: np.ndarray
    """int64 [full chunks, per]: index within the chunk (top-k) or within the block (bmax)."""
    values: np.ndarray
    """float32 [full chunks, per]."""
    tail_index: np.ndarray
    tail_values: np.ndarray

    def flat_index(self) -> np.ndarray:
        return np.concatenate([self.index.reshape(-1), self.tail_index])


class _SparseCodec(Codec):
    """A codec that keeps ``per`` entries of every chunk of ``chunk`` elements; the body is the
    value coding's head, the index streams, then the value coding's tail."""

    sparse = True
    checks_finite = True
    chunk: int

    @property
    @abstractmethod
    def per(self) -> int:
        """Entries kept by a full chunk."""

    @property
    @abstractmethod
    def coding(self) -> KeptValues:
        """How the kept values are written."""

    @abstractmethod
    def _kept_in(self, length: int) -> int:
        """Entries kept by a chunk of ``length`` elements."""

    @abstractmethod
    def _select(self, rows: np.ndarray, magnitude: np.ndarray, work: np.ndarray) -> Selection | None:
        """The selection of rows [m, length] of one length (a full chunk or the last one)."""

    @abstractmethod
    def _index_size(self, numel: int) -> int: ...

    @abstractmethod
    def _index_parts(self, kept: _Kept, numel: int) -> list[np.ndarray]: ...

    @abstractmethod
    def _parse_index(self, body: memoryview, offset: int, numel: int) -> np.ndarray:
        """The checked indices (uint16 [kept], entry order) of the index streams at ``offset``."""

    @abstractmethod
    def _positions(self, index: np.ndarray, first: int) -> np.ndarray:
        """Vector positions (int64) of entries ``first, first + 1, ...`` with these indices
        (``first`` starts a chunk)."""

    def _layout(self, numel: int) -> tuple[int, int]:
        """(chunks, kept entries) for ``numel`` elements."""
        full, rest = divmod(numel, self.chunk)
        return full + (rest > 0), full * self.per + (self._kept_in(rest) if rest else 0)

    def body_size(self, numel: int) -> int:
        chunks, kept = self._layout(numel)
        return self.coding.head_size(chunks) + self._index_size(numel) + self.coding.tail_size(kept)

    def _step(self) -> int:
        return max(core.SUM_SLICE // self.chunk, 1) * self.chunk

    def _window(self) -> int:
        return max(core.SLICE // self.chunk, 1) * self.chunk

    def _select_all(self, slices: Iterator[tuple[int, np.ndarray]], numel: int, what: str) -> _Kept:
        """Select from the vector given step by step: (start, float32 elements) in order."""
        full, rest = divmod(numel, self.chunk)
        index = np.empty((full, self.per), dtype=np.int64)
        values = np.empty((full, self.per), dtype=np.float32)
        tail: Selection = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        magnitude, work = np.empty(self._step(), dtype=np.float32), np.empty(self._step(), dtype=np.float32)
        for start, part in slices:
            whole = len(part) // self.chunk * self.chunk
            for is_tail, rows in ((False, part[:whole]), (True, part[whole:])):
                if not len(rows):
                    continue
                got = self._select(rows.reshape(-1, len(rows) if is_tail else self.chunk), magnitude, work)
                if got is None:
                    where = start + int(np.flatnonzero(~np.isfinite(part))[0])
                    raise InputError(f"{what}: element {where} is {float(part[where - start])}, not finite")
                if is_tail:
                    tail = (got[0][0], got[1][0])
                else:
                    row = start // self.chunk
                    index[row : row + len(got[0])], values[row : row + len(got[0])] = got
        return _Kept(index, values, *tail)

    def _slices(self, x: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        step = self._step()
        return ((start, x[start : start + step]) for start in range(0, len(x), step))

    def _encode_kept(self, kept: _Kept, numel: int, what: str) -> tuple[list[bytes | np.ndarray], np.ndarray]:
        """The body parts, and the decoded kept values (float32, entry order)."""
        encoded = self.coding.encode(kept.values, kept.tail_values, what)
        return [*encoded.head, *self._index_parts(kept, numel), *encoded.tail], encoded.decoded

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        what = f"codec {self.name!r}"
        kept = self._select_all(self._slices(x.numpy()), x.numel(), what)
        return self._encode_kept(kept, x.numel(), what)[0]

    def _encode_feedback(self, update: torch.Tensor, residual: torch.Tensor, decay: float) -> list[bytes | np.ndarray]:
        corrected, change, step = residual.numpy(), update.numpy(), self._step()
        slices = ((start, correct_in_place(corrected, change, decay, start, start + step))
                  for start in range(0, len(corrected), step))  # fmt: skip
        what = f"codec {self.name!r} corrected vector"
        kept = self._select_all(slices, len(corrected), what)
        parts, decoded = self._encode_kept(kept, len(corrected), what)
        positions = self._positions(kept.flat_index(), 0)
        corrected[positions] -= decoded  # float32, as ``corrected - decode(payload)``; 0 elsewhere
        return parts

    def max_abs_error(self, x: torch.Tensor) -> torch.Tensor:
        x = checked_vector(x, f"codec {self.name!r}")
        kept = self._select_all(self._slices(x.numpy()), x.numel(), f"codec {self.name!r}")
        bound = x.double().abs()  # an element that is not kept decodes as 0
        positions = self._positions(kept.flat_index(), 0)
        bound[torch.from_numpy(positions)] = torch.from_numpy(self.coding.bound(kept.values, kept.tail_values))
        return bound

    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        chunks, kept = self._layout(numel)
        index_at = self.coding.head_size(chunks)
        tail_at = index_at + self._index_size(numel)
        value_parts = self.coding.parse(body, 0, tail_at, chunks, kept, self.name)
        return self._parse_index(body, index_at, numel), value_parts

    def _windows(self, numel: int) -> Iterator[tuple[int, int]]:
        """(first entry, entries) of each window of ``_window()`` elements of the vector."""
        kept, window = self._layout(numel)[1], self._window()
        for start in range(0, numel, window):
            first = start // self.chunk * self.per
            yield first, min(window // self.chunk * self.per, kept - first)

    def _entries(self, parts: tuple, numel: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        index, value_parts = parts
        for first, count in self._windows(numel):
            positions = self._positions(index[first : first + count].astype(np.int64), first)
            yield positions, self.coding.window(value_parts, first, count, self.per)

    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        out = np.zeros(numel, dtype=np.float32)  # numpy's allocator asks for huge pages: fewer faults
        for positions, values in self._entries(parts, numel):
            out[positions] = values
        return torch.from_numpy(out)

    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        # Only the kept entries: every other element decodes as 0, and out[i] + 0.0 == out[i]
        # (-0.0 aside). Positions are unique, so index_add_ is one float64 addition per entry.
        for positions, values in self._entries(parts, numel):
            out.index_add_(0, torch.from_numpy(positions), torch.from_numpy(values).double() * weight)


def _check_chunk(name: str, chunk: object) -> None:
    if not isinstance(chunk, int) or not is_power_of_two(chunk, 64, 65536):
        raise ConfigError(f"codec {name!r}: chunk {chunk} is not a power of two in 64..65536")


def _check_bits(name: str, bits: object, optional: bool) -> None:
    if optional and bits is None:
        return
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise ConfigError(f"codec {name!r}: bits {bits} is not in 1..8")


class _TopKRows(_SparseCodec):
    """Top-k selection: chunks keep their k largest |x|; positions are chunk * C + index."""

    k: int

    @property
    def per(self) -> int:
        return self.k

    def _kept_in(self, length: int) -> int:
        return min(self.k, length)

    def _select(self, rows: np.ndarray, magnitude: np.ndarray, work: np.ndarray) -> Selection | None:
        return top_k_select(rows, self._kept_in(rows.shape[1]), magnitude, work)

    def _positions(self, index: np.ndarray, first: int) -> np.ndarray:
        chunks = np.arange(first // self.k, -(-(first + len(index)) // self.k), dtype=np.int64) * self.chunk
        return np.repeat(chunks, self.k)[: len(index)] + index

    def _check_rows(self, index: np.ndarray, first_chunk: int, length: int, what: str) -> None:
        """Rows [m, n] of a window's indices strictly increase and stay below ``length``."""
        unordered = (np.diff(index, axis=1) <= 0).any(axis=1)
        if unordered.any():
            raise PayloadError(f"{what}: chunk {first_chunk + int(unordered.argmax())} indices do not strictly increase")
        outside = index[:, -1] >= length
        if outside.any():
            row = int(outside.argmax())
            raise PayloadError(
                f"{what}: chunk {first_chunk + row} index {int(index[row, -1])} is not below its length {length}"
            )


@dataclass(frozen=True, kw_only=True)
class TopKCodec(_TopKRows):
    """Chunks of ``chunk`` elements; each keeps its ``k`` largest |x|, quantized to ``bits`` bits."""

    chunk: int
    """Elements per chunk: a power of two, 64..65536."""
    k: int
    """Entries kept per chunk: 1..chunk."""
    bits: int
    """Bits per kept value: 1..8, on 2**bits uniform levels over [-scale, scale]."""

    def __post_init__(self) -> None:
        _check_chunk(self.name, self.chunk)
        if not isinstance(self.k, int) or not 1 <= self.k <= self.chunk:
            raise ConfigError(f"codec {self.name!r}: k {self.k} is not in 1..{self.chunk} (the chunk)")
        _check_bits(self.name, self.bits, optional=False)

    @property
    def name(self) -> str:
        return f"topk-c{self.chunk}-k{self.k}-q{self.bits}"

    @property
    def coding(self) -> KeptValues:
        return UniformLevels(self.bits)

    @property
    def nominal_bits_per_element(self) -> float:
        return (32 + self.k * (self.index_bits + self.bits)) / self.chunk

    @property
    def index_bits(self) -> int:
        """Bits per index: log2(chunk)."""
        return self.chunk.bit_length() - 1

    def _index_size(self, numel: int) -> int:
        return packed_size(self._layout(numel)[1], self.index_bits)

    def _index_parts(self, kept: _Kept, numel: int) -> list[np.ndarray]:
        return [pack_bits(kept.flat_index(), self.index_bits)]

    def _parse_index(self, body: memoryview, offset: int, numel: int) -> np.ndarray:
        what = f"codec payload ({self.name})"
        kept = self._layout(numel)[1]
        stream = checked_stream(body, offset, kept * self.index_bits, f"{what} index stream")
        index = np.empty(kept, dtype=np.uint16)
        full, rest = divmod(numel, self.chunk)
        for first, count in self._windows(numel):
            part = unpack_bits(stream, self.index_bits, first, count)
            rows = min(count // self.k, full - first // self.k)
            self._check_rows(part[: rows * self.k].reshape(rows, self.k), first // self.k, self.chunk, what)
            last = part[rows * self.k :]
            if len(last):
                if (np.diff(last) <= 0).any():
                    raise PayloadError(f"{what}: chunk {full} indices do not strictly increase")
                if last[-1] >= rest:
                    raise PayloadError(f"{what}: an index of the last chunk is not below its length {rest}")
            index[first : first + count] = part
        return index


@dataclass(frozen=True, kw_only=True)
class EliasFanoTopKCodec(_TopKRows):
    """Top-k per chunk with Elias-Fano indices; values on table levels (``bits``) or float32."""

    chunk: int
    """Elements per chunk: a power of two, 64..65536."""
    k: int
    """Entries kept per chunk: 1..chunk."""
    bits: int | None
    """Bits per kept value, 1..8 (statistical levels with a per-payload table), or None: float32."""

    def __post_init__(self) -> None:
        _check_chunk(self.name, self.chunk)
        if not isinstance(self.k, int) or not 1 <= self.k <= self.chunk:
            raise ConfigError(f"codec {self.name!r}: k {self.k} is not in 1..{self.chunk} (the chunk)")
        _check_bits(self.name, self.bits, optional=True)

    @property
    def name(self) -> str:
        return f"topk-c{self.chunk}-k{self.k}-{self.coding.suffix}"

    @property
    def coding(self) -> KeptValues:
        return Float32Values() if self.bits is None else TableLevels(self.bits)

    @property
    def low_bits(self) -> int:
        """Low bits per index: max(0, floor(log2(chunk / k)))."""
        return elias_fano_low_bits(self.chunk, self.k)

    @property
    def nominal_bits_per_element(self) -> float:
        scale = 0 if self.bits is None else 32
        index = self.k * self.low_bits + high_bits(self.chunk, self.k, self.low_bits)
        return (scale + index + self.k * self.coding.bits_per_value()) / self.chunk

    def _high_layout(self, numel: int) -> tuple[int, int, int]:
        """(full chunks, bits of a full chunk's high vector, bits of the last one's)."""
        full, rest = divmod(numel, self.chunk)
        return full, high_bits(self.chunk, self.k, self.low_bits), high_bits(rest, min(self.k, rest), self.low_bits)

    def _index_size(self, numel: int) -> int:
        full, row_bits, tail_bits = self._high_layout(numel)
        return packed_size(self._layout(numel)[1], self.low_bits) + packed_size(full * row_bits + tail_bits, 1)

    def _index_parts(self, kept: _Kept, numel: int) -> list[np.ndarray]:
        _, row_bits, tail_bits = self._high_layout(numel)
        low = pack_bits(kept.flat_index() & ((1 << self.low_bits) - 1), self.low_bits)
        return [low, pack_high(kept.index, self.low_bits, row_bits, kept.tail_index, tail_bits)]

    def _parse_index(self, body: memoryview, offset: int, numel: int) -> np.ndarray:
        what = f"codec payload ({self.name})"
        kept = self._layout(numel)[1]
        full, row_bits, tail_bits = self._high_layout(numel)
        low_stream = checked_stream(body, offset, kept * self.low_bits, f"{what} low-bit stream")
        high_at = offset + packed_size(kept, self.low_bits)
        high_stream = checked_stream(body, high_at, full * row_bits + tail_bits, f"{what} high-bit stream")
        index = np.empty(kept, dtype=np.uint16)
        for first, count in self._windows(numel):
            chunk0 = first // self.k
            rows = min(count // self.k, full - chunk0)
            high = unpack_high(high_stream, chunk0 * row_bits, rows, row_bits, self.k, self.low_bits, chunk0, what)
            low = unpack_bits(low_stream, self.low_bits, first, count)
            part = (high.reshape(-1) << self.low_bits) | low[: rows * self.k]
            self._check_rows(part.reshape(rows, self.k), chunk0, self.chunk, what)
            index[first : first + rows * self.k] = part
            if count > rows * self.k:  # the last, shorter chunk
                rest, left = numel - full * self.chunk, count - rows * self.k
                high = unpack_high(high_stream, full * row_bits, 1, tail_bits, left, self.low_bits, full, what)
                part = (high.reshape(-1) << self.low_bits) | low[rows * self.k :]
                self._check_rows(part.reshape(1, left), full, rest, what)
                index[first + rows * self.k : first + count] = part
        return index


@dataclass(frozen=True, kw_only=True)
class BlockMaxCodec(_SparseCodec):
    """Every block of ``block`` elements keeps its largest |x|; values per chunk of ``chunk``."""

    one_per_block = True
    chunk: int
    """Elements per chunk (one scale each): a power of two, 64..65536, a multiple of the block."""
    block: int
    """Elements per block (one kept each): a power of two, 2..chunk."""
    bits: int | None
    """Bits per kept value, 1..8 (statistical levels with a per-payload table), or None: float32."""

    def __post_init__(self) -> None:
        _check_chunk(self.name, self.chunk)
        if not isinstance(self.block, int) or not is_power_of_two(self.block, 2, self.chunk):
            raise ConfigError(f"codec {self.name!r}: block {self.block} is not a power of two in 2..{self.chunk}")
        _check_bits(self.name, self.bits, optional=True)

    @property
    def name(self) -> str:
        return f"bmax-c{self.chunk}-b{self.block}-{self.coding.suffix}"

    @property
    def coding(self) -> KeptValues:
        return Float32Values() if self.bits is None else TableLevels(self.bits)

    @property
    def per(self) -> int:
        return self.chunk // self.block

    @property
    def index_bits(self) -> int:
        """Bits per index: log2(block)."""
        return self.block.bit_length() - 1

    @property
    def nominal_bits_per_element(self) -> float:
        scale = 0 if self.bits is None else 32
        return scale / self.chunk + (self.index_bits + self.coding.bits_per_value()) / self.block

    def _kept_in(self, length: int) -> int:
        return -(-length // self.block)

    def _select(self, rows: np.ndarray, magnitude: np.ndarray, work: np.ndarray) -> Selection | None:
        got = block_max_select(rows.reshape(-1), self.block, magnitude)
        if got is None:
            return None
        per = self._kept_in(rows.shape[1])
        return got[0].reshape(-1, per), got[1].reshape(-1, per)

    def _positions(self, index: np.ndarray, first: int) -> np.ndarray:
        return (first + np.arange(len(index), dtype=np.int64)) * self.block + index

    def _index_size(self, numel: int) -> int:
        return packed_size(self._layout(numel)[1], self.index_bits)

    def _index_parts(self, kept: _Kept, numel: int) -> list[np.ndarray]:
        return [pack_bits(kept.flat_index(), self.index_bits)]

    def _parse_index(self, body: memoryview, offset: int, numel: int) -> np.ndarray:
        what = f"codec payload ({self.name})"
        kept = self._layout(numel)[1]
        stream = checked_stream(body, offset, kept * self.index_bits, f"{what} index stream")
        rest = numel % self.block
        if rest and unpack_bits(stream, self.index_bits, kept - 1, 1)[0] >= rest:
            raise PayloadError(f"{what}: the index of the last block is not below its length {rest}")
        index = np.empty(kept, dtype=np.uint16)
        for first, count in self._windows(numel):
            index[first : first + count] = unpack_bits(stream, self.index_bits, first, count)
        return index
