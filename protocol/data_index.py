"""The signed data index of a ``files`` run, and which tokens a peer trains on in a round.

The coordinator tokenizes its corpus at launch into token shards: flat little-endian arrays of
``uint16`` (vocabularies up to 65,536) or ``uint32`` token ids, each named by the sha256 of its
bytes. The index lists them, training and held-out apart, with their token counts; it is signed
by the coordinator's key and the manifest names it by sha256 (``data.index``), so a peer that
holds the manifest can check every byte it trains on.

Which windows a peer trains on is a pure function of the manifest, the index, the peer's id and
the round (``round_shard``, ``window_starts``): one shard per (peer, round), drawn with odds in
proportion to its window starts, then ``batch_size`` window starts in it per inner step. Every
draw is an integer from sha256 (no floating point, no torch generator), so it is the same on
every machine and every torch build. Anyone
can recompute what a peer trained on, and a peer downloads only the shards of its own rounds.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

import torch

from protocol.errors import MalformedRecord, SignatureError
from protocol.signing import SigningKey, key_id, verify_signature
from protocol.wire import PROTOCOL_VERSION, canonical_bytes, decode_map, is_hex, is_wire_int

__all__ = [
    "INDEX_MAX_BYTES", "SHARD_MAX_TOKENS", "Shard", "DataIndex", "SignedDataIndex",
    "dtype_for_vocab", "round_shard", "window_starts", "heldout_starts",
]

INDEX_MAX_BYTES = 64 * 1024 * 1024
"""No data index is larger (about 750,000 shards)."""
SHARD_MAX_TOKENS = 1 << 28
"""No shard holds more tokens (1 GiB of uint32)."""
_MAX_SHARDS = 1 << 20
_DOMAIN = "barnraise/data-index"
"""Signed bytes start with this record kind, so a data index signature fits no other record."""


def dtype_for_vocab(vocab_size: int) -> Literal["uint16", "uint32"]:
    """The narrowest token dtype that holds ids below ``vocab_size``."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class Shard:
    """One token shard: the sha256 of its bytes and its token count (its dtype is the index's)."""

    sha256: str
    tokens: int


@dataclass(frozen=True, kw_only=True)
class DataIndex:
    """Token shards of a run: training and held-out, with the tokenizer they came from."""

    tokenizer: str
    """``bytes`` or the tokenizer file's sha256 (hex)."""
    vocab_size: int
    """Token ids are below this (the tokenizer's vocabulary)."""
    dtype: Literal["uint16", "uint32"]
    separator: int
    """The token id appended after each document (-1: none)."""
    train: tuple[Shard, ...]
    heldout: tuple[Shard, ...]

    def __post_init__(self) -> None:
        if not (self.tokenizer == "bytes" or is_hex(self.tokenizer, 64)):
            raise MalformedRecord("data index: tokenizer must be 'bytes' or 64 hex digits")
        if not is_wire_int(self.vocab_size) or not 2 <= self.vocab_size <= 1 << 32:
            raise MalformedRecord("data index: vocab_size out of range")
        if self.dtype != dtype_for_vocab(self.vocab_size):
            raise MalformedRecord(f"data index: dtype {self.dtype!r} does not fit vocab_size {self.vocab_size}")
        if not is_wire_int(self.separator) or not -1 <= self.separator < self.vocab_size:
            raise MalformedRecord("data index: separator must be -1 or a token id")
        for split in ("train", "heldout"):
            shards = getattr(self, split)
            if not 0 < len(shards) <= _MAX_SHARDS:
                raise MalformedRecord(f"data index: {split} must list 1 to {_MAX_SHARDS} shards")
            for shard in shards:
                if not is_hex(shard.sha256, 64) or not is_wire_int(shard.tokens) or not 0 < shard.tokens <= SHARD_MAX_TOKENS:
                    raise MalformedRecord(f"data index: a {split} shard has a bad sha256 or token count")

    @property
    def token_bytes(self) -> int:
        return 2 if self.dtype == "uint16" else 4

    def shard_bytes(self, shard: Shard) -> int:
        return shard.tokens * self.token_bytes

    def to_wire(self) -> dict[str, Any]:
        split = lambda shards: [[s.sha256, s.tokens] for s in shards]  # noqa: E731
        return {"version": PROTOCOL_VERSION, "tokenizer": self.tokenizer, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "separator": self.separator, "train": split(self.train),
                "heldout": split(self.heldout)}

    @classmethod
    def from_wire(cls, mapping: Any) -> DataIndex:
        fields = {"version", "tokenizer", "vocab_size", "dtype", "separator", "train", "heldout"}
        if not isinstance(mapping, dict) or set(mapping) != fields:
            raise MalformedRecord(f"data index: expected exactly the fields {', '.join(sorted(fields))}")
        if mapping["version"] != PROTOCOL_VERSION:
            raise MalformedRecord(f"data index: protocol version {mapping['version']!r} is not {PROTOCOL_VERSION}")

        def shards(value: Any, split: str) -> tuple[Shard, ...]:
            if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == 2 for v in value):
                raise MalformedRecord(f"data index: {split} must be a list of [sha256, tokens] pairs")
            return tuple(Shard(v[0], v[1]) for v in value)

        if not isinstance(mapping["tokenizer"], str) or mapping["dtype"] not in ("uint16", "uint32"):
            raise MalformedRecord("data index: tokenizer must be a string and dtype uint16 or uint32")
        return cls(tokenizer=mapping["tokenizer"], vocab_size=mapping["vocab_size"], dtype=mapping["dtype"],
                   separator=mapping["separator"], train=shards(mapping["train"], "train"),
                   heldout=shards(mapping["heldout"], "heldout"))

    def sign(self, key: SigningKey) -> SignedDataIndex:
        return SignedDataIndex(index=self, signer=key.public_key_hex,
                               signature=key.sign(_signed_bytes(self)))


def _signed_bytes(index: DataIndex) -> bytes:
    return _DOMAIN.encode() + b"\x00" + canonical_bytes(index.to_wire())


@dataclass(frozen=True, kw_only=True)
class SignedDataIndex:
    """The index with the coordinator's signature; its bytes' sha256 is the manifest's ``data.index``."""

    index: DataIndex
    signer: str
    signature: str

    def verify(self, coordinator_key: str) -> DataIndex:
        if self.signer != coordinator_key:
            raise SignatureError(f"data index is signed by key {key_id(self.signer)}, not the run's coordinator")
        verify_signature(self.signer, _signed_bytes(self.index), self.signature, what="data index")
        return self.index

    def to_bytes(self) -> bytes:
        return canonical_bytes({"index": self.index.to_wire(), "signer": self.signer, "signature": self.signature})

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedDataIndex:
        mapping = decode_map(raw, what="data index", max_bytes=INDEX_MAX_BYTES, max_container=2 * _MAX_SHARDS)
        if set(mapping) != {"index", "signer", "signature"}:
            raise MalformedRecord("data index: expected exactly the fields 'index', 'signer' and 'signature'")
        if not is_hex(mapping["signer"], 64) or not isinstance(mapping["signature"], str):
            raise MalformedRecord("data index: signer must be 64 hex digits and signature a hex string")
        return cls(index=DataIndex.from_wire(mapping["index"]), signer=mapping["signer"],
                   signature=mapping["signature"])


def _draw(below: int, *parts: object) -> int:
    """An integer in [0, below) from sha256(repr(parts)): the same on every machine, torch or not
    (128 bits reduced modulo ``below``; the bias is below 2**-64 for any count of tokens)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:16], "little") % below


def round_shard(index: DataIndex, *, seed: int, width: int, peer_id: str, round: int) -> int:
    """The training shard peer ``peer_id`` draws round ``round``'s windows from: a shard with
    odds in proportion to its window starts (``tokens − width + 1``); shards shorter than a window
    are never drawn."""
    bounds, total = [], 0
    for shard in index.train:
        total += max(0, shard.tokens - width + 1)
        bounds.append(total)
    if total <= 0:
        raise MalformedRecord(f"data index: no training shard holds a window of {width} tokens")
    return bisect.bisect_right(bounds, _draw(total, seed, "shard", peer_id, round))


def window_starts(tokens: int, *, seed: int, width: int, batch_size: int, peer_id: str, round: int,
                  step: int) -> torch.Tensor:
    """[batch_size] int64 starts of the windows of inner step ``step`` in a shard of ``tokens`` tokens."""
    count = tokens - width + 1
    return torch.tensor([_draw(count, seed, peer_id, round, step, k) for k in range(batch_size)], dtype=torch.int64)


def heldout_starts(total: int, *, width: int, count: int) -> torch.Tensor:
    """[count] evenly spaced window starts over ``total`` held-out tokens (fixed; integer arithmetic,
    so the last window ends exactly at the last token however large ``total`` is)."""
    last = total - width
    if count == 1:
        return torch.zeros(1, dtype=torch.int64)
    return torch.tensor([i * last // (count - 1) for i in range(count)], dtype=torch.int64)
