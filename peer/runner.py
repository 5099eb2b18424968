"""The volunteer's process: join a run, then train round after round until stopped.

    barnraise-peer join --coordinator http://127.0.0.1:8470 --workdir peer-1

Rounds are windows of wall-clock time (``protocol.consensus.RoundClock``). In each one the peer
takes the inner steps that fit before the window closes (at most H), announces its compressed
outer gradient, and settles the round once it is decided (``peer.rounds``): every peer applies
the same update to the same consensus. Asynchronous (``averaging.overlap``, the default): the
next window's steps start at once, and the round's update is applied between two of them as
soon as it is in hand (``Trainer.advance(in_flight=True)``). A peer out of step (it missed a
round's payloads, or joined late) replays the rounds it missed from their payloads; only when
that cannot work does it download a peer's state. Ctrl+C settles the round in flight (bounded
by its deadline) and leaves; before training starts it leaves at once. Paused (SIGUSR1, or a
``pause`` file in the workdir), the peer settles the round in flight and then sits rounds out
until resumed, when it catches up like a late joiner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from peer.admission import TokenKeeper, join_token, token_signer
from peer.assets import TOKENIZER_MAX_BYTES, coordinator_source, open_assets
from peer.coordinator_client import CoordinatorClient
from peer.evidence import FOLDER as EVIDENCE_FOLDER
from peer.evidence import KEEP as EVIDENCE_KEPT
from peer.evidence import EvidenceKeeper
from peer.idle import IdleWatch
from peer.join import StartingState, state_from_checkpoint, state_from_genesis, state_from_quorum
from peer.metrics import PeerMetrics
from peer.model import check_memory, count_parameters
from peer.pacing import bytes_per_second, round_budget
from peer.progress import MANIFEST_KEY, MANIFEST_TTL, PROGRESS_TTL, progress_key, read_progress
from peer.rounds import ANNOUNCE_ROUNDS, Announced, RoundExchanger, RoundOutcome, RoundWork, Settled, clock_of
from peer.state import RoundState, outer_step
from peer.swarm import SwarmNode
from peer.trainer import Trainer
from peer.workdir import load_or_create_key, pause_reason, write_atomic, write_run_file
from protocol.codecs import parse_codec, payload_size
from protocol.errors import (
    BarnraiseError,
    DeadlineExceeded,
    HashMismatch,
    MalformedRecord,
    TransportError,
    VerificationError,
)
from protocol.manifest import SignedManifest
from protocol.multiaddr import valid_multiaddr
from protocol.policy import request_signature
from protocol.records import PeerProgress
from protocol.signing import key_id

__all__ = ["PeerOptions", "run_peer"]

_MANIFEST_WAIT = 30.0
_BLOB_DEADLINE = 120.0
"""How long the swarm's peers are asked for one file of the run (a shard, the config, ...)."""
_STATE_TRIES = 3
"""State downloads (the fallback) tried before training on from what this peer holds."""


@dataclass(frozen=True, kw_only=True)
class PeerOptions:
    """What ``barnraise-peer join`` was asked to do."""

    coordinator_url: str | None = None
    initial_peers: tuple[str, ...] = ()
    workdir: Path = Path("barnraise-peer")
    host: str = "0.0.0.0"
    """Address the peer's DHT and payload store listen on."""
    coordinator_key: str | None = None
    """Pin: refuse a manifest not signed by this public key (hex)."""
    max_rounds: int | None = None
    """Leave after taking part in this many rounds."""
    max_minutes: float | None = None
    device: str = "cpu"
    threads: int | None = None
    slowdown: float = 1.0
    """Test and benchmark knob: sleep (slowdown − 1) × each inner step's time after it."""
    snapshot_every: int = 0
    """Write the consensus parameters to ``snapshots/`` every N rounds (0: never)."""
    save_state: Path | None = None
    """Write the consensus parameters here (safetensors) when leaving."""
    max_memory: int | None = None
    """Bytes this peer may use for the model (default: what the machine has); a larger model is refused."""
    micro_batch: int | None = None
    """Windows per forward pass (default: the run's batch_size); gradients are accumulated."""
    activation_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    token: bytes | None = None
    """A private run's join token for this peer's key (default: fetched from the coordinator)."""
    port: int = 0
    """TCP port the peer's node listens on (0: any free one)."""
    relay: bool = True
    """Behind NAT, reserve a slot on a relay (``peer.swarm.SwarmNode``)."""
    max_upload_mbps: float | None = None
    """Pace what this peer sends to this many Mbit/s (``peer.pacing``); None: no cap."""
    max_download_mbps: float | None = None
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (``peer.metrics``); None: none."""
    only_when_idle: float | None = None
    """Pause while other programs use more than this percent of the CPU (``peer.idle``); None: never."""
    on_line: object = field(default=print, repr=False)


class _StopFlag:
    """Ctrl+C/SIGTERM. Before training starts (``open``): leave now (``KeyboardInterrupt``: one line,
    exit 130). Then the first one: stop after the current inner step, settle the round in flight
    (within its deadline), then publish and leave, and say so at once (``notice``). Second Ctrl+C:
    leave now."""

    def __init__(self, notice: Callable[[], None] = lambda: None):
        self.requested = False
        self.training = False
        """Set by ``open``, when the round loop starts."""
        self.notice = notice
        self._teller: threading.Thread | None = None
        self._pipe = (-1, -1)

    def open(self) -> None:
        """Training starts: from now on the first signal is said by a thread of our own (a print from
        the handler could land inside a print of the main thread: a reentrant call), woken through a
        pipe (a write is a plain system call: no lock the interrupted code may hold). ``close`` ends it."""
        self._pipe = os.pipe()
        self._teller = threading.Thread(target=self._tell, name="stop-notice")
        self._teller.start()
        self.training = True

    def _tell(self) -> None:
        if os.read(self._pipe[0], 1):
            self.notice()

    def close(self) -> None:
        teller, self._teller = self._teller, None  # first: a signal from here on writes nothing
        if teller is not None:
            os.close(self._pipe[1])  # the reader sees the end (if nothing was written) and returns
            teller.join()
            os.close(self._pipe[0])

    def __call__(self, signum, frame):
        if not self.training:
            raise KeyboardInterrupt("interrupted while joining, before training started")
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt("interrupted again: left without finishing the round in flight")
            return
        self.requested = True
        if self._teller is not None:
            os.write(self._pipe[1], b"!")


class _PauseSwitch:
    """SIGUSR1 pauses the peer, and the next one resumes it (``PeerProcess._sit_out``)."""

    def __init__(self):
        self.on = False

    def __call__(self, signum, frame):
        self.on = not self.on


class OutOfStep(BarnraiseError):
    """This peer cannot compute the swarm's consensus by replaying rounds."""


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


@dataclass
class _InFlight:
    """A round announced (or only followed) whose settle runs on the settler thread."""

    round: int
    announced: Announced | None
    future: Future


class PeerProcess:
    """Everything one running peer holds; ``run()`` is the round loop."""

    def __init__(self, options: PeerOptions, node: SwarmNode, signed: SignedManifest, client: CoordinatorClient | None,
                 pause: _PauseSwitch | None = None):
        self.options, self.node, self.signed, self.client = options, node, signed, client
        self.manifest = signed.manifest
        self.run_id = self.manifest.run_id
        self.key = load_or_create_key(options.workdir / "peer.key")
        self.peer_id = key_id(self.key.public_key_hex)
        self.served: tuple[bytes | None, list[torch.Tensor]] = (None, [])
        """(signed record, [parameters, momentum]) of the state served to joiners (its root named)."""
        self.served_root = ""
        model, averaging = self.manifest.config.model, self.manifest.config.averaging
        numel = model.parameters or count_parameters(model)
        self.checked = self.manifest.config.checks.spot_check_every > 0
        """The run spot-checks its members: keep this peer's evidence of each round (``peer.evidence``)."""
        self.idle = IdleWatch(options.only_when_idle) if options.only_when_idle is not None else None
        self.metrics = PeerMetrics() if options.metrics_port is not None else None
        self.memory = check_memory(numel, options.device, options.max_memory)
        self.clock = clock_of(self.manifest)
        node.start_averager(  # first: peers serve this peer's blob cache, and it fetches from theirs
            prefix=f"{self.run_id}_avg",
            payload_limit=payload_size(parse_codec(averaging.codec), numel),
            averaging=averaging,
            state_source=self._serve,
            blobs=options.workdir / "blobs",
            evidence=options.workdir / EVIDENCE_FOLDER if self.checked else None,
            upload_rate=bytes_per_second(options.max_upload_mbps),
            download_rate=bytes_per_second(options.max_download_mbps),
        )
        sources = [("the coordinator", coordinator_source(client))] if client is not None else []
        sources.append(("the swarm's peers", self._from_peers))
        self.assets = open_assets(self.manifest, options.workdir / "blobs", sources)
        self.corpus = self.assets.corpus
        self.trainer = Trainer(self.manifest, self.corpus, self.peer_id, options.device,
                               config_json=self.assets.config_json, micro_batch=options.micro_batch,
                               activation_checkpointing=options.activation_checkpointing)
        self.overlap = self.manifest.config.averaging.overlap
        self.contribution_path = options.workdir / "contribution.json"
        self.samples = _saved_samples(self.contribution_path, self.run_id)
        """Samples this peer (this key) has contributed to this run, across restarts."""
        self.exchanger: RoundExchanger | None = None
        self.settler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle")
        """Owns every background settle; shut down (bounded) when the peer leaves."""
        self.in_flight: _InFlight | None = None
        self.before: RoundState | None = None
        """The consensus before the latest round was applied (to redo that round another way)."""
        self.last: RoundOutcome | None = None
        self.stop = _StopFlag(self._stop_notice)
        self.landing: _InFlight | None = None
        """The round ``_land`` is waiting for (it is no longer ``in_flight``)."""
        self.pause = pause or _PauseSwitch()
        self.log_path = options.workdir / "rounds.jsonl"
        self.manifest_checked = -float("inf")
        self.published_root = ""
        self.step_seconds = 0.0
        """The time one inner step takes here (slowdown included), as recently measured."""
        self.last_hook: float | None = None
        self.announce_seconds = 0.2
        self.rounds_taken = 0
        self.progress_stored = -float("inf")
        self.announce_failure: str | None = None
        self.next_window = -1
        self.token = TokenKeeper(node, client, self.key, self.say)
        """A private run: this peer's join token, renewed before it expires."""
        """Asynchronous: the window after the one this peer announced last (it may start early)."""

    def say(self, text: str) -> None:
        self.options.on_line(f"[peer {self.peer_id[:8]}] {text}")

    def _serve(self) -> tuple[bytes | None, list[torch.Tensor]]:
        return self.served

    def _from_peers(self, sha256: str, size: int, destination: Path) -> None:
        """A blob source: the live peers of the run, asked in turn (their records name their libp2p ids)."""
        holders = self._live_peers()
        random.shuffle(holders)  # peers do not all queue at the same holder
        if not holders:
            raise TransportError("no live peer found to ask")
        limit = size if size >= 0 else TOKENIZER_MAX_BYTES
        if not self.node.fetch_blob(sha256, limit, holders, destination, timeout=_BLOB_DEADLINE):
            raise TransportError(f"none of {len(holders)} live peers served it within {_BLOB_DEADLINE:.0f} s")

    def start(self) -> None:
        numel = self.trainer.layout.size
        self.exchanger = RoundExchanger(self.node, self.manifest, self.key, self.peer_id, self.options.workdir, numel)
        self.evidence = EvidenceKeeper(self.options.workdir, self.run_id, self.peer_id) if self.checked else None
        self._start_extras(numel)
        start = self._recorded_state()
        if start is None:  # genesis is the run's init weights and no coordinator serves them
            self.say("genesis is the run's init weights and no coordinator is given: loading a peer's state")
            source = self._reload()
            if source is None:
                raise OutOfStep("no peer served its state, and genesis (the run's init weights) needs --coordinator")
        else:
            self.trainer.load(start.state)
            source = start.source
        if (wait := self.clock.opens(0) - time.time()) > 0:
            self.say(f"round 0 opens in {wait:.0f} s")
        now_round = self.clock.round_at(time.time())
        try:
            replayed = self._replay(now_round)
            if replayed:
                source += f", then {replayed} round(s) replayed from their payloads"
        except OutOfStep as error:
            self.say(f"cannot replay from {source} ({error}); loading a peer's state")
            source = self._reload() or source
        self._publish(store=True)
        self.say(f"joined run {self.manifest.config.name} ({self.run_id}) at round {self.trainer.state.round}: {source}")
        maddrs = self.node.maddrs
        usable = [a for a in maddrs if valid_multiaddr(a)] or ["none (no address of the form --initial-peers takes)"]
        self.say(f"this peer's addresses (others join through them with --initial-peers): {' '.join(usable)}")
        write_run_file(self.options.workdir, run_id=self.run_id, run_name=self.manifest.config.name,
                       coordinator_url=self.options.coordinator_url, maddrs=maddrs, joined_at=time.time())
        if self.options.snapshot_every > 0:
            self._snapshot()  # the first point of a curve: where training starts, and when

    def _recorded_state(self) -> StartingState | None:
        """The ledger's latest checkpoint (with a coordinator), else genesis rebuilt here (None when
        genesis is the run's init weights, which only the coordinator serves)."""
        config_json = self.assets.config_json
        if self.client is not None:
            folder = self.options.workdir / "checkpoints"
            start, _ledger = state_from_checkpoint(self.client, self.manifest, self.trainer.layout, folder, config_json)
            return start
        if self.manifest.config.model.init:
            return None
        return state_from_genesis(self.manifest, self.trainer.layout, config_json)

    def _replay(self, target: int, *, in_flight: bool = False) -> int:
        """Settle rounds from this peer's consensus round up to ``target`` (exclusive) without work of
        our own: the rounds' announcements and payloads give their updates. Returns how many."""
        done = 0
        while self.trainer.state.round < target and not self.stop.requested:
            round_ = self.trainer.state.round
            if time.time() - self.clock.closes(round_) > (ANNOUNCE_ROUNDS - 2) * self.clock.seconds:
                raise OutOfStep(f"round {round_} is too old to replay (its announcements have lapsed)")
            settled = self.exchanger.settle(round_, self.published_root or self._root(), stop=lambda: self.stop.requested)
            if settled.failure is not None and settled.decision is not None and self._repair(settled.decision.base_root):
                continue  # the previous round redone the swarm's way: this one again
            if settled.failure is not None:
                raise OutOfStep(f"round {round_}: {settled.failure}")
            self._advance(settled, in_flight=in_flight)
            self.published_root = self._root()
            done += 1
        return done

    def _repair(self, target: str | None) -> bool:
        """The swarm holds consensus ``target`` where this peer holds another: the previous round
        went the other way here (void here and applied there, or the reverse). Redo it from the
        state before it, both ways; True if one gives ``target``."""
        before = self.before
        if target is None or before is None or before.round + 1 != self.trainer.state.round:
            return False
        layout = self.trainer.layout
        if before.root(layout) == target:  # the swarm voided the round
            self.trainer.load(dataclasses.replace(before.copy(), round=before.round + 1))
        else:
            settled = self.exchanger.settle(before.round, before.root(layout))
            if settled.failure is not None or settled.void is not None or settled.update is None:
                return False
            training = self.manifest.config.training
            redone = outer_step(before, settled.update, lr=training.outer_lr, momentum=training.outer_momentum,
                                nesterov=training.nesterov)
            if redone.root(layout) != target:
                return False
            self.trainer.load(redone)
        self.before = None
        self.published_root = self._root()
        self.say(f"repaired round {before.round}: now on the swarm's consensus {target[:16]}")
        return True

    def _reload(self) -> str | None:
        """Fallback: a live peer's state (verified against its signed record), then the rounds
        since it replayed. Returns where the state came from, or None (training on from ours)."""
        for attempt in range(_STATE_TRIES):
            if self.stop.requested:
                return None
            try:
                start = self._quorum_state()
                if start.state.round < self.trainer.state.round:
                    raise VerificationError(f"the state served is of round {start.state.round}, older than ours")
                self.trainer.load(start.state)
                self.published_root = self._root()
                self._replay(self.clock.round_at(time.time()))
                return start.source
            except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord, OutOfStep) as error:
                if attempt == _STATE_TRIES - 1:
                    self.say(f"could not load a peer's state ({error}); training on from round {self.trainer.state.round}")
                time.sleep(1.0)
        return None

    def _live_peers(self) -> list[str]:
        """libp2p ids of the other live peers, from their believed progress records."""
        own = self.node.p2p_id
        return [r.p2p_id for r in read_progress(self.node, self.run_id, clock=self.clock).alive() if r.p2p_id != own]

    def _quorum_state(self) -> StartingState:
        """The state a majority of the live peers vouches for, from one of them (``state_from_quorum``)."""
        candidates = self._live_peers()
        timeout = self.manifest.config.averaging.round_deadline_seconds + 8 * self.trainer.layout.size / 1e6
        return state_from_quorum(self.node, self.manifest, self.trainer.layout, self.clock, own_peer_id=self.peer_id,
                                 candidates=candidates, timeout=timeout)

    def _root(self) -> str:
        return self.trainer.state.root(self.trainer.layout)

    def _publish(self, *, store: bool = False) -> PeerProgress:
        """Sign a progress record for the consensus this peer holds and serve it with the state (for
        the fallback state download); store it in the DHT when ``store``, or when the stored one is
        a third of its TTL old (the round's announcement already says the peer is alive)."""
        state, last = self.trainer.state, self.last
        record = PeerProgress.signed(
            self.key,
            run_id=self.run_id,
            round=state.round,
            samples=self.samples,
            loss=last.loss if last else 0.0,
            samples_per_second=last.samples_per_second if last else 0.0,
            averaged_with=min(4096, max(1, last.contributors)) if last else 1,
            averaged=bool(last and last.contributors >= 2),
            network_seconds=last.network_seconds if last else 0.0,
            state_root=(root := self._root()),
            p2p_id=self.node.p2p_id,
            maddrs=self.node.maddrs[:16],
            time=time.time(),
        )
        self.published_root = root
        tensors = self.served[1]
        if root != self.served_root:  # a round nobody contributed to leaves the tensors as they were
            tensors = [state.parameters.clone(), state.momentum.clone()]
        self.served, self.served_root = (record.to_bytes(), tensors), root
        self.node.publish_state(record.to_bytes())
        if store or time.monotonic() - self.progress_stored > PROGRESS_TTL / 3:
            self.node.store(progress_key(self.run_id), record.to_bytes(), ttl=PROGRESS_TTL, subkey=self.peer_id)
            self.progress_stored = time.monotonic()
        self._keep_manifest()
        return record

    def _keep_manifest(self) -> None:
        """Keep the manifest findable for joiners when the coordinator no longer refreshes it: once a
        minute, look at the copy this node stores (no network) and re-store it only if it lapses
        within a third of its TTL (or this node holds none: a swarm of more than 5 nodes)."""
        if time.monotonic() - self.manifest_checked < PROGRESS_TTL / 2:
            return
        self.manifest_checked = time.monotonic()
        expires = self.node.stored_expiration(MANIFEST_KEY)
        if expires is None or expires - time.time() < MANIFEST_TTL / 3:
            self.node.store(MANIFEST_KEY, self.signed.to_bytes(), ttl=MANIFEST_TTL)

    def _report(self, outcome: RoundOutcome) -> None:
        line = (
            f"round {outcome.round:4d} | loss {outcome.loss:.3f} | {outcome.samples_per_second:6.0f} samples/s"
            f" | {outcome.contributors} contributor{'s' if outcome.contributors != 1 else ''}"
            f" | net {outcome.network_seconds:4.1f}s, idle {outcome.wait_seconds:4.1f}s"
            f" | sent {outcome.payload_bytes / 1024:.0f} KiB | contributed {self.samples} samples"
        )
        if outcome.failure is not None:
            line += f" | OUT OF STEP: {outcome.failure}"
        elif outcome.void is not None:
            line += f" | ROUND VOID: {outcome.void}; the work goes out again next round"
        elif outcome.waiting:
            line += " | left for a later round (more than G contributed)"
        elif not outcome.entered:
            line += f" | NOT IN THE ROUND: {self.announce_failure or 'announced too late'}"
        self.say(line)
        entry = outcome.to_log() | {"state_round": self.trainer.state.round, "state_root": self.published_root}
        with self.log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")

    def _advance(self, settled: Settled, *, in_flight: bool) -> str | None:
        """Apply the round; returns why its outer step was refused (the round is then void), or None."""
        self.before = self.trainer.state.copy()
        return self.trainer.advance(settled.update, in_flight=in_flight)

    def _settled(self, flight: _InFlight, settled: Settled, *, in_flight: bool, idle: float = 0.0) -> None:
        """Apply a settled round (or note that this peer is out of step), publish, report."""
        if settled.failure is None and (refused := self._advance(settled, in_flight=in_flight)) is not None:
            # every peer computes the same update, so every peer refuses the same step: the round is void
            if settled.entered and flight.announced is not None:
                self.exchanger.take_back(flight.announced)
            settled = dataclasses.replace(settled, entered=False, void=f"the outer step was refused ({refused})")
        work = flight.announced.work if flight.announced is not None else None
        if work is not None and settled.entered:
            self.samples += work.samples
            write_atomic(self.contribution_path, json.dumps({"run_id": self.run_id, "samples": self.samples}).encode())
        if work is not None:
            busy = work.seconds + idle
            decision = settled.decision
            self.last = RoundOutcome(
                round=flight.round, loss=work.loss, samples=work.samples,
                samples_per_second=work.samples / busy if busy > 0 else 0.0, contributors=settled.members,
                entered=settled.entered,
                waiting=decision is not None and any(w.peer_id == self.peer_id for w in decision.waiting),
                void=settled.void, failure=settled.failure, compute_seconds=work.seconds,
                network_seconds=settled.seconds, wait_seconds=idle, payload_bytes=flight.announced.payload_bytes,
            )
        self._publish()
        if self.options.snapshot_every > 0 and self.trainer.state.round % self.options.snapshot_every == 0:
            self._snapshot()
        if work is not None:
            self.announce_failure = flight.announced.failure or settled.left_out
            self._report(self.last)
            if self.metrics is not None:
                fetched = settled.decision.members if settled.update is not None and settled.decision else ()
                self.metrics.round(self.last, received_bytes=sum(m.payload_size for m in fetched
                                                                 if m.peer_id != self.peer_id))

    def _snapshot(self) -> None:
        """The consensus θ (not this peer's own start point) to snapshots/rNNNNNN.safetensors, with
        the time, for scoring elsewhere: no evaluation on the training path."""
        self._save_state(self.options.workdir / "snapshots" / f"r{self.trainer.state.round:06d}.safetensors")

    def _save_state(self, path: Path) -> None:
        tensors = {n: t.contiguous() for n, t in self.trainer.layout.views(self.trainer.state.parameters).items()}
        metadata = {"run_id": self.run_id, "round": str(self.trainer.state.round), "time": repr(time.time()),
                    "samples": str(self.samples)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, save_safetensors(tensors, metadata))

    def _settle_deadline(self, round_: int) -> float:
        """Unix time by which the settle of round ``round_`` is given up."""
        return self.clock.receipts_read(round_) + self.manifest.config.averaging.round_deadline_seconds + 30

    def _land(self, *, in_flight: bool) -> float:
        """Wait for the round in flight (bounded by its deadline) and apply it; returns the idle seconds."""
        flight, self.in_flight = self.in_flight, None
        if flight is None:
            return 0.0
        started = time.monotonic()
        limit = self._settle_deadline(flight.round) - time.time()
        self.landing = flight
        try:
            settled = flight.future.result(timeout=max(1.0, limit))
        except FutureTimeout:
            settled = Settled(None, None, "the round's settle ran past its deadline", limit)
        except BarnraiseError as error:  # e.g. the averager process did not answer
            settled = Settled(None, None, str(error), time.monotonic() - started)
        finally:
            self.landing = None
        idle = time.monotonic() - started
        self._settled(flight, settled, in_flight=in_flight, idle=idle)
        return idle

    def _between_steps(self, stop_at: float) -> bool:
        """Called before every inner step: apply a round update that has arrived; say whether one
        more step still ends before ``stop_at`` (judged by the slowest of the recent steps)."""
        first, now = self.last_hook is None, time.monotonic()
        if self.last_hook is not None:
            self.step_seconds = max(now - self.last_hook, 0.8 * self.step_seconds)
        if self.in_flight is not None and self.in_flight.future.done():
            self._land(in_flight=True)
        self.last_hook = time.monotonic()
        if self.stop.requested:
            return True
        if first:  # one step per window at least: a slow peer still contributes (or its work waits)
            return time.time() >= stop_at
        return time.time() + self.step_seconds > stop_at

    def _catch_up(self, window: int) -> None:
        """Before window ``window``'s steps: hold θ_window (θ_window-1 with its round in flight when
        asynchronous); replay what is missing, or reload a peer's state when replay cannot work."""
        need = window - 1 if self.in_flight is not None else window
        if self.in_flight is not None and self.in_flight.round != need:
            self._land(in_flight=False)  # an older round in flight: land it before replaying the rest
            need = window
        if self.trainer.state.round >= need:
            return
        try:
            count = self._replay(need)
            self.say(f"replayed {count} round(s) from their payloads: now at round {self.trainer.state.round}")
        except OutOfStep as error:
            self.say(f"out of step ({error}); loading a peer's state")
            if (source := self._reload()) is not None:
                self.say(f"caught up: now at round {self.trainer.state.round} ({source})")

    def _data_for(self, window: int) -> bool:
        """Fetch the training shard window ``window`` draws from (nothing for the built-in corpus);
        False, said in one line, when no source has it right (unreachable, cut short, or bytes that
        do not hash to its name): the peer sits the round out and tries again next round."""
        try:
            self.corpus.prefetch(self.peer_id, window)
            return True
        except (TransportError, DeadlineExceeded, HashMismatch) as error:
            self.say(f"round {window}: no training data ({error}); sitting this round out")
            return False

    def _stop_notice(self) -> None:
        """The first Ctrl+C's line: what the peer still does before it leaves, and for how long."""
        flight = self.in_flight or self.landing
        if flight is None:
            self.say("stopping: no round in flight, leaving after the current step; Ctrl+C again to leave now")
            return
        seconds = max(0.0, self._settle_deadline(flight.round) - time.time())
        self.say(f"stopping: finishing round {flight.round} (at most {seconds:.0f} s); Ctrl+C again to leave now")

    def _sit_out(self, reason: str) -> None:
        """Paused: settle the round in flight, then announce nothing (the DHT node stays up and the
        progress record lapses) until resumed; then catch up as a late joiner does, and rejoin at
        the next round boundary."""
        if self.in_flight is not None:
            self._land(in_flight=False)
        self.say(f"paused: {reason}; no round in flight, nothing is announced until resumed")
        while not self.stop.requested and self._pause_reason() is not None:
            self.token.keep()
            time.sleep(0.5)
        if self.stop.requested:
            return
        rejoin = self.clock.round_at(time.time()) + 1
        self.say(f"resumed: catching up, then rejoining at round {rejoin}")
        self._catch_up(rejoin - 1)
        self._sleep_until(self.clock.opens(rejoin))

    def _start_extras(self, numel: int) -> None:
        """What the volunteer asked for besides training: metrics, and a word on its caps and idling."""
        options, averaging = self.options, self.manifest.config.averaging
        if self.metrics is not None:
            host = "127.0.0.1" if options.host in ("0.0.0.0", "::") else options.host
            port = self.metrics.serve(host, options.metrics_port)
            self.say(f"metrics at http://{host}:{port}/metrics")
        problem = round_budget(upload=bytes_per_second(options.max_upload_mbps),
                               download=bytes_per_second(options.max_download_mbps),
                               payload_bytes=payload_size(parse_codec(averaging.codec), numel),
                               members=averaging.max_contributors, seconds=averaging.round_seconds)
        if problem is not None:
            self.say(f"warning: {problem}")
        if self.idle is not None and self.idle.unsupported:
            self.say("--only-when-idle: this system has no /proc/stat to read the CPU's load from; it never pauses")
        if self.checked:
            self.say("this run spot-checks its volunteers' rounds: this peer keeps its evidence of the last "
                     f"{EVIDENCE_KEPT} rounds in {options.workdir / EVIDENCE_FOLDER} and serves it")

    def _pause_reason(self) -> str | None:
        reason = pause_reason(self.options.workdir, signalled=self.pause.on)
        return reason if reason is not None or self.idle is None else self.idle.reason()

    def _round(self) -> bool:
        """One window: catch up, inner steps until the window closes, announce, settle (async: in
        the background). Returns False when the peer should stop."""
        self.token.keep()
        if (reason := self._pause_reason()) is not None:
            self._sit_out(reason)
            return not self.stop.requested
        now = time.time()
        # asynchronous: the next window's steps start as soon as this one is announced, a moment
        # before it opens, so no compute time is lost to the announcement
        window = max(self.clock.round_at(now), self.next_window if self.overlap else 0)
        if (wait := self.clock.opens(window) - now) > 0 and window != self.next_window:  # before round 0 opens
            time.sleep(min(wait, 1.0))
            return not self.stop.requested
        self._catch_up(window)
        if self.stop.requested:
            return False
        if not self._data_for(window):
            self._sleep_until(self.clock.closes(window))
            return not self.stop.requested
        stop_at = self.clock.closes(window) - min(self.clock.seconds / 4, 0.1 + 1.5 * self.announce_seconds)
        self.last_hook = None
        if self.evidence is not None:  # what a spot check of this round replays from
            self.evidence.keep(window, self.trainer, self.exchanger.residual)
        inner = self.trainer.inner_steps(window, lambda: self._between_steps(stop_at), slowdown=self.options.slowdown)
        if self.stop.requested:
            return False  # a round cut short is not announced
        if self.in_flight is not None:
            self._land(in_flight=True)  # the previous round's update had not arrived: wait for it
        if inner.samples == 0 or self.trainer.state.round != window:
            if inner.samples:
                self.say(f"round {window}: {inner.samples} samples not announced (consensus at round "
                         f"{self.trainer.state.round}, not {window}); they are dropped")
            self._sleep_until(self.clock.opens(window + 1))
            return not self.stop.requested
        work = RoundWork(window, inner.loss if math.isfinite(inner.loss) else 0.0, inner.samples, inner.seconds)
        delta = self.trainer.outer_gradient()
        began = time.monotonic()
        announced = self.exchanger.announce(work, delta, base_root=self.published_root)
        self.announce_seconds = time.monotonic() - began
        future = self.settler.submit(self.exchanger.settle, window, self.published_root, announced)
        self.in_flight = _InFlight(window, announced, future)
        self.rounds_taken += 1
        self.next_window = window + 1
        if self.overlap:
            self.trainer.rebase(delta)  # the next window starts from our own progress; the update lands on it
        else:
            self._land(in_flight=False)
        return True

    def _sleep_until(self, moment: float) -> None:
        while not self.stop.requested and (wait := moment - time.time()) > 0:
            time.sleep(min(wait, 0.25))

    def run(self) -> int:
        started = time.monotonic()
        options = self.options
        self.stop.open()  # from now on the first Ctrl+C finishes the round in flight, and says so
        try:
            while not self.stop.requested:
                if options.max_rounds is not None and self.rounds_taken >= options.max_rounds:
                    break
                if options.max_minutes is not None and time.monotonic() - started > options.max_minutes * 60:
                    break
                if not self._round():
                    break
            if self.in_flight is not None:
                self._land(in_flight=False)  # the round in flight: bounded by its deadline
        finally:
            self.settler.shutdown(wait=True, cancel_futures=True)
            self.stop.close()
        if self.stop.requested:
            self.say("stop requested: leaving the swarm")
        self._publish(store=True)
        if self.options.save_state is not None:
            self._save_state(self.options.save_state)
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
    """Join and train; returns the exit code. Raises ``BarnraiseError`` with a one-line reason, and
    ``KeyboardInterrupt`` with one when stopped before training starts (or by a second Ctrl+C)."""
    pause = _PauseSwitch()
    sigusr1 = getattr(signal, "SIGUSR1", None)  # not on Windows: the pause file only
    previous = signal.signal(sigusr1, pause) if sigusr1 is not None else None  # from the start: none is lost
    try:
        return _join_and_train(options, pause)
    except KeyboardInterrupt as interrupt:
        if str(interrupt):
            raise
        raise KeyboardInterrupt("interrupted while joining, before training started") from None
    finally:
        if sigusr1 is not None:
            signal.signal(sigusr1, previous)


def _join_and_train(options: PeerOptions, pause: _PauseSwitch) -> int:
    if options.threads:
        torch.set_num_threads(options.threads)
    options.workdir.mkdir(parents=True, exist_ok=True)
    client = CoordinatorClient(options.coordinator_url) if options.coordinator_url else None
    key = load_or_create_key(options.workdir / "peer.key")  # also its libp2p identity
    signed, admission, token = None, None, b""
    if client is not None:
        signed = client.manifest()
        signed.verify(options.coordinator_key)
        admission, token = join_token(signed, key, client, options.token)
        bootstrap = client.bootstrap()
    else:
        bootstrap = list(options.initial_peers)
    if not bootstrap:
        raise TransportError("no bootstrap address: give --coordinator URL or --initial-peers MULTIADDR")
    node = SwarmNode(initial_peers=bootstrap, host_maddrs=[f"/ip4/{options.host}/tcp/{options.port}"], identity=key,
                     admission=admission, token=token, relay=options.relay)
    if client is not None and admission is not None:  # checkpoint and run files go to admitted keys only
        client.auth = lambda path: request_signature(key, node.token, path, time.time())
    process = None
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if signed is None:
            signed = _manifest_from_swarm(node, options.coordinator_key or token_signer(options.token))
            admission, token = join_token(signed, key, None, options.token)
            if admission is not None:
                node.admit(admission, token)
        process = PeerProcess(options, node, signed, client, pause)
        for signum in previous:
            signal.signal(signum, process.stop)
        process.say(node.reachability().line)
        process.start()
        return process.run()
    finally:
        try:
            if process is not None and process.metrics is not None:
                process.metrics.close()
            node.shutdown()  # first: a Ctrl+C meanwhile goes to the peer's own handler (``_StopFlag``)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

