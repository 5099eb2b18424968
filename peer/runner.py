"""The volunteer's process: join a run, then train round after round until stopped.

    barnraise-peer join --coordinator http://127.0.0.1:8470 --workdir peer-1

Each round publishes a signed progress record, runs H inner steps, compresses the outer
gradient and exchanges it with the round's group (``peer.rounds``), applies the group's update
with the outer step and prints one line per settled round. With ``averaging.overlap`` the
exchange of round r runs while round r + 1's inner steps do, and its update is applied one
round late. Ctrl+C settles the exchange in flight (bounded by its deadline) and leaves.
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from peer.coordinator_client import CoordinatorClient
from peer.data import load_corpus
from peer.join import StartingState, state_from_checkpoint, state_from_genesis, state_from_peer
from peer.progress import MANIFEST_KEY, MANIFEST_TTL, PROGRESS_TTL, SwarmView, progress_key, read_progress
from peer.rounds import Exchange, OuterExchanger, RoundOutcome, RoundWork
from peer.swarm import SwarmNode
from peer.trainer import Trainer
from peer.workdir import load_or_create_key, write_atomic
from protocol.codecs import parse_codec, payload_size
from protocol.errors import DeadlineExceeded, MalformedRecord, TransportError, VerificationError
from protocol.manifest import SignedManifest
from protocol.records import PeerProgress
from protocol.signing import key_id

__all__ = ["PeerOptions", "run_peer"]

_MANIFEST_WAIT = 30.0
_CATCH_UP_TRIES = 5
_CATCH_UP_PAUSE = 1.0
_GATHER_WAIT = 180.0


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
    snapshot_every: int = 0
    """Write the consensus parameters to ``snapshots/`` every N rounds (0: never)."""
    wait_for_peers: int = 0
    """Before the first round, wait (up to ``_GATHER_WAIT`` s) until this many peers are present."""
    save_state: Path | None = None
    """Write the consensus parameters here (safetensors) when leaving."""
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
        self.overlap = self.manifest.config.averaging.overlap
        self.exchanger: OuterExchanger | None = None
        self.exchange: Exchange | None = None
        """Overlap: the exchange of the consensus round (in flight, or empty after a fresh start)."""
        self.drifted = False
        """Our consensus state misses an update the swarm applied: load a peer's state next boundary."""
        self.next_steps: int | None = None
        """Overlap: inner steps of the next round when this peer launched late (None: all H)."""
        self.stop = _StopFlag()
        self.log_path = options.workdir / "rounds.jsonl"
        self.manifest_checked = -float("inf")
        self.published_root = ""
        self.view: SwarmView | None = None
        """The swarm as read just before this peer's latest launch (one DHT read per round)."""

    def say(self, text: str) -> None:
        self.options.on_line(f"[peer {self.peer_id[:8]}] {text}")

    def _serve(self) -> tuple[bytes | None, list[torch.Tensor]]:
        return self.served

    def start(self) -> None:
        averaging, numel = self.manifest.config.averaging, self.trainer.layout.size
        self.node.start_averager(
            prefix=f"{self.run_id}_avg",
            payload_limit=payload_size(parse_codec(averaging.codec), numel),
            averaging=averaging,
            state_source=self._serve,
        )
        self.exchanger = OuterExchanger(self.node, self.manifest, self.peer_id, self.options.workdir, numel)
        start = self._starting_state(read_progress(self.node, self.run_id))
        self._adopt(start)
        self.say(f"joined run {self.manifest.config.name} ({self.run_id}) at {start.source}")
        self._wait_for_peers(self.options.wait_for_peers)
        if self.options.snapshot_every > 0:
            self._snapshot()  # the first point of a curve: where training starts, and when

    def _wait_for_peers(self, wanted: int) -> None:
        """Start a fresh run together: wait until ``wanted`` peers (this one included) are present
        at this round, or until the swarm is already past it, or ``_GATHER_WAIT`` seconds."""
        deadline, present = time.monotonic() + _GATHER_WAIT, 1
        while wanted > 1 and not self.stop.requested and time.monotonic() < deadline:
            view = read_progress(self.node, self.run_id)
            here = [r for r in view.alive() if r.round == self.trainer.state.round]
            present = len({r.peer_id for r in here} | {self.peer_id})
            if present >= wanted or view.max_round > self.trainer.state.round:
                return
            mine = view.records.get(self.peer_id)
            if mine is None or time.time() - mine.time > PROGRESS_TTL / 2:
                self._publish()  # stay visible to the others while waiting
            time.sleep(1.0)
        if wanted > 1 and not self.stop.requested:
            self.say(f"only {present} of {wanted} peers after {_GATHER_WAIT:.0f} s; starting anyway")

    def _adopt(self, start: StartingState) -> None:
        """Load a verified consensus state, publish it, and pace the next round to the swarm.
        Overlap: keep our exchange of that round if we are in it; otherwise hold an empty one, and
        if a live peer served the state (its round's exchange was in flight without us) load a
        newer state at the next boundary."""
        self.trainer.load(start.state)
        kept = self._hold_exchange(start) if self.overlap else None
        self._publish()
        if kept is not None:
            # our payload was computed against the consensus we just replaced: take the mean of
            # the groupmates that hold the one we loaded (they leave ours out the same way)
            kept.base_root = self.published_root
            kept.own_excluded = True
        self._pace_after_load(start.state.round)

    def _hold_exchange(self, start: StartingState) -> Exchange | None:
        """The exchange to settle after loading ``start``; returns it when it is ours, kept."""
        ours = self.exchange
        if ours is not None and ours.round == start.state.round and ours.work is not None and ours.pending is not None:
            self.drifted = False
            self.trainer.rebase(ours.delta)  # our own progress of that round stays on top
            return ours
        if ours is not None and ours.pending is not None:
            ours.pending.cancel()  # it would hold matchmaking for our next exchange
        self.exchange = self.exchanger.empty(start.state.round)
        self.drifted = start.live
        return None

    def _starting_state(self, view: SwarmView) -> StartingState:
        others = [r for r in view.alive() if r.peer_id != self.peer_id]
        if others and view.max_round == 0:  # nothing averaged yet: genesis is what they hold
            try:
                return state_from_genesis(self.manifest, self.trainer.layout)
            except VerificationError as error:
                self.say(f"could not rebuild genesis here ({error}); loading state from peers")
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
        drifted = self.drifted or self.last is not None and not self.last.averaged and any(
            r.averaged and r.peer_id != self.peer_id and r.round >= mine for r in view.alive()
        )
        if not (view.max_round > mine or drifted):
            return
        try:
            start = self._download_live_state(at_least=max(view.max_round, mine))
        except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord) as error:
            self.say(f"behind the swarm but could not load state ({error}); training on")
            return
        if start.state.round >= mine:
            self._adopt(start)
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
            state_root=(root := state.root(self.trainer.layout)),
            p2p_id=self.node.p2p_id,
            maddrs=self.node.maddrs[:16],
            time=time.time(),
        )
        self.published_root = root
        # a drifted state is not the swarm's: joiners must not load it
        self.served = (None, []) if self.drifted else (record.to_bytes(), [state.parameters.clone(), state.momentum.clone()])
        self.node.set_state_priority(state.round)
        self.node.store(progress_key(self.run_id), record.to_bytes(), ttl=PROGRESS_TTL, subkey=self.peer_id)
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

    def _report(self, outcome: RoundOutcome, view: SwarmView) -> None:
        total = sum(r.samples for r in view.alive() if r.peer_id != self.peer_id) + self.samples
        share = self.samples / total if total else 1.0
        line = (
            f"round {outcome.round:4d} | loss {outcome.loss:.3f} | {outcome.samples_per_second:6.0f} samples/s"
            f" | averaged with {outcome.group_size} peer{'s' if outcome.group_size != 1 else ''}"
            f" | net {outcome.network_seconds:4.1f}s, waited {outcome.wait_seconds:4.1f}s"
            f" | sent {outcome.payload_bytes / 1024:.0f} KiB | contributed {self.samples} samples ({share:.0%})"
        )
        if not outcome.averaged:
            line += f" | LOCAL ROUND: {outcome.failure}"
        self.say(line)
        # the consensus root after this round's update: equal on groupmates that averaged together
        entry = outcome.to_log() | {"state_round": self.trainer.state.round, "state_root": self.published_root,
                                    "drifted": self.drifted}
        with self.log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")

    def _settle(self, exchange: Exchange) -> None:
        """Apply a finished (or failed) exchange's update with the outer step; report the round."""
        update, outcome = self.exchanger.resolve(exchange)
        self.trainer.apply_outer(update)
        if outcome is not None:
            if outcome.averaged and outcome.contributed:  # work not in the swarm's model earns no credit
                self.samples += outcome.samples
            if outcome.diverged:
                self.drifted = True  # load the majority's state at the next boundary
            write_atomic(self.contribution_path, json.dumps({"run_id": self.run_id, "samples": self.samples}).encode())
            self.last = outcome
        # after the outcome is recorded: the record must say whether *this* round averaged (others'
        # catch-up reads it), not the round before
        self._publish()
        if self.options.snapshot_every > 0 and self.trainer.state.round % self.options.snapshot_every == 0:
            self._snapshot()
        if outcome is not None:
            self._report(outcome, self.view or read_progress(self.node, self.run_id))

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

    def _round(self) -> bool:
        """One round: inner steps, settle the previous exchange (overlap), launch this one."""
        round_ = self.trainer.state.round + (1 if self.overlap else 0)
        inner = self.trainer.inner_steps(round_, lambda: self.stop.requested, steps=self.next_steps)
        if self.stop.requested or inner.samples == 0:
            return False
        work = RoundWork(round_, inner.loss if math.isfinite(inner.loss) else 0.0, inner.samples, inner.seconds)
        delta = self.trainer.outer_gradient()
        if self.overlap:
            self._settle(self.exchange)  # the consensus moves to round_ (and is published)
        view = self.view = read_progress(self.node, self.run_id)
        ahead = view.max_round
        skip = f"behind the swarm (round {round_}, swarm at {ahead}): not averaging a stale update" if ahead > round_ else None
        if self.overlap:
            self.next_steps = self._steps_to_keep_pace(view, round_, inner.seconds / max(1, inner.samples))
        exchange = self.exchanger.launch(work, delta, base_root=self.published_root, skip=skip)
        if self.overlap:
            self.exchange = exchange
            self.trainer.rebase(delta)
        else:
            self._settle(exchange)
        return True

    def _pace_after_load(self, round_: int) -> None:
        """Overlap: the peers that published ``round_`` launched its exchange then and will launch
        the next one H steps later; a peer that loads their state late shortens its first round."""
        if not self.overlap:
            return
        view = read_progress(self.node, self.run_id)
        speeds = [r.samples_per_second for r in view.alive() if r.peer_id != self.peer_id and r.samples_per_second > 0]
        mine = self.last.samples_per_second if self.last and self.last.samples_per_second > 0 else None
        speed = mine or (sorted(speeds)[len(speeds) // 2] if speeds else 0.0)
        self.next_steps = self._steps_to_keep_pace(view, round_, 1.0 / speed if speed > 0 else 0.0)

    def _steps_to_keep_pace(self, view: SwarmView, round_: int, seconds_per_sample: float) -> int | None:
        """Overlap has no barrier, so a slower peer would drift a little later every round until it
        missed its groups. Peers publish just before they launch; one that launches after the median
        of the other live peers (those not at this round yet count as launching now) shortens its
        next round by that lag (its weight, the samples, shrinks with it)."""
        now = time.time()
        others = sorted(
            r.time if r.round == round_ else now
            for r in view.alive() if r.peer_id != self.peer_id and r.round in (round_, round_ - 1)
        )
        if not others:
            return None
        lag = now - others[len(others) // 2]
        training = self.manifest.config.training
        step_seconds = seconds_per_sample * training.batch_size
        if lag <= step_seconds or step_seconds <= 0:
            return None
        return max(1, training.inner_steps - math.ceil(lag / step_seconds))

    def run(self) -> int:
        started = time.monotonic()
        options = self.options
        while not self.stop.requested:
            if options.max_rounds is not None and self.trainer.state.round >= options.max_rounds:
                break
            if options.max_minutes is not None and time.monotonic() - started > options.max_minutes * 60:
                break
            # one DHT read per round: the launch just before read the swarm. Sync: a round that
            # averaged kept this peer in step with its group, so that view is reused (a swarm that got
            # ahead since shows at the next launch, which then skips averaging and the read after it is
            # fresh); after a local or failed round the exchange's outcome is news: read again
            settled_alone = self.last is None or not self.last.averaged or self.drifted
            fresh = self.view is None or (not self.overlap and settled_alone)
            self._catch_up(read_progress(self.node, self.run_id) if fresh else self.view)
            if not self._round():
                break
        if self.overlap and self.exchange is not None and self.exchange.work is not None:
            self._settle(self.exchange)  # the round in flight: bounded by its deadline
            self.exchange = None
        if self.stop.requested:
            self.say("stop requested: leaving the swarm")
        self._publish()
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

