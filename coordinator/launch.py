"""Launching (or resuming) a run in a working folder: key, manifest, genesis, ledger.

    WORKDIR/coordinator.key     Ed25519 private key (PEM, mode 0600): signs manifest and ledger
    WORKDIR/coordinator.pub     its public key (PEM), for auditors
    WORKDIR/manifest.msgpack    the signed run manifest
    WORKDIR/ledger.sqlite       the ledger (SQLite, WAL)
    WORKDIR/checkpoints/        r000000/ (genesis), r000005/, ... each model + outer safetensors
    WORKDIR/blobs/              files the manifest names by sha256: model config, init weights,
                                tokenizer, signed data index, token shards (``coordinator.assets``)
    WORKDIR/p2p.key             the DHT node's libp2p identity, so peers find it again after a restart
    WORKDIR/swarm.json          ports and peers last seen, for a relaunch
    WORKDIR/ledger.jsonl        the ledger exported for auditors, rewritten after each entry
    WORKDIR/endpoint.json       the HTTP address and DHT multiaddrs while the coordinator serves

Relaunching with the same RUN.toml resumes: the ledger's whole chain is re-checked and
the head checkpoint's files are re-hashed, as is every file in ``blobs/`` the manifest names. A
changed RUN.toml, or a changed model config, init or tokenizer file, is refused; the corpus is
tokenized once, at the first launch.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from coordinator.assets import RESOLVED_FIELDS, resolve_run
from coordinator.checkpoints import CheckpointWriter
from coordinator.ledger_store import LedgerStore
from peer.assets import open_assets
from peer.blobs import BlobStore
from peer.workdir import load_or_create_key, write_atomic
from protocol.errors import ConfigError, HashMismatch
from protocol.hashing import checkpoint_root
from protocol.ledger import next_entry
from protocol.manifest import RunConfig, RunManifest, SignedManifest, is_blob_ref
from protocol.signing import SigningKey, public_key_to_pem

__all__ = ["LaunchedRun", "prepare_run", "config_difference"]


@dataclass
class LaunchedRun:
    key: SigningKey
    signed: SignedManifest
    ledger: LedgerStore
    checkpoints: CheckpointWriter
    resumed: bool
    blobs: BlobStore

    @property
    def manifest(self) -> RunManifest:
        return self.signed.manifest


def config_difference(old: RunConfig, new: RunConfig) -> str | None:
    """The first field (``section.key``) whose value differs, or None; a field launch fills in
    from a file (``coordinator.assets.RESOLVED_FIELDS``) is compared only when neither side still
    holds what RUN.toml wrote (a path), so removing ``init`` or going back to ``bytes`` counts."""
    if old.name != new.name:
        return "run.name"
    for section in ("model", "data", "training", "averaging", "checkpoints"):
        for field in dataclasses.fields(getattr(old, section)):
            before, after = getattr(getattr(old, section), field.name), getattr(getattr(new, section), field.name)
            unfilled = _unfilled(section, field.name, before) or _unfilled(section, field.name, after)
            if (section, field.name) in RESOLVED_FIELDS and unfilled:
                continue
            if before != after:
                return f"{section}.{field.name}"
    return None


def _unfilled(section: str, name: str, value: object) -> bool:
    """A value as RUN.toml gives it before launch fills it in: a path or inline table (a file
    field), no parameter count, no data index. ``""`` and ``"bytes"`` are final as they are."""
    if name == "parameters":
        return value == 0
    if name == "index":
        return value == ""
    return isinstance(value, str) and value not in ("", "bytes") and not is_blob_ref(value)


def _load_manifest(path: Path, key: SigningKey) -> SignedManifest:
    signed = SignedManifest.from_bytes(path.read_bytes())
    signed.verify(key.public_key_hex)
    return signed


def _refuse_changes(launched: RunConfig, config: RunConfig, workdir: Path) -> None:
    if (field := config_difference(launched, config)) is not None:
        raise ConfigError(
            f"the run config differs from the run already launched in {workdir} ({field}); "
            "launch it in a new --workdir"
        )


def prepare_run(config: RunConfig, workdir: Path, start_in: float = 0.0, base: Path | None = None,
                on_line=lambda line: None) -> LaunchedRun:
    """Create or resume the run in ``workdir``; on return the ledger holds at least genesis. A new
    run's round 0 opens ``start_in`` seconds from now (its manifest's ``created_at``). ``base`` is
    the folder RUN.toml's relative paths start from (default: the current folder)."""
    if not (workdir / "manifest.msgpack").exists():
        before = set(workdir.iterdir()) if workdir.is_dir() else None
        try:
            return _prepare(config, workdir, start_in, base, on_line)
        except BaseException:  # a launch that failed leaves the folder as it found it (no orphan key)
            if before is None:
                shutil.rmtree(workdir, ignore_errors=True)
            else:
                for made in set(workdir.iterdir()) - before:
                    shutil.rmtree(made) if made.is_dir() else made.unlink(missing_ok=True)
            raise
    return _prepare(config, workdir, start_in, base, on_line)


def _prepare(config: RunConfig, workdir: Path, start_in: float, base: Path | None, on_line) -> LaunchedRun:
    workdir.mkdir(parents=True, exist_ok=True)
    key = load_or_create_key(workdir / "coordinator.key")
    manifest_path = workdir / "manifest.msgpack"
    blobs = BlobStore(workdir / "blobs")
    base = Path.cwd() if base is None else base
    resumed = manifest_path.exists()
    if resumed:
        signed = _load_manifest(manifest_path, key)
        launched = signed.manifest.config
        _refuse_changes(launched, config, workdir)  # RUN.toml's own values, before any file is read
        resolved = resolve_run(config, base, blobs, key, data_index=launched.data.index or None, on_line=on_line)
        _refuse_changes(launched, resolved, workdir)  # the files it names
        assets = open_assets(signed.manifest, blobs.folder, [])  # every file is in the run's own store
        writer = CheckpointWriter(workdir / "checkpoints", signed.manifest, assets.corpus, assets.config_json, blobs)
    else:
        resolved = resolve_run(config, base, blobs, key, on_line=on_line)
        draft = RunManifest(config=resolved, coordinator_key=key.public_key_hex, genesis_root="0" * 64,
                            created_at=time.time() + start_in)
        assets = open_assets(draft, blobs.folder, [])
        writer = CheckpointWriter(workdir / "checkpoints", draft, assets.corpus, assets.config_json, blobs)
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
    return LaunchedRun(key, signed, ledger, writer, resumed, blobs)


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
