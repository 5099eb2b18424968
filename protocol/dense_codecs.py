"""Dense wire codecs: every element travels. fp16 (IEEE half) and int8 with a scale per block.

The formats are specified in ``protocol.codecs`` (its module docstring) and docs/protocol.md 10.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from protocol import codec_core as core
from protocol.codec_core import PayloadError, SlicedCodec, checked_vector, is_power_of_two, padded, read_scales
from protocol.errors import ConfigError, InputError

__all__ = ["Fp16Codec", "Int8Codec"]


@dataclass(frozen=True)
class Fp16Codec(SlicedCodec):
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
        return (checked_vector(x, f"codec {self.name!r}").double().abs() * 2.0**-11).clamp_(min=2.0**-25)

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        half = x.to(torch.float16)
        if torch.isinf(half).any():
            where = int(torch.isinf(half).nonzero()[0])
            raise InputError(f"codec 'fp16': element {where} ({float(x[where])}) is beyond the fp16 range (65504)")
        return [half.numpy().astype("<f2", copy=False)]

    def _parse_body(self, body: memoryview, numel: int) -> tuple:
        raw = np.frombuffer(body, dtype="<i2", count=numel)
        for start in range(0, numel, core.SLICE):
            not_finite = (raw[start : start + core.SLICE] & 0x7C00) == 0x7C00  # all-ones exponent: inf or NaN
            if not_finite.any():
                raise PayloadError(f"codec payload (fp16): element {start + int(not_finite.argmax())} is not finite")
        return (raw,)

    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        (raw,) = parts
        for start in range(0, numel, step):
            yield start, torch.from_numpy(raw[start : start + step].astype(np.int16)).view(torch.float16).float()


@dataclass(frozen=True, kw_only=True)
class Int8Codec(SlicedCodec):
    """Blocks of ``block`` elements: a float32 scale ``max|x| / 127`` and one int8 per element."""

    block: int
    """Elements per block: a power of two, 16..65536."""

    def __post_init__(self) -> None:
        if not isinstance(self.block, int) or not is_power_of_two(self.block, 16, 65536):
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
        x = checked_vector(x, f"codec {self.name!r}")
        amax = padded(x.abs(), self.block).view(-1, self.block).amax(1).double()
        scale = (amax.float() / 127).double()  # the scale as encode computes it
        per_block = 0.5 * scale + core.SLACK * amax + core.TINY
        return per_block.repeat_interleave(self.block)[: x.numel()]

    def _encode_body(self, x: torch.Tensor) -> list[bytes | np.ndarray]:
        scales = np.empty(-(-x.numel() // self.block), dtype="<f4")
        values = np.empty(x.numel(), dtype=np.int8)
        for start in range(0, x.numel(), core.SLICE):
            part = x[start : start + core.SLICE]
            rows = padded(part, self.block).view(-1, self.block)
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
        scales = torch.from_numpy(read_scales(body, blocks, self.name, top_level=127.0))
        values = np.frombuffer(body, dtype=np.int8, count=numel, offset=4 * blocks)
        for start in range(0, numel, core.SLICE):
            part = values[start : start + core.SLICE]
            if (part == -128).any():
                where = start + int((part == -128).argmax())
                raise PayloadError(f"codec payload ({self.name}): value {where} is -128, outside -127..127")
        return scales, values

    def _dense_slices(self, parts: tuple, numel: int, step: int) -> Iterator[tuple[int, torch.Tensor]]:
        scales, values = parts
        for start in range(0, numel, step):
            part = values[start : start + step]
            rows = padded(torch.from_numpy(part.copy()), self.block).view(-1, self.block).float()
            rows *= scales[start // self.block : start // self.block + len(rows), None]
            yield start, rows.view(-1)[: len(part)]

