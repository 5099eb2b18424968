"""Turning RUN.toml's files into what the signed manifest names by sha256, in ``WORKDIR/blobs``.

    model.config    a transformers config.json (or an inline table)  -> sha256:<hex> of its bytes
    model.init      starting weights (safetensors)                   -> sha256:<hex>
    data.tokenizer  a tokenizers file                                 -> sha256:<hex>
    data.files      the corpus, tokenized into shards                 -> data.index = sha256:<hex> of
                                                                         the signed data index
    model.parameters                                                  -> counted from the config

Paths are relative to the folder that holds RUN.toml. On a relaunch the data index already named
by the manifest is kept (the corpus is fixed at launch): its shards are re-hashed, not rebuilt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from coordinator.shards import build_shards, byte_tokenizer, file_tokenizer
from peer.blobs import BlobStore
from peer.model import count_parameters, transformers_config
from protocol.data_index import SignedDataIndex
from protocol.errors import ConfigError
from protocol.manifest import INLINE_PREFIX, SHA256_PREFIX, RunConfig, blob_digest, is_blob_ref
from protocol.signing import SigningKey

__all__ = ["resolve_run", "RESOLVED_FIELDS", "check_blobs"]

RESOLVED_FIELDS = {("model", "config"), ("model", "init"), ("model", "parameters"), ("data", "tokenizer"),
                   ("data", "index")}
"""Fields launch fills in from files: a relaunch compares RUN.toml's other fields with the manifest."""


def _file(base: Path, value: str, what: str) -> Path:
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {value!r} (relative to {base})")
    return path


def _model_config_bytes(value: str, base: Path) -> bytes:
    if value.startswith(INLINE_PREFIX):
        return value[len(INLINE_PREFIX):].encode()
    return _file(base, value, "model.config").read_bytes()


def resolve_run(config: RunConfig, base: Path, store: BlobStore, key: SigningKey, *, data_index: str | None = None,
                on_line: Callable[[str], None] = lambda line: None) -> RunConfig:
    """``config`` with every file replaced by its ``sha256:<hex>`` in ``store`` (see the module doc);
    ``data_index``: the index a relaunched run already names (kept, its shards re-checked)."""
    model, data = config.model, config.data
    config_json = None
    if model.config:
        config_json = _model_config_bytes(model.config, base)
        model = dataclasses.replace(model, config=SHA256_PREFIX + store.put_bytes(config_json))
    hf = transformers_config(model, config_json)
    positions = next((getattr(hf, k) for k in ("max_position_embeddings", "n_positions") if hasattr(hf, k)), None)
    if positions is not None and positions < data.seq_len:
        raise ConfigError(f"model config's context ({positions} tokens) is shorter than data.seq_len {data.seq_len}")
    if model.init:
        model = dataclasses.replace(model, init=SHA256_PREFIX + store.put_file(_file(base, model.init, "model.init")))
    model = dataclasses.replace(model, parameters=count_parameters(model, config_json))
    if data.corpus == "files":
        if data.tokenizer == "bytes":
            tokenizer, tokenizer_sha = byte_tokenizer(), "bytes"
        else:
            path = _file(base, data.tokenizer, "data.tokenizer")
            tokenizer, tokenizer_sha = file_tokenizer(path), store.put_file(path)
            data = dataclasses.replace(data, tokenizer=SHA256_PREFIX + tokenizer_sha)
        if tokenizer[1] > hf.vocab_size:
            raise ConfigError(f"data.tokenizer has {tokenizer[1]} tokens, more than the model's vocab_size {hf.vocab_size}")
        built = data_index is None
        if built:
            index = build_shards(data, base, store, tokenizer, tokenizer_sha, on_line)
            data_index = SHA256_PREFIX + store.put_bytes(index.sign(key).to_bytes())
        data = dataclasses.replace(data, index=data_index)
    resolved = dataclasses.replace(config, model=model, data=data)
    # shards just built were written from the bytes they were hashed from: only a relaunch re-reads them
    check_blobs(resolved, store, key.public_key_hex, shards=data.corpus == "files" and not built)
    return resolved


def check_blobs(config: RunConfig, store: BlobStore, coordinator_key: str, *, shards: bool = True) -> None:
    """Re-hash every file the resolved ``config`` names (config, init, tokenizer, index, and the
    shards unless ``shards`` is False): ``HashMismatch`` or ``InputError`` names the first one
    missing or changed."""
    model, data = config.model, config.data
    for value, what in ((model.config, "the model config"), (model.init, "the init weights"),
                        (data.tokenizer, "the tokenizer")):
        if is_blob_ref(value):
            store.verify(blob_digest(value), what)
    if is_blob_ref(data.index):
        index = SignedDataIndex.from_bytes(store.read(blob_digest(data.index), "the data index")).verify(coordinator_key)
        for split in ("train", "heldout") if shards else ():
            for number, shard in enumerate(getattr(index, split)):
                store.verify(shard.sha256, f"{split} shard {number}")
