"""Where a peer's starting state comes from, and how each source is verified before use.

A peer starts from the latest checkpoint in the coordinator's ledger, genesis included (the
ledger's chain and signatures are verified under the manifest's coordinator key, and each
downloaded file must match the entry's sha256, size and canonical root; genesis's parameters the
manifest's ``genesis_root`` too), or, joined by multiaddrs alone, from genesis
rebuilt from the manifest's model config and seed (its root must equal the signed manifest's
``genesis_root``); it then replays the rounds since from their payloads (``peer.runner``). Only
when those rounds have lapsed does it load a live peer's round-boundary state, whose tensors must
hash to the ``state_root`` of the donor's signed progress record, and that root must be the one
a quorum of distinct live peers vouches for (``state_from_quorum``).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peer.coordinator_client import CoordinatorClient
from peer.model import build_model
from peer.state import RoundState, StateLayout
from protocol.consensus import RoundClock
from protocol.errors import (
    DeadlineExceeded,
    HashMismatch,
    InputError,
    MalformedRecord,
    SignatureError,
    TransportError,
    VerificationError,
)
from protocol.hashing import checkpoint_root, sha256_stream
from protocol.ledger import checkpoint_dir_name, verify_chain
from protocol.manifest import RunManifest
from protocol.policy import progress_problem, quorum_state, state_problem
from protocol.records import LedgerEntry, PeerProgress

__all__ = ["StartingState", "state_from_peer", "state_from_checkpoint", "state_from_genesis", "state_from_quorum"]

_RECORD_SECONDS = 5.0
"""How long the live peers are given to say which state they hold."""
_ASKED = 16
"""Live peers asked at most (a random sample of them when there are more)."""


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
    if (problem := state_problem(state.parameters, state.momentum)) is not None:
        raise VerificationError(f"state from peer {record.peer_id} is refused: {problem}")
    return StartingState(state, f"round {record.round} from peer {record.peer_id} (root {root[:16]} matches its signed record)")


def state_from_quorum(node, manifest: RunManifest, layout: StateLayout, clock: RoundClock, *, own_peer_id: str,
                      candidates: list[str], timeout: float) -> StartingState:
    """The state a quorum of distinct live peers vouches for, fetched from those vouchers only.

    ``candidates`` (libp2p ids of the live peers, from their DHT records) are asked directly for
    the signed record of the state each serves; the answers that verify, are of this run, name
    the libp2p id that answered and pass ``protocol.policy.progress_problem`` vote;
    ``protocol.policy.quorum_state`` picks the state and its donors; the donors are tried in turn
    (``SwarmNode.download_state``: a byte cap and a deadline each), and the bytes must hash to
    that root and pass ``protocol.policy.state_problem``."""
    asked = random.sample(candidates, min(len(candidates), _ASKED))
    if not asked:
        raise TransportError("no live peer to ask for a state")
    answers = node.state_records(asked, timeout=_RECORD_SECONDS)
    records, now = [], time.time()
    for p2p_id, raw in answers.items():
        try:
            record = PeerProgress.from_bytes(raw).verify()
        except (MalformedRecord, VerificationError):
            continue
        if record.run_id == manifest.run_id and record.p2p_id == p2p_id and progress_problem(record, now=now, clock=clock) is None:
            records.append(record)
    quorum = quorum_state(records, exclude=own_peer_id, asked=len(asked))
    if quorum is None:
        raise VerificationError(f"no state is vouched for by a majority of the {len(asked)} peers asked "
                                f"({len(records)} answered)")
    deadline, failures = time.monotonic() + timeout, []
    for donor in random.sample(quorum.donors, len(quorum.donors)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            _, record_bytes, tensors = node.download_state(root=quorum.root, numel=layout.size, donors=[donor],
                                                           timeout=remaining)
            start = state_from_peer(record_bytes, tensors, manifest, layout)
            record = PeerProgress.from_bytes(record_bytes)
            # the round travels in the donor's record, not in the tensors: it must be the quorum's too
            if (record.round, record.state_root, record.p2p_id) != (quorum.round, quorum.root, donor):
                raise VerificationError(f"state from {donor} is of round {record.round}, root "
                                        f"{record.state_root[:16]}, not the quorum's {quorum.round}, {quorum.root[:16]}")
            # the tensors hash to the record's root (state_from_peer), which is the quorum's: no second hash
        except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord) as error:
            failures.append(str(error))  # this donor failed: the next one is asked
            continue
        return StartingState(start.state, f"{start.source}, vouched for by {quorum.vouchers} of {len(asked)} peers asked")
    raise TransportError(f"none of the {len(quorum.donors)} donors of state {quorum.root[:16]} served it: "
                         + "; ".join(failures[:2]))


_STATE_FILES = ("model.safetensors", "outer.safetensors")
"""The files of a ledger checkpoint a peer downloads: the parameters and the outer momentum."""


def _state_file_max_bytes(layout: StateLayout) -> int:
    """The largest safetensors file of the layout's float32 tensors: the data, the 8-byte header
    length, and a JSON header of at most 512 bytes per tensor (name, dtype, shape, offsets) plus
    64 KiB for the metadata."""
    return 4 * layout.size + 8 + 512 * len(layout.names) + 64 * 1024


def _file_ok(path: Path, sha256: str, size: int) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    with path.open("rb") as stream:
        return sha256_stream(stream) == sha256


def state_from_checkpoint(
    client: CoordinatorClient, manifest: RunManifest, layout: StateLayout, folder: Path, config_json: bytes | None = None
) -> tuple[StartingState, list[LedgerEntry]]:
    """Download the latest ledger checkpoint into ``folder`` and verify it against the ledger. Genesis
    too: it is not rebuilt here, where another torch may initialise differently (only a genesis
    entry that lists no state files is rebuilt from the manifest)."""
    ledger = client.ledger()
    verify_chain(ledger, manifest.coordinator_key, run_id=manifest.run_id)
    entry = ledger[-1]
    records = {f.name: f for f in entry.files if f.name in _STATE_FILES}
    if entry.kind == "genesis" and not records:
        return state_from_genesis(manifest, layout, config_json), ledger
    if set(records) != set(_STATE_FILES):
        raise InputError(f"ledger entry {entry.seq} does not list model.safetensors and outer.safetensors")
    if entry.kind == "genesis" and records["model.safetensors"].root != manifest.genesis_root:
        raise HashMismatch(f"ledger entry {entry.seq}: genesis root {records['model.safetensors'].root[:16]} is not "
                           f"the signed manifest's {manifest.genesis_root[:16]}")
    most = _state_file_max_bytes(layout)
    for record in records.values():  # the layout is of the model this peer's memory check allowed
        if record.size > most:
            raise HashMismatch(f"ledger entry {entry.seq}: {record.name} is {record.size:,} bytes, more than the "
                               f"{most:,} a state of {layout.size:,} float32 values takes: refused")
    target = folder / checkpoint_dir_name(entry)
    target.mkdir(parents=True, exist_ok=True)
    loaded = {}
    for record in records.values():  # only these two: other files an entry lists are not needed here
        path = target / record.name
        if not _file_ok(path, record.sha256, record.size):
            client.download(f"/checkpoints/{target.name}/{record.name}", path, record.size)
            if not _file_ok(path, record.sha256, record.size):
                path.unlink(missing_ok=True)
                raise HashMismatch(f"ledger entry {entry.seq}: {record.name} does not match its sha256")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, TypeError, RuntimeError) as error:  # it hashed right: a hostile ledger
            shutil.rmtree(target, ignore_errors=True)
            raise HashMismatch(f"ledger entry {entry.seq}: {record.name} is not a readable safetensors file ({error})") from None
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
