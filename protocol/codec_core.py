"""What every wire codec shares: the payload error, the codec interface and the vector checks.

``protocol.codecs`` is the public face (formats, parsing, encode/decode, sums); the codecs live
in ``protocol.dense_codecs`` (fp16, int8) and ``protocol.sparse_codecs`` (top-k, block max), on
top of this module and ``protocol.bitstreams``. Slice sizes are read from this module at call
time (``codec_core.SLICE``), so a test can shrink them for every codec at once.
"""

from __future__ import annotations

import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch

from protocol.errors import InputError, MalformedRecord

__all__ = [
    "PAYLOAD_MAGIC",
    "PAYLOAD_VERSION",
    "HEADER",
    "HEADER_SIZE",
    "SLICE",
    "SUM_SLICE",
    "SLACK",
    "TINY",
    "PayloadError",
    "Codec",
    "SlicedCodec",
    "is_power_of_two",
    "check_count",
    "checked_vector",
    "padded",
    "read_scales",
    "correct_in_place",
]

PAYLOAD_MAGIC = b"BRNC"
PAYLOAD_VERSION = 1
HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = HEADER.size
"""Bytes before the codec name: magic, version, reserved, name length, element count."""

SLICE = 1 << 22
"""Elements handled at once when parsing and listing entries: a multiple of every block and
chunk (and of 8 chunks, so every slice's bit streams start on a byte); bounds the temporaries."""
SUM_SLICE = 1 << 18
"""Elements per float64 temporary when adding into a sum or dividing it, and per selection step
of the sparse encoders: a multiple of every block and chunk, small enough to stay in cache."""
SLACK = 2.0**-20
"""Relative float32 rounding allowed on top of a codec's quantization step."""
TINY = 2.0**-126
"""Absolute error allowed for subnormal scales (the smallest normal float32)."""


class PayloadError(MalformedRecord):
    """Codec payload bytes do not decode: wrong framing, size, codec, element count or content."""


def is_power_of_two(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def check_count(numel: object, what: str) -> int:
    if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
        raise InputError(f"{what}: element count {numel!r} is not a non-negative integer")
    return numel


class Codec(ABC):
    """A wire codec: ``name`` says everything that changes its bytes."""

    sparse: ClassVar[bool] = False
    """True when a payload lists only some positions (``ParsedPayload.entries``)."""
    checks_finite: ClassVar[bool] = False
    """True when ``_encode_body`` itself refuses a non-finite input (so ``encode`` need not)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """The codec's one name, as ``parse_codec`` reads it and the payload header carries it."""

    @property
    @abstractmethod
    def nominal_bits_per_element(self) -> float:
        """Body bits per element for a long vector (headers, per-payload tables and partial
        blocks left out)."""

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
        the parts that the methods below read; builds nothing vector-sized."""

    @abstractmethod
    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        """The float32 vector [numel] of a parsed body."""

    @abstractmethod
    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        """``out[i] += float64(x[i]) * weight`` for the elements ``x[i]`` of a parsed body; those
        that decode as +0.0 may be skipped (adding +0.0 changes nothing but a -0.0 to +0.0)."""

    def entry_window(self) -> int:
        """Elements per window of ``_entries``: the i-th pair lists positions i * w .. i * w + w - 1."""
        return SLICE

    @abstractmethod
    def _entries(self, parts: tuple, numel: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(positions int64 ascending, float32 values) of the listed entries: one pair per
        window of ``entry_window()`` elements of the vector, in order (a pair may be empty)."""

    @abstractmethod
    def _encode_feedback(self, update: torch.Tensor, residual: torch.Tensor, decay: float) -> list[bytes | np.ndarray]:
        """The body of ``decay * residual + update``, leaving ``residual`` = that vector minus the
        body's decoding (both checked 1-D float32 CPU vectors of one size, not aliased)."""

    def payload_size(self, numel: int) -> int:
        """Exact payload bytes (header, name and body) for ``numel`` elements."""
        numel = check_count(numel, f"codec {self.name!r}")
        return HEADER_SIZE + len(self.name) + self.body_size(numel)

    def __str__(self) -> str:
        return self.name


class SlicedCodec(Codec):
    """A codec whose body decodes slice by slice into dense float32 values."""

    @abstractmethod
    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start, float32 values of elements start .. start + step - 1), slice after slice, in
        order; ``step`` is a multiple of every block."""

    def _materialize(self, parts: tuple, numel: int) -> torch.Tensor:
        out = torch.empty(numel, dtype=torch.float32)
        for start, values in self._dense_slices(parts, numel, SLICE):
            out[start : start + len(values)] = values
        return out

    def _add_weighted(self, parts: tuple, numel: int, out: torch.Tensor, weight: float) -> None:
        for start, values in self._dense_slices(parts, numel, SUM_SLICE):
            product = values.double()
            product *= weight  # the same float64 product as ``values.double() * weight``
            out[start : start + len(values)] += product

    def _entries(self, parts: tuple, numel: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, values in self._dense_slices(parts, numel, SLICE):
            yield np.arange(start, start + len(values), dtype=np.int64), values.numpy()

    def _encode_feedback(self, update: torch.Tensor, residual: torch.Tensor, decay: float) -> list[bytes | np.ndarray]:
        numel = residual.numel()
        for start in range(0, numel, SUM_SLICE):
            correct_in_place(residual.numpy(), update.numpy(), decay, start, start + SUM_SLICE)
        checked_vector(residual, f"codec {self.name!r} corrected vector")
        parts = self._encode_body(residual)
        parsed = self._parse_body(memoryview(b"".join(parts)), numel)
        for start, values in self._dense_slices(parsed, numel, SLICE):
            residual[start : start + len(values)] -= values
        return parts


def correct_in_place(residual: np.ndarray, update: np.ndarray, decay: float, start: int, stop: int) -> np.ndarray:
    """``residual[start:stop] = float32(float32(decay) * residual) + update`` (the product is left
    out for decay 1.0: ``r * 1 == r``), in float32; returns that slice of ``residual``."""
    part = residual[start:stop]
    if decay != 1.0:
        np.multiply(part, np.float32(decay), out=part)
    np.add(part, update[start:stop], out=part)
    return part


def checked_vector(x: object, what: str, *, finite: bool = True) -> torch.Tensor:
    """``x`` as a contiguous 1-D float32 CPU tensor (finite unless ``finite=False``), or InputError."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32 or x.dim() != 1 or x.device.type != "cpu":
        raise InputError(f"{what}: expected a 1-D float32 CPU tensor, got {x.dtype} {list(x.shape)} on {x.device}")
    x = x.detach().contiguous()
    for start in range(0, x.numel() if finite else 0, SLICE):
        part = x[start : start + SLICE]
        if not torch.isfinite(part.abs().amax()):  # amax propagates NaN: one cheap pass
            where = start + int((~torch.isfinite(part)).nonzero()[0])
            raise InputError(f"{what}: element {where} is {float(x[where])}, not finite")
    return x


def padded(values: torch.Tensor, multiple: int) -> torch.Tensor:
    """``values`` with zeros appended up to a multiple of ``multiple``."""
    extra = -values.numel() % multiple
    return torch.cat([values, values.new_zeros(extra)]) if extra else values


def read_scales(body: memoryview, count: int, name: str, top_level: float = 1.0, offset: int = 0) -> np.ndarray:
    """The ``count`` float32 scales at ``offset`` of a body: finite, non-negative, and such that
    ``top_level * scale`` is finite in float32 (so every decoded value is)."""
    scales = np.frombuffer(body, dtype="<f4", count=count, offset=offset).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        bad = ~np.isfinite(scales * np.float32(top_level)) | np.signbit(scales)
    if bad.any():
        where = int(bad.argmax())
        raise PayloadError(
            f"codec payload ({name}): scale {where} is {scales[where]}, not a finite non-negative number"
        )
    return scales
