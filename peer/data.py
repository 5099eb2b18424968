"""The reference corpus: the Python standard library's own ``.py`` files, as bytes.

Every machine with Python has it, so a run needs no download. Files are taken in sorted
order of their path relative to the standard library's root; a file goes to the held-out
split when the first 8 hex digits of sha256(relative path) are below ``heldout_percent``
of 2**32, so the split does not depend on which other files exist.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol.errors import InputError
from protocol.manifest import DataSpec

__all__ = ["Corpus", "load_corpus", "training_batch", "heldout_windows"]

_SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """Training and held-out bytes as flat uint8 tensors."""

    train: torch.Tensor
    heldout: torch.Tensor
    files: int


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
