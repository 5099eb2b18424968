"""Bit streams of the codec payloads: fixed-width packing and Elias-Fano index vectors.

A stream of ``width``-bit values is little-endian: bit j of the i-th value is bit
``i * width + j`` of the stream, stream bit n is bit ``n % 8`` of byte ``n // 8``, and the last
byte is padded with zero bits. Packing works on groups of 8 values (``width`` bytes each) held
in two little-endian 64-bit words, so it costs a few numpy passes over the values, never one
pass per bit.

Elias-Fano (one chunk of ``length`` positions keeping ``kept`` of them, ascending): with ``low``
bits per index, the low parts ``index & (2**low - 1)`` go to a fixed-width stream, and the
high parts set bit ``(index >> low) + i`` of the chunk's high vector of
``kept + ceil(length / 2**low)`` bits for the i-th kept index (i from 0). The vector holds
exactly ``kept`` ones, and ``index_i = ((p_i - i) << low) | low_i`` where ``p_i`` is the
position of its i-th one. ``unpack_high`` checks the count of ones per chunk; the caller checks
that the indices strictly increase and stay inside the chunk.

Pure numpy; every check raises ``PayloadError`` with one line naming what was wrong.
"""

from __future__ import annotations

import numpy as np

from protocol.codec_core import PayloadError

__all__ = [
    "packed_size",
    "pack_bits",
    "unpack_bits",
    "checked_stream",
    "elias_fano_low_bits",
    "high_bits",
    "pack_high",
    "unpack_high",
]

_MAX_WIDTH = 16


def packed_size(count: int, width: int) -> int:
    """Bytes of a stream of ``count`` values of ``width`` bits."""
    return (count * width + 7) // 8


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """The uint8 stream of ``values`` (non-negative, below 2**width), ``width`` in 0..16."""
    if not 0 <= width <= _MAX_WIDTH:
        raise ValueError(f"bit width {width} is not in 0..{_MAX_WIDTH}")
    count = len(values)
    if width == 0 or count == 0:
        return np.zeros(0, dtype=np.uint8)
    if 8 % width == 0:  # whole values per byte: shift and or bytes
        return _pack_bytes(values, width)
    groups = -(-count // 8)
    grid = np.zeros((groups, 8), dtype=np.uint64)
    grid.reshape(-1)[:count] = values
    if width <= 8:  # a group's 8 values fit one 64-bit word
        words = np.bitwise_or.reduce(grid << _shifts(width), axis=1).astype("<u8")[:, None]
    else:  # bits 0..63 and 64..127 of each group
        words = np.zeros((groups, 2), dtype="<u8")
        for i in range(8):
            offset, column = i * width, grid[:, i]
            if offset < 64:
                words[:, 0] |= column << np.uint64(offset)
                if offset + width > 64:
                    words[:, 1] |= column >> np.uint64(64 - offset)
            else:
                words[:, 1] |= column << np.uint64(offset - 64)
    stream = np.ascontiguousarray(words.view(np.uint8)[:, :width]).reshape(-1)
    return stream[: packed_size(count, width)]


def unpack_bits(stream: np.ndarray, width: int, first: int, count: int) -> np.ndarray:
    """Values ``first .. first + count - 1`` (int64) of a uint8 stream of ``width``-bit values."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    if 8 % width == 0:
        return _unpack_bytes(stream, width, first, count)
    group0 = first // 8  # unpack whole groups of 8 values (``width`` bytes), then cut
    skip = first - 8 * group0
    groups = -(-(skip + count) // 8)
    raw = stream[group0 * width : (group0 + groups) * width]
    whole = np.zeros(groups * width, dtype=np.uint8)  # the stream's last group may be cut short
    whole[: len(raw)] = raw
    mask = np.uint64((1 << width) - 1)
    if width <= 8:
        grid = np.zeros((groups, 8), dtype=np.uint8)
        grid[:, :width] = whole.reshape(groups, width)
        out = (grid.view("<u8") >> _shifts(width)) & mask
    else:
        grid = np.zeros((groups, 16), dtype=np.uint8)
        grid[:, :width] = whole.reshape(groups, width)
        words = grid.view("<u8").astype(np.uint64)
        out = np.empty((groups, 8), dtype=np.uint64)
        for i in range(8):
            offset = i * width
            if offset + width <= 64:
                out[:, i] = (words[:, 0] >> np.uint64(offset)) & mask
            elif offset >= 64:
                out[:, i] = (words[:, 1] >> np.uint64(offset - 64)) & mask
            else:
                out[:, i] = ((words[:, 0] >> np.uint64(offset)) | (words[:, 1] << np.uint64(64 - offset))) & mask
    return out.reshape(-1)[skip : skip + count].astype(np.int64)


def _pack_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """``pack_bits`` for a width that divides 8: value i is in byte i // (8 / width)."""
    per = 8 // width
    grid = np.zeros((-(-len(values) // per), per), dtype=np.uint8)
    grid.reshape(-1)[: len(values)] = values
    stream = grid[:, 0].copy()
    for i in range(1, per):
        stream |= grid[:, i] << np.uint8(i * width)
    return stream


def _unpack_bytes(stream: np.ndarray, width: int, first: int, count: int) -> np.ndarray:
    """``unpack_bits`` for a width that divides 8."""
    per = 8 // width
    raw = stream[first // per : -(-(first + count) // per)]
    grid = np.empty((len(raw), per), dtype=np.uint8)
    mask = np.uint8((1 << width) - 1)
    for i in range(per):
        np.bitwise_and(raw >> np.uint8(i * width), mask, out=grid[:, i])
    skip = first % per
    return grid.reshape(-1)[skip : skip + count].astype(np.int64)


def _shifts(width: int) -> np.ndarray:
    """Bit offsets of the 8 values of a group in its 64-bit word (width <= 8)."""
    return np.arange(8, dtype=np.uint64) * np.uint64(width)


def checked_stream(body: memoryview, offset: int, bits: int, what: str) -> np.ndarray:
    """The bytes of a stream of ``bits`` bits at ``offset`` of a body; padding must be zero."""
    raw = np.frombuffer(body, dtype=np.uint8, count=(bits + 7) // 8, offset=offset)
    used = bits % 8
    if used and raw[-1] >> used:
        raise PayloadError(f"{what}: padding bits of the last byte are not zero")
    return raw


def elias_fano_low_bits(chunk: int, kept: int) -> int:
    """Low bits per index: max(0, floor(log2(chunk / kept)))."""
    return (chunk // kept).bit_length() - 1


def high_bits(length: int, kept: int, low: int) -> int:
    """Bits of the high vector of a chunk of ``length`` positions keeping ``kept``."""
    return kept + -(-length // (1 << low)) if length else 0


def pack_high(index: np.ndarray, low: int, row_bits: int, tail: np.ndarray | None = None,
              tail_bits: int = 0) -> np.ndarray:
    """The high stream of rows of ascending indices [rows, kept] (each row ``row_bits`` bits),
    followed by one shorter last row ``tail`` (``tail_bits`` bits) when given."""
    rows, kept = index.shape
    total = rows * row_bits + (tail_bits if tail is not None else 0)
    bits = np.zeros(total, dtype=np.uint8)
    if rows:
        ones = (index >> low) + np.arange(kept, dtype=np.int64)
        ones += (np.arange(rows, dtype=np.int64) * row_bits)[:, None]
        bits[ones.reshape(-1)] = 1
    if tail is not None and len(tail):
        bits[rows * row_bits + (tail >> low) + np.arange(len(tail), dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little")


def unpack_high(stream: np.ndarray, bit_offset: int, rows: int, row_bits: int, kept: int, low: int,
                first_row: int, what: str) -> np.ndarray:
    """High parts [rows, kept] (int64) of ``rows`` vectors of ``row_bits`` bits starting at bit
    ``bit_offset``; PayloadError unless each vector holds exactly ``kept`` ones."""
    if rows == 0:
        return np.zeros((0, kept), dtype=np.int64)
    start, stop = bit_offset // 8, -(-(bit_offset + rows * row_bits) // 8)
    bits = np.unpackbits(stream[start:stop], bitorder="little")
    grid = bits[bit_offset - 8 * start : bit_offset - 8 * start + rows * row_bits].reshape(rows, row_bits)
    counts = np.count_nonzero(grid, axis=1)
    wrong = counts != kept
    if wrong.any():
        where = int(wrong.argmax())
        raise PayloadError(
            f"{what}: the high vector of chunk {first_row + where} holds {int(counts[where])} ones, not {kept}"
        )
    ones = np.flatnonzero(grid).reshape(rows, kept)
    ones -= (np.arange(rows, dtype=np.int64) * row_bits)[:, None]
    ones -= np.arange(kept, dtype=np.int64)
    return ones
