"""Where a peer's starting state comes from, and how each source is verified before use.

A peer starts from the latest checkpoint in the coordinator's ledger (the ledger's chain and
signatures are verified under the manifest's coordinator key, and each downloaded file must
match the entry's sha256, size and canonical root), or, joined by multiaddrs alone, from genesis
rebuilt from the manifest's model config and seed (its root must equal the signed manifest's
``genesis_root``); it then replays the rounds since from their payloads (``peer.runner``). Only
when those rounds have lapsed does it load a live peer's round-boundary state, whose tensors must
hash to the ``state_root`` of the donor's signed progress record.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from peer.coordinator_client import CoordinatorClient
from peer.model import build_model
from peer.state import RoundState, StateLayout
from protocol.errors import HashMismatch, InputError, SignatureError
from protocol.hashing import checkpoint_root, sha256_stream
from protocol.ledger import checkpoint_dir_name, verify_chain
from protocol.manifest import RunManifest
from protocol.records import LedgerEntry, PeerProgress

__all__ = ["StartingState", "state_from_peer", "state_from_checkpoint", "state_from_genesis"]


@dataclass(frozen=True)
class StartingState:
    state: RoundState
    source: str
    """One line for the user: where the state came from and what it was checked against."""


def state_from_peer(record_bytes: bytes, tensors: list[torch.Tensor], manifest: RunManifest, layout: StateLayout) -> StartingState:
    """Verify a downloaded state against the donor's signed progress record."""
    record = PeerProgress.from_bytes(record_bytes).verify()
    if record.run_id != manifest.run_id:
        raise SignatureError(f"state donor {record.peer_id} is on run {record.run_id}, not {manifest.run_id}")
    if len(tensors) != 2 or any(t.dtype != torch.float32 or t.dim() != 1 for t in tensors):
        raise HashMismatch(f"state from peer {record.peer_id} is not two flat float32 vectors")
    state = RoundState(record.round, tensors[0].clone(), tensors[1].clone())
    root = state.root(layout)
    if root != record.state_root:
        raise HashMismatch(f"state from peer {record.peer_id} hashes to {root[:16]}, its signed record says {record.state_root[:16]}")
    return StartingState(state, f"round {record.round} from peer {record.peer_id} (root {root[:16]} matches its signed record)")


def _file_ok(path: Path, sha256: str, size: int) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    with path.open("rb") as stream:
        return sha256_stream(stream) == sha256


def state_from_checkpoint(
    client: CoordinatorClient, manifest: RunManifest, layout: StateLayout, folder: Path, config_json: bytes | None = None
) -> tuple[StartingState, list[LedgerEntry]]:
    """Download the latest ledger checkpoint into ``folder`` and verify it against the ledger (genesis
    is rebuilt from the manifest instead, when this machine's torch rebuilds it bit for bit)."""
    ledger = client.ledger()
    verify_chain(ledger, manifest.coordinator_key, run_id=manifest.run_id)
    entry = ledger[-1]
    if entry.kind == "genesis":  # rebuilt here from the manifest: nothing to download
        try:
            return state_from_genesis(manifest, layout, config_json), ledger
        except HashMismatch:
            pass  # init weights, or another torch initialises differently: download the recorded genesis
    names = {f.name for f in entry.files}
    if not {"model.safetensors", "outer.safetensors"} <= names:
        raise InputError(f"ledger entry {entry.seq} does not list model.safetensors and outer.safetensors")
    target = folder / checkpoint_dir_name(entry)
    target.mkdir(parents=True, exist_ok=True)
    loaded = {}
    for record in entry.files:
        path = target / record.name
        if not _file_ok(path, record.sha256, record.size):
            client.download(f"/checkpoints/{target.name}/{record.name}", path, record.size)
            if not _file_ok(path, record.sha256, record.size):
                path.unlink(missing_ok=True)
                raise HashMismatch(f"ledger entry {entry.seq}: {record.name} does not match its sha256")
        tensors = load_file(str(path))
        if checkpoint_root(tensors) != record.root:
            shutil.rmtree(target, ignore_errors=True)
            raise HashMismatch(f"ledger entry {entry.seq}: {record.name} does not match its canonical root")
        loaded[record.name] = tensors
    state = RoundState(
        entry.round,
        layout.flatten(loaded["model.safetensors"]),
        layout.flatten(loaded["outer.safetensors"]),
    )
    return StartingState(state, f"checkpoint of round {entry.round} (ledger entry {entry.seq}, root {entry.checkpoint_root[:16]} verified)"), ledger


def state_from_genesis(manifest: RunManifest, layout: StateLayout, config_json: bytes | None = None) -> StartingState:
    """Rebuild genesis from the manifest and check it against the signed genesis root (``HashMismatch``
    when it differs, or when genesis is the run's ``init`` weights, which are downloaded instead)."""
    if manifest.config.model.init:
        raise HashMismatch("genesis is the run's init weights: it is downloaded, not rebuilt")
    model = build_model(manifest.config.model, config_json)
    root = checkpoint_root(dict(model.named_parameters()))
    if root != manifest.genesis_root:
        raise HashMismatch(
            f"rebuilt genesis hashes to {root[:16]}, the manifest says {manifest.genesis_root[:16]} "
            "(a different torch version initialises differently: join with --coordinator to download it)"
        )
    flat = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    return StartingState(RoundState(0, flat, torch.zeros_like(flat)), f"genesis (root {root[:16]} matches the signed manifest)")
