"""Tokenizing a run's corpus into content-addressed token shards, streamed.

Files are read one at a time, in sorted path order, with Hugging Face ``datasets`` in streaming
mode (so a corpus larger than memory works): ``.txt`` as documents separated by blank lines,
``.jsonl``/``.json`` and ``.parquet`` by their ``text_field``. A document is held out when the
first 8 hex digits of sha256(its text) fall below ``heldout_percent`` of 2**32, so the split does
not depend on the other documents. Documents are tokenized in batches (``tokenizers``), each
followed by the separator token, and cut into shards of exactly ``shard_tokens`` tokens (the last
of each split shorter). At most one shard per split, plus one batch of text, is in memory.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from peer.blobs import BlobStore
from protocol.data_index import DataIndex, Shard, dtype_for_vocab
from protocol.errors import ConfigError, InputError
from protocol.manifest import DataSpec

__all__ = ["expand_files", "Tokenize", "byte_tokenizer", "file_tokenizer", "build_shards"]

_BATCH_DOCUMENTS = 256
_READ_BYTES = 1 << 20
"""Bytes of a .txt or .jsonl file read at a time (datasets' default of 10 MiB holds ~100 MiB of rows)."""
_SEPARATOR_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

Tokenize = Callable[[list[str]], list[list[int]]]


def expand_files(patterns: tuple[str, ...], base: Path) -> list[Path]:
    """The files the globs name, relative to ``base``, sorted and without repeats; a glob that
    matches nothing, or a file of another type, is a ``ConfigError`` naming it."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        full = pattern if os.path.isabs(pattern) else str(base / pattern)
        matches = [Path(m) for m in glob.glob(full, recursive=True) if Path(m).is_file()]
        if not matches:
            raise ConfigError(f"data.files: {pattern!r} matches no file (relative to {base})")
        for match in matches:
            if match.suffix.lower() not in _BUILDERS:
                raise ConfigError(f"data.files: {match.name} is not .txt, .jsonl, .json or .parquet")
            found[match.resolve().as_posix()] = match
    return [found[k] for k in sorted(found)]


def byte_tokenizer() -> tuple[Tokenize, int, int]:
    """One token per UTF-8 byte; documents end with a blank line (no separator token)."""
    return (lambda texts: [list((text + "\n\n").encode("utf-8")) for text in texts]), 256, -1


def file_tokenizer(path: Path) -> tuple[Tokenize, int, int]:
    """A Hugging Face ``tokenizers`` file: (tokenize, vocabulary size, separator id or -1)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own Exception for any bad file
        raise ConfigError(f"data.tokenizer {path.name} is not a tokenizers file ({str(error)[:200]})") from None
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    separator = next((tokenizer.token_to_id(n) for n in _SEPARATOR_NAMES if tokenizer.token_to_id(n) is not None), -1)

    def tokenize(texts: list[str]) -> list[list[int]]:
        encoded = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [ids + [separator] for ids in encoded] if separator >= 0 else encoded

    return tokenize, vocab, separator


def _documents(path: Path, text_field: str) -> Iterator[str]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only: never ask a hub
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    builder = _BUILDERS[path.suffix.lower()]
    options: dict = {"sample_by": "paragraph", "chunksize": _READ_BYTES} if builder == "text" else {}
    if builder == "json":
        options["chunksize"] = _READ_BYTES
    if builder == "parquet":
        options.update(columns=[text_field], batch_size=_BATCH_DOCUMENTS)
    field = "text" if builder == "text" else text_field
    try:
        rows = datasets.load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **options)
        for number, row in enumerate(rows):
            text = row.get(field)
            if not isinstance(text, str):
                raise InputError(f"{path.name}: row {number} has no text field {field!r}")
            if text.strip():
                yield text
    except InputError:
        raise
    except Exception as error:  # datasets and pyarrow raise many types for a malformed file
        raise InputError(f"{path.name}: cannot be read as {builder} ({' '.join(str(error).split())[:200]})") from None


def _is_heldout(text: str, percent: int) -> bool:
    bucket = int(hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8], 16)
    return bucket < percent * (2**32) // 100


class _Split:
    """Tokens of one split, cut into shards of ``size`` tokens as they come."""

    def __init__(self, store: BlobStore, size: int, dtype: str):
        self.store, self.size, self.dtype = store, size, np.dtype(dtype).newbyteorder("<")
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[Shard] = []

    def add(self, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        while self.pending_tokens >= self.size:
            joined = np.concatenate(self.pending)
            self._write(joined[: self.size])
            rest = joined[self.size :]
            self.pending, self.pending_tokens = [rest], len(rest)

    def finish(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        self.shards.append(Shard(self.store.put_bytes(tokens.tobytes()), int(tokens.size)))


def build_shards(spec: DataSpec, base: Path, store: BlobStore, tokenizer: tuple[Tokenize, int, int],
                 tokenizer_sha256: str, on_line: Callable[[str], None] = lambda line: None) -> DataIndex:
    """Tokenize the files of ``spec`` into shards in ``store``; the (unsigned) index of them."""
    tokenize, vocab, separator = tokenizer
    dtype = dtype_for_vocab(vocab)
    train, heldout = _Split(store, spec.shard_tokens, dtype), _Split(store, spec.shard_tokens, dtype)
    files = expand_files(spec.files, base)
    documents = 0
    for path in files:
        batch: list[str] = []
        for text in _documents(path, spec.text_field):
            batch.append(text)
            if len(batch) == _BATCH_DOCUMENTS:
                documents += _route(batch, tokenize, spec.heldout_percent, train, heldout)
                batch = []
        documents += _route(batch, tokenize, spec.heldout_percent, train, heldout)
    train.finish()
    heldout.finish()
    width = spec.seq_len + 1
    if not any(s.tokens >= width for s in train.shards):
        raise InputError(f"data.files: the training split has no {width} tokens in one shard (is the corpus empty?)")
    if sum(s.tokens for s in heldout.shards) < width:
        raise InputError(f"data.files: fewer than {width} held-out tokens; add text or raise data.heldout_percent")
    on_line(f"tokenized {len(files)} files, {documents} documents: {sum(s.tokens for s in train.shards):,} training "
            f"tokens in {len(train.shards)} shards, {sum(s.tokens for s in heldout.shards):,} held out in "
            f"{len(heldout.shards)}")
    return DataIndex(tokenizer=tokenizer_sha256, vocab_size=vocab, dtype=dtype, separator=separator,
                     train=tuple(train.shards), heldout=tuple(heldout.shards))


def _route(texts: list[str], tokenize: Tokenize, percent: int, train: _Split, heldout: _Split) -> int:
    if not texts:
        return 0
    for text, ids in zip(texts, tokenize(texts), strict=True):
        (heldout if _is_heldout(text, percent) else train).add(ids)
    return len(texts)
