"""Training data: the reference corpus (the standard library, as bytes) or a run's token shards.

Both give the trainer ``batch(spec, batch_size, peer_id=, round=, step=)`` ([B, seq_len + 1]
int64 windows, fixed by the manifest, the peer and the round) and the coordinator
``heldout(spec)`` (the fixed held-out windows).

``ShardCorpus``: the token shards of a ``files`` run (``protocol.data_index``), fetched into the
peer's cache only when a round of this peer draws from them, and checked against the signed
index each time one is loaded.

The reference corpus is the Python standard library's own ``.py`` files, as bytes.
Every machine with Python has it, so a run needs no download. Files are taken in sorted
order of their path relative to the standard library's root; a file goes to the held-out
split when the first 8 hex digits of sha256(relative path) are below ``heldout_percent``
of 2**32, so the split does not depend on which other files exist.
"""

from __future__ import annotations

import hashlib
import sysconfig
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peer.blobs import BlobCache
from protocol.data_index import DataIndex, Shard, heldout_starts, round_shard, window_starts
from protocol.errors import InputError
from protocol.manifest import DataSpec

__all__ = ["Corpus", "ShardCorpus", "load_corpus", "training_batch", "heldout_windows"]

_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """Training and held-out bytes as flat uint8 tensors."""

    train: torch.Tensor
    heldout: torch.Tensor
    files: int

    def batch(self, spec: DataSpec, batch_size: int, *, peer_id: str, round: int, step: int) -> torch.Tensor:
        return training_batch(self, spec, batch_size, peer_id=peer_id, round=round, step=step)

    def heldout_windows(self, spec: DataSpec) -> torch.Tensor:
        return heldout_windows(self, spec)

    def prefetch(self, peer_id: str, round: int) -> None:
        """Nothing to fetch: every machine has the corpus."""


def _stdlib_files(root: Path) -> list[Path]:
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(
        (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _is_heldout(relative: str, percent: int) -> bool:
    bucket = int(hashlib.sha256(relative.encode("utf-8")).hexdigest()[:8], 16)
    return bucket < percent * (2**32) // 100


def load_corpus(spec: DataSpec, root: Path | None = None) -> Corpus:
    """Read the corpus named by ``spec`` (``root`` overrides the standard library's folder)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = _stdlib_files(root)
    train, heldout = bytearray(), bytearray()
    for path in files:
        relative = path.relative_to(root).as_posix()
        target = heldout if _is_heldout(relative, spec.heldout_percent) else train
        target += path.read_bytes() + _SEPARATOR
    if len(train) <= spec.seq_len + 1 or len(heldout) <= spec.seq_len + 1:
        raise InputError(f"corpus under {root} is too small for seq_len {spec.seq_len}")
    as_tensor = lambda raw: torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # noqa: E731
    return Corpus(train=as_tensor(train), heldout=as_tensor(heldout), files=len(files))


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def training_batch(corpus: Corpus, spec: DataSpec, batch_size: int, *, peer_id: str, round: int, step: int) -> torch.Tensor:
    """[batch_size, seq_len + 1] int64 windows of training bytes, fixed by (seed, peer, round, step).

    Each peer draws its own windows, so peers cover different data (their own shard of
    the sample stream) while any one draw is reproducible.
    """
    generator = torch.Generator().manual_seed(_seed(spec.seed, peer_id, round, step))
    width = spec.seq_len + 1
    starts = torch.randint(0, corpus.train.numel() - width, (batch_size,), generator=generator)
    offsets = starts[:, None] + torch.arange(width)[None, :]
    return corpus.train[offsets].long()


def heldout_windows(corpus: Corpus, spec: DataSpec) -> torch.Tensor:
    """[eval_windows, seq_len + 1] int64 held-out windows at evenly spaced offsets (fixed)."""
    width = spec.seq_len + 1
    starts = torch.linspace(0, corpus.heldout.numel() - width - 1, spec.eval_windows).long()
    offsets = starts[:, None] + torch.arange(width)[None, :]
    return corpus.heldout[offsets].long()


_LOADED_SHARDS = 2
"""Decoded shards kept in memory (this round's, and the next one's while it is fetched)."""


class ShardCorpus:
    """A ``files`` run's token shards: fetched on demand into ``cache``, checked when loaded."""

    def __init__(self, index: DataIndex, cache: BlobCache, spec: DataSpec):
        self.index, self.cache, self.spec = index, cache, spec
        self._drawn: tuple[tuple[str, int], int] | None = None
        self._loaded: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, shard: Shard, what: str) -> torch.Tensor:
        with self._lock:
            if (hit := self._loaded.get(shard.sha256)) is not None:
                self._loaded.move_to_end(shard.sha256)
                return hit
        raw = self.cache.read(shard.sha256, what, self.index.shard_bytes(shard))
        dtype = np.dtype(self.index.dtype).newbyteorder("<")
        wide = np.int32 if self.index.dtype == "uint16" else np.int64  # uint32 ids do not fit int32
        tokens = torch.from_numpy(np.frombuffer(raw, dtype=dtype).astype(wide))
        if tokens.numel() != shard.tokens:
            raise InputError(f"{what} holds {tokens.numel()} tokens, the data index says {shard.tokens}")
        if tokens.numel() and int(tokens.max()) >= self.index.vocab_size:
            raise InputError(f"{what} holds a token id beyond the vocabulary of {self.index.vocab_size}")
        with self._lock:
            self._loaded[shard.sha256] = tokens
            while len(self._loaded) > _LOADED_SHARDS:
                self._loaded.popitem(last=False)
        return tokens

    def _round_shard(self, spec: DataSpec, peer_id: str, round: int) -> tuple[int, Shard]:
        if self._drawn is None or self._drawn[0] != (peer_id, round):  # once per round, not per step
            number = round_shard(self.index, seed=spec.seed, width=spec.seq_len + 1, peer_id=peer_id, round=round)
            self._drawn = ((peer_id, round), number)
        number = self._drawn[1]
        return number, self.index.train[number]

    def batch(self, spec: DataSpec, batch_size: int, *, peer_id: str, round: int, step: int) -> torch.Tensor:
        number, shard = self._round_shard(spec, peer_id, round)
        tokens = self._tokens(shard, f"training shard {number}")
        width = spec.seq_len + 1
        starts = window_starts(shard.tokens, seed=spec.seed, width=width, batch_size=batch_size, peer_id=peer_id,
                               round=round, step=step)
        return tokens[starts[:, None] + torch.arange(width)[None, :]].long()

    def prefetch(self, peer_id: str, round: int) -> None:
        """Fetch (not load) the shard a round of this peer draws from, if this cache lacks it."""
        number, shard = self._round_shard(self.spec, peer_id, round)
        self.cache.fetch(shard.sha256, self.index.shard_bytes(shard), f"training shard {number}")

    def heldout_windows(self, spec: DataSpec) -> torch.Tensor:
        """[eval_windows, seq_len + 1] windows evenly spaced over the held-out shards, end to end."""
        width = spec.seq_len + 1
        shards = self.index.heldout
        total = sum(s.tokens for s in shards)
        starts = heldout_starts(total, width=width, count=spec.eval_windows)
        bounds = np.cumsum([0] + [s.tokens for s in shards])
        windows = []
        for start in starts.tolist():
            pieces, position = [], start
            while position < start + width:
                number = int(np.searchsorted(bounds, position, side="right") - 1)
                tokens = self._tokens(shards[number], f"held-out shard {number}")
                offset = position - int(bounds[number])
                piece = tokens[offset : offset + (start + width - position)]
                pieces.append(piece)
                position += piece.numel()
            windows.append(torch.cat(pieces))
        return torch.stack(windows).long()
