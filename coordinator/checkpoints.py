"""Writing checkpoints: safetensors files in ``checkpoints/r000042/``, hashed, then recorded.

A checkpoint is written to a hidden partial folder, each file fsynced, and the folder renamed
into place; only then is the ledger entry appended. A crash before the append leaves at most
an unrecorded folder, which the next checkpoint of the same round replaces.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from coordinator.audit import file_record
from peer.blobs import BlobStore
from peer.data import Corpus, ShardCorpus
from peer.model import build_model, heldout_loss, load_parameters
from peer.state import RoundState, StateLayout
from peer.workdir import fsync_folder
from protocol.errors import HashMismatch, InputError
from protocol.manifest import RunManifest, blob_digest
from protocol.records import FileRecord

__all__ = ["CheckpointWriter", "MODEL_FILE", "OUTER_FILE"]

MODEL_FILE = "model.safetensors"
OUTER_FILE = "outer.safetensors"


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


class CheckpointWriter:
    """Writes a round's state as files, hashes them, and scores held-out loss."""

    def __init__(self, folder: Path, manifest: RunManifest, corpus: Corpus | ShardCorpus,
                 config_json: bytes | None = None, blobs: BlobStore | None = None):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(".r*.partial"):  # a write cut short by a crash
            shutil.rmtree(leftover, ignore_errors=True)
        self.model_config = manifest.config.model
        self.config_json = config_json
        self.corpus = corpus
        """The run's training data too: spot checks replay peers' rounds on it (``coordinator.spotcheck``)."""
        self.blobs = blobs
        self.model = build_model(self.model_config, config_json)
        self.layout = StateLayout.of(self.model)
        self.windows = corpus.heldout_windows(manifest.config.data)

    def path(self, round: int) -> Path:
        return self.folder / f"r{round:06d}"

    def write(self, state: RoundState) -> list[FileRecord]:
        """Write ``state`` as ``r<round>/{model,outer}.safetensors``; return their records."""
        final = self.path(state.round)
        partial = self.folder / f".{final.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        try:
            for name, flat in ((MODEL_FILE, state.parameters), (OUTER_FILE, state.momentum)):
                tensors = {n: t.clone().contiguous() for n, t in self.layout.views(flat).items()}
                save_file(tensors, str(partial / name), metadata={"round": str(state.round)})
                _fsync_file(partial / name)
            if final.exists():
                shutil.rmtree(final)  # an unrecorded leftover of an earlier attempt at this round
            os.replace(partial, final)
            fsync_folder(self.folder)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return self.records(state.round)

    def records(self, round: int) -> list[FileRecord]:
        """File records of an existing checkpoint folder (model file first)."""
        return [file_record(self.path(round) / name) for name in (MODEL_FILE, OUTER_FILE)]

    def heldout_loss(self, state: RoundState) -> float | None:
        """Held-out loss (nats/token), or None if the model has diverged (not a finite number)."""
        load_parameters(self.model, self.layout.views(state.parameters))
        loss = heldout_loss(self.model, self.windows)
        return round(loss, 6) if math.isfinite(loss) else None

    def genesis(self) -> RoundState:
        """Round 0: the model initialised from ``init_seed`` (or the ``init`` weights) and zero momentum."""
        if self.model_config.init:
            if self.blobs is None:
                raise InputError("model.init needs the run's blob store")
            path = self.blobs.path(blob_digest(self.model_config.init))
            try:
                tensors = load_file(str(path))
            except (OSError, SafetensorError) as error:
                raise InputError(f"model.init is not a safetensors file ({error})") from None
            try:
                flat = self.layout.flatten(tensors)
            except HashMismatch as error:
                raise InputError(f"model.init does not fit model.config: {error}") from None
            if not torch.isfinite(flat).all():
                raise InputError("model.init holds values that are not finite")
        else:
            flat = torch.nn.utils.parameters_to_vector(build_model(self.model_config, self.config_json).parameters())
            flat = flat.detach()
        return RoundState(0, flat, torch.zeros_like(flat))

    def read(self, round: int) -> RoundState:
        """The state a recorded checkpoint folder holds (its files were verified at launch)."""
        folder = self.path(round)
        parameters = self.layout.flatten(load_file(str(folder / MODEL_FILE)))
        momentum = self.layout.flatten(load_file(str(folder / OUTER_FILE)))
        return RoundState(round, parameters, momentum)
