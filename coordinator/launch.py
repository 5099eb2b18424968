"""Launching (or resuming) a run in a working folder: key, manifest, genesis, ledger.

    WORKDIR/coordinator.key     Ed25519 private key (PEM, mode 0600): signs manifest and ledger
    WORKDIR/coordinator.pub     its public key (PEM), for auditors
    WORKDIR/manifest.msgpack    the signed run manifest
    WORKDIR/ledger.sqlite       the ledger (SQLite, WAL)
    WORKDIR/checkpoints/        r000000/ (genesis), r000005/, ... each model + outer safetensors
    WORKDIR/p2p.key             the DHT node's libp2p identity, so peers find it again after a restart
    WORKDIR/swarm.json          ports and peers last seen, for a relaunch
    WORKDIR/ledger.jsonl        the ledger exported for auditors, rewritten after each entry
    WORKDIR/endpoint.json       the HTTP address and DHT multiaddrs while the coordinator serves

Relaunching with the same RUN.toml resumes: the ledger's whole chain is re-checked and
the head checkpoint's files are re-hashed. A changed RUN.toml is refused.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.checkpoints import CheckpointWriter
from coordinator.ledger_store import LedgerStore
from peer.data import load_corpus
from peer.workdir import load_or_create_key, write_atomic
from protocol.errors import ConfigError, HashMismatch
from protocol.hashing import checkpoint_root
from protocol.ledger import next_entry
from protocol.manifest import RunConfig, RunManifest, SignedManifest
from protocol.signing import SigningKey, public_key_to_pem

__all__ = ["LaunchedRun", "prepare_run", "config_difference"]


@dataclass
class LaunchedRun:
    key: SigningKey
    signed: SignedManifest
    ledger: LedgerStore
    checkpoints: CheckpointWriter
    resumed: bool

    @property
    def manifest(self) -> RunManifest:
        return self.signed.manifest


def config_difference(old: RunConfig, new: RunConfig) -> str | None:
    """The first field (``section.key``) whose value differs, or None."""
    if old.name != new.name:
        return "run.name"
    for section in ("model", "data", "training", "averaging", "checkpoints"):
        for field in dataclasses.fields(getattr(old, section)):
            if getattr(getattr(old, section), field.name) != getattr(getattr(new, section), field.name):
                return f"{section}.{field.name}"
    return None


def _load_manifest(path: Path, key: SigningKey, config: RunConfig) -> SignedManifest:
    signed = SignedManifest.from_bytes(path.read_bytes())
    signed.verify(key.public_key_hex)
    if (field := config_difference(signed.manifest.config, config)) is not None:
        raise ConfigError(
            f"the run config differs from the run already launched in {path.parent} ({field}); "
            "launch it in a new --workdir"
        )
    return signed


def prepare_run(config: RunConfig, workdir: Path, start_in: float = 0.0) -> LaunchedRun:
    """Create or resume the run in ``workdir``; on return the ledger holds at least genesis. A new
    run's round 0 opens ``start_in`` seconds from now (its manifest's ``created_at``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = load_or_create_key(workdir / "coordinator.key")
    manifest_path = workdir / "manifest.msgpack"
    corpus = load_corpus(config.data)
    resumed = manifest_path.exists()
    if resumed:
        signed = _load_manifest(manifest_path, key, config)
        writer = CheckpointWriter(workdir / "checkpoints", signed.manifest, corpus)
    else:
        draft = RunManifest(config=config, coordinator_key=key.public_key_hex, genesis_root="0" * 64,
                            created_at=time.time() + start_in)
        writer = CheckpointWriter(workdir / "checkpoints", draft, corpus)
        genesis = writer.genesis()
        root = checkpoint_root(writer.layout.views(genesis.parameters))
        signed = dataclasses.replace(draft, genesis_root=root).sign(key)
        write_atomic(manifest_path, signed.to_bytes())
    write_atomic(workdir / "coordinator.pub", public_key_to_pem(key.public_key_hex))
    ledger = LedgerStore.open(workdir / "ledger.sqlite", key.public_key_hex, signed.manifest.run_id)
    try:
        if len(ledger) == 0:
            _append_genesis(key, signed.manifest, ledger, writer)
        else:
            _check_head_files(ledger, writer)
    except BaseException:
        ledger.close()
        raise
    return LaunchedRun(key, signed, ledger, writer, resumed)


def _append_genesis(key: SigningKey, manifest: RunManifest, ledger: LedgerStore, writer: CheckpointWriter) -> None:
    genesis = writer.genesis()
    files = writer.write(genesis)
    if files[0].root != manifest.genesis_root:
        raise HashMismatch("rebuilt genesis does not match the manifest's genesis_root (was torch upgraded?)")
    entry = next_entry(
        key, None, run_id=manifest.run_id, round=0, created_at=time.time(),
        files=files, contributors=[], heldout_loss=writer.heldout_loss(genesis),
    )
    ledger.append(entry)


def _check_head_files(ledger: LedgerStore, writer: CheckpointWriter) -> None:
    head = ledger.head()
    folder = writer.path(head.round)
    if not folder.is_dir():
        raise HashMismatch(f"ledger entry {head.seq}: its checkpoint folder {folder.name} is missing")
    recorded = [(f.name, f.sha256, f.root) for f in head.files]
    measured = [(f.name, f.sha256, f.root) for f in writer.records(head.round)]
    if recorded != measured:
        raise HashMismatch(f"ledger entry {head.seq}: its checkpoint files on disk do not match the ledger")
