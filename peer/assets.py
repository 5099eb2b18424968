"""What a peer needs besides the manifest, fetched into ``WORKDIR/blobs`` and checked by sha256.

The manifest names the model config, the tokenizer and the signed data index by sha256; the index
names every token shard by sha256. A peer fetches the config, the tokenizer and the index when it
joins, and a shard only when one of its rounds draws from it (``peer.data.ShardCorpus``). Each comes
from this peer's cache when it holds it, else from the coordinator, else from any peer that holds
it (``peer.swarm``: peers serve their cache by sha256), so a peer joined with ``--initial-peers``
trains on while the coordinator is down.

A hostile coordinator signs the manifest and the index, so what a peer fetches is bounded by
more than their word: a file whose size they do not state is fetched only up to its kind's cap
(``CONFIG_MAX_BYTES``, ``INDEX_MAX_BYTES``, ``TOKENIZER_MAX_BYTES``), a shard only up to the size
the index gives it (at most ``SHARD_MAX_TOKENS`` tokens, one per round), and the model config
must build no more parameters than the manifest states, the number this peer's memory check
(``peer.model.check_memory``) was made for, before anything builds the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from peer.blobs import BlobCache, BlobSource
from peer.coordinator_client import CoordinatorClient
from peer.data import Corpus, ShardCorpus, load_corpus
from peer.model import count_parameters
from protocol.data_index import INDEX_MAX_BYTES, SignedDataIndex
from protocol.errors import InputError
from protocol.manifest import ModelConfig, RunManifest, blob_digest, is_blob_ref

__all__ = ["RunAssets", "open_assets", "coordinator_source", "CONFIG_MAX_BYTES", "TOKENIZER_MAX_BYTES"]

CONFIG_MAX_BYTES = 1024 * 1024
"""The largest model config fetched (a transformers config.json is a few KiB)."""
TOKENIZER_MAX_BYTES = 256 * 1024 * 1024
"""The largest tokenizer file fetched (its size is not signed), and the cap of any blob of unknown size."""


@dataclass
class RunAssets:
    """The run's model config bytes (None: the built-in GPT-2, or a config inline in the manifest) and its data."""

    config_json: bytes | None
    corpus: Corpus | ShardCorpus


def coordinator_source(client: CoordinatorClient) -> BlobSource:
    """Blobs from the coordinator's ``/blobs/<sha256>``."""

    def fetch(sha256: str, size: int, destination: Path) -> None:
        client.download(f"/blobs/{sha256}", destination, size if size >= 0 else TOKENIZER_MAX_BYTES)

    return fetch


def open_assets(manifest: RunManifest, folder: Path, sources: Sequence[tuple[str, BlobSource]]) -> RunAssets:
    """Fetch (or find in ``folder``) and check the config, tokenizer and data index the manifest names."""
    model, data = manifest.config.model, manifest.config.data
    if not is_blob_ref(model.config) and data.corpus == "python-stdlib":  # an inline config is in the manifest
        _check_size(model, None)
        return RunAssets(None, load_corpus(data))
    cache = BlobCache(folder, sources)
    config_json = None
    if is_blob_ref(model.config):
        config_json = BlobCache(folder, _at_most(sources, CONFIG_MAX_BYTES)).read(blob_digest(model.config), "the model config")
        if len(config_json) > CONFIG_MAX_BYTES:
            raise InputError(f"the model config is larger than {CONFIG_MAX_BYTES} bytes")
    _check_size(model, config_json)
    if data.corpus == "python-stdlib":
        return RunAssets(config_json, load_corpus(data))
    raw = BlobCache(folder, _at_most(sources, INDEX_MAX_BYTES)).read(blob_digest(data.index), "the data index")
    if len(raw) > INDEX_MAX_BYTES:
        raise InputError(f"the data index is larger than {INDEX_MAX_BYTES} bytes")
    index = SignedDataIndex.from_bytes(raw).verify(manifest.coordinator_key)
    wanted = "bytes" if data.tokenizer == "bytes" else blob_digest(data.tokenizer)
    if index.tokenizer != wanted:
        raise InputError("the data index was made with another tokenizer than the manifest names")
    if data.tokenizer != "bytes":
        cache.fetch(index.tokenizer, -1, "the tokenizer")
    return RunAssets(config_json, ShardCorpus(index, cache, data))


def _at_most(sources: Sequence[tuple[str, BlobSource]], max_bytes: int) -> list[tuple[str, BlobSource]]:
    """The sources, each asked for at most ``max_bytes`` of a blob whose size is not known (a
    source takes ``size`` as the most it accepts)."""

    def capped(source: BlobSource) -> BlobSource:
        return lambda sha256, size, destination: source(sha256, size if size >= 0 else max_bytes, destination)

    return [(name, capped(source)) for name, source in sources]


def _check_size(model: ModelConfig, config_json: bytes | None) -> None:
    """``VerificationError`` when the model the config builds has more parameters than the manifest
    states (the runner checked memory for that number; with none stated, it counted them itself)."""
    if model.parameters:
        count_parameters(model, config_json, at_most=model.parameters)
