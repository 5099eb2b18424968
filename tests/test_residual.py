"""The error-feedback residual is part of a peer's local state: it survives a restart."""

from __future__ import annotations

import torch

from peer.rounds import RESIDUAL_FILE, RoundExchanger
from protocol.manifest import AveragingConfig, RunConfig, RunManifest


def _manifest(codec: str) -> RunManifest:
    config = RunConfig(name="residual", averaging=AveragingConfig(codec=codec))
    return RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=0.0)


def test_a_restarted_peer_reloads_its_residual_for_the_same_run_and_codec(tmp_path):
    saved = RoundExchanger(None, _manifest("topk-c64-k4-q2"), None, "0" * 16, tmp_path, 100)
    saved.residual = torch.randn(100)
    saved._save_residual(3)
    assert (tmp_path / RESIDUAL_FILE).exists()
    again = RoundExchanger(None, _manifest("topk-c64-k4-q2"), None, "0" * 16, tmp_path, 100)
    assert torch.equal(again.residual, saved.residual)
    other_codec = RoundExchanger(None, _manifest("int8-b256"), None, "0" * 16, tmp_path, 100)
    assert torch.equal(other_codec.residual, torch.zeros(100)), "a residual of another codec must not be reused"
    other_size = RoundExchanger(None, _manifest("topk-c64-k4-q2"), None, "0" * 16, tmp_path, 99)
    assert torch.equal(other_size.residual, torch.zeros(99))


def test_a_damaged_residual_file_starts_from_zero(tmp_path):
    (tmp_path / RESIDUAL_FILE).write_bytes(b"not safetensors")
    fresh = RoundExchanger(None, _manifest("topk-c64-k4-q2"), None, "0" * 16, tmp_path, 10)
    assert torch.equal(fresh.residual, torch.zeros(10))
