"""A peer's evidence of its work, for spot checks (``[checks] spot_check_every``; docs/protocol.md §10.6).

At the start of each round's inner steps, a peer of a run with spot checks writes what a
validator needs, besides public data, to replay that round exactly: its inner AdamW state (the
moments and step count of every parameter) and its error-feedback residual. The consensus it
starts from, its windows, its learning rates and the codec are public. The file is kept for the
last ``KEEP`` rounds and served to anyone who asks for its id, like a blob of the run.

    id = sha256("barnraise/work-evidence\\0" ‖ run id ‖ ":" ‖ round ‖ ":" ‖ peer id)

The file is safetensors: ``exp_avg``, ``exp_avg_sq``, ``residual`` (flat float32, the model's
parameter order), ``step`` (float32, one per parameter tensor), and metadata: ``fresh`` (the
AdamW state was empty), ``micro_batch``, ``device`` type, ``threads`` and ``torch`` version.
A validator reads it as untrusted bytes: shapes, dtypes and values are checked (``read_evidence``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protocol.errors import MalformedRecord

__all__ = ["Evidence", "EvidenceKeeper", "evidence_id", "evidence_limit", "read_evidence", "KEEP", "FOLDER"]

KEEP = 4
"""Rounds of evidence a peer keeps (a spot check comes one round after the round it checks)."""
FOLDER = "evidence"
"""The workdir's folder of evidence files, each named by its id."""
_DOMAIN = b"barnraise/work-evidence\x00"
_HEADER_SLACK = 64 * 1024


def evidence_id(run_id: str, round_: int, peer_id: str) -> str:
    return hashlib.sha256(_DOMAIN + f"{run_id}:{round_}:{peer_id}".encode()).hexdigest()


def evidence_limit(numel: int, tensors: int) -> int:
    """The largest evidence file a model of ``numel`` values in ``tensors`` tensors can have."""
    return 4 * (3 * numel + tensors) + _HEADER_SLACK


@dataclass(frozen=True)
class Evidence:
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    residual: torch.Tensor
    step: torch.Tensor
    fresh: bool
    micro_batch: int
    device: str
    threads: int
    torch_version: str


def _flat(parameters: list[torch.nn.Parameter], state: dict, name: str) -> torch.Tensor:
    return torch.cat([state[p][name].detach().reshape(-1).float().cpu() if p in state else
                      torch.zeros(p.numel()) for p in parameters])


def evidence_bytes(trainer, residual: torch.Tensor) -> bytes:
    """The evidence of the round ``trainer`` is about to run, with ``residual`` (the peer's
    error-feedback residual, as its announcement will use it)."""
    parameters = list(trainer.model.parameters())
    state = trainer.inner.state
    fresh = not any(p in state for p in parameters)
    tensors = {
        "exp_avg": _flat(parameters, state, "exp_avg"),
        "exp_avg_sq": _flat(parameters, state, "exp_avg_sq"),
        "residual": residual.detach().float().cpu().contiguous(),
        "step": torch.tensor([float(state[p]["step"]) if p in state else 0.0 for p in parameters]),
    }
    metadata = {"fresh": "1" if fresh else "0", "micro_batch": str(trainer.micro_batch),
                "device": trainer.device.type, "threads": str(torch.get_num_threads()),
                "torch": torch.__version__}
    return save_safetensors(tensors, metadata=metadata)


def read_evidence(raw: bytes, *, numel: int, tensors: int) -> Evidence:
    """Untrusted evidence bytes, checked: the four tensors, float32, of the model's sizes, finite;
    sane metadata. MalformedRecord otherwise."""
    if len(raw) > evidence_limit(numel, tensors):
        raise MalformedRecord(f"evidence: {len(raw)} bytes, more than a model of {numel} values needs")
    try:
        loaded = load_safetensors(raw)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise MalformedRecord(f"evidence: not a safetensors file: {error}") from None
    expected = {"exp_avg": numel, "exp_avg_sq": numel, "residual": numel, "step": tensors}
    if set(loaded) != set(expected):
        raise MalformedRecord(f"evidence: tensors {sorted(loaded)}, expected {sorted(expected)}")
    for name, size in expected.items():
        value = loaded[name]
        if value.dtype != torch.float32 or value.shape != (size,):
            raise MalformedRecord(f"evidence: {name} is {value.dtype} {tuple(value.shape)}, expected float32 ({size},)")
        if not bool(torch.isfinite(value).all()):
            raise MalformedRecord(f"evidence: {name} is not finite")
    if bool((loaded["exp_avg_sq"] < 0).any()) or bool((loaded["step"] < 0).any()):
        raise MalformedRecord("evidence: a negative second moment or step")
    metadata = _metadata(raw)
    try:
        micro_batch, threads = int(metadata.get("micro_batch", "")), int(metadata.get("threads", ""))
    except ValueError:
        raise MalformedRecord("evidence: micro_batch and threads must be whole numbers") from None
    if not (1 <= micro_batch <= 1 << 20 and 1 <= threads <= 4096) or metadata.get("fresh") not in ("0", "1"):
        raise MalformedRecord("evidence: metadata out of range")
    return Evidence(loaded["exp_avg"], loaded["exp_avg_sq"], loaded["residual"], loaded["step"],
                    metadata["fresh"] == "1", micro_batch, str(metadata.get("device", ""))[:16], threads,
                    str(metadata.get("torch", ""))[:64])


def _metadata(raw: bytes) -> dict[str, str]:
    (length,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(raw[8 : 8 + length])  # safetensors already parsed this header: it is JSON
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise MalformedRecord("evidence: bad metadata")
    return metadata


class EvidenceKeeper:
    """Writes a peer's evidence into ``WORKDIR/evidence/<id>`` and keeps the last ``KEEP`` rounds'."""

    def __init__(self, workdir: Path, run_id: str, peer_id: str):
        self.folder = workdir / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.iterdir():  # a previous life's files: their rounds are over
            leftover.unlink(missing_ok=True)
        self.run_id, self.peer_id = run_id, peer_id
        self.kept: deque[Path] = deque()

    def keep(self, round_: int, trainer, residual: torch.Tensor) -> Path:
        path = self.folder / evidence_id(self.run_id, round_, self.peer_id)
        partial = path.with_name(f".{path.name}.partial")  # no fsync: evidence need not survive a crash
        partial.write_bytes(evidence_bytes(trainer, residual))
        os.replace(partial, path)
        self.kept.append(path)
        while len(self.kept) > KEEP:
            self.kept.popleft().unlink(missing_ok=True)
        return path
