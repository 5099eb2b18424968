"""The volunteer's process: join a run, then train round after round until stopped.

    barnraise-peer join --coordinator http://127.0.0.1:8470 --workdir peer-1

Each round publishes a signed progress record, runs H inner steps, averages the outer
gradient with the round's group (checking the average really arrived), takes the outer
step and prints one line. Ctrl+C finishes the current round's averaging and leaves.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peer.coordinator_client import CoordinatorClient
from peer.data import load_corpus
from peer.join import StartingState, state_from_checkpoint, state_from_genesis, state_from_peer
from peer.progress import MANIFEST_KEY, PROGRESS_TTL, SwarmView, progress_key, read_progress
from peer.rounds import RoundOutcome, average_round
from peer.swarm import SwarmNode
from peer.trainer import Trainer
from peer.workdir import load_or_create_key, write_atomic
from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError, VerificationError
from protocol.manifest import SignedManifest
from protocol.records import PeerProgress
from protocol.signing import key_id

__all__ = ["PeerOptions", "run_peer"]

_MANIFEST_WAIT = 30.0
_CATCH_UP_TRIES = 5
_CATCH_UP_PAUSE = 1.0


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    """What ``barnraise-peer join`` was asked to do."""

    coordinator_url: str | None = None
    initial_peers: tuple[str, ...] = ()
    workdir: Path = Path("barnraise-peer")
    host: str = "0.0.0.0"
    """Address the peer's DHT and averager listen on."""
    coordinator_key: str | None = None
    """Pin: refuse a manifest not signed by this public key (hex)."""
    max_rounds: int | None = None
    max_minutes: float | None = None
    device: str = "cpu"
    threads: int | None = None
    on_line: object = field(default=print, repr=False)


class _StopFlag:
    """First Ctrl+C/SIGTERM: stop after the current inner step, or once the averaging in flight
    ends (within the round deadline), then publish and leave. Second Ctrl+C: leave now."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


def _manifest_from_swarm(node: SwarmNode, pin: str | None) -> SignedManifest:
    deadline = time.monotonic() + _MANIFEST_WAIT
    while time.monotonic() < deadline:
        raw = node.fetch(MANIFEST_KEY)
        if isinstance(raw, bytes):
            signed = SignedManifest.from_bytes(raw)
            signed.verify(pin)
            return signed
        time.sleep(1.0)
    raise DeadlineExceeded(f"no run manifest found in the swarm within {_MANIFEST_WAIT:.0f} s")


class PeerProcess:
    """Everything one running peer holds; ``run()`` is the round loop."""

    def __init__(self, options: PeerOptions, node: SwarmNode, signed: SignedManifest, client: CoordinatorClient | None):
        self.options, self.node, self.signed, self.client = options, node, signed, client
        self.manifest = signed.manifest
        self.run_id = self.manifest.run_id
        self.key = load_or_create_key(options.workdir / "peer.key")
        self.peer_id = key_id(self.key.public_key_hex)
        self.corpus = load_corpus(self.manifest.config.data)
        self.trainer = Trainer(self.manifest, self.corpus, self.peer_id, options.device)
        self.served: tuple[bytes | None, list[torch.Tensor]] = (None, [])
        self.contribution_path = options.workdir / "contribution.json"
        self.samples = _saved_samples(self.contribution_path, self.run_id)
        """Samples this peer (this key) has contributed to this run, across restarts."""
        self.last: RoundOutcome | None = None
        self.stop = _StopFlag()
        self.log_path = options.workdir / "rounds.jsonl"

    def say(self, text: str) -> None:
        self.options.on_line(f"[peer {self.peer_id[:8]}] {text}")

    def _serve(self) -> tuple[bytes | None, list[torch.Tensor]]:
        return self.served

    def start(self) -> None:
        self.node.start_averager(
            prefix=f"{self.run_id}_avg",
            vector_size=self.trainer.layout.size,
            averaging=self.manifest.config.averaging,
            state_source=self._serve,
        )
        start = self._starting_state(read_progress(self.node, self.run_id))
        self.trainer.load(start.state)
        self.say(f"joined run {self.manifest.config.name} ({self.run_id}) at {start.source}")

    def _starting_state(self, view: SwarmView) -> StartingState:
        others = [r for r in view.alive() if r.peer_id != self.peer_id]
        if others:
            try:
                return self._download_live_state()
            except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord) as error:
                fallback = "the ledger's latest checkpoint" if self.client is not None else "genesis"
                self.say(f"could not load state from peers ({error}); starting from {fallback}")
        if self.client is not None:
            folder = self.options.workdir / "checkpoints"
            start, _ledger = state_from_checkpoint(self.client, self.manifest, self.trainer.layout, folder)
            return start
        return state_from_genesis(self.manifest, self.trainer.layout)

    def _download_live_state(self, at_least: int = 0) -> StartingState:
        """A verified state of round ``at_least`` or later; donors publish theirs moments after
        a round ends, so a too-old answer is retried a bounded number of times."""
        timeout = self.manifest.config.averaging.round_deadline_seconds * 2
        for attempt in range(_CATCH_UP_TRIES):
            if attempt:
                time.sleep(_CATCH_UP_PAUSE)
            record_bytes, tensors = self.node.download_state(timeout=timeout)
            start = state_from_peer(record_bytes, tensors, self.manifest, self.trainer.layout)
            if start.state.round >= at_least:
                break
        return start

    def _catch_up(self, view: SwarmView) -> None:
        """Download state when the swarm is ahead of us, or our last round was alone while
        others averaged (our parameters have drifted from theirs)."""
        mine = self.trainer.state.round
        target = max(view.max_round, max(self.last.group_rounds, default=-1) + 1 if self.last else -1)
        drifted = self.last is not None and not self.last.averaged and any(
            r.averaged and r.peer_id != self.peer_id and r.round >= mine for r in view.alive()
        )
        if not (target > mine or drifted):
            return
        try:
            start = self._download_live_state(at_least=max(target, mine))
        except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord) as error:
            self.say(f"behind the swarm but could not load state ({error}); training on")
            return
        if start.state.round >= mine:
            self.trainer.load(start.state)
            self.say(f"caught up: now at {start.source}")

    def _publish(self) -> PeerProgress:
        state, last = self.trainer.state, self.last
        record = PeerProgress.signed(
            self.key,
            run_id=self.run_id,
            round=state.round,
            samples=self.samples,
            loss=last.loss if last else 0.0,
            samples_per_second=last.samples_per_second if last else 0.0,
            averaged_with=last.group_size if last else 1,
            averaged=bool(last and last.averaged),
            network_seconds=last.network_seconds if last else 0.0,
            state_root=state.root(self.trainer.layout),
            p2p_id=self.node.p2p_id,
            maddrs=self.node.maddrs[:16],
            time=time.time(),
        )
        self.served = (record.to_bytes(), [state.parameters.clone(), state.momentum.clone()])
        self.node.set_state_priority(state.round)
        self.node.store(progress_key(self.run_id), record.to_bytes(), ttl=PROGRESS_TTL, subkey=self.peer_id)
        self.node.store(MANIFEST_KEY, self.signed.to_bytes(), ttl=PROGRESS_TTL)
        return record

    def _report(self, outcome: RoundOutcome, view: SwarmView) -> None:
        total = sum(r.samples for r in view.alive() if r.peer_id != self.peer_id) + self.samples
        share = self.samples / total if total else 1.0
        line = (
            f"round {outcome.round:4d} | loss {outcome.loss:.3f} | {outcome.samples_per_second:6.0f} samples/s"
            f" | averaged with {outcome.group_size} peer{'s' if outcome.group_size != 1 else ''}"
            f" | net {outcome.network_seconds:4.1f}s | contributed {self.samples} samples ({share:.0%})"
        )
        if not outcome.averaged:
            line += f" | LOCAL ROUND: {outcome.failure}"
        self.say(line)
        with self.log_path.open("a") as log:
            log.write(json.dumps(outcome.to_log()) + "\n")

    def run(self) -> int:
        started = time.monotonic()
        options = self.options
        while not self.stop.requested:
            if options.max_rounds is not None and self.trainer.state.round >= options.max_rounds:
                break
            if options.max_minutes is not None and time.monotonic() - started > options.max_minutes * 60:
                break
            self._catch_up(read_progress(self.node, self.run_id))
            self._publish()
            outcome = average_round(
                self.trainer, self.node, self.manifest, self.peer_id,
                stop_requested=lambda: self.stop.requested,
                swarm_round=lambda: read_progress(self.node, self.run_id).max_round,
            )
            if outcome is None:
                break
            if outcome.averaged:  # a local round's work is not in the swarm's model: no credit
                self.samples += outcome.samples
            write_atomic(self.contribution_path, json.dumps({"run_id": self.run_id, "samples": self.samples}).encode())
            self.last = outcome
            self._report(outcome, read_progress(self.node, self.run_id))
        if self.stop.requested:
            self.say("stop requested: leaving the swarm")
        self._publish()
        self.say(f"stopped at round {self.trainer.state.round} after contributing {self.samples} samples")
        return 0


def _saved_samples(path: Path, run_id: str) -> int:
    """The sample count a previous life of this peer recorded for ``run_id`` (0 if none)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0
    if isinstance(saved, dict) and saved.get("run_id") == run_id and isinstance(saved.get("samples"), int):
        return max(0, saved["samples"])
    return 0


def run_peer(options: PeerOptions) -> int:
    """Join and train; returns the exit code. Raises ``BarnraiseError`` with a one-line reason."""
    if options.threads:
        torch.set_num_threads(options.threads)
    options.workdir.mkdir(parents=True, exist_ok=True)
    client = CoordinatorClient(options.coordinator_url) if options.coordinator_url else None
    signed = None
    if client is not None:
        signed = client.manifest()
        signed.verify(options.coordinator_key)
        bootstrap = client.bootstrap()
    else:
        bootstrap = list(options.initial_peers)
    if not bootstrap:
        raise TransportError("no bootstrap address: give --coordinator URL or --initial-peers MULTIADDR")
    node = SwarmNode(initial_peers=bootstrap, host_maddrs=[f"/ip4/{options.host}/tcp/0"])
    process = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if signed is None:
            signed = _manifest_from_swarm(node, options.coordinator_key)
        process = PeerProcess(options, node, signed, client)
        for signum in previous:
            signal.signal(signum, process.stop)
        process.start()
        return process.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        node.shutdown()

