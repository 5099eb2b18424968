"""The error-feedback residual is part of a peer's local state: it survives a restart."""

from __future__ import annotations

import pytest
import torch

from peer.rounds import RESIDUAL_FILE, OuterExchanger, outvoted
from protocol.manifest import AveragingConfig, RunConfig, RunManifest


def _manifest(codec: str) -> RunManifest:
    config = RunConfig(name="residual", averaging=AveragingConfig(codec=codec))
    return RunManifest(config=config, genesis_root="0" * 64, coordinator_key="0" * 64, created_at=0.0)


def test_a_restarted_peer_reloads_its_residual_for_the_same_run_and_codec(tmp_path):
    saved = OuterExchanger(None, _manifest("topk-c64-k4-q2"), "0" * 16, tmp_path, 100)
    saved.residual = torch.randn(100)
    saved._save_residual(3)
    assert (tmp_path / RESIDUAL_FILE).exists()
    again = OuterExchanger(None, _manifest("topk-c64-k4-q2"), "0" * 16, tmp_path, 100)
    assert torch.equal(again.residual, saved.residual)
    other_codec = OuterExchanger(None, _manifest("int8-b256"), "0" * 16, tmp_path, 100)
    assert torch.equal(other_codec.residual, torch.zeros(100)), "a residual of another codec must not be reused"
    other_size = OuterExchanger(None, _manifest("topk-c64-k4-q2"), "0" * 16, tmp_path, 99)
    assert torch.equal(other_size.residual, torch.zeros(99))


def test_a_damaged_residual_file_starts_from_zero(tmp_path):
    (tmp_path / RESIDUAL_FILE).write_bytes(b"not safetensors")
    fresh = OuterExchanger(None, _manifest("topk-c64-k4-q2"), "0" * 16, tmp_path, 10)
    assert torch.equal(fresh.residual, torch.zeros(10))


# ---------------------------------------------------------------------------------------
# Which consensus gives way when a group's members hold different roots
# ---------------------------------------------------------------------------------------

A, B, C, D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


@pytest.mark.parametrize(
    ("own", "members", "others", "gives_way"),
    [
        (A, 4, [], False),  # everyone agrees
        (A, 3, [B], False),  # majority
        (B, 1, [A, A, A], True),  # minority
        (A, 2, [B, B], False),  # a tie goes to the smaller root
        (B, 2, [A, A], True),
        # every member on its own root (all went local in one round): only the smallest keeps its
        # state; counting the others together would make all four give way, and none serve
        (A, 1, [B, C, D], False),
        (C, 1, [A, B, D], True),
        (B, 2, [A, C, D], False),  # the most members win, whatever the others add up to
        (C, 1, [A, A, B], True),
    ],
)
def test_outvoted_picks_one_winner(own, members, others, gives_way):
    assert outvoted(own, members, others) is gives_way


def test_outvoted_leaves_exactly_one_root_standing():
    """Whatever the mix, the members that keep their state all hold the same root."""
    import itertools

    for mix in itertools.product([A, B, C, D], repeat=4):
        keep = {root for i, root in enumerate(mix)
                if not outvoted(root, mix.count(root), [r for j, r in enumerate(mix) if r != root])}
        assert len(keep) == 1, mix
