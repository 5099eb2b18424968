"""Files a peer (or coordinator) keeps in its working folder, and what a peer's folder says about
it read back without the network (``barnraise-peer status``).

A peer's folder: ``peer.key`` (its identity), ``run.json`` (the run it joined: ``RUN_FILE``),
``contribution.json`` (its credit), ``rounds.jsonl`` (one line per settled round), ``pause``
(present: the peer sits rounds out), plus ``blobs/``, ``checkpoints/``, ``snapshots/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from protocol.errors import InputError
from protocol.signing import SigningKey, key_id

__all__ = [
    "load_or_create_key",
    "write_atomic",
    "fsync_folder",
    "RUN_FILE",
    "PAUSE_FILE",
    "OUTCOMES",
    "round_outcome",
    "pause_reason",
    "write_run_file",
    "PeerSummary",
    "summarise_workdir",
]

RUN_FILE = "run.json"
"""Written when the peer joins: ``run_id``, ``run_name``, ``coordinator_url`` (null when it joined
by multiaddrs), ``maddrs`` (its own addresses) and ``joined_at`` (Unix time)."""
PAUSE_FILE = "pause"
"""While a file of this name exists in the workdir, the peer is paused (``peer.runner``)."""
OUTCOMES = ("entered", "waiting", "not_in_round", "void", "out_of_step")
"""How a round a peer announced in ended for it, in the order ``barnraise-peer status`` lists them."""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old file or the new one."""
    partial = path.with_name(f".{path.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a power loss cannot undo it)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def load_or_create_key(path: Path) -> SigningKey:
    """The Ed25519 key at ``path`` (PEM), created with mode 0600 if missing."""
    if path.exists():
        try:
            return SigningKey.from_pem(path.read_bytes())
        except InputError as error:
            raise InputError(f"{path}: {error}") from None
    key = SigningKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, key.to_pem(), mode=0o600)
    return key


def pause_reason(folder: Path, *, signalled: bool) -> str | None:
    """Why a peer working in ``folder`` sits rounds out now, None when it trains: SIGUSR1 toggled
    it, or the pause file exists (either one pauses; the peer resumes when neither holds)."""
    if signalled:
        return "SIGUSR1 (send it again to resume)"
    if (folder / PAUSE_FILE).exists():
        return f"{folder / PAUSE_FILE} exists (remove it to resume)"
    return None


def write_run_file(folder: Path, *, run_id: str, run_name: str, coordinator_url: str | None,
                   maddrs: list[str], joined_at: float) -> None:
    record = {"run_id": run_id, "run_name": run_name, "coordinator_url": coordinator_url, "maddrs": maddrs,
              "joined_at": joined_at}
    write_atomic(folder / RUN_FILE, (json.dumps(record) + "\n").encode())


def round_outcome(entry: dict) -> str:
    """Which of ``OUTCOMES`` a ``rounds.jsonl`` line records (the first that holds, in this order:
    out of step, void, left for a later round, entered, else not in the round)."""
    if entry.get("failure") is not None:
        return "out_of_step"
    if entry.get("void") is not None:
        return "void"
    if entry.get("waiting"):
        return "waiting"
    return "entered" if entry.get("entered") else "not_in_round"


@dataclass(frozen=True)
class PeerSummary:
    """A peer's folder, read back: every field None (or empty) when its file is missing."""

    workdir: str
    peer_id: str | None = None
    run_id: str | None = None
    run_name: str | None = None
    coordinator_url: str | None = None
    maddrs: tuple[str, ...] = ()
    rounds: dict[str, int] = field(default_factory=dict)
    """Rounds announced in, by outcome (``OUTCOMES``), from ``rounds.jsonl``."""
    unreadable_lines: int = 0
    """Lines of ``rounds.jsonl`` that are not a JSON object (a line cut short by a crash)."""
    samples: int | None = None
    """Credit: samples of this peer's payloads that entered a round, from ``contribution.json``."""
    last_round: int | None = None
    last_loss: float | None = None
    state_round: int | None = None
    """The consensus round the peer held after its last logged round."""
    last_written: float | None = None
    """Unix time of the newest write to ``run.json``, ``contribution.json`` or ``rounds.jsonl``."""
    paused: bool = False

    @property
    def rounds_taken(self) -> int:
        return sum(self.rounds.values())

    def to_json(self) -> dict:
        return {
            "workdir": self.workdir, "peer_id": self.peer_id, "run_id": self.run_id, "run_name": self.run_name,
            "coordinator_url": self.coordinator_url, "maddrs": list(self.maddrs),
            "rounds": {"total": self.rounds_taken, **{o: self.rounds.get(o, 0) for o in OUTCOMES}},
            "unreadable_lines": self.unreadable_lines, "samples": self.samples, "last_round": self.last_round,
            "last_loss": self.last_loss, "state_round": self.state_round, "last_written": self.last_written,
            "paused": self.paused,
        }


def _json_object(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def summarise_workdir(folder: Path) -> PeerSummary:
    """What a peer's folder says (no network, nothing created or changed). ``InputError`` when the
    folder is missing or holds none of a peer's files."""
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (give the --workdir the peer joined with)")
    files = {name: folder / name for name in ("peer.key", RUN_FILE, "contribution.json", "rounds.jsonl")}
    present = {name for name, path in files.items() if path.is_file()}
    if not present:
        raise InputError(f"{folder}: not a peer's workdir (no peer.key, {RUN_FILE}, contribution.json or "
                         "rounds.jsonl)")
    peer_id = None
    if "peer.key" in present:
        try:
            peer_id = key_id(SigningKey.from_pem(files["peer.key"].read_bytes()).public_key_hex)
        except (OSError, InputError) as error:
            raise InputError(f"{files['peer.key']}: {error}") from None
    run = _json_object(files[RUN_FILE]) or {}
    contribution = _json_object(files["contribution.json"]) or {}
    rounds: dict[str, int] = {}
    unreadable, last = 0, None
    if "rounds.jsonl" in present:
        for line in files["rounds.jsonl"].read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                unreadable += bool(line.strip())
                continue
            outcome = round_outcome(entry)
            rounds[outcome] = rounds.get(outcome, 0) + 1
            last = entry
    written = [files[name].stat().st_mtime for name in present - {"peer.key"}]
    return PeerSummary(
        workdir=str(folder),
        peer_id=peer_id,
        run_id=_text(run.get("run_id")) or _text(contribution.get("run_id")),
        run_name=_text(run.get("run_name")),
        coordinator_url=_text(run.get("coordinator_url")),
        maddrs=tuple(a for a in run.get("maddrs") or () if isinstance(a, str)),
        rounds=rounds,
        unreadable_lines=unreadable,
        samples=contribution["samples"] if isinstance(contribution.get("samples"), int) else None,
        last_round=_number(last, "round", int),
        last_loss=_number(last, "loss", float),
        state_round=_number(last, "state_round", int),
        last_written=max(written) if written else None,
        paused=(folder / PAUSE_FILE).exists(),
    )


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _number(entry: dict | None, name: str, kind: type) -> int | float | None:
    value = (entry or {}).get(name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return kind(value)
