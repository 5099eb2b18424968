"""Spot checks in process (no swarm): an honest peer's round replays bitwise from its evidence,
also rounds after the first (AdamW state and residual carried over); a payload that is a scaled
copy of another peer's, or the right payload with doctored evidence, fails; a kept check reruns;
the ledger records checks and an auditor's chain check covers them."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from coordinator.spotcheck import SpotChecker, rerun_check, save_check, summary_of
from peer.data import load_corpus
from peer.evidence import EvidenceKeeper, evidence_bytes, evidence_id, read_evidence
from peer.state import RoundState
from peer.trainer import Trainer
from protocol.codecs import compress_with_feedback, decode, parse_codec
from protocol.errors import ChainError, ConfigError, MalformedRecord
from protocol.ledger import entries_from_jsonl, entry_to_json, next_entry, verify_chain
from protocol.manifest import (
    AveragingConfig,
    ChecksConfig,
    DataSpec,
    ModelConfig,
    RunConfig,
    RunManifest,
    TrainingConfig,
)
from protocol.records import FileRecord, LedgerEntry, RoundAnnouncement, SpotCheck
from protocol.signing import SigningKey

CONFIG = RunConfig(
    name="spot",
    model=ModelConfig(n_embd=32, n_layer=1, n_head=2, n_positions=32),
    data=DataSpec(seq_len=32),
    training=TrainingConfig(inner_steps=3, batch_size=4),
    averaging=AveragingConfig(overlap=False),
    checks=ChecksConfig(spot_check_every=1),
)
MANIFEST = RunManifest(config=CONFIG, coordinator_key="0" * 64, genesis_root="0" * 64, created_at=0.0)
CORPUS = load_corpus(CONFIG.data)
CODEC = parse_codec(CONFIG.averaging.codec)
KEYS = [SigningKey.generate() for _ in range(2)]


class _Peer:
    """A peer's training side, as the runner drives it in synchronous rounds."""

    def __init__(self, key: SigningKey, start: RoundState):
        self.key = key
        self.trainer = Trainer(MANIFEST, CORPUS, peer_id=_id(key))
        self.trainer.load(start)
        self.residual = torch.zeros(self.trainer.layout.size)

    def round(self, round_: int, steps: int) -> tuple[bytes, bytes, RoundAnnouncement]:
        evidence = evidence_bytes(self.trainer, self.residual)
        self.trainer.inner_steps(round_, steps=steps)
        payload, self.residual = compress_with_feedback(CODEC, self.trainer.outer_gradient(), self.residual,
                                                        decay=CONFIG.averaging.error_feedback_decay)
        return evidence, payload, self.announce(round_, payload, steps)

    def announce(self, round_: int, payload: bytes, steps: int) -> RoundAnnouncement:
        return RoundAnnouncement.signed(
            self.key, run_id="ab" * 8, round=round_, weight=float(steps * CONFIG.training.batch_size),
            codec=CODEC.name, payload_size=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest(),
            base_root=self.trainer.state.root(self.trainer.layout), loss=3.0, p2p_id="12D3KooWx", time=1.0)

    def advance(self, update: torch.Tensor) -> None:
        self.trainer.advance(update)


def _id(key: SigningKey) -> str:
    from protocol.signing import key_id

    return key_id(key.public_key_hex)


@pytest.fixture(scope="module")
def rounds():
    """Two peers, three synchronous rounds; each round's (θ_r, evidence, payload, announcement) per peer."""
    genesis = Trainer(MANIFEST, CORPUS, peer_id="0" * 16).state
    peers = [_Peer(k, genesis) for k in KEYS]
    kept = []
    for round_ in range(3):
        state = peers[0].trainer.state.copy()
        results = [p.round(round_, steps=3 if i == 0 else 2) for i, p in enumerate(peers)]
        kept.append((state, results))
        update = sum(decode(r[1], CODEC, state.parameters.numel()) for r in results) / 2
        for p in peers:
            p.advance(update)
    return kept


@pytest.fixture(scope="module")
def checker():
    return SpotChecker(MANIFEST, CORPUS, None)


def _check(checker, state, evidence, payload, announcement):
    replayed = checker.replay(state, announcement, checker.evidence(evidence))
    return checker.judge(replayed, payload, announcement, 0.0)


def test_an_honest_round_replays_bitwise_also_after_the_first(rounds, checker):
    for state, results in rounds:
        for evidence, payload, announcement in results:
            judgement = _check(checker, state, evidence, payload, announcement)
            assert judgement.passed and judgement.bitwise, (state.round, judgement)
    assert not read_evidence(rounds[2][1][0][0], numel=checker.numel, tensors=checker.tensors).fresh


def test_a_scaled_copy_of_another_peers_payload_fails(rounds, checker):
    state, ((evidence, _, _), (_, other, _)) = rounds[1]
    for scale in (1.0, 1.5):
        copied = decode(other, CODEC, state.parameters.numel()) * scale
        fake, _ = compress_with_feedback(CODEC, copied, torch.zeros_like(copied), decay=1.0)
        cheat = _Peer(KEYS[0], state).announce(1, fake, 3)
        judgement = _check(checker, state, evidence, fake, cheat)
        assert not judgement.passed and not judgement.bitwise, judgement
        assert judgement.cosine < 0.9, judgement  # far from the line: not a matter of tolerance


def test_the_right_payload_with_doctored_evidence_fails(rounds, checker):
    state, ((evidence, payload, announcement), _) = rounds[2]
    parsed = checker.evidence(evidence)
    doctored = dataclasses.replace(parsed, residual=parsed.residual * 0.5)
    judgement = checker.judge(checker.replay(state, announcement, doctored), payload, announcement, 0.0)
    assert not judgement.passed


def test_evidence_is_read_as_untrusted_bytes(checker, rounds):
    evidence = rounds[0][1][0][0]
    with pytest.raises(MalformedRecord, match="not a safetensors file"):
        checker.evidence(b"\x00" * 64)
    with pytest.raises(MalformedRecord, match="more than a model"):
        checker.evidence(evidence + b"\x00" * (1 << 20))
    from safetensors.torch import load, save

    tensors = load(evidence)
    tensors["residual"] = tensors["residual"][:-1]
    with pytest.raises(MalformedRecord, match="residual"):
        checker.evidence(save(tensors, metadata={"fresh": "0", "micro_batch": "4", "threads": "1"}))
    tensors = load(evidence)
    tensors["exp_avg"][0] = float("nan")
    with pytest.raises(MalformedRecord, match="not finite"):
        checker.evidence(save(tensors, metadata={"fresh": "0", "micro_batch": "4", "threads": "1"}))


def test_a_kept_check_reruns_from_its_folder_and_refuses_swapped_inputs(tmp_path, rounds, checker):
    state, ((evidence, payload, announcement), (_, other, _)) = rounds[1]
    layout = checker.trainer().layout
    folder = tmp_path / "checks" / f"r{state.round:06d}-{announcement.peer_id}"
    save_check(folder, state, evidence, announcement.to_bytes(), payload, {"note": "test"})
    judgement, again = rerun_check(checker, folder, lambda s: s.root(layout))
    assert judgement.passed and judgement.bitwise and again == announcement
    assert summary_of(judgement, announcement, "ab" * 32)["passed"] is True
    (folder / "payload.bin").write_bytes(other)
    with pytest.raises(Exception, match="not the payload the announcement names"):
        rerun_check(checker, folder, lambda s: s.root(layout))


def test_evidence_keeper_keeps_the_last_rounds_under_their_ids(tmp_path, rounds):
    trainer = Trainer(MANIFEST, CORPUS, peer_id="0" * 16)
    keeper = EvidenceKeeper(tmp_path, "ab" * 8, "cd" * 8)
    for round_ in range(6):
        keeper.keep(round_, trainer, torch.zeros(trainer.layout.size))
    names = sorted(p.name for p in (tmp_path / "evidence").iterdir())
    assert names == sorted(evidence_id("ab" * 8, r, "cd" * 8) for r in range(2, 6))


def test_spot_checks_need_synchronous_rounds():
    with pytest.raises(ConfigError, match="overlap = false"):
        dataclasses.replace(CONFIG, averaging=AveragingConfig(overlap=True))


# --- the ledger


def _entries(checks=()):
    key = SigningKey.generate()
    files = [FileRecord(name="model.safetensors", sha256="aa" * 32, size=1, root="bb" * 32, tensors={})]
    genesis = next_entry(key, None, run_id="ab" * 8, round=0, created_at=1.0, files=files, contributors=[],
                         heldout_loss=None)
    entry = next_entry(key, genesis, run_id="ab" * 8, round=5, created_at=2.0, files=files, contributors=[],
                       heldout_loss=None, checks=checks)
    return key, [genesis, entry]


def test_a_ledger_entry_lists_its_checks_and_one_without_has_its_old_bytes():
    check = SpotCheck(peer_id="cd" * 8, round=3, verdict="failed", samples=12, payload_sha256="ee" * 32,
                      evidence_sha256="ff" * 32)
    key, entries = _entries([check])
    text = "".join(entry_to_json(e) + "\n" for e in entries)
    assert '"checks"' in text.splitlines()[1] and '"checks"' not in text.splitlines()[0]
    again = entries_from_jsonl(text)
    assert again[1].checks == [check]
    verify_chain(again, key.public_key_hex)
    tampered = text.replace('"verdict":"failed"', '"verdict":"passed"')
    with pytest.raises(Exception, match="signature"):
        verify_chain(entries_from_jsonl(tampered), key.public_key_hex)
    with pytest.raises(MalformedRecord, match="checks"):
        LedgerEntry.from_wire(entries[1].to_wire() | {"checks": []})  # one encoding: empty is left out


def test_a_check_of_a_round_not_before_the_checkpoint_breaks_the_chain():
    late = SpotCheck(peer_id="cd" * 8, round=5, verdict="passed", samples=12, payload_sha256="ee" * 32,
                     evidence_sha256="ff" * 32)
    with pytest.raises(ChainError, match="before the checkpoint"):
        _entries([late])

