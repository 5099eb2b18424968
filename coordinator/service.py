"""The coordinator's process: one uvloop event loop running the HTTP view and the tracker.

    barnraise-coordinator launch RUN.toml --workdir run-1

Every blocking swarm call (DHT reads, payload fetches, hashing) runs in a worker thread with a
deadline, so the HTTP view stays responsive. Peers never wait on this process: once per round it
replays the decided round from its payloads (``coordinator.follower``), reads the progress
records its own DHT node holds, and every K rounds records a checkpoint of the state it
replayed. Only when the rounds since its state have lapsed (it was down too long) does it load a
peer's state instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from aiohttp import web

from coordinator.admission import issued_token
from coordinator.follower import Follower
from coordinator.http import HttpView, build_app
from coordinator.launch import LaunchedRun, prepare_run
from coordinator.metrics import CONTENT_TYPE, RunMetrics
from coordinator.runpage import HISTORY, JoinCommands, RoundPoint, join_commands, round_point, run_page
from coordinator.spotcheck import Inspector, SpotChecker
from coordinator.swarm import SwarmMemory, start_bootstrap_node
from coordinator.tracker import MAX_CONTRIBUTORS, Tracker
from peer.join import state_from_quorum
from peer.progress import MANIFEST_KEY, MANIFEST_TTL, read_progress
from peer.rounds import Settled
from peer.state import RoundState
from peer.swarm import SwarmNode
from peer.workdir import write_atomic
from protocol.errors import (
    BarnraiseError,
    DeadlineExceeded,
    InputError,
    MalformedRecord,
    TransportError,
    VerificationError,
)
from protocol.ledger import checkpoint_dir_name, next_entry
from protocol.manifest import RunConfig
from protocol.policy import Admission, request_problem
from protocol.records import MAX_CHECKS, Contribution, SpotCheck
from protocol.signing import public_key_to_pem

__all__ = ["CoordinatorOptions", "serve"]

_IDLE_SECONDS = 30.0
"""The longest the loop sleeps between two passes (it wakes when the next round is decided)."""
_NETWORK_READ_SECONDS = 60.0
"""How often it reads them from the swarm (a DHT read costs every peer bytes: about 16 kB in all in a
swarm of 5 nodes); in a swarm of up to 5 nodes its own node already holds every record."""
_MANIFEST_REFRESH = MANIFEST_TTL / 2
_CHECKPOINT_RETRY = 15.0


@dataclass(frozen=True, kw_only=True)
class CoordinatorOptions:
    run_config: Path
    workdir: Path
    host: str = "127.0.0.1"
    """Address for both the HTTP view and the DHT node."""
    http_port: int = 8470
    start_in: float = 0.0
    """A new run's round 0 opens this many seconds after launch."""
    on_line: Callable[[str], None] = print


class Coordinator:
    """Holds the run, the swarm node and the tracker; ``tick`` is one pass of the loop."""

    def __init__(self, options: CoordinatorOptions, run: LaunchedRun, node: SwarmNode, memory: SwarmMemory):
        self.options, self.run, self.node, self.memory = options, run, node, memory
        training = run.manifest.config.training
        self.tracker = Tracker(run.manifest.run_id, samples_per_round=training.inner_steps * training.batch_size)
        head = run.ledger.head()
        self.tracker.seed_from_ledger(head)
        self.metrics = RunMetrics(self._gauges)
        self.history: deque[RoundPoint] = deque(maxlen=HISTORY)
        """The rounds replayed by this process, for the run page's curves."""
        self.recent: dict[str, tuple[int, float, int]] = {}
        """Each member's latest replayed round: (round, its samples/s in it, the round's members)."""
        self.follower = Follower(node, run.manifest, run.checkpoints.read(head.round), run.checkpoints.layout, head,
                                 observe=self._observe)
        self.inspector: Inspector | None = None
        if run.manifest.config.checks.spot_check_every:
            checker = SpotChecker(run.manifest, run.checkpoints.corpus, run.checkpoints.config_json)
            self.inspector = Inspector(node, run.manifest, checker, options.workdir / "checks", self.say)
        self.checks: list[SpotCheck] = []
        """Spot checks since the ledger's head: the next entry lists them."""
        self.withdrawn: list[tuple[str, int]] = []
        """Samples to withdraw from credit once the round that credited them is applied."""
        self.commands: JoinCommands | None = None
        """Set once the HTTP view listens (its URL is in them)."""
        self.manifest_stored_at = time.monotonic()
        self.next_checkpoint_try = 0.0
        self.next_network_read = 0.0
        self.export_ledger()

    def export_ledger(self) -> None:
        """Keep ``WORKDIR/ledger.jsonl`` (what auditors read) in step with the SQLite ledger."""
        self.run.ledger.write_jsonl(self.options.workdir / "ledger.jsonl")

    def say(self, text: str) -> None:
        self.options.on_line(f"[coordinator] {text}")

    def bootstrap(self) -> list[str]:
        return self.node.maddrs + self.tracker.peer_maddrs()[:8]

    def tick(self) -> None:
        """Replay the decided rounds; read progress; refresh the manifest; record a checkpoint when due."""
        follower = self.follower
        if follower.lapsed(time.time()):
            self._adopt_from_peer()
        else:
            problem = follower.problem
            follower.follow(time.time())
            for peer_id, samples in self.withdrawn:  # a failed spot check: that round earns nothing
                follower.credit[peer_id] = max(0, follower.credit.get(peer_id, 0) - samples)
            self.withdrawn.clear()
            if follower.problem is not None and follower.problem != problem:
                self.say(f"replay waits: {follower.problem}")
        local = time.monotonic() < self.next_network_read
        self.tracker.update(read_progress(self.node, self.run.manifest.run_id, clock=follower.clock, local=local))
        if not local:
            self.next_network_read = time.monotonic() + _NETWORK_READ_SECONDS
        if time.monotonic() - self.manifest_stored_at > _MANIFEST_REFRESH:
            self.node.store(MANIFEST_KEY, self.run.signed.to_bytes(), ttl=MANIFEST_TTL)
            self.manifest_stored_at = time.monotonic()
        if peers := self.tracker.peer_maddrs():
            self.memory.peer_maddrs = peers
            self.memory.save()
        head = self.run.ledger.head()
        every = self.run.manifest.config.checkpoints.every_rounds
        due = follower.state.round >= head.round + every and follower.changed and not follower.unconfirmed
        if due and time.monotonic() >= self.next_checkpoint_try:
            self.checkpoint()

    def _adopt_from_peer(self) -> None:
        """Fallback when the rounds since the follower's state have lapsed: the state a majority of
        the live peers vouches for (``peer.join.state_from_quorum``), never one donor's word."""
        if time.monotonic() < self.next_checkpoint_try:
            return
        manifest, follower, layout = self.run.manifest, self.follower, self.run.checkpoints.layout
        candidates = [r.p2p_id for r in self.tracker.alive()]
        try:
            start = state_from_quorum(self.node, manifest, layout, follower.clock, own_peer_id="", candidates=candidates,
                                      timeout=manifest.config.averaging.round_deadline_seconds + 8 * layout.size / 1e6)
        except (TransportError, DeadlineExceeded, VerificationError, MalformedRecord) as error:
            self._postpone(f"rounds since round {follower.state.round} have lapsed and no peer served a state: {error}")
            return
        if start.state.round <= follower.state.round:
            self._postpone(f"rounds since round {follower.state.round} have lapsed; the state served is of round {start.state.round}")
            return
        follower.adopt(start.state)
        self.say(f"rounds since our state had lapsed: following on from {start.source}")

    def checkpoint(self) -> None:
        manifest, head, state = self.run.manifest, self.run.ledger.head(), self.follower.state
        files = self.run.checkpoints.write(state)
        largest = sorted(((s, p) for p, s in self.follower.credit.items() if s > 0), reverse=True)[:MAX_CONTRIBUTORS]
        entry = next_entry(
            self.run.key, head, run_id=manifest.run_id, round=state.round, created_at=time.time(),
            files=files, contributors=[Contribution(peer_id=p, samples=s) for s, p in sorted(largest, key=lambda i: i[1])],
            heldout_loss=self.run.checkpoints.heldout_loss(state),
            checks=[c for c in self.checks if c.round < state.round],
        )
        self.run.ledger.append(entry)
        self.checks = [c for c in self.checks if c.round >= state.round]
        self.metrics.checkpoints.inc()
        self.follower.changed = False
        self.export_ledger()
        loss = "not finite (diverged)" if entry.heldout_loss is None else f"{entry.heldout_loss:.3f}"
        self.say(
            f"checkpoint {entry.seq}: round {entry.round}, held-out loss {loss}, "
            f"root {entry.checkpoint_root[:16]}, {len(entry.contributors)} contributors, {entry.total_samples} samples"
            + (f", {len(entry.checks)} spot checks ({sum(c.verdict == 'passed' for c in entry.checks)} passed)"
               if entry.checks else "")
        )

    def _postpone(self, reason: str) -> None:
        self.say(reason)
        self.next_checkpoint_try = time.monotonic() + _CHECKPOINT_RETRY

    def _observe(self, settled: Settled, state: RoundState) -> None:
        applied = settled.update is not None
        for member in self.inspector.draw(settled.decision.members) if applied and self.inspector else ():
            holders = [m.p2p_id for m in settled.decision.members if m.peer_id != member.peer_id]
            check, judgement = self.inspector.check(member, state, dict(settled.credit).get(member.peer_id, 0), holders)
            self.metrics.spot_checks.labels(check.verdict).inc()
            if judgement is not None:
                self.metrics.spot_check_seconds.observe(judgement.seconds)
            self.checks = (self.checks + [check])[-MAX_CHECKS:]
            if check.samples:
                self.withdrawn.append((check.peer_id, check.samples))
        self.metrics.round_replayed(members=settled.members if applied else 0, void=settled.void is not None,
                                    dropped=settled.dropped)
        if settled.decision is not None:
            seconds = self.run.manifest.config.averaging.round_seconds
            members = settled.decision.members if applied else ()
            with self.tracker.lock:  # read by the HTTP handlers
                self.history.append(round_point(settled.decision.round, members, seconds))
                for m in members:
                    self.recent[m.peer_id] = (settled.decision.round, m.weight / seconds, len(members))

    def _gauges(self) -> dict[str, object]:
        head, alive = self.run.ledger.head(), self.tracker.alive()
        return {
            "global_round": self.tracker.global_round, "live_peers": len(alive),
            "verified_samples": sum(self.follower.credit.values()),
            "swarm_samples_per_second": sum(r.samples_per_second for r in alive),
            "heldout_loss": head.heldout_loss, "ledger_entries": head.seq + 1,
            "replayed_round": self.follower.state.round, "rejected_records": dict(self.tracker.rejected_kinds),
        }

    def page(self) -> dict | None:
        if self.commands is None:  # the HTTP view listens, but its URL is not known yet
            return None
        with self.tracker.lock:
            history, recent = list(self.history), dict(self.recent)
        manifest = self.run.manifest
        return run_page(name=manifest.config.name, status=self.tracker.status(self.run.ledger.head()),
                        history=history, entries=self.run.ledger.entries(), credit=dict(self.follower.credit),
                        commands=self.commands, private=Admission.of(manifest) is not None, recent=recent)

    def http_view(self) -> HttpView:
        signed = self.run.signed
        admission = Admission.of(signed.manifest)
        workdir = self.options.workdir

        def refused(header: str | None, path: str) -> str | None:
            return None if admission is None else request_problem(header, path, admission, now=time.time())

        return HttpView(
            manifest_bytes=signed.to_bytes(),
            manifest_json=signed.to_wire(),
            public_key_pem=public_key_to_pem(signed.manifest.coordinator_key),
            checkpoints=self.run.checkpoints.folder,
            blobs=self.run.blobs.folder,
            ledger_jsonl=self.run.ledger.export_jsonl,
            status=lambda: self.tracker.status(self.run.ledger.head()),
            bootstrap=self.bootstrap,
            recorded=lambda folder: any(checkpoint_dir_name(e) == folder for e in self.run.ledger.entries()),
            token=lambda peer_id: issued_token(workdir, peer_id) if admission is not None else None,
            refused=refused,
            page=self.page,
            metrics=lambda: (self.metrics.render(), CONTENT_TYPE),
        )


async def _loop(coordinator: Coordinator, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            await asyncio.to_thread(coordinator.tick)
        except (BarnraiseError, OSError, sqlite3.Error) as error:
            # e.g. a full disk while writing a checkpoint: nothing was recorded; try again later
            coordinator.say(f"this pass failed and is retried: {type(error).__name__}: {error}")
            coordinator.next_checkpoint_try = time.monotonic() + _CHECKPOINT_RETRY
        pause = min(_IDLE_SECONDS, max(0.2, coordinator.follower.next_due() - time.time()))
        try:
            await asyncio.wait_for(stop.wait(), timeout=pause)
        except TimeoutError:
            pass


async def _serve(options: CoordinatorOptions, run: LaunchedRun, node: SwarmNode, memory: SwarmMemory) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    endpoint = options.workdir / "endpoint.json"
    coordinator = Coordinator(options, run, node, memory)
    runner = web.AppRunner(build_app(coordinator.http_view()), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, options.host, options.http_port)
        await site.start()
        port = runner.addresses[0][1]
        shown_host = socket.gethostname() if options.host in ("0.0.0.0", "::") else options.host
        url = f"http://{shown_host}:{port}"
        write_atomic(endpoint, json.dumps({"url": url, "maddrs": node.maddrs, "pid": os.getpid()}).encode())
        head = run.ledger.head()
        verb = "resumed" if run.resumed else "launched"
        private = Admission.of(run.manifest) is not None
        commands = coordinator.commands = join_commands(url, node.maddrs, run.manifest.coordinator_key, private=private)
        coordinator.say(f"{verb} run {run.manifest.config.name} ({run.manifest.run_id}); ledger at entry {head.seq}, round {head.round}")
        coordinator.say(f"run page: {url}/   metrics: {url}/metrics")
        coordinator.say(f"join with: {commands.url}")
        if commands.multiaddr is not None:
            coordinator.say(f"or, through the swarm: {commands.multiaddr}")
        coordinator.say(f"audit with: {commands.audit}")
        if private:
            coordinator.say(f"this run is private: admit each volunteer's key (barnraise-peer key prints it) with: "
                            f"barnraise-coordinator admit --workdir {options.workdir} KEY")
        await _loop(coordinator, stop)
        coordinator.say("stopping")
    finally:
        endpoint.unlink(missing_ok=True)
        await runner.cleanup()


def serve(options: CoordinatorOptions) -> int:
    """Launch or resume the run and serve until SIGINT/SIGTERM; returns the exit code."""
    config = RunConfig.from_toml(_read_config(options.run_config))
    say = lambda line: options.on_line(f"[coordinator] {line}")  # noqa: E731
    run = prepare_run(config, options.workdir, options.start_in, base=options.run_config.resolve().parent, on_line=say)
    try:
        # hivemind starts its processes from the main thread, before the event loop runs.
        node, memory = start_bootstrap_node(options.workdir, options.host, run.signed, run.checkpoints.layout.size,
                                            run.key)
        try:
            uvloop.run(_serve(options, run, node, memory))
        finally:
            node.shutdown()
    finally:
        run.ledger.close()
    return 0


def _read_config(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"run config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read run config {path}: {error}") from None
