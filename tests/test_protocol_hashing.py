"""Canonical checkpoint hash: known-answer vectors and properties.

The reference below is written from the byte layout in ``protocol/hashing.py``'s docstring
with hashlib, struct and numpy only, so it does not share code with the implementation.
The hard-coded hex pins the hash: if a vector changes, every recorded ledger breaks.

    pytest -q tests/test_protocol_hashing.py
"""

from __future__ import annotations

import hashlib
import io
import struct

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.errors import InputError
from protocol.hashing import (
    CHECKPOINT_DIGEST,
    DTYPE_NAMES,
    checkpoint_root,
    root_from_digests,
    sha256_stream,
    tensor_digest,
    tensor_digests,
)

# ---------------------------------------------------------------------------------------
# Independent reference implementation (from the spec, not from the code)
# ---------------------------------------------------------------------------------------


def reference_preimage(name: str, dtype_name: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    """The exact bytes that the tensor digest is sha256 of."""
    name_raw = name.encode("utf-8")
    return (
        b"barnraise.tensor.v1\x00"
        + struct.pack("<I", len(name_raw))
        + name_raw
        + struct.pack("<I", len(dtype_name))
        + dtype_name.encode("ascii")
        + struct.pack("<I", len(shape))
        + b"".join(struct.pack("<Q", d) for d in shape)
        + struct.pack("<Q", len(payload))
        + payload
    )


def reference_digest(name: str, dtype_name: str, shape: tuple[int, ...], payload: bytes) -> bytes:
    return hashlib.sha256(reference_preimage(name, dtype_name, shape, payload)).digest()


def reference_root(digests: dict[str, bytes]) -> str:
    body = b"barnraise.root.v1\x00" + struct.pack("<Q", len(digests))
    for name_raw in sorted(name.encode("utf-8") for name in digests):
        body += struct.pack("<I", len(name_raw)) + name_raw + digests[name_raw.decode("utf-8")]
    return hashlib.sha256(body).hexdigest()


def bf16_bytes(values: list[float]) -> bytes:
    """bfloat16 is the top half of float32; exact for values representable in bf16."""
    bits = np.asarray(values, dtype="<f4").view("<u4") >> 16
    return bits.astype("<u2").tobytes()


# Each case: (name, torch tensor built from Python values, safetensors dtype name, shape,
# little-endian payload built by numpy, pinned tensor digest hex).
KAT_CASES = [
    (
        "layer.weight",
        torch.tensor([[1.0, -2.5, 0.0], [3.25, 1e-3, -0.0]], dtype=torch.float32),
        "F32",
        (2, 3),
        np.array([[1.0, -2.5, 0.0], [3.25, 1e-3, -0.0]], dtype="<f4").tobytes(),
        "ec771320cd582c7ac20a25f90d196fcdeeff0973321c16e21bd58528fb950cd9",
    ),
    (
        "layer.bias",
        torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.bfloat16),
        "BF16",
        (4,),
        bf16_bytes([1.0, -2.0, 0.5, 3.0]),
        "53b988ecca519ff25f021217818a87ef995289ae0d9f0fa345e9ce079488b33c",
    ),
    (
        "half",
        torch.tensor([1.0, -0.5, 65504.0], dtype=torch.float16),
        "F16",
        (3,),
        np.array([1.0, -0.5, 65504.0], dtype="<f2").tobytes(),
        "33fcdd57af4c6e403522f6a403754e11000e5a5715706325697bfca5726e0074",
    ),
    (
        "step",
        torch.tensor([[0, -1], [2**40, -(2**62)]], dtype=torch.int64),
        "I64",
        (2, 2),
        np.array([[0, -1], [2**40, -(2**62)]], dtype="<i8").tobytes(),
        "d31789f7da0efe85916c0590101cae3d78c5077f90d2ac75980a70fef9ad7661",
    ),
    (
        "mask",
        torch.tensor([True, False, True], dtype=torch.bool),
        "BOOL",
        (3,),
        b"\x01\x00\x01",
        "2c3816f0ff40f1a38ea175d3244f26d84d50ebaa1e10430e482fb150e19e2675",
    ),
    (
        "scalar",
        torch.tensor(7.0, dtype=torch.float32),
        "F32",
        (),
        np.array(7.0, dtype="<f4").tobytes(),
        "293ff92943dc4b8d0c0451c4aff443540619a229c9e37842eda22f61f1458941",
    ),
    (
        "empty",
        torch.zeros(0, 3, dtype=torch.float32),
        "F32",
        (0, 3),
        b"",
        "7e82035bfc81e52d660dee565f59ca4e1a5510d66a32aad385d41d375ca4b48f",
    ),
    (
        "層.重み.ü",
        torch.tensor([0.25, -4.0], dtype=torch.float32),
        "F32",
        (2,),
        np.array([0.25, -4.0], dtype="<f4").tobytes(),
        "c9ebd9c3587d4a361f030ce199042446ca0e004d9ff84de5297422812b7c3eee",
    ),
]

ROOT_KAT = "d10198ed5f9a047e385c0e2345333c6d60ff9d5a8a0e3268a1d8dd6984d1a828"
"""Root of every tensor in KAT_CASES together."""

EMPTY_ROOT_KAT = "6bad2e1ad681b01c57359d32fe23b6a20edf8230b72cbf884c4b4ffd54439a37"
"""Root of a checkpoint with no tensors: sha256(b"barnraise.root.v1\\0" || u64le(0))."""


@pytest.mark.parametrize(("name", "tensor", "dtype_name", "shape", "payload", "pinned"), KAT_CASES)
def test_tensor_digest_matches_reference_and_pinned_vector(name, tensor, dtype_name, shape, payload, pinned):
    assert DTYPE_NAMES[tensor.dtype] == dtype_name
    assert tuple(tensor.shape) == shape
    expected = reference_digest(name, dtype_name, shape, payload)
    assert tensor_digest(name, tensor) == expected
    assert expected.hex() == pinned


def test_preimage_layout_of_one_tensor_byte_by_byte():
    # Spelled out by hand so a misreading of the spec in the reference would show up here.
    preimage = reference_preimage("w", "F32", (2,), np.array([1.0, 2.0], dtype="<f4").tobytes())
    expected_hex = (
        "6261726e72616973652e74656e736f722e763100"  # b"barnraise.tensor.v1\0"
        "0100000077"  # u32le(1) "w"
        "03000000463332"  # u32le(3) "F32"
        "010000000200000000000000"  # u32le(ndim=1) u64le(2)
        "0800000000000000"  # u64le(nbytes=8)
        "0000803f00000040"  # 1.0f, 2.0f little-endian
    )
    assert preimage.hex() == expected_hex
    assert tensor_digest("w", torch.tensor([1.0, 2.0])) == hashlib.sha256(preimage).digest()


def test_root_of_named_set_matches_reference_and_pinned_vector():
    tensors = {name: tensor for name, tensor, *_ in KAT_CASES}
    digests = {name: reference_digest(name, dt, shape, payload) for name, _, dt, shape, payload, _ in KAT_CASES}
    assert checkpoint_root(tensors) == reference_root(digests)
    assert checkpoint_root(tensors) == ROOT_KAT


def test_root_of_nothing_is_pinned():
    assert checkpoint_root({}) == hashlib.sha256(b"barnraise.root.v1\x00" + bytes(8)).hexdigest()
    assert checkpoint_root({}) == EMPTY_ROOT_KAT


def test_digest_name_encodes_the_scheme():
    assert CHECKPOINT_DIGEST == "barnraise-ckpt-v1-sha256"


@pytest.mark.parametrize(
    ("dtype", "numpy_dtype", "dtype_name"),
    [
        (torch.float64, "<f8", "F64"),
        (torch.float32, "<f4", "F32"),
        (torch.float16, "<f2", "F16"),
        (torch.int64, "<i8", "I64"),
        (torch.int32, "<i4", "I32"),
        (torch.int16, "<i2", "I16"),
        (torch.int8, "<i1", "I8"),
        (torch.uint8, "<u1", "U8"),
    ],
)
def test_every_numpy_backed_dtype_matches_reference(dtype, numpy_dtype, dtype_name):
    values = [[0, 1, 2], [3, 4, 5]] if dtype in (torch.uint8,) else [[0, -1, 2], [3, -4, 5]]
    tensor = torch.tensor(values, dtype=dtype)
    payload = np.array(values, dtype=numpy_dtype).tobytes()
    assert tensor_digest("t", tensor) == reference_digest("t", dtype_name, (2, 3), payload)


@settings(max_examples=40, deadline=None)
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", "<i8", "<i4", "<u1"]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    ),
    name=st.text(min_size=1, max_size=12),
)
def test_random_arrays_match_reference(array, name):
    names = {
        np.dtype(code): name
        for code, name in [("<f4", "F32"), ("<f8", "F64"), ("<i8", "I64"), ("<i4", "I32"), ("<u1", "U8")]
    }
    # from_numpy keeps numpy's strides (stride 0 for empty arrays): a case worth covering.
    tensor = torch.from_numpy(array.copy())
    expected = reference_digest(name, names[array.dtype], tuple(array.shape), array.tobytes())
    assert tensor_digest(name, tensor) == expected


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------


def _small_state() -> dict[str, torch.Tensor]:
    return {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor([1, 2, 3], dtype=torch.int64),
        "é": torch.tensor([True, False]),
        "Z": torch.tensor(0.5, dtype=torch.float16),
    }


@settings(max_examples=30, deadline=None)
@given(order=st.permutations(["b", "a", "é", "Z"]))
def test_root_is_independent_of_insertion_order(order):
    state = _small_state()
    reordered = {name: state[name] for name in order}
    assert checkpoint_root(reordered) == checkpoint_root(state)


def test_root_sorts_by_utf8_bytes():
    state = _small_state()
    digests = {name: tensor_digest(name, t) for name, t in state.items()}
    assert checkpoint_root(state) == reference_root(digests)
    # Swapping two digests (names kept) must change the root: order is by name, not by digest.
    swapped = dict(digests)
    swapped["a"], swapped["b"] = digests["b"], digests["a"]
    assert reference_root(swapped) != checkpoint_root(state)


def test_root_changes_when_any_single_byte_changes():
    base = torch.tensor([1.5, -2.0, 3.0], dtype=torch.float32)
    root = checkpoint_root({"w": base})
    raw = bytearray(np.asarray(base).tobytes())
    seen = {root}
    for index in range(len(raw)):
        edited = bytearray(raw)
        edited[index] ^= 0x01
        tensor = torch.from_numpy(np.frombuffer(bytes(edited), dtype="<f4").copy())
        seen.add(checkpoint_root({"w": tensor}))
    assert len(seen) == len(raw) + 1


def test_root_changes_with_dtype_for_the_same_bytes():
    as_float = torch.tensor([1.0, 2.0], dtype=torch.float32)
    as_int = as_float.view(torch.int32)
    assert np.asarray(as_int).tobytes() == np.asarray(as_float).tobytes()
    assert checkpoint_root({"w": as_float}) != checkpoint_root({"w": as_int})


def test_root_changes_with_shape_for_the_same_bytes():
    flat = torch.arange(6, dtype=torch.float32)
    shapes = [(6,), (2, 3), (3, 2), (1, 6), (6, 1), (1, 2, 3)]
    roots = {checkpoint_root({"w": flat.reshape(shape)}) for shape in shapes}
    assert len(roots) == len(shapes)


def test_root_changes_with_a_name():
    tensor = torch.ones(2)
    names = ["w", "W", "w ", "w\x00", "ẃ", "layer.w"]
    roots = {checkpoint_root({name: tensor}) for name in names}
    assert len(roots) == len(names)
    # Moving bytes between name and data must not collide either.
    assert checkpoint_root({"ab": torch.ones(1), "c": torch.ones(1)}) != checkpoint_root(
        {"a": torch.ones(1), "bc": torch.ones(1)}
    )


def test_root_changes_when_a_tensor_is_added_or_removed():
    state = _small_state()
    fewer = dict(state)
    del fewer["a"]
    more = dict(state, extra=torch.zeros(1))
    assert len({checkpoint_root(state), checkpoint_root(fewer), checkpoint_root(more)}) == 3


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t.t(),
        lambda t: t[:, ::2],
        lambda t: t[1:, 1:],
        lambda t: t[0].unsqueeze(0).expand(3, 4),
        lambda t: t.permute(1, 0)[1:3],
        lambda t: t.reshape(-1)[::13],  # one element, stride 13: torch calls it contiguous
        lambda t: t[:1, ::7],
        lambda t: t.reshape(-1)[:1].expand(0),  # empty, stride 0
    ],
)
def test_strided_tensor_hashes_as_its_contiguous_copy(view):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensor = view(base)
    assert tensor.stride() != torch.empty(tensor.shape).stride()
    assert tensor_digest("w", tensor) == tensor_digest("w", tensor.contiguous())
    payload = np.ascontiguousarray(np.asarray(tensor)).tobytes()
    assert tensor_digest("w", tensor) == reference_digest("w", "F32", tuple(tensor.shape), payload)


def test_gradient_tracking_does_not_change_the_digest():
    tensor = torch.tensor([1.0, 2.0], requires_grad=True)
    assert tensor_digest("w", tensor) == tensor_digest("w", tensor.detach())


def test_tensor_digests_and_root_from_digests_agree_with_checkpoint_root():
    state = _small_state()
    by_name = tensor_digests(state)
    assert set(by_name) == set(state)
    assert all(len(d) == 64 and d == d.lower() for d in by_name.values())
    pairs = [(name, bytes.fromhex(d)) for name, d in by_name.items()]
    assert root_from_digests(pairs) == checkpoint_root(state)


# ---------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_unsupported_dtype_is_an_input_error(dtype):
    with pytest.raises(InputError, match="unsupported dtype"):
        tensor_digest("w", torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("name", ["", "\ud800"])
def test_bad_tensor_name_is_an_input_error(name):
    with pytest.raises(InputError):
        tensor_digest(name, torch.zeros(1))


def test_duplicate_names_are_refused():
    digest = tensor_digest("w", torch.zeros(1))
    with pytest.raises(InputError, match="same name"):
        root_from_digests([("w", digest), ("w", digest)])


def test_short_digest_is_refused():
    with pytest.raises(InputError, match="32 bytes"):
        root_from_digests([("w", b"\x00" * 31)])


# ---------------------------------------------------------------------------------------
# File sha256
# ---------------------------------------------------------------------------------------


def test_sha256_stream_known_answer():
    # FIPS 180-2 test vector for "abc".
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_stream(io.BytesIO(b"abc")) == expected


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=2048), chunk=st.integers(min_value=1, max_value=300))
def test_sha256_stream_is_plain_sha256_for_any_chunking(data, chunk):
    assert sha256_stream(io.BytesIO(data), chunk_bytes=chunk) == hashlib.sha256(data).hexdigest()
