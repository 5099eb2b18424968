"""Spot checks: replay a member's round from the consensus and its evidence, compare the payloads.

    barnraise-coordinator spot-check --workdir DIR checks/r000042-0123456789abcdef

With ``[checks] spot_check_every = N``, after replaying a round the coordinator draws each of
its members with probability 1/N (its own randomness: a peer cannot predict or steer which of its
rounds are checked). It fetches that member's evidence (``peer.evidence``)
and payload, and replays the round as the peer ran it: the same consensus θ_r, its AdamW state
and residual, the same number of inner steps (the announced samples over the batch size) on the
same windows at the same learning rates, on the CPU with the peer's thread count. Then it
compresses the result with the peer's residual, as the peer's announcement did, and compares:

- **bitwise**: the replayed payload's sha256 is the announced one (same torch, same CPU kind);
- **within tolerance** otherwise (another torch, another CPU's kernels, a GPU's bf16): the
  decoded payloads' cosine similarity is at least ``MIN_COSINE`` and their norms differ by at
  most ``MAX_NORM_DIFFERENCE``. A payload copied from another peer, scaled, or made up is far
  outside both (docs/protocol.md §10.6 has the measurements).

A failed check, or evidence not served in time, withdraws the round's samples from the peer's
credit, and the next ledger entry lists the check (``SpotCheck``). Every check's inputs are kept
in ``checks/r<round>-<peer id>/`` (the consensus state, the evidence, the signed announcement and
the payload), so anyone can rerun it with the command above; the ledger entry names the
evidence's and the payload's sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peer.data import Corpus, ShardCorpus
from peer.evidence import Evidence, evidence_id, evidence_limit, read_evidence
from peer.state import RoundState
from peer.trainer import Trainer
from protocol.codecs import compress_with_feedback, decode, parse_codec
from protocol.errors import DeadlineExceeded, HashMismatch, InputError, MalformedRecord, TransportError
from protocol.manifest import RunManifest
from protocol.records import RoundAnnouncement, SpotCheck

__all__ = ["SpotChecker", "Inspector", "Judgement", "MIN_COSINE", "MAX_NORM_DIFFERENCE", "save_check", "rerun_check",
           "CHECK_FILES", "rerun_in_workdir"]

MIN_COSINE = 0.99
"""Least cosine similarity of the replayed and the sent payload (decoded) for a check to pass
when they are not bitwise equal."""
MAX_NORM_DIFFERENCE = 0.03
"""Largest relative difference of their norms for such a check to pass."""
CHECK_FILES = ("state.safetensors", "evidence.safetensors", "announcement.msgpack", "payload.bin")


@dataclass(frozen=True)
class Judgement:
    passed: bool
    bitwise: bool
    cosine: float
    norm_ratio: float
    """|sent| / |replayed| (decoded)."""
    seconds: float
    """Seconds the replay took."""

    def describe(self) -> str:
        if self.bitwise:
            return f"passed (bitwise) in {self.seconds:.1f} s"
        verdict = "passed within tolerance" if self.passed else "FAILED"
        return f"{verdict} (cosine {self.cosine:.4f}, norm ratio {self.norm_ratio:.3f}) in {self.seconds:.1f} s"


class SpotChecker:
    """Replays rounds of a run on this machine's CPU (one model, built once and reused)."""

    def __init__(self, manifest: RunManifest, corpus: Corpus | ShardCorpus, config_json: bytes | None):
        self.manifest, self.corpus, self.config_json = manifest, corpus, config_json
        self.codec = parse_codec(manifest.config.averaging.codec)
        self._trainer: Trainer | None = None

    def trainer(self) -> Trainer:
        if self._trainer is None:
            self._trainer = Trainer(self.manifest, self.corpus, "0" * 16, "cpu", config_json=self.config_json)
        return self._trainer

    @property
    def numel(self) -> int:
        return self.trainer().layout.size

    @property
    def tensors(self) -> int:
        return len(list(self.trainer().model.parameters()))

    def evidence(self, raw: bytes) -> Evidence:
        return read_evidence(raw, numel=self.numel, tensors=self.tensors)

    def replay(self, state: RoundState, announcement: RoundAnnouncement, evidence: Evidence) -> bytes:
        """The payload the peer would have sent for ``announcement``'s round, from ``state`` (θ_r)."""
        training = self.manifest.config.training
        steps, rest = divmod(int(announcement.weight), training.batch_size)
        if rest or not 0 < steps <= training.inner_steps or announcement.weight != int(announcement.weight):
            raise MalformedRecord(f"announced {announcement.weight} samples: not 1 to {training.inner_steps} "
                                  f"steps of {training.batch_size}")
        trainer = self.trainer()
        trainer.peer_id = announcement.peer_id
        trainer.micro_batch = min(evidence.micro_batch, training.batch_size)
        trainer.load(state)  # θ_r, and an empty AdamW state
        if not evidence.fresh:
            _restore(trainer, evidence)
        with _threads(evidence.threads):
            trainer.inner_steps(announcement.round, steps=steps)
        delta = trainer.outer_gradient()
        payload, _ = compress_with_feedback(self.codec, delta, evidence.residual.clone(),
                                            decay=self.manifest.config.averaging.error_feedback_decay)
        return payload

    def judge(self, replayed: bytes, sent: bytes, announcement: RoundAnnouncement, seconds: float) -> Judgement:
        if hashlib.sha256(replayed).hexdigest() == announcement.payload_sha256:
            return Judgement(True, True, 1.0, 1.0, seconds)
        ours = decode(replayed, self.codec, self.numel).double()
        theirs = decode(sent, self.codec, self.numel).double()
        norms = float(ours.norm()), float(theirs.norm())
        cosine = float(ours @ theirs) / (norms[0] * norms[1]) if min(norms) > 0 else 0.0
        ratio = norms[1] / norms[0] if norms[0] > 0 else math.inf
        passed = cosine >= MIN_COSINE and abs(ratio - 1.0) <= MAX_NORM_DIFFERENCE
        return Judgement(passed, False, cosine, ratio if math.isfinite(ratio) else 1e308, seconds)


def _restore(trainer: Trainer, evidence: Evidence) -> None:
    offset = 0
    for index, parameter in enumerate(trainer.model.parameters()):
        size = parameter.numel()
        trainer.inner.state[parameter] = {
            "step": torch.tensor(float(evidence.step[index])),
            "exp_avg": evidence.exp_avg[offset : offset + size].view_as(parameter).clone(),
            "exp_avg_sq": evidence.exp_avg_sq[offset : offset + size].view_as(parameter).clone(),
        }
        offset += size


@contextlib.contextmanager
def _threads(count: int):
    """Replay with the peer's thread count: CPU reductions split by threads round differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(count, 256)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_check(folder: Path, state: RoundState, evidence: bytes, announcement: bytes, payload: bytes,
               summary: dict) -> None:
    """Keep a check's inputs (and what it found) so that anyone can rerun it."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({"parameters": state.parameters.contiguous(), "momentum": state.momentum.contiguous()},
              str(partial / "state.safetensors"), metadata={"round": str(state.round)})
    (partial / "evidence.safetensors").write_bytes(evidence)
    (partial / "announcement.msgpack").write_bytes(announcement)
    (partial / "payload.bin").write_bytes(payload)
    (partial / "check.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def rerun_check(checker: SpotChecker, folder: Path, layout_root) -> tuple[Judgement, RoundAnnouncement]:
    """Rerun a kept check: every input is checked against the signed announcement first."""
    try:
        files = {name: (folder / name).read_bytes() for name in CHECK_FILES}
    except OSError as error:
        raise InputError(f"{folder}: not a spot check's folder ({error.strerror or error})") from None
    announcement = RoundAnnouncement.from_bytes(files["announcement.msgpack"]).verify()
    if hashlib.sha256(files["payload.bin"]).hexdigest() != announcement.payload_sha256:
        raise HashMismatch(f"{folder}/payload.bin is not the payload the announcement names")
    saved = load_file(str(folder / "state.safetensors"))
    state = RoundState(announcement.round, saved["parameters"], saved["momentum"])
    if layout_root(state) != announcement.base_root:
        raise HashMismatch(f"{folder}/state.safetensors is not the consensus the round built on")
    evidence = checker.evidence(files["evidence.safetensors"])
    started = time.monotonic()
    replayed = checker.replay(state, announcement, evidence)
    return checker.judge(replayed, files["payload.bin"], announcement, time.monotonic() - started), announcement


def rerun_in_workdir(workdir: Path, folder: Path) -> dict:
    """``barnraise-coordinator spot-check``: rerun a kept check with the run of ``workdir`` (its
    verified manifest and files), and compare with what the ledger recorded for it."""
    from coordinator.export import read_run
    from peer.assets import open_assets

    manifest, entries = read_run(workdir)
    assets = open_assets(manifest, workdir / "blobs", [])
    checker = SpotChecker(manifest, assets.corpus, assets.config_json)
    layout = checker.trainer().layout
    judgement, announcement = rerun_check(checker, folder, lambda state: state.root(layout))
    if announcement.run_id != manifest.run_id:
        raise InputError(f"{folder} is a check of run {announcement.run_id}, not of {manifest.run_id}")
    recorded = next((c for e in entries for c in e.checks
                     if (c.round, c.peer_id) == (announcement.round, announcement.peer_id)), None)
    evidence_sha = hashlib.sha256((folder / "evidence.safetensors").read_bytes()).hexdigest()
    if recorded is not None and recorded.evidence_sha256 not in ("", evidence_sha):
        raise HashMismatch(f"{folder}/evidence.safetensors is not the evidence the ledger names")
    return summary_of(judgement, announcement, evidence_sha) | {
        "ledger_verdict": None if recorded is None else recorded.verdict,
        "agrees": recorded is None or (recorded.verdict == "passed") == judgement.passed,
    }


def summary_of(judgement: Judgement, announcement: RoundAnnouncement, evidence_sha256: str) -> dict:
    return asdict(judgement) | {"round": announcement.round, "peer_id": announcement.peer_id,
                                "payload_sha256": announcement.payload_sha256, "evidence_sha256": evidence_sha256}


_EVIDENCE_SECONDS = 20.0
"""Time a drawn member has to serve its evidence (plus a second per MB of it)."""
_PASSED_KEPT = 20
"""Folders of passed checks kept (every failed or unanswered one is kept)."""


class Inspector:
    """The coordinator's side of spot checks: draws members of a replayed round, checks each, keeps its inputs in ``folder``, and returns what the ledger records."""

    def __init__(self, node, manifest: RunManifest, checker: SpotChecker, folder: Path, say,
                 rng: random.Random | None = None):
        self.node, self.manifest, self.checker, self.folder, self.say = node, manifest, checker, folder, say
        self.every = manifest.config.checks.spot_check_every
        self.rng = rng or random.SystemRandom()  # the coordinator's own: peers cannot predict the draw
        self.folder.mkdir(parents=True, exist_ok=True)

    def draw(self, members) -> list[RoundAnnouncement]:
        """Each member independently, with probability 1/N (N = 1: every member of every round)."""
        if self.every == 0:
            return []
        return [m for m in members if self.rng.random() < 1.0 / self.every]

    def check(self, member: RoundAnnouncement, state: RoundState, credited: int,
              holders: list[str]) -> tuple[SpotCheck, Judgement | None]:
        """Check ``member``'s round from ``state`` (θ_r); ``credited``: the samples the round
        credited it (withdrawn unless the check passes)."""
        peer, round_ = member.peer_id, member.round
        numel, tensors = self.checker.numel, self.checker.tensors
        limit = evidence_limit(numel, tensors)
        incoming = self.folder / f".incoming-{round_}-{peer}"
        raw = None
        try:
            wanted = evidence_id(self.manifest.run_id, round_, peer)
            if self.node.fetch_blob(wanted, limit, [member.p2p_id], incoming, _EVIDENCE_SECONDS + limit / 1e6,
                                    by_content=False):
                raw = incoming.read_bytes()
        except (TransportError, DeadlineExceeded, OSError) as error:
            self.say(f"spot check of round {round_}, peer {peer}: its evidence did not come: {error}")
        finally:
            incoming.unlink(missing_ok=True)
        payloads = self.node.fetch_payloads([(member.payload_sha256, member.payload_size,
                                              [member.p2p_id, *holders])], _EVIDENCE_SECONDS)
        payload = payloads.get(member.payload_sha256)
        if raw is None or payload is None:
            what = "its evidence" if raw is None else "its payload"
            self.say(f"spot check of round {round_}, peer {peer}: UNANSWERED ({what} was not served); "
                     f"{credited} samples withdrawn")
            return SpotCheck(peer_id=peer, round=round_, verdict="unanswered", samples=credited,
                             payload_sha256=member.payload_sha256, evidence_sha256=""), None
        evidence_sha = hashlib.sha256(raw).hexdigest()
        started = time.monotonic()
        try:
            judgement = self.checker.judge(self.checker.replay(state, member, self.checker.evidence(raw)), payload,
                                           member, time.monotonic() - started)
        except (MalformedRecord, InputError) as error:  # evidence that cannot be replayed is no evidence
            judgement = Judgement(False, False, 0.0, 0.0, time.monotonic() - started)
            self.say(f"spot check of round {round_}, peer {peer}: its evidence cannot be replayed: {error}")
        name = f"r{round_:06d}-{peer}"
        save_check(self.folder / name, state, raw, member.to_bytes(), payload,
                   summary_of(judgement, member, evidence_sha))
        self._prune()
        withdrawn = 0 if judgement.passed else credited
        self.say(f"spot check of round {round_}, peer {peer}: {judgement.describe()}"
                 + ("" if judgement.passed else f"; {withdrawn} samples withdrawn") + f" (checks/{name})")
        return SpotCheck(peer_id=peer, round=round_, verdict="passed" if judgement.passed else "failed",
                         samples=withdrawn, payload_sha256=member.payload_sha256,
                         evidence_sha256=evidence_sha), judgement

    def _prune(self) -> None:
        passed = []
        for folder in sorted(self.folder.glob("r*-*")):
            try:
                if json.loads((folder / "check.json").read_text()).get("passed"):
                    passed.append(folder)
            except (OSError, ValueError):
                continue
        for folder in passed[:-_PASSED_KEPT]:
            shutil.rmtree(folder, ignore_errors=True)
