"""The sparse codec families: Elias-Fano top-k (``topk-...-s{Q}``, ``-f32``) and block max
(``bmax-...``), their bit streams, and the fast selection behind every top-k codec.

A slow, independent encoder written from the format's description (pure Python: sorting for
the selection, Python ints for the bit streams, Python floats for the float64 sums, numpy
float32 scalars where the format says float32) must give the codecs' bytes exactly; known
answers pin a few by hand; hypothesis checks the round trip, the exact size and the error
bound; every malformed payload raises ``PayloadError`` before anything vector-sized is built.

    pytest -q tests/test_protocol_sparse_codecs.py
"""

from __future__ import annotations

import math
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec_core
from protocol.bitstreams import pack_bits, unpack_bits
from protocol.codecs import (
    HEADER_SIZE,
    BlockMaxCodec,
    EliasFanoTopKCodec,
    PayloadError,
    accumulate,
    aggregate,
    compress_with_feedback,
    decode,
    encode,
    finish,
    parse_codec,
    parse_payload,
    payload_size,
)
from protocol.errors import ConfigError, InputError
from protocol.kept_values import level_table, rms_scales
from protocol.sparse_codecs import top_k_select

NEW_FAMILIES = ["topk-c64-k4-s2", "topk-c64-k4-f32", "bmax-c64-b8-s2", "bmax-c64-b8-f32"]


def vector(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# An independent encoder, from the format's description
# ---------------------------------------------------------------------------------------


def bit_stream(values: list[int], width: int) -> bytes:
    """Value i occupies bits i*width .. i*width+width-1 of a little-endian stream."""
    stream = 0
    for i, value in enumerate(values):
        stream |= value << (i * width)
    return stream.to_bytes((len(values) * width + 7) // 8, "little")


def bits_to_bytes(ones: list[int], total: int) -> bytes:
    stream = 0
    for bit in ones:
        stream |= 1 << bit
    return stream.to_bytes((total + 7) // 8, "little")


def floats(values: list[float]) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def header(name: str, numel: int) -> bytes:
    return struct.pack("<4sBBHQ", b"BRNC", 1, 0, len(name), numel) + name.encode("ascii")


def reference_chunks(codec, x: list[float]) -> list[tuple[int, list[int], list[float]]]:
    """(chunk length, kept indices, kept values) per chunk, kept in ascending position order."""
    chunks = []
    for start in range(0, len(x), codec.chunk):
        part = x[start : start + codec.chunk]
        if isinstance(codec, EliasFanoTopKCodec):
            best = sorted(range(len(part)), key=lambda i: (-abs(part[i]), i))[: min(codec.k, len(part))]
            index = sorted(best)
            values = [part[i] for i in index]
        else:  # block max: the index within each block, the lowest of equal |x|
            index, values = [], []
            for block in range(0, len(part), codec.block):
                cells = part[block : block + codec.block]
                best = min(range(len(cells)), key=lambda i: (-abs(cells[i]), i))
                index.append(best)
                values.append(cells[best])
        chunks.append((len(part), index, values))
    return chunks


def reference_table_levels(kept: list[list[float]], bits: int) -> tuple[list[float], list[float], list[int]]:
    """(table, scales, levels) of the ``s{Q}`` coding, every operation as the format states."""
    classes = 1 << (bits - 1)
    scales, units, levels = [], [], []
    for values in kept:
        total = 0.0
        for v in values:
            total += float(v) * float(v)
        scale = np.float32(math.sqrt(total / len(values)))
        scales.append(float(scale))
        for v in values:
            u = np.float32(v) / scale if scale > 0 else np.float32(0.0)
            level = 2 * min(classes - 1, math.floor(abs(float(u)) * classes / 2)) + (1 if v < 0 else 0)
            units.append(float(u))
            levels.append(level)
    table = []
    for level in range(1 << bits):
        members = [u for u, q in zip(units, levels, strict=True) if q == level]
        if members:
            total = 0.0
            for u in members:
                total += u
            table.append(float(np.float32(total / len(members))))
        else:
            centre = (level // 2 + 0.5) * 2 / classes
            table.append(-centre if level % 2 else centre)
    return table, scales, levels


def reference_payload(name: str, x: list[float]) -> bytes:
    codec = parse_codec(name)
    chunks = reference_chunks(codec, x)
    kept = [values for _, _, values in chunks]
    indices = [i for _, index, _ in chunks for i in index]
    if isinstance(codec, EliasFanoTopKCodec):
        low = codec.low_bits
        ones, offset = [], 0
        for length, index, _ in chunks:
            ones.extend(offset + (i >> low) + n for n, i in enumerate(index))
            offset += len(index) + -(-length // (1 << low))
        index_part = bit_stream([i & ((1 << low) - 1) for i in indices], low) + bits_to_bytes(ones, offset)
    else:
        index_part = bit_stream(indices, codec.block.bit_length() - 1)
    flat = [v for values in kept for v in values]
    if codec.bits is None:
        return header(name, len(x)) + index_part + floats(flat)
    table, scales, levels = reference_table_levels(kept, codec.bits)
    return header(name, len(x)) + floats(table) + floats(scales) + index_part + bit_stream(levels, codec.bits)


def reference_decode(name: str, x: list[float]) -> list[float]:
    codec = parse_codec(name)
    chunks = reference_chunks(codec, x)
    kept = [values for _, _, values in chunks]
    if codec.bits is not None:
        table, scales, levels = reference_table_levels(kept, codec.bits)
        per_entry = [scale for scale, values in zip(scales, kept, strict=True) for _ in values]
        decoded = [float(np.float32(table[q]) * np.float32(s)) for q, s in zip(levels, per_entry, strict=True)]
    else:
        decoded = [v for values in kept for v in values]
    out = [0.0] * len(x)
    entry = 0
    for number, (_, index, _) in enumerate(chunks):
        for n, i in enumerate(index):
            block = n * codec.block if isinstance(codec, BlockMaxCodec) else 0
            out[number * codec.chunk + block + i] = decoded[entry]
            entry += 1
    return out


# ---------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------


def topk_input() -> list[float]:
    chunk = [0.01 * (i % 5) for i in range(64)]
    chunk[3], chunk[10], chunk[40], chunk[50], chunk[63] = 2.0, -1.0, 0.5, 0.5, -2.0
    return chunk + [0.0, 3.0, -3.0, 1.0, 0.0, 0.5]  # a last chunk of 6 keeps 4 too


TOPK_F32_BODY = (
    "a3f82153"  # low stream, 4 bits each (l = log2(64 / 4)): 3 10 8 15 | 1 2 3 5
    "530f"  # high vectors: chunk 0 (8 bits) 0b01010011, chunk 1 (5 bits) 0b01111
    "00000040000080bf0000003f000000c0"  # 2.0 -1.0 0.5 -2.0
    "00004040000040c00000803f0000003f"  # 3.0 -3.0 1.0 0.5
)
TOPK_S2_BODY = "7ccfac3e355828bfaab1ab3faab1abbffea5c23f41660c40a3f82153530fc60e"


def test_elias_fano_topk_known_answer():
    payload = encode("topk-c64-k4-f32", vector(topk_input()))
    assert payload == header("topk-c64-k4-f32", 70) + bytes.fromhex(TOPK_F32_BODY)
    # Chunk 0 keeps 3, 10, 40 (0.5 at 40 and 50 tie: the lower index) and 63; l = 4, so the
    # high parts are 0, 0, 2, 3 and set bits 0+0, 0+1, 2+2, 3+3 of 4 + 64/16 = 8 bits.
    assert payload[HEADER_SIZE + 15 + 4] == 0b01010011
    # The last chunk (6 elements) keeps 1, 2, 3, 5: high parts 0, bits 0..3 of 4 + 1 = 5 bits.
    assert payload[HEADER_SIZE + 15 + 5] == 0b00001111
    assert decode(payload, "topk-c64-k4-f32", 70)[[3, 10, 40, 63, 65, 66, 67, 69]].tolist() == [
        2.0, -1.0, 0.5, -2.0, 3.0, -3.0, 1.0, 0.5
    ]  # fmt: skip


def test_elias_fano_topk_table_levels_known_answer():
    name = "topk-c64-k4-s2"
    payload = encode(name, vector(topk_input()))
    assert payload == header(name, 70) + bytes.fromhex(TOPK_S2_BODY)
    table = struct.unpack_from("<4f", payload, HEADER_SIZE + len(name))
    scales = struct.unpack_from("<2f", payload, HEADER_SIZE + len(name) + 16)
    # RMS scales: sqrt((4 + 1 + 0.25 + 4) / 4) and sqrt((9 + 9 + 1 + 0.25) / 4).
    assert scales == (float(np.float32(math.sqrt(9.25 / 4))), float(np.float32(math.sqrt(19.25 / 4))))
    # Levels (2 bits): 2.0 -> u 1.315 -> class 1, positive -> 2; -1.0 -> u -0.658 -> 1; 0.5 -> 0;
    # -2.0 -> 3 | 3.0 -> 2; -3.0 -> 3; 1.0 -> 0; 0.5 -> 0, packed 2 1 0 3 | 2 3 0 0.
    assert payload[-2:] == bit_stream([2, 1, 0, 3, 2, 3, 0, 0], 2)
    u = [float(np.float32(v) / np.float32(scales[c])) for v, c in ((0.5, 0), (1.0, 1), (0.5, 1))]
    assert table[0] == float(np.float32((u[0] + u[1] + u[2]) / 3))  # level 0: three members
    assert table[1] == float(np.float32(-1.0) / np.float32(scales[0]))  # level 1: -1.0 alone
    assert payload == reference_payload(name, topk_input())


BMAX_F32_BODY = (
    "d320e801"  # 9 block indices, 3 bits each: 3 2 3 0 2 0 2 7 | 1
    "00000040000080bf0ad7233d0ad7233d0ad7233d0000003f0000003f000000c000004040"
)


def test_block_max_known_answer():
    payload = encode("bmax-c64-b8-f32", vector(topk_input()))
    assert payload == header("bmax-c64-b8-f32", 70) + bytes.fromhex(BMAX_F32_BODY)
    # Block 0 (elements 0..7) keeps 2.0 at 3; block 3 (24..31) holds 0.04 at 24 and at 29: the
    # lower index, 0; block 6 keeps 0.5 at 50 (index 2); the last block (6 elements) keeps 3.0
    # at 1 (tied with -3.0 at 2: the lower index).
    assert payload[HEADER_SIZE + 15 : HEADER_SIZE + 19] == bit_stream([3, 2, 3, 0, 2, 0, 2, 7, 1], 3)
    for name in ("bmax-c64-b8-s2", "bmax-c64-b8-s1", "bmax-c64-b2-s8"):
        assert encode(name, vector(topk_input())) == reference_payload(name, topk_input()), name


def test_a_zero_block_keeps_its_first_element():
    codec = parse_codec("bmax-c64-b4-f32")
    x = vector([0.0, -0.0, 0.0, 0.0] + [0.0, 0.0, -1.0, 1.0] + [0.0] * 56)
    parsed = parse_payload(encode(codec, x), codec, 64)
    positions, values = next(parsed.entries())
    assert positions[:2].tolist() == [0, 6] and values[:2].tolist() == [0.0, -1.0]
    assert len(positions) == 16  # every block lists one entry, zero or not


def test_table_levels_for_one_bit_are_the_signs_means():
    x = vector([3.0, -1.0, 0.0, 0.0] * 16)  # one chunk of 64; K = 32 keeps the 3s and -1s
    payload = encode("topk-c64-k32-s1", x)
    table = struct.unpack_from("<2f", payload, HEADER_SIZE + len("topk-c64-k32-s1"))
    scale = np.float32(math.sqrt((9 + 1) / 2))
    assert table == (float(np.float32(3.0) / scale), float(np.float32(-1.0) / scale))
    assert decode(payload, "topk-c64-k32-s1", 64)[:4].tolist() == [
        float(np.float32(table[0]) * scale), float(np.float32(table[1]) * scale), 0.0, 0.0
    ]  # fmt: skip


def test_empty_levels_get_their_class_centres():
    table = level_table(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8), 3)
    assert table.tolist() == [0.25, -0.25, 0.75, -0.75, 1.25, -1.25, 1.75, -1.75]


def test_empty_vectors_carry_only_the_table():
    for name in NEW_FAMILIES:
        payload = encode(name, torch.zeros(0))
        assert len(payload) == payload_size(name, 0) and decode(payload, name, 0).shape == (0,)
        assert payload == reference_payload(name, [])


@pytest.mark.parametrize(
    ("name", "bits"),
    [("topk-c4096-k64-s2", 0.1640625), ("topk-c4096-k64-f32", 0.625), ("bmax-c4096-b64-s2", 0.1328125),
     ("bmax-c4096-b64-f32", 0.59375), ("topk-c4096-k64-q2", 0.2265625)],
)  # fmt: skip
def test_bits_per_element_at_chunk_4096(name, bits):
    # topk s2: (32 scale + 64 x (6 low + 2 high + 2 level)) / 4096; bmax s2: 32/4096 + (6 + 2)/64.
    assert parse_codec(name).nominal_bits_per_element == bits


@pytest.mark.parametrize("name", [*NEW_FAMILIES, "topk-c4096-k64-s2", "topk-c65536-k3-s5", "topk-c64-k64-f32",
                                  "topk-c128-k100-s8", "bmax-c65536-b2-s1", "bmax-c64-b64-f32"])  # fmt: skip
def test_nominal_bits_per_element_is_the_body_rate(name):
    codec = parse_codec(name)
    numel = 8 * 65536
    table = 0 if codec.bits is None else 32 << codec.bits
    assert codec.body_size(numel) * 8 == codec.nominal_bits_per_element * numel + table


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@st.composite
def sparse_codecs(draw) -> str:
    chunk = draw(st.sampled_from([64, 128, 256]))
    values = draw(st.sampled_from(["f32", *(f"s{q}" for q in range(1, 9))]))
    if draw(st.booleans()):
        return f"topk-c{chunk}-k{draw(st.integers(1, chunk))}-{values}"
    return f"bmax-c{chunk}-b{draw(st.sampled_from([2, 4, 8, 64, chunk]))}-{values}"


@st.composite
def inputs(draw) -> torch.Tensor:
    """Short lists of any finite floats, or longer random vectors with zeros, ties and scales
    from subnormal to huge; sizes rarely a multiple of a chunk."""
    if draw(st.booleans()):
        finite = st.floats(width=32, allow_nan=False, allow_infinity=False)
        return vector(draw(st.lists(finite, min_size=0, max_size=40)))
    size = draw(st.integers(1, 700))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    x = torch.randn(size, generator=generator)
    if draw(st.booleans()):
        x = torch.round(x * 2) / 2
    x[torch.rand(size, generator=generator) < draw(st.sampled_from([0.0, 0.5, 0.99]))] = 0.0
    return x * draw(st.sampled_from([1e-42, 1e-30, 1e-3, 1.0, 1e3, 1e30]))


def encoded_or_too_large(name: str, x: torch.Tensor) -> bytes | None:
    """The payload, or None when a table-levels codec refused values near the float32 limit."""
    try:
        return encode(name, x)
    except InputError as error:
        assert "too large" in str(error) and float(x.abs().max()) > 2.0**100
        return None


@settings(max_examples=300, deadline=None)
@given(name=sparse_codecs(), x=inputs())
def test_encoding_matches_the_independent_encoder(name, x):
    payload = encoded_or_too_large(name, x)
    if payload is None:
        return
    assert payload == reference_payload(name, x.tolist())
    assert decode(payload, name, x.numel()).tolist() == reference_decode(name, x.tolist())


@settings(max_examples=200, deadline=None)
@given(name=sparse_codecs(), x=inputs())
def test_round_trip_is_within_the_error_bound_and_exactly_sized(name, x):
    payload = encoded_or_too_large(name, x)
    if payload is None:
        return
    codec = parse_codec(name)
    assert len(payload) == payload_size(name, x.numel()) == codec.payload_size(x.numel())
    assert payload == encode(name, x.clone()), "encoding is deterministic"
    decoded = decode(payload, name, x.numel())
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    assert bool(((decoded.double() - x.double()).abs() <= codec.max_abs_error(x)).all())


@pytest.mark.parametrize("name", [*NEW_FAMILIES, "topk-c64-k5-s3", "topk-c128-k128-f32", "bmax-c128-b2-s8"])
@pytest.mark.parametrize("numel", [1, 1023, 1024, 1025, 3000, 5 * 1024])
def test_payload_does_not_depend_on_the_slice_sizes(monkeypatch, name, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload = encode(name, x)
    decoded = decode(payload, name, numel)
    monkeypatch.setattr(codec_core, "SLICE", 1024)
    monkeypatch.setattr(codec_core, "SUM_SLICE", 128)
    assert encode(name, x) == payload
    assert torch.equal(decode(payload, name, numel), decoded)


@settings(max_examples=150, deadline=None)
@given(name=sparse_codecs(), x=inputs())
def test_entries_list_the_kept_positions_in_order(name, x):
    payload = encoded_or_too_large(name, x)
    if payload is None:
        return
    parsed = parse_payload(payload, name, x.numel())
    decoded = parsed.decode()
    pairs = list(parsed.entries())
    positions = np.concatenate([p for p, _ in pairs]) if pairs else np.zeros(0, dtype=np.int64)
    values = np.concatenate([v for _, v in pairs]) if pairs else np.zeros(0, dtype=np.float32)
    assert positions.dtype == np.int64 and values.dtype == np.float32
    assert (np.diff(positions) > 0).all()
    assert len(positions) == parsed.codec._layout(x.numel())[1]
    assert np.array_equal(decoded.numpy()[positions].view(np.int32), values.view(np.int32))
    rest = np.ones(x.numel(), dtype=bool)
    rest[positions] = False
    assert not decoded.numpy()[rest].any()


def old_top_indices(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The selection top-k used before: a unique int64 key per element and ``torch.topk``."""
    if k == rows.shape[1]:
        return torch.arange(k).expand(len(rows), k)
    keys = (rows.view(torch.int32) & 0x7FFFFFFF).to(torch.int64)
    keys <<= 16
    keys |= 0xFFFF - torch.arange(rows.shape[1], dtype=torch.int64)
    top = torch.topk(keys, k, dim=1, sorted=False).values
    return torch.sort(0xFFFF - (top & 0xFFFF), dim=1).values


@settings(max_examples=200, deadline=None)
@given(x=inputs(), length=st.sampled_from([1, 3, 64, 100]), k=st.integers(1, 100))
def test_selection_matches_the_key_based_top_k(x, length, k):
    rows = x[: x.numel() // length * length].view(-1, length)
    k = min(k, length)
    scratch = np.empty(rows.numel(), dtype=np.float32), np.empty(rows.numel(), dtype=np.float32)
    index, values = top_k_select(rows.numpy(), k, *scratch)
    assert torch.equal(torch.from_numpy(index), old_top_indices(rows, k))
    assert np.array_equal(values, np.take_along_axis(rows.numpy(), index, axis=1))


def test_table_sums_add_in_entry_order():
    # Magnitudes far apart: a pairwise or reordered sum would give other bits.
    units = np.array([1e8, 1.0, -1e8, 3e-8, 1.0, 7.0] * 50, dtype=np.float32)
    levels = np.array([2, 2, 2, 2, 0, 2] * 50, dtype=np.uint8)
    total = 0.0
    for u, q in zip(units.tolist(), levels.tolist(), strict=True):
        total += u if q == 2 else 0.0
    assert level_table(units, levels, 2)[2] == np.float32(total / 250)
    rows = np.array([[1e20, 1.0, 3.0, 1e-20] * 16], dtype=np.float32)
    squares = 0.0
    for v in rows[0].tolist():
        squares += v * v
    assert rms_scales(rows)[0] == np.float32(math.sqrt(squares / 64))


# ---------------------------------------------------------------------------------------
# Names and parameters
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk-c64-k1-s1", "topk-c65536-k65536-s8", "topk-c4096-k64-f32",
                                  "bmax-c64-b2-s1", "bmax-c65536-b65536-f32", "bmax-c4096-b64-s2"])  # fmt: skip
def test_new_names_round_trip(name):
    codec = parse_codec(name)
    assert codec.name == str(codec) == name and parse_codec(name) == codec


@pytest.mark.parametrize(
    "name",
    ["topk-c64-k4-s0", "topk-c64-k4-s9", "topk-c64-k4-s02", "topk-c64-k4-f16", "topk-c64-k4-f32 ", "topk-c64-k4-s",
     "topk-c64-k4-F32", "topk-c64-k65-s2", "bmax-c64-b8-q2", "bmax-c64-b1-s2", "bmax-c64-b128-s2", "bmax-c64-b6-s2",
     "bmax-c32-b8-s2", "bmax-c64-b08-s2", "bmax-c64-b8", "bmax-b8-c64-s2", "bmax-c64-b8-s2-f32", "bmax-c64-b0-f32"],
)  # fmt: skip
def test_bad_new_names_are_refused(name):
    with pytest.raises(ConfigError) as error:
        parse_codec(name)
    assert repr(name) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "make",
    [lambda: BlockMaxCodec(chunk=64, block=128, bits=2), lambda: BlockMaxCodec(chunk=64, block=3, bits=2),
     lambda: BlockMaxCodec(chunk=64, block=8, bits=0), lambda: EliasFanoTopKCodec(chunk=64, k=0, bits=None),
     lambda: EliasFanoTopKCodec(chunk=64, k=4, bits=True), lambda: EliasFanoTopKCodec(chunk=100, k=4, bits=2)],
)  # fmt: skip
def test_new_codecs_check_their_parameters(make):
    with pytest.raises(ConfigError):
        make()


# ---------------------------------------------------------------------------------------
# Hostile payloads
# ---------------------------------------------------------------------------------------


def topk_body(name: str, numel: int, chunks: list[tuple[int, list[int]]], *, ones: list[int] | None = None,
              table: list[float] | None = None, scales: list[float] | None = None,
              values: list[float] | None = None) -> bytes:
    """An Elias-Fano top-k payload written by hand: (chunk length, indices) per chunk; ``ones``
    replaces the high-vector bits that the indices give."""
    codec = parse_codec(name)
    low = codec.low_bits
    indices = [i for _, index in chunks for i in index]
    bits, offset = [], 0
    for length, index in chunks:
        bits.extend(offset + (i >> low) + n for n, i in enumerate(index))
        offset += len(index) + -(-length // (1 << low))
    index_part = bit_stream([i & ((1 << low) - 1) for i in indices], low) + bits_to_bytes(ones or bits, offset)
    if codec.bits is None:
        return header(name, numel) + index_part + floats(values or [1.0] * len(indices))
    table = table or [0.5, -0.5, 1.5, -1.5][: 1 << codec.bits]
    scales = scales or [1.0] * len(chunks)
    return header(name, numel) + floats(table) + floats(scales) + index_part + bit_stream([0] * len(indices), 2)


GOOD_CHUNKS = [(64, [3, 10, 40, 63]), (6, [1, 2, 3, 5])]


@pytest.mark.parametrize("name", ["topk-c64-k4-s2", "topk-c64-k4-f32"])
def test_hand_written_topk_payloads_decode(name):
    decoded = decode(topk_body(name, 70, GOOD_CHUNKS), name, 70)
    assert decoded.nonzero().view(-1).tolist() == [3, 10, 40, 63, 65, 66, 67, 69]


@pytest.mark.parametrize(
    ("chunks", "ones", "message"),
    [
        (GOOD_CHUNKS, [0, 1, 4, 6, 7, 8, 9, 10, 11], "chunk 0 holds 5 ones, not 4"),
        (GOOD_CHUNKS, [0, 1, 4, 8, 9, 10, 11], "chunk 0 holds 3 ones, not 4"),
        (GOOD_CHUNKS, [0, 1, 4, 6, 8, 9, 10], "chunk 1 holds 3 ones, not 4"),
        ([(64, [10, 3, 40, 63]), (6, [1, 2, 3, 5])], None, "chunk 0 indices do not strictly increase"),
        ([(64, [3, 3, 40, 63]), (6, [1, 2, 3, 5])], None, "chunk 0 indices do not strictly increase"),
        ([(64, [3, 10, 40, 63]), (6, [1, 3, 2, 5])], None, "chunk 1 indices do not strictly increase"),
        ([(64, [3, 10, 40, 64]), (6, [1, 2, 3, 5])], None, "chunk 0 index 64 is not below its length 64"),
        ([(64, [3, 10, 40, 63]), (6, [1, 2, 3, 6])], None, "chunk 1 index 6 is not below its length 6"),
        ([(64, [3, 10, 40, 63]), (6, [1, 2, 3, 15])], None, "chunk 1 index 15 is not below its length 6"),
    ],
)
@pytest.mark.parametrize("name", ["topk-c64-k4-s2", "topk-c64-k4-f32"])
def test_elias_fano_rejections(name, chunks, ones, message):
    with pytest.raises(PayloadError, match=message):
        decode(topk_body(name, 70, chunks, ones=ones), name, 70)


@pytest.mark.parametrize(
    ("table", "message"),
    [([math.nan, -0.5, 1.5, -1.5], "entry 0"), ([0.5, -math.inf, 1.5, -1.5], "entry 1"),
     ([0.5, 0.5, 1.5, -1.5], "entry 1"), ([0.5, -0.5, -1.5, -1.5], "entry 2"), ([-1e-45, -0.5, 1.5, -1.5], "entry 0")],
)  # fmt: skip
def test_level_table_entries_must_be_finite_and_of_their_levels_sign(table, message):
    with pytest.raises(PayloadError, match=f"level table {message}"):
        decode(topk_body("topk-c64-k4-s2", 70, GOOD_CHUNKS, table=table), "topk-c64-k4-s2", 70)


def test_zero_table_entries_of_either_sign_are_allowed():
    payload = topk_body("topk-c64-k4-s2", 70, GOOD_CHUNKS, table=[0.0, -0.0, -0.0, 0.0])
    assert not decode(payload, "topk-c64-k4-s2", 70).any()


@pytest.mark.parametrize("scale", [math.nan, math.inf, -1.0, -0.0, 3e38])
def test_scales_must_be_finite_non_negative_and_keep_decoded_values_finite(scale):
    # 3e38 x the largest table entry (1.5) overflows float32.
    payload = topk_body("topk-c64-k4-s2", 70, GOOD_CHUNKS, scales=[1.0, scale])
    with pytest.raises(PayloadError, match="scale 1"):
        decode(payload, "topk-c64-k4-s2", 70)
    assert decode(topk_body("topk-c64-k4-s2", 70, GOOD_CHUNKS, scales=[1.0, 2e38]), "topk-c64-k4-s2", 70).isfinite().all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_float32_values_must_be_finite(bad):
    payload = topk_body("topk-c64-k4-f32", 70, GOOD_CHUNKS, values=[1.0] * 6 + [bad, 1.0])
    with pytest.raises(PayloadError, match="kept value 6 is not finite"):
        decode(payload, "topk-c64-k4-f32", 70)
    bmax = bytearray(encode("bmax-c64-b8-f32", vector(topk_input())))
    bmax[-4:] = struct.pack("<f", bad)
    with pytest.raises(PayloadError, match="kept value 8 is not finite"):
        decode(bytes(bmax), "bmax-c64-b8-f32", 70)


def test_the_last_block_index_must_be_inside_it():
    good = encode("bmax-c64-b8-f32", vector(topk_input()))
    at = HEADER_SIZE + len("bmax-c64-b8-f32")
    for index, ok in ((5, True), (6, False), (7, False)):  # the last block holds 6 elements
        payload = good[:at] + bit_stream([3, 2, 3, 3, 0, 0, 0, 7, index], 3) + good[at + 4 :]
        if ok:
            assert decode(payload, "bmax-c64-b8-f32", 70)[64 + index] == 3.0
        else:
            with pytest.raises(PayloadError, match="last block is not below its length 6"):
                decode(payload, "bmax-c64-b8-f32", 70)


@pytest.mark.parametrize(
    ("name", "offset", "bit", "stream"),
    [("topk-c64-k3-f32", 1, 0x80, "low-bit stream"),  # 3 kept x 4 low bits: 12 bits in 2 bytes
     ("topk-c64-k3-f32", 2, 0x80, "high-bit stream"),  # 3 + 64/16 = 7 high bits
     ("topk-c64-k3-s2", 23, 0x40, "level stream"),  # after 16 + 4 + 2 + 1 bytes: 3 x 2 level bits
     ("bmax-c64-b16-s2", 21, 0x80, "index stream")],  # after 16 + 4 bytes: 3 blocks x 4 index bits
)  # fmt: skip
def test_padding_bits_must_be_zero(name, offset, bit, stream):
    numel = 48 if name.startswith("bmax") else 64
    payload = bytearray(encode(name, torch.randn(numel, generator=torch.Generator().manual_seed(1))))
    payload[HEADER_SIZE + len(name) + offset] |= bit
    with pytest.raises(PayloadError, match=f"{stream}: padding bits"):
        decode(bytes(payload), name, numel)


@pytest.mark.parametrize("name", NEW_FAMILIES)
def test_structurally_malformed_payloads_raise_payload_error(name):
    good = encode(name, torch.randn(200, generator=torch.Generator().manual_seed(7)))
    other = "bmax-c64-b8-f32" if name != "bmax-c64-b8-f32" else "bmax-c64-b8-s2"
    for what, payload in {
        "truncated": good[:-1], "extended": good + b"\x00", "not bytes": bytearray(good), "empty": b"",
        "magic": b"BRNX" + good[4:], "version": good[:4] + b"\x02" + good[5:], "reserved": good[:5] + b"\x01" + good[6:],
        "other codec": encode(other, torch.zeros(200)), "other numel": encode(name, torch.zeros(199)),
    }.items():  # fmt: skip
        with pytest.raises(PayloadError):
            decode(payload, name, 200)
        assert what


def hostile(name: str, numel: int) -> bytes:
    """A payload of ``name`` malformed in its very last chunk (or, for f32, its last value)."""
    payload = bytearray(encode(name, torch.randn(numel, generator=torch.Generator().manual_seed(5))))
    if name.endswith("f32"):
        payload[-4:] = struct.pack("<f", math.nan)
    elif name.startswith("topk"):  # the last chunk's high vector: one more one
        codec = parse_codec(name)
        full, rest = divmod(numel, codec.chunk)
        chunks = (full + (rest > 0)) * 4
        high_at = HEADER_SIZE + len(name) + 16 + chunks + len(pack_bits(np.zeros(codec._layout(numel)[1]), codec.low_bits))
        high_bits = full * (codec.k + codec.chunk // (1 << codec.low_bits))
        last = high_bits + min(codec.k, rest) + -(-rest // (1 << codec.low_bits)) - 1
        payload[high_at + last // 8] ^= 1 << (last % 8)
    else:  # a negative table entry on a positive level
        payload[HEADER_SIZE + len(name) : HEADER_SIZE + len(name) + 4] = struct.pack("<f", -1.0)
    return bytes(payload)


@pytest.mark.parametrize("name", ["topk-c4096-k64-s2", "topk-c4096-k64-f32", "bmax-c4096-b64-s2", "bmax-c4096-b64-f32"])
def test_hostile_payloads_are_refused_before_anything_vector_sized(name):
    numel = (1 << 20) + 100  # the fault sits in the last, shorter chunk
    bad = hostile(name, numel)
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError):
            parse_payload(bad, name, numel)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < numel  # numpy's allocations: far below the 4 x numel bytes of the vector
    out = torch.zeros(numel, dtype=torch.float64)
    with pytest.raises(PayloadError):
        accumulate(out, bad, name, numel, 1.0)
    assert not out.any()


# ---------------------------------------------------------------------------------------
# Sums and error feedback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*NEW_FAMILIES, "topk-c128-k128-s8"])
@pytest.mark.parametrize("numel", [1, 255, 1025, 3000])
def test_accumulate_then_finish_is_aggregate(name, numel):
    generator = torch.Generator().manual_seed(numel)
    payloads = [encode(name, torch.randn(numel, generator=generator) * 10.0**i) for i in range(-2, 2)]
    weights = [1.0, 0.1, 7.0, 3.5]
    expected = aggregate([decode(p, name, numel) for p in payloads], weights)
    out = torch.zeros(numel, dtype=torch.float64)
    for payload, weight in zip(payloads, weights, strict=True):
        accumulate(out, payload, name, numel, weight)
    assert torch.equal(finish(out, sum(weights)).view(torch.int32), expected.view(torch.int32))


def feedback_reference(name: str, update: torch.Tensor, residual: torch.Tensor, decay: float):
    """What error feedback must give: corrected = float32(float32(decay) * r) + u, its payload,
    and corrected - decode(payload), computed densely."""
    corrected = residual * np.float32(decay) + update if decay != 1.0 else update + residual
    payload = encode(name, corrected)
    return payload, corrected - decode(payload, name, corrected.numel())


@pytest.mark.parametrize("name", ["fp16", "int8-b16", "topk-c64-k4-q2", *NEW_FAMILIES])
@pytest.mark.parametrize("decay", [1.0, 0.9, 0.5, 0.0, 1])
def test_feedback_encodes_the_decayed_sum_and_keeps_what_it_lost(name, decay):
    generator = torch.Generator().manual_seed(3)
    update, residual = torch.randn(1000, generator=generator), torch.randn(1000, generator=generator) * 0.3
    expected_payload, expected_residual = feedback_reference(name, update, residual.clone(), decay)
    payload, new_residual = compress_with_feedback(name, update, residual, decay=decay)
    assert payload == expected_payload
    assert torch.equal(new_residual.view(torch.int32), expected_residual.view(torch.int32))
    assert new_residual.data_ptr() == residual.data_ptr(), "the residual is reused in place"


def test_feedback_with_decay_one_is_the_plain_sum_bit_for_bit():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(8))
    r = torch.randn(5000, generator=torch.Generator().manual_seed(9)) * 1e-3
    for name in ("bmax-c64-b8-s2", "topk-c4096-k64-s2", "topk-c64-k4-q2"):
        payload, residual = compress_with_feedback(name, x, r.clone())
        assert payload == encode(name, x + r)
        assert torch.equal(residual.view(torch.int32), ((x + r) - decode(payload, name, 5000)).view(torch.int32))


def test_feedback_of_a_sparse_codec_leaves_unkept_elements_as_they_were_corrected():
    x, r = torch.randn(640), torch.randn(640)
    corrected = x + r
    payload, residual = compress_with_feedback("bmax-c64-b8-s2", x, r)
    positions = np.concatenate([p for p, _ in parse_payload(payload, "bmax-c64-b8-s2", 640).entries()])
    others = np.setdiff1d(np.arange(640), positions)
    assert torch.equal(residual[others], corrected[others])


def test_feedback_when_the_update_is_the_residual():
    x = torch.randn(300, generator=torch.Generator().manual_seed(4))
    expected_payload, expected_residual = feedback_reference("bmax-c64-b8-s2", x, x.clone(), 0.5)
    payload, residual = compress_with_feedback("bmax-c64-b8-s2", x, x, decay=0.5)
    assert payload == expected_payload and torch.equal(residual, expected_residual)


@pytest.mark.parametrize("decay", [-0.1, 1.5, math.nan, math.inf, True, "0.5", None])
def test_feedback_refuses_a_bad_decay(decay):
    with pytest.raises(InputError, match="decay"):
        compress_with_feedback("bmax-c64-b8-s2", torch.zeros(10), torch.zeros(10), decay=decay)


@pytest.mark.parametrize("name", ["bmax-c64-b8-s2", "topk-c64-k4-f32", "topk-c64-k4-q2", "int8-b16"])
def test_feedback_refuses_what_is_not_finite(name):
    update = torch.zeros(200)
    update[150] = math.nan
    with pytest.raises(InputError, match="element 150 is nan"):
        compress_with_feedback(name, update, torch.zeros(200))
    with pytest.raises(InputError, match="element 3 is inf"):
        encode(name, vector([1.0, 2.0, 3.0, math.inf]))


def test_refusing_values_too_large_for_the_table():
    # One chunk of equal huge values (u = 1) shares level 2 with one whose lone value has
    # u = 8: the table's mean u exceeds 1, and 3e38 x that overflows float32.
    x = torch.zeros(128)
    x[:64] = 3e38
    x[64] = 1.0
    with pytest.raises(InputError, match="chunk 0 holds values too large"):
        encode("topk-c64-k64-s2", x)
    assert encode("topk-c64-k64-f32", x)


# ---------------------------------------------------------------------------------------
# Bit streams
# ---------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 16), data=st.data())
def test_bit_streams_match_the_independent_packer(width, data):
    values = data.draw(st.lists(st.integers(0, (1 << width) - 1), max_size=60))
    stream = pack_bits(np.array(values, dtype=np.int64), width)
    assert stream.tobytes() == bit_stream(values, width)
    first = data.draw(st.integers(0, len(values)))
    count = data.draw(st.integers(0, len(values) - first))
    assert unpack_bits(stream, width, first, count).tolist() == values[first : first + count]
