"""How a sparse codec writes the values it keeps: uniform levels, levels with a table, or float32.

A sparse codec (``protocol.sparse_codecs``) keeps ``per`` entries of each chunk (fewer in the
last, shorter chunk) and hands their values, chunk by chunk in ascending position order, to
one of these codings. Each writes a *head* before the codec's index streams and a *tail*
after them (``protocol.codecs`` gives the full layouts):

    UniformLevels (q{Q})   head: a float32 scale per chunk (s = max |v|); tail: Q-bit levels
                           on 2**Q uniform levels over [-s, s]
    TableLevels (s{Q})     head: a table of 2**Q float32 values, then a float32 scale per chunk
                           (s = RMS of its kept values); tail: Q-bit levels, decoded as
                           float32(table[q] * s)
    Float32Values (f32)    head: nothing; tail: every kept value as float32

Every float operation that decides bytes is fixed below (float32 or float64, in which order),
so the same values give the same bytes on every machine. Parsing checks a head and a tail
before anything is built from them and raises ``PayloadError``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from protocol import codec_core as core
from protocol.bitstreams import checked_stream, pack_bits, packed_size, unpack_bits
from protocol.codec_core import PayloadError, read_scales
from protocol.errors import InputError

__all__ = ["KeptValues", "UniformLevels", "TableLevels", "Float32Values", "rms_scales", "level_table"]


@dataclass(frozen=True)
class Encoded:
    """What a coding writes for the kept values, and how they decode."""

    head: list[np.ndarray]
    tail: list[np.ndarray]
    decoded: np.ndarray
    """float32 [kept]: the decoded kept values, in entry order."""


class KeptValues(ABC):
    """One way of writing kept values; ``suffix`` is its part of the codec name."""

    @property
    @abstractmethod
    def suffix(self) -> str: ...

    @abstractmethod
    def bits_per_value(self) -> int:
        """Tail bits per kept value."""

    @abstractmethod
    def head_size(self, chunks: int) -> int: ...

    def tail_size(self, kept: int) -> int:
        return packed_size(kept, self.bits_per_value())

    @abstractmethod
    def encode(self, rows: np.ndarray, tail: np.ndarray, what: str) -> Encoded:
        """The head and tail for full chunks' values ``rows`` [m, per] and the last, shorter
        chunk's ``tail`` [n] (empty when there is none); all finite float32."""

    @abstractmethod
    def parse(self, body: memoryview, head: int, tail: int, chunks: int, kept: int, name: str) -> tuple:
        """The checked parts at byte offsets ``head`` and ``tail`` of a body of checked size (of
        a payload of codec ``name``)."""

    @abstractmethod
    def window(self, parts: tuple, first: int, count: int, per: int) -> np.ndarray:
        """float32 values of entries ``first .. first + count - 1`` (entry e is in chunk e // per;
        ``first`` starts a chunk)."""

    @abstractmethod
    def bound(self, rows: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """float64 [kept]: a bound on |decoded - kept value|, in entry order."""


def _flat(rows: np.ndarray, tail: np.ndarray) -> np.ndarray:
    return np.concatenate([rows.reshape(-1), tail]) if len(tail) else rows.reshape(-1)


def _parts(rows: np.ndarray, tail: np.ndarray) -> list[np.ndarray]:
    """The full chunks' rows [m, per] and the last chunk as one row [1, n], those not empty."""
    return ([rows] if len(rows) else []) + ([tail[None]] if len(tail) else [])


def _joined(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _per_entry(scales: np.ndarray, first: int, count: int, per: int) -> np.ndarray:
    """The scale of each entry ``first .. first + count - 1`` (``first`` starts a chunk)."""
    return np.repeat(scales[first // per : -(-(first + count) // per)], per)[:count]


@dataclass(frozen=True)
class UniformLevels(KeptValues):
    """2**bits uniform levels over [-s, s], s = max |v| of the chunk (the ``q`` top-k format)."""

    bits: int

    @property
    def suffix(self) -> str:
        return f"q{self.bits}"

    def bits_per_value(self) -> int:
        return self.bits

    def head_size(self, chunks: int) -> int:
        return 4 * chunks

    def _table(self) -> np.ndarray:
        steps = (1 << self.bits) - 1
        return (2 * np.arange(steps + 1) / steps - 1).astype(np.float32)

    def _levels(self, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales [m], levels [m, n]) of rows of kept values, in float32 (torch, as ever)."""
        half_steps = ((1 << self.bits) - 1) / 2
        scale = kept.abs().amax(1)
        divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
        level = torch.round((kept / divisor[:, None] + 1) * half_steps).clamp_(0, 2 * half_steps)
        return scale, level.to(torch.uint8)

    def encode(self, rows: np.ndarray, tail: np.ndarray, what: str) -> Encoded:
        scales, levels, per_entry = [], [], []
        for part in _parts(rows, tail):
            scale, level = self._levels(torch.from_numpy(part))
            scales.append(scale.numpy())
            levels.append(level.numpy().reshape(-1))
            per_entry.append(np.repeat(scale.numpy(), part.shape[1]))
        scale_all, level_all, scale_per_entry = (_joined(p, dtype) for p, dtype in
                                                 ((scales, np.float32), (levels, np.uint8), (per_entry, np.float32)))
        decoded = self._table()[level_all] * scale_per_entry
        return Encoded([scale_all.astype("<f4", copy=False)], [pack_bits(level_all, self.bits)], decoded)

    def parse(self, body: memoryview, head: int, tail: int, chunks: int, kept: int, name: str) -> tuple:
        scales = read_scales(body, chunks, name, offset=head)
        levels = checked_stream(body, tail, kept * self.bits, f"codec payload ({name}) level stream")
        return scales, levels

    def window(self, parts: tuple, first: int, count: int, per: int) -> np.ndarray:
        scales, levels = parts
        return self._table()[unpack_bits(levels, self.bits, first, count)] * _per_entry(scales, first, count, per)

    def bound(self, rows: np.ndarray, tail: np.ndarray) -> np.ndarray:
        steps = (1 << self.bits) - 1
        bounds = []
        for part in _parts(rows, tail):
            scale = np.abs(part).max(1, initial=0.0).astype(np.float64)
            kept = scale / steps + core.SLACK * scale + core.TINY  # half of the level spacing 2s/(L-1)
            bounds.append(np.repeat(kept, part.shape[1]))
        return np.concatenate(bounds) if bounds else np.zeros(0)


def rms_scales(rows: np.ndarray) -> np.ndarray:
    """float32 [m]: per row, sqrt(S / n) with S the float64 sum of the squares, added left to
    right (from 0.0); the float64 sqrt is rounded to float32."""
    if rows.size == 0:
        return np.zeros(len(rows), dtype=np.float32)
    squares = rows.astype(np.float64)
    squares *= squares  # exact: a float32's square fits a float64
    total = np.add.accumulate(squares, axis=1)[:, -1]  # strictly left to right (np.sum is pairwise)
    return np.sqrt(total / rows.shape[1]).astype(np.float32)


def _units_and_levels(values: np.ndarray, scales: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, levels) of rows [m, n] with scales [m]: u = float32(v / s) (0 where s = 0);
    class = min(M - 1, floor(|u| * M / 2)) with M = 2**(bits - 1); level = 2 * class + (v < 0)."""
    units = np.zeros(values.shape, dtype=np.float32)
    np.divide(values, scales[:, None], out=units, where=scales[:, None] > 0)
    classes = 1 << (bits - 1)
    magnitude = np.abs(units)
    magnitude *= np.float32(classes / 2)  # a power of two: exact
    level = np.minimum(np.floor(magnitude), classes - 1).astype(np.uint8)
    level *= 2
    level += values < 0
    return units, level


def level_table(units: np.ndarray, levels: np.ndarray, bits: int) -> np.ndarray:
    """float32 [2**bits]: entry q = float32(sum of float64(u) over the entries at level q, added
    from 0.0 in entry order, / their count); a level with no entry gets its class's centre,
    signed. ``np.add.accumulate`` adds strictly left to right (``np.sum`` would not)."""
    size = 1 << bits
    order = np.argsort(levels, kind="stable")  # a radix sort (uint8) that keeps entry order
    members = np.split(units[order], np.cumsum(np.bincount(levels, minlength=size))[:-1])
    table = np.empty(size, dtype=np.float32)
    for level, member in enumerate(members):
        if len(member):
            total = np.add.accumulate(member.astype(np.float64))[-1] + 0.0  # as if from 0.0: -0.0 -> +0.0
            table[level] = total / len(member)
        else:
            centre = (level // 2 + 0.5) * 2 / (size // 2)
            table[level] = -centre if level % 2 else centre
    return table


@dataclass(frozen=True)
class TableLevels(KeptValues):
    """Q-bit levels by RMS units with a per-payload table of the levels' mean units (``s{Q}``)."""

    bits: int

    @property
    def suffix(self) -> str:
        return f"s{self.bits}"

    def bits_per_value(self) -> int:
        return self.bits

    def head_size(self, chunks: int) -> int:
        return 4 * (1 << self.bits) + 4 * chunks

    def _prepare(self, rows: np.ndarray, tail: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(scales [chunks], scale per entry, units, levels) of the kept values, in entry order."""
        scales, per_entry, units, levels = [], [], [], []
        for part in _parts(rows, tail):
            scale = rms_scales(part)
            unit, level = _units_and_levels(part, scale, self.bits)
            scales.append(scale)
            per_entry.append(np.repeat(scale, part.shape[1]))
            units.append(unit.reshape(-1))
            levels.append(level.reshape(-1))
        return (_joined(scales, np.float32), _joined(per_entry, np.float32), _joined(units, np.float32),
                _joined(levels, np.uint8))

    def encode(self, rows: np.ndarray, tail: np.ndarray, what: str) -> Encoded:
        scales, per_entry, units, levels = self._prepare(rows, tail)
        table = level_table(units, levels, self.bits)
        with np.errstate(over="ignore"):
            overflow = ~np.isfinite(scales * np.float32(np.abs(table).max()))
        if overflow.any():
            where = int(overflow.argmax())
            raise InputError(f"{what}: chunk {where} holds values too large for its scale times the level table")
        decoded = table[levels] * per_entry
        head = [table.astype("<f4", copy=False), scales.astype("<f4", copy=False)]
        return Encoded(head, [pack_bits(levels, self.bits)], decoded)

    def parse(self, body: memoryview, head: int, tail: int, chunks: int, kept: int, name: str) -> tuple:
        what = f"codec payload ({name})"
        size = 1 << self.bits
        table = np.frombuffer(body, dtype="<f4", count=size, offset=head).astype(np.float32)
        negative = np.arange(size) % 2 == 1
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(table) | (negative & (table > 0)) | (~negative & (table < 0))
        if bad.any():
            where = int(bad.argmax())
            sign = "negative" if negative[where] else "positive"
            raise PayloadError(f"{what}: level table entry {where} is {table[where]}, not finite and {sign} or 0")
        scales = read_scales(body, chunks, name, top_level=float(np.abs(table).max()), offset=head + 4 * size)
        levels = checked_stream(body, tail, kept * self.bits, f"{what} level stream")
        return table, scales, levels

    def window(self, parts: tuple, first: int, count: int, per: int) -> np.ndarray:
        table, scales, levels = parts
        return table[unpack_bits(levels, self.bits, first, count)] * _per_entry(scales, first, count, per)

    def bound(self, rows: np.ndarray, tail: np.ndarray) -> np.ndarray:
        """A level's members and its table entry share its class's range of u: 2/M wide below
        the top class; the top class reaches 2 sqrt(n) (|u| <= sqrt(n) for an RMS scale, twice
        that when a subnormal scale rounds down), n the most entries of a chunk."""
        scales, per_entry, units, levels = self._prepare(rows, tail)
        classes = 1 << (self.bits - 1)
        most = max(rows.shape[1] if len(rows) else 0, len(tail), 1)
        top = 2 * math.sqrt(most) * (1 + core.SLACK)
        span = np.where(levels // 2 == classes - 1, top - 2 * (classes - 1) / classes, 2 / classes)
        values = _flat(rows, tail).astype(np.float64)
        scale = per_entry.astype(np.float64)
        return scale * (span + core.SLACK * (top + 1)) + core.SLACK * np.abs(values) + core.TINY


@dataclass(frozen=True)
class Float32Values(KeptValues):
    """Every kept value as float32: exact for what is kept (``f32``)."""

    @property
    def suffix(self) -> str:
        return "f32"

    def bits_per_value(self) -> int:
        return 32

    def head_size(self, chunks: int) -> int:
        return 0

    def encode(self, rows: np.ndarray, tail: np.ndarray, what: str) -> Encoded:
        values = _flat(rows, tail).astype(np.float32)
        return Encoded([], [values.astype("<f4", copy=False)], values)

    def parse(self, body: memoryview, head: int, tail: int, chunks: int, kept: int, name: str) -> tuple:
        what = f"codec payload ({name})"
        values = np.frombuffer(body, dtype="<f4", count=kept, offset=tail)
        for start in range(0, kept, core.SLICE):
            bad = ~np.isfinite(values[start : start + core.SLICE])
            if bad.any():
                raise PayloadError(f"{what}: kept value {start + int(bad.argmax())} is not finite")
        return (values,)

    def window(self, parts: tuple, first: int, count: int, per: int) -> np.ndarray:
        return parts[0][first : first + count].astype(np.float32)

    def bound(self, rows: np.ndarray, tail: np.ndarray) -> np.ndarray:
        return np.zeros(rows.size + len(tail))
