"""Wire codecs for outer gradients: fp16, block int8 and chunked top-k.

Known-answer vectors pin each codec's payload bytes (checked in part by hand, and the bit
streams by an independent packer); hypothesis checks that decoding stays within each codec's
error bound, that ``payload_size`` is exact and that encoding is deterministic; every
malformed payload raises ``PayloadError`` before any tensor is built. Summing payloads with
``accumulate`` and ``finish`` (as ``averaging.combine`` does) gives the bits of ``aggregate``
over the decoded vectors, and a payload that is refused leaves the sum untouched.

    pytest -q tests/test_protocol_codecs.py
"""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import codec_core
from protocol.codecs import (
    HEADER_SIZE,
    Codec,
    Fp16Codec,
    Int8Codec,
    PayloadError,
    TopKCodec,
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
from protocol.errors import ConfigError, InputError, MalformedRecord

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_BELOW_MAX = float(np.nextafter(np.float32(FLOAT32_MAX), np.float32(0)))
"""The int8 codec refuses FLOAT32_MAX: its scale times 127 overflows. It takes anything below."""
THIRD = float(np.float32(1 / 3))
"""The float32 level 2q/(L-1) - 1 for q = 2, L = 4: top-k's decoded values are multiples of it."""


def pack_bits(values: list[int], width: int) -> bytes:
    """An independent little-endian bit packer: value i occupies bits i*width .. i*width+width-1."""
    stream = 0
    for i, value in enumerate(values):
        stream |= value << (i * width)
    return stream.to_bytes((len(values) * width + 7) // 8, "little")


def header(name: str, numel: int, *, magic: bytes = b"BRNC", version: int = 1, reserved: int = 0) -> bytes:
    return struct.pack("<4sBBHQ", magic, version, reserved, len(name), numel) + name.encode("ascii")


def topk_payload(name: str, numel: int, scales: list[float], indices: list[int], levels: list[int]) -> bytes:
    codec = parse_codec(name)
    assert isinstance(codec, TopKCodec)
    body = (
        struct.pack(f"<{len(scales)}f", *scales) + pack_bits(indices, codec.index_bits) + pack_bits(levels, codec.bits)
    )
    return header(name, numel) + body


def vector(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------

FP16_INPUT = [0.0, 1.0, -2.5, 0.1, 65504.0, 6e-8]
FP16_HEX = "42524e43010004000600000000000000667031360000003c00c1662eff7b0100"
FP16_DECODED = [0.0, 1.0, -2.5, 0.0999755859375, 65504.0, 2.0**-24]


def test_fp16_known_answer():
    payload = encode("fp16", vector(FP16_INPUT))
    assert payload.hex() == FP16_HEX
    # Header: b"BRNC", version 1, reserved 0, name length 4, numel 6 (u64); then b"fp16".
    assert payload[:HEADER_SIZE] == b"BRNC\x01\x00\x04\x00" + (6).to_bytes(8, "little")
    # 1.0 is 0x3c00 and -2.5 is 0xc100 in binary16, stored little-endian.
    assert payload[22:26] == bytes.fromhex("003c00c1")
    assert decode(payload, "fp16", 6).tolist() == FP16_DECODED


INT8_INPUT = [float(v) for v in range(-8, 8)] + [0.0] * 16 + [0.5, -0.25, 0.125, 0.0]
INT8_HEX = (
    "42524e43010008002400000000000000"
    "696e74382d623136"  # header, b"int8-b16"
    "0402813d"
    "00000000"
    "0402813b"  # scales 8/127, 0 (an all-zero block), 0.5/127
    "8191a1b1c0d0e0f000102030404f5f6f"
    "00000000000000000000000000000000"
    "7fc02000"
)


def test_int8_known_answer():
    payload = encode("int8-b16", vector(INT8_INPUT))
    assert payload.hex() == INT8_HEX
    assert len(payload) == payload_size("int8-b16", 36) == 16 + 8 + 3 * 4 + 36
    assert struct.unpack_from("<3f", payload, 24) == (float(np.float32(8) / 127), 0.0, float(np.float32(0.5) / 127))
    # -8 -> -127 (0x81); -7 * 127/8 = -111.125 -> -111 (0x91); -0.25 * 254 = -63.5 -> -64 (0xc0, half to even).
    assert payload[36:38] == b"\x81\x91" and payload[69] == 0xC0
    scales = [np.float32(8) / 127] * 16 + [np.float32(0)] * 16 + [np.float32(0.5) / 127] * 4
    levels = [-127, -111, -95, -79, -64, -48, -32, -16, 0, 16, 32, 48, 64, 79, 95, 111] + [0] * 16 + [127, -64, 32, 0]
    expected = [float(np.float32(q) * s) for q, s in zip(levels, scales, strict=True)]
    assert decode(payload, "int8-b16", 36).tolist() == expected


def topk_input() -> list[float]:
    chunk = [0.01 * (i % 5) for i in range(64)]
    chunk[3], chunk[10], chunk[40], chunk[50], chunk[63] = 2.0, -1.0, 0.5, 0.5, -2.0
    return chunk + [0.0, 3.0, -3.0, 1.0, 0.0, 0.5]  # a last chunk of 6 keeps 4 too


TOPK_HEX = (
    "42524e4301000e004600000000000000"
    "746f706b2d6336342d6b342d7132"  # header, b"topk-c64-k4-q2"
    "00000040"
    "00004040"  # scales 2.0 and 3.0
    "8382fe813014"  # indices 3 10 40 63 | 1 2 3 5, 6 bits each
    "27a3"  # levels 3 1 2 0 | 3 0 2 2, 2 bits each
)


def test_topk_known_answer():
    payload = encode("topk-c64-k4-q2", vector(topk_input()))
    assert payload.hex() == TOPK_HEX
    # 0.5 at 40 and at 50 tie for the 4th place: the lower index is kept.
    assert payload[38:] == pack_bits([3, 10, 40, 63, 1, 2, 3, 5], 6) + pack_bits([3, 1, 2, 0, 3, 0, 2, 2], 2)
    assert payload[38] == 0x83  # 3, then the low two bits of 10 (0b10) at bits 6-7
    assert payload[44] == 0x27  # levels 3 | 1 << 2 | 2 << 4 | 0 << 6
    expected = torch.zeros(70)
    # Levels of 4 over [-s, s]: -s, -s/3, s/3, s. -1.0 -> (-0.5 + 1) * 1.5 = 0.75 -> level 1.
    expected[[3, 10, 40, 63]] = vector([2.0, -2 * THIRD, 2 * THIRD, -2.0])
    expected[[65, 66, 67, 69]] = vector([3.0, -3.0, 3 * THIRD, 3 * THIRD])
    assert torch.equal(decode(payload, "topk-c64-k4-q2", 70), expected)


def test_topk_one_bit_sends_plus_or_minus_scale():
    x = vector([0.0] * 60 + [-4.0, 1.0, -0.5, 0.25])
    assert decode(encode("topk-c64-k2-q1", x), "topk-c64-k2-q1", 64)[60:].tolist() == [-4.0, 4.0, 0.0, 0.0]


def test_topk_ties_keep_the_lowest_indices_and_zero_chunks_decode_to_zero():
    codec = parse_codec("topk-c64-k8-q3")
    x = vector([1.0, -1.0] * 32 + [0.0] * 64 + [-0.0] * 3)
    payload = encode(codec, x)
    assert payload == topk_payload(
        codec.name, 131, [1.0, 0.0, 0.0], [*range(8), *range(8), 0, 1, 2], [7, 0] * 4 + [4] * 11
    )
    assert decode(payload, codec, 131).tolist() == [1.0, -1.0] * 4 + [0.0] * 123


def test_empty_vector():
    for name in ("fp16", "int8-b16", "topk-c64-k4-q2"):
        payload = encode(name, torch.zeros(0))
        assert payload == header(name, 0) and len(payload) == payload_size(name, 0)
        assert decode(payload, name, 0).shape == (0,)


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


@st.composite
def codecs_(draw) -> Codec:
    kind = draw(st.sampled_from(["fp16", "int8", "topk"]))
    if kind == "fp16":
        return Fp16Codec()
    if kind == "int8":
        return Int8Codec(block=draw(st.sampled_from([16, 32, 64, 256, 65536])))
    chunk = draw(st.sampled_from([64, 128, 256]))
    return TopKCodec(chunk=chunk, k=draw(st.integers(1, chunk)), bits=draw(st.integers(1, 8)))


@st.composite
def vectors(draw, codec: Codec) -> torch.Tensor:
    """Any finite floats (short), or long random vectors: sizes that are rarely a multiple of a
    block or chunk, scales from subnormal to huge, zeros, and ties at every threshold."""
    fp16 = isinstance(codec, Fp16Codec)
    if draw(st.booleans()):
        limit = 65504.0 if fp16 else FLOAT32_BELOW_MAX
        return vector(draw(st.lists(st.floats(-limit, limit, width=32), min_size=1, max_size=40)))
    size = draw(st.integers(1, 700))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    x = torch.randn(size, generator=generator)
    if draw(st.booleans()):
        x = torch.round(x * 2) / 2
    x[torch.rand(size, generator=generator) < draw(st.sampled_from([0.0, 0.5, 0.99]))] = 0.0
    scales = [1e-6, 1.0, 1e3] if fp16 else [1e-42, 1e-30, 1e-3, 1.0, 1e3, 1e30]
    return x * draw(st.sampled_from(scales))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_round_trip_is_within_the_error_bound_and_exactly_sized(data):
    codec = data.draw(codecs_())
    x = data.draw(vectors(codec))
    payload = encode(codec, x)
    assert len(payload) == payload_size(codec, x.numel()) == codec.payload_size(x.numel())
    assert payload == encode(codec, x.clone()), "encoding is deterministic"
    decoded = decode(payload, codec, x.numel())
    assert decoded.dtype == torch.float32 and decoded.shape == x.shape
    bound = codec.max_abs_error(x)
    assert bool(((decoded.double() - x.double()).abs() <= bound).all())


@pytest.mark.parametrize("name", ["int8-b16", "int8-b128", "topk-c64-k5-q3", "topk-c128-k3-q7", "topk-c64-k64-q2"])
@pytest.mark.parametrize("numel", [1, 1023, 1024, 1025, 3000, 5 * 1024])
def test_payload_does_not_depend_on_the_slice_size(monkeypatch, name, numel):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    payload = encode(name, x)
    decoded = decode(payload, name, numel)
    bound = parse_codec(name).max_abs_error(x)
    monkeypatch.setattr(codec_core, "SLICE", 1024)  # 8 x the largest chunk here: byte-aligned slices
    assert encode(name, x) == payload
    assert torch.equal(decode(payload, name, numel), decoded)
    assert torch.equal(parse_codec(name).max_abs_error(x), bound)


@pytest.mark.parametrize(
    "name", ["fp16", "int8-b16", "int8-b65536", "topk-c64-k4-q2", "topk-c4096-k64-q2", "topk-c65536-k3-q5"]
)
def test_nominal_bits_per_element_is_the_body_rate(name):
    codec = parse_codec(name)
    numel = 8 * 65536
    assert codec.body_size(numel) * 8 == codec.nominal_bits_per_element * numel
    assert codec.payload_size(numel) == HEADER_SIZE + len(name) + codec.body_size(numel)


def test_compression_ratios_documented_in_names():
    assert parse_codec("topk-c4096-k64-q2").nominal_bits_per_element == pytest.approx(0.2265625)
    assert parse_codec("int8-b256").nominal_bits_per_element == 8.125


# ---------------------------------------------------------------------------------------
# Codec names
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["fp16", "int8-b16", "int8-b65536", "topk-c64-k1-q1", "topk-c65536-k65536-q8", "topk-c4096-k64-q2"]
)
def test_parse_codec_round_trips_names(name):
    codec = parse_codec(name)
    assert codec.name == str(codec) == name
    assert parse_codec(codec.name) == codec


@pytest.mark.parametrize(
    "name",
    [
        "", "fp32", "FP16", " fp16", "fp16 ", "fp16\n", "int8", "int8-b", "int8-b0", "int8-b8", "int8-b100",
        "int8-b0256", "int8-b+256", "int8-b\u0662\u0665\u0666", "int8-b131072", "int8-b256-", "topk-c4096-k64",
        "topk-c100-k4-q2", "topk-c32-k4-q2", "topk-c131072-k4-q2", "topk-c64-k65-q2", "topk-c64-k0-q2",
        "topk-c64-k4-q0", "topk-c64-k4-q9", "topk-c64-k4-q10", "topk-c64-k04-q2", "topk-k4-c64-q2",
    ],
)  # fmt: skip
def test_parse_codec_rejects_bad_names(name):
    with pytest.raises(ConfigError) as error:
        parse_codec(name)
    assert "\n" not in str(error.value) and repr(name) in str(error.value)


@pytest.mark.parametrize("value", [None, 16, b"fp16"])
def test_parse_codec_rejects_non_strings(value):
    with pytest.raises(ConfigError):
        parse_codec(value)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Int8Codec(block=100),
        lambda: Int8Codec(block=8),
        lambda: TopKCodec(chunk=64, k=65, bits=2),
        lambda: TopKCodec(chunk=96, k=4, bits=2),
        lambda: TopKCodec(chunk=64, k=4, bits=0),
        lambda: TopKCodec(chunk=64, k=4, bits=9),
    ],
)
def test_codecs_check_their_parameters(make):
    with pytest.raises(ConfigError):
        make()


# ---------------------------------------------------------------------------------------
# Malformed payloads and refused inputs
# ---------------------------------------------------------------------------------------

SAMPLE = torch.randn(200, generator=torch.Generator().manual_seed(7))


def sample_payload(name: str) -> bytes:
    return encode(name, SAMPLE)


def mutations(name: str) -> dict[str, object]:
    good = sample_payload(name)
    other = "int8-b32" if name != "int8-b32" else "int8-b16"
    return {
        "not bytes": bytearray(good),
        "a string": good.hex(),
        "empty": b"",
        "shorter than the header": good[:10],
        "truncated": good[:-1],
        "extended": good + b"\x00",
        "magic": b"BRNX" + good[4:],
        "version": good[:4] + b"\x02" + good[5:],
        "reserved": good[:5] + b"\x01" + good[6:],
        "other codec": encode(other, SAMPLE),
        "other numel": encode(name, SAMPLE[:199]),
        "header numel": good[:8] + (201).to_bytes(8, "little") + good[16:],
        "name length": good[:6] + (len(name) + 1).to_bytes(2, "little") + good[8:],
    }


@pytest.mark.parametrize("name", ["fp16", "int8-b32", "topk-c64-k4-q2"])
def test_structurally_malformed_payloads_raise_payload_error(name):
    assert decode(sample_payload(name), name, 200).shape == (200,)
    for what, payload in mutations(name).items():
        with pytest.raises(PayloadError) as error:
            decode(payload, name, 200)
        assert isinstance(error.value, MalformedRecord), what
        assert "\n" not in str(error.value), what


def test_decode_rejects_an_unexpected_element_count():
    with pytest.raises(PayloadError, match="holds 200 elements, expected 201"):
        decode(sample_payload("fp16"), "fp16", 201)


def with_float32(payload: bytes, offset: int, value: float) -> bytes:
    return payload[:offset] + struct.pack("<f", value) + payload[offset + 4 :]


@pytest.mark.parametrize("name", ["int8-b32", "topk-c64-k4-q2"])
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -1.0, -0.0])
def test_scales_must_be_finite_and_non_negative(name, scale):
    first_scale = HEADER_SIZE + len(name)
    payload = with_float32(sample_payload(name), first_scale + 4, scale)
    with pytest.raises(PayloadError, match="scale 1"):
        decode(payload, name, 200)


def test_int8_scale_must_keep_decoded_values_finite():
    with pytest.raises(InputError, match="too large"):
        encode("int8-b16", vector([1.0] * 20 + [FLOAT32_MAX]))
    assert decode(encode("int8-b16", vector([-FLOAT32_BELOW_MAX])), "int8-b16", 1).tolist() == [-FLOAT32_BELOW_MAX]
    # 127 * 2**121 = 2**127.99: finite; 127 * 3e36 overflows float32.
    payload = encode("int8-b16", vector([1.0]))
    assert decode(with_float32(payload, HEADER_SIZE + 8, 2.0**121), "int8-b16", 1).tolist() == [127 * 2.0**121]
    with pytest.raises(PayloadError, match="scale 0"):
        decode(with_float32(payload, HEADER_SIZE + 8, 3e36), "int8-b16", 1)


@pytest.mark.parametrize("half", [0x7C00, 0xFC00, 0x7E00, 0x7C01])
def test_fp16_rejects_inf_and_nan(half):
    payload = sample_payload("fp16")
    offset = HEADER_SIZE + 4 + 2 * 17
    with pytest.raises(PayloadError, match="element 17 is not finite"):
        decode(payload[:offset] + half.to_bytes(2, "little") + payload[offset + 2 :], "fp16", 200)


def test_int8_rejects_minus_128():
    payload = bytearray(sample_payload("int8-b32"))
    payload[HEADER_SIZE + 8 + 7 * 4 + 5] = 0x80
    with pytest.raises(PayloadError, match="value 5 is -128"):
        decode(bytes(payload), "int8-b32", 200)


TOPK_70 = dict(name="topk-c64-k4-q2", numel=70, scales=[2.0, 3.0], levels=[3, 1, 2, 0, 3, 0, 2, 2])


def test_topk_builder_matches_the_known_answer():
    assert topk_payload(**TOPK_70, indices=[3, 10, 40, 63, 1, 2, 3, 5]).hex() == TOPK_HEX


@pytest.mark.parametrize(
    ("indices", "message"),
    [
        ([10, 3, 40, 63, 1, 2, 3, 5], "chunk 0 indices do not strictly increase"),
        ([3, 10, 10, 63, 1, 2, 3, 5], "chunk 0 indices do not strictly increase"),
        ([3, 10, 40, 63, 1, 3, 2, 5], "chunk 1 indices do not strictly increase"),
        ([3, 10, 40, 63, 1, 2, 3, 6], "not below its length 6"),
        ([3, 10, 40, 63, 1, 2, 3, 63], "not below its length 6"),
    ],
)
def test_topk_indices_must_increase_and_stay_in_the_chunk(indices, message):
    with pytest.raises(PayloadError, match=message):
        decode(topk_payload(**TOPK_70, indices=indices), "topk-c64-k4-q2", 70)


def test_topk_across_chunks_indices_may_restart():
    # Chunk boundaries are not an ordering violation: 63 then 1.
    decoded = decode(topk_payload(**TOPK_70, indices=[3, 10, 40, 63, 1, 2, 3, 5]), "topk-c64-k4-q2", 70)
    assert decoded[63] == -2.0 and decoded[65] == 3.0


def test_bit_stream_padding_must_be_zero():
    codec = parse_codec("topk-c64-k3-q3")  # 3 kept: 18 index bits and 9 level bits, both padded
    good = topk_payload(codec.name, 64, [1.0], [0, 1, 2], [0, 7, 7])
    assert decode(good, codec, 64)[:4].tolist() == [-1.0, 1.0, 1.0, 0.0]
    index_end = HEADER_SIZE + len(codec.name) + 4 + 3
    for position, bit in ((index_end - 1, 0x04), (len(good) - 1, 0x80)):
        bad = bytearray(good)
        bad[position] |= bit
        with pytest.raises(PayloadError, match="padding bits"):
            decode(bytes(bad), codec, 64)


@pytest.mark.parametrize(
    "x",
    [
        vector([1.0, math.nan]),
        vector([math.inf, 1.0]),
        vector([-math.inf]),
        torch.zeros(4, dtype=torch.float64),
        torch.zeros(4, dtype=torch.float16),
        torch.zeros(2, 2),
        torch.tensor(1.0),
        [1.0, 2.0],
    ],
)
def test_encode_refuses_what_is_not_a_finite_float32_vector(x):
    for name in ("fp16", "int8-b16", "topk-c64-k4-q2"):
        with pytest.raises(InputError) as error:
            encode(name, x)
        assert not isinstance(error.value, MalformedRecord)


def test_fp16_refuses_what_would_round_to_infinity():
    assert decode(encode("fp16", vector([65519.0])), "fp16", 1).tolist() == [65504.0]
    with pytest.raises(InputError, match="beyond the fp16 range"):
        encode("fp16", vector([1.0, -65520.0]))


@pytest.mark.parametrize("numel", [-1, 1.5, True, "3"])
def test_sizes_need_a_non_negative_integer_count(numel):
    with pytest.raises(InputError):
        payload_size("fp16", numel)
    with pytest.raises(InputError):
        decode(sample_payload("fp16"), "fp16", numel)


def test_a_codec_argument_must_be_a_codec_or_a_name():
    with pytest.raises(ConfigError):
        encode(16, SAMPLE)


# ---------------------------------------------------------------------------------------
# Error feedback
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk-c64-k4-q2", "int8-b64"])
def test_error_feedback_transmits_what_was_dropped(name):
    update = torch.randn(640, generator=torch.Generator().manual_seed(3))
    residual = torch.zeros(640)
    sent = torch.zeros(640, dtype=torch.float64)
    residual_norms = []
    rounds = 200
    for _ in range(rounds):
        payload, residual = compress_with_feedback(name, update, residual)
        sent += decode(payload, name, 640).double()
        residual_norms.append(float(residual.norm()))
    total = rounds * update.double()
    # What was sent is everything but the last residual ...
    assert float((total - sent - residual.double()).norm()) <= 1e-5 * float(total.norm())
    # ... and the residual stays bounded instead of growing with the rounds,
    assert max(residual_norms[rounds // 2 :]) <= 1.5 * max(residual_norms[: rounds // 2])
    assert float((total - sent).norm()) <= 0.05 * float(total.norm())
    # while without feedback the codec loses the same part every round.
    without_feedback = rounds * decode(encode(name, update), name, 640).double()
    assert float((total - sent).norm()) <= 0.1 * float((total - without_feedback).norm())


def test_error_feedback_rejects_mismatched_shapes():
    with pytest.raises(InputError):
        compress_with_feedback("int8-b16", torch.zeros(10), torch.zeros(11))
    with pytest.raises(InputError):
        compress_with_feedback("int8-b16", torch.zeros(10), torch.zeros(10, dtype=torch.float64))


# ---------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------


def test_aggregate_is_the_float64_weighted_mean_in_the_given_order():
    generator = torch.Generator().manual_seed(11)
    decoded = [torch.randn(1000, generator=generator) * 10**i for i in range(4)]
    weights = [3, 0.5, 7.25, 1e-3]
    expected = torch.zeros(1000, dtype=torch.float64)
    for part, weight in zip(decoded, weights, strict=True):
        expected += part.double() * weight
    expected = (expected / sum(float(weight) for weight in weights)).float()
    result = aggregate(decoded, weights)
    assert result.dtype == torch.float32
    assert torch.equal(result, expected)
    assert torch.equal(aggregate(decoded, weights), result)


def test_aggregate_of_two_equal_weights_is_the_correctly_rounded_midpoint():
    a, b = torch.randn(2, 1000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(aggregate([a, b], [2.0, 2.0]), (a + b) / 2)


def test_aggregate_of_one_vector_is_that_vector():
    x = torch.randn(100)
    assert torch.equal(aggregate([x], [3.0]), x)


@pytest.mark.parametrize(
    ("decoded", "weights"),
    [
        ([], []),
        ([torch.zeros(3)], []),
        ([torch.zeros(3)], [1.0, 1.0]),
        ([torch.zeros(3)], [0.0]),
        ([torch.zeros(3)], [-1.0]),
        ([torch.zeros(3)], [math.nan]),
        ([torch.zeros(3)], [math.inf]),
        ([torch.zeros(3)], [True]),
        ([torch.zeros(3)], ["1"]),
        ([torch.zeros(3)], [10**400]),
        ([torch.zeros(3), torch.zeros(3)], [1e308, 1e308]),
        ([torch.zeros(3), torch.zeros(4)], [1.0, 1.0]),
        ([torch.zeros(3, dtype=torch.float64)], [1.0]),
        ([torch.tensor([1.0, math.nan])], [1.0]),
    ],
)
def test_aggregate_rejects_bad_input(decoded, weights):
    with pytest.raises(InputError):
        aggregate(decoded, weights)


# ---------------------------------------------------------------------------------------
# Summing payloads: accumulate, finish, combine
# ---------------------------------------------------------------------------------------


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 vector: equal bits, sign of zero included."""
    return x.view(torch.int32)


def summed(payloads: list[bytes], codec, numel: int, weights: list[float]) -> torch.Tensor:
    out = torch.zeros(numel, dtype=torch.float64)
    for payload, weight in zip(payloads, weights, strict=True):
        accumulate(out, payload, codec, numel, weight)
    return finish(out, sum(weights))


@st.composite
def payload_groups(draw) -> tuple[Codec, int, list[bytes], list[float]]:
    """1-4 payloads of one codec and size (often not a multiple of a block or chunk): random,
    rounded or mostly zero vectors of any scale, with weights from tiny to huge."""
    codec = draw(codecs_())
    numel = draw(st.integers(0, 1500) | st.sampled_from([1, 63, 64, 65, 255, 256, 257, 4095, 4097]))
    payloads = []
    for _ in range(draw(st.integers(1, 4))):
        generator = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
        x = torch.randn(numel, generator=generator)
        if draw(st.booleans()):
            x = torch.round(x * 2) / 2
        x[torch.rand(numel, generator=generator) < draw(st.sampled_from([0.0, 0.5, 0.99]))] = 0.0
        scales = [1e-6, 1.0, 1e3] if isinstance(codec, Fp16Codec) else [1e-42, 1e-30, 1e-3, 1.0, 1e3, 1e30]
        payloads.append(encode(codec, x * draw(st.sampled_from(scales))))
    weight = st.floats(1e-3, 1e6) | st.integers(1, 10**6) | st.sampled_from([1.0, 3.0, 1e-300, 1e300])
    return codec, numel, payloads, [draw(weight) for _ in payloads]


@settings(max_examples=200, deadline=None)
@given(group=payload_groups())
def test_accumulate_then_finish_is_aggregate_bit_for_bit(group):
    codec, numel, payloads, weights = group
    expected = aggregate([decode(payload, codec, numel) for payload in payloads], weights)
    result = summed(payloads, codec, numel, weights)
    assert result.dtype == torch.float32 and result.shape == (numel,)
    assert torch.equal(bits(result), bits(expected))


@pytest.mark.parametrize("name", ["fp16", "int8-b16", "int8-b128", "topk-c64-k5-q3", "topk-c128-k128-q8"])
@pytest.mark.parametrize("numel", [1, 255, 256, 1023, 1025, 3000])
def test_accumulate_matches_aggregate_across_slices(monkeypatch, name, numel):
    generator = torch.Generator().manual_seed(numel)
    payloads = [encode(name, torch.randn(numel, generator=generator) * 10.0**i) for i in range(-2, 2)]
    weights = [1.0, 0.1, 7.0, 3.5]
    expected = aggregate([decode(payload, name, numel) for payload in payloads], weights)
    assert torch.equal(bits(summed(payloads, name, numel, weights)), bits(expected))
    monkeypatch.setattr(codec_core, "SLICE", 1024)  # byte-aligned top-k slices, as above
    monkeypatch.setattr(codec_core, "SUM_SLICE", 256)  # a multiple of the blocks here
    assert torch.equal(bits(summed(payloads, name, numel, weights)), bits(expected))


def test_accumulate_at_full_slice_sizes():
    numel = 2 * codec_core.SUM_SLICE + 4097  # three sums' slices; the last chunk and block short
    generator = torch.Generator().manual_seed(2)
    vectors = [torch.randn(numel, generator=generator) for _ in range(3)]
    for name in ("fp16", "int8-b256", "topk-c4096-k64-q2"):
        payloads = [encode(name, x) for x in vectors]
        expected = aggregate([decode(payload, name, numel) for payload in payloads], [2.0, 5.0, 1.0])
        assert torch.equal(bits(summed(payloads, name, numel, [2.0, 5.0, 1.0])), bits(expected))


def late_faults(numel: int) -> dict[str, tuple[str, bytes]]:
    """Payloads that are malformed only near their end: (codec name, payload) by fault."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(9))
    fp16 = bytearray(encode("fp16", x))
    fp16[-4:-2] = (0x7C00).to_bytes(2, "little")
    int8 = bytearray(encode("int8-b16", x))
    int8[-3] = 0x80
    name = "topk-c64-k4-q2"
    full, rest = divmod(numel, 64)
    scales, levels = [1.0] * (full + 1), [0, 1, 2, 3] * (full + 1)
    return {
        "fp16 inf": ("fp16", bytes(fp16)),
        "int8 -128": ("int8-b16", bytes(int8)),
        "top-k order": (name, topk_payload(name, numel, scales, [0, 1, 2, 3] * full + [0, 2, 1, 3], levels)),
        "top-k range": (name, topk_payload(name, numel, scales, [0, 1, 2, 3] * full + [0, 1, 2, rest], levels)),
    }


@pytest.mark.parametrize("slices", [False, True])
def test_a_payload_bad_near_its_end_leaves_the_sum_untouched(monkeypatch, slices):
    if slices:  # the fault is in the last of several slices
        monkeypatch.setattr(codec_core, "SLICE", 1024)
        monkeypatch.setattr(codec_core, "SUM_SLICE", 256)
    for what, (name, payload) in late_faults(3000).items():
        out = torch.randn(3000, dtype=torch.float64)
        before = out.clone()
        with pytest.raises(PayloadError):
            accumulate(out, payload, name, 3000, 2.0)
        assert torch.equal(out.view(torch.int64), before.view(torch.int64)), what


@pytest.mark.parametrize("name", ["fp16", "int8-b32", "topk-c64-k4-q2"])
def test_a_malformed_payload_leaves_the_sum_untouched(name):
    for what, payload in mutations(name).items():
        out = torch.ones(200, dtype=torch.float64)
        with pytest.raises(PayloadError):
            accumulate(out, payload, name, 200, 1.0)
        assert torch.equal(out, torch.ones(200, dtype=torch.float64)), what


@pytest.mark.parametrize(
    ("out", "weight"),
    [
        (torch.zeros(200), 1.0),
        (torch.zeros(201, dtype=torch.float64), 1.0),
        (torch.zeros(2, 100, dtype=torch.float64), 1.0),
        ([0.0] * 200, 1.0),
        (torch.zeros(200, dtype=torch.float64), 0.0),
        (torch.zeros(200, dtype=torch.float64), -1.0),
        (torch.zeros(200, dtype=torch.float64), math.nan),
        (torch.zeros(200, dtype=torch.float64), math.inf),
        (torch.zeros(200, dtype=torch.float64), True),
        (torch.zeros(200, dtype=torch.float64), 10**400),
    ],
)
def test_accumulate_refuses_a_bad_sum_or_weight(out, weight):
    with pytest.raises(InputError):
        accumulate(out, sample_payload("int8-b32"), "int8-b32", 200, weight)
    if isinstance(out, torch.Tensor):
        assert not out.any()


@pytest.mark.parametrize(
    ("out", "total"),
    [(torch.zeros(3), 1.0), (torch.zeros(3, dtype=torch.float64), 0.0), (torch.zeros(3, dtype=torch.float64), math.inf)],
)
def test_finish_refuses_a_bad_sum_or_total(out, total):
    with pytest.raises(InputError):
        finish(out, total)


def test_parsed_payload_decodes_and_adds_like_the_functions():
    parsed = parse_payload(sample_payload("topk-c64-k4-q2"), "topk-c64-k4-q2", 200)
    assert torch.equal(parsed.decode(), decode(sample_payload("topk-c64-k4-q2"), "topk-c64-k4-q2", 200))
    out = torch.zeros(200, dtype=torch.float64)
    parsed.add_to(out, 3.0)
    assert torch.equal(out, parsed.decode().double() * 3.0)


@pytest.mark.parametrize("name", ["fp16", "int8-b16", "topk-c64-k4-q2", "topk-c64-k4-s2", "bmax-c64-b8-f32"])
@pytest.mark.parametrize("slices", [False, True])
def test_entries_list_positions_in_order_with_their_decoded_values(monkeypatch, name, slices):
    if slices:
        monkeypatch.setattr(codec_core, "SLICE", 1024)
    numel = 3000
    parsed = parse_payload(encode(name, torch.randn(numel, generator=torch.Generator().manual_seed(1))), name, numel)
    pairs = list(parsed.entries())
    positions = np.concatenate([p for p, _ in pairs])
    values = np.concatenate([v for _, v in pairs])
    assert positions.dtype == np.int64 and values.dtype == np.float32 and (np.diff(positions) > 0).all()
    decoded = parsed.decode().numpy()
    assert np.array_equal(values.view(np.int32), decoded[positions].view(np.int32))
    if parsed.sparse:  # every element not listed decodes as 0
        assert not np.delete(decoded, positions).any() and len(positions) < numel
    else:  # a dense codec lists every element
        assert positions.tolist() == list(range(numel))
    assert len(pairs) == (-(-numel // 1024) if slices else 1)


def group_entry(peer: int, weight: float, payload: bytes, codec: Codec) -> tuple[dict, bytes]:
    from protocol.averaging import GroupMember

    member = GroupMember.for_payload(peer_id=f"{peer:016x}", round=3, weight=weight, codec=codec, payload=payload,
                                     base_root="ab" * 32)
    return member.to_wire(), payload


@pytest.mark.parametrize(
    ("name", "fault"), [("fp16", "fp16 inf"), ("int8-b16", "int8 -128"), ("topk-c64-k4-q2", "top-k range")]
)
def test_combine_is_aggregate_in_peer_id_order_and_leaves_bad_payloads_out(name, fault):
    from protocol.averaging import combine

    codec, numel = parse_codec(name), 3000
    generator = torch.Generator().manual_seed(4)
    payloads = [encode(codec, torch.randn(numel, generator=generator) * (i + 1)) for i in range(3)]
    bad = late_faults(numel)[fault][1]  # its record's size and sha256 match: only its content is bad
    entries = [group_entry(9, 2.0, payloads[0], codec), group_entry(2, 0.5, payloads[1], codec),
               group_entry(5, 7.0, bad, codec), group_entry(4, 1.25, payloads[2], codec)]  # fmt: skip
    group = combine(entries, codec=codec, numel=numel, round=3, max_weight=1e9, base_root="ab" * 32, clip=0.0)
    assert [m.peer_id for m in group.members] == [f"{p:016x}" for p in (2, 4, 9)]
    assert len(group.rejected) == 1 and f"codec payload ({name})" in group.rejected[0]
    decoded = [decode(p, codec, numel) for p in (payloads[1], payloads[2], payloads[0])]
    assert torch.equal(bits(group.update), bits(aggregate(decoded, [0.5, 1.25, 2.0])))
