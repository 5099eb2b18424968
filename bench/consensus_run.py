"""A real swarm on loopback for the round protocol: N peers of uneven speed, optional chaos.

    python scripts/bench_consensus.py --peers 12 --spread 3 --minutes 4

A coordinator and N ``barnraise-peer`` processes (one torch thread each) train the demo model;
peer i is slowed by ``--slowdown`` spread linearly from 1 to ``spread``. With ``chaos_every``, a
random peer is killed with SIGKILL every that many seconds and restarted from its workdir. At the
end every process is stopped, the ledger is audited, and the peers' ``rounds.jsonl`` give:

- forks: rounds after which two peers held different consensus roots (must be 0);
- per peer: rounds taken part in, rounds whose update holds its payload, rounds out of step;
- the share of samples in the model within two rounds: a round's samples count when its payload
  is in that round's update, or (left waiting or announced too late, its work back in the
  residual) when the next round's update holds this peer's payload;
- compute fraction: seconds of inner steps over the wall seconds of a peer's windows (its second to
  its last, missed ones included; a window's steps may start a moment before it opens).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.children import Child, group_alive, kill_group

__all__ = ["SwarmRunSpec", "run_swarm", "analyse"]

_RUN = """\
[run]
name = "consensus"

[model]
n_embd = 128
n_layer = 2
n_head = 4

[averaging]
round_seconds = {round_seconds}
settle_seconds = {settle_seconds}
max_contributors = {max_contributors}
overlap = {overlap}

[checkpoints]
every_rounds = 4
"""


@dataclass(frozen=True)
class SwarmRunSpec:
    peers: int = 8
    minutes: float = 3.0
    spread: float = 3.0
    """The slowest peer runs this many times slower than the fastest."""
    round_seconds: float = 8.0
    settle_seconds: float = 1.5
    max_contributors: int = 16
    overlap: bool = True
    chaos_every: float | None = None
    """Seconds between two SIGKILLs of a random peer (None: no chaos)."""
    start_in: float = 20.0
    """Round 0 opens this long after the coordinator's launch (the peers start meanwhile)."""
    seed: int = 0
    hostile: tuple[tuple[int, str], ...] = ()
    """(peer index, behaviour): these peers run ``bench.hostile_peer`` with that behaviour."""
    joiner_at: float | None = None
    """Seconds after the start at which one more honest peer joins by multiaddrs alone (no
    coordinator): it cannot replay from genesis, so it must load a state from the swarm."""


@dataclass
class _Swarm:
    workdir: Path
    coordinator: Child | None = None
    peers: dict[int, Child] = field(default_factory=dict)
    killed: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""


def _endpoint(coordinator: Child, path: Path, deadline: float) -> str:
    while time.monotonic() < deadline:
        if not coordinator.running:
            raise RuntimeError(f"the coordinator exited (see {coordinator.log_path})")
        try:
            return json.loads(path.read_text())["url"]
        except (FileNotFoundError, ValueError, KeyError):
            time.sleep(0.3)
    raise RuntimeError("the coordinator did not serve within its deadline")


def _start_peer(swarm: _Swarm, index: int, slowdown: float, behaviour: str | None = None,
                bootstrap: list[str] | None = None) -> None:
    source = ["--coordinator", swarm.url] if bootstrap is None else [a for m in bootstrap for a in ("--initial-peers", m)]
    args = ["join", *source, "--workdir", str(swarm.workdir / f"peer-{index}"),
            "--host", "127.0.0.1", "--threads", "1", "--slowdown", f"{slowdown:.3f}"]
    log = swarm.workdir / f"peer-{index}.{sum(k['peer'] == index for k in swarm.killed)}.log"
    if behaviour is None:
        swarm.peers[index] = Child(f"peer-{index}", "peer.cli", args, log, echo=False)
    else:
        swarm.peers[index] = Child(f"peer-{index}", "bench.hostile_peer", ["--behaviour", behaviour, *args], log,
                                   echo=False)


def run_swarm(spec: SwarmRunSpec, workdir: Path) -> dict[str, Any]:
    """Run the swarm for ``spec.minutes``, stop it, audit it; returns ``analyse``'s summary."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "RUN.toml").write_text(_RUN.format(
        round_seconds=spec.round_seconds, settle_seconds=spec.settle_seconds,
        max_contributors=spec.max_contributors, overlap=str(spec.overlap).lower()))
    slowdowns = [1.0 + (spec.spread - 1.0) * i / max(1, spec.peers - 1) for i in range(spec.peers)]
    swarm = _Swarm(workdir)
    chooser = random.Random(spec.seed)
    leaked: list[str] = []
    try:
        swarm.coordinator = Child("coordinator", "coordinator.cli",
                                  ["launch", str(workdir / "RUN.toml"), "--workdir", str(workdir / "coordinator"),
                                   "--http-port", "0", "--start-in", str(spec.start_in)],
                                  workdir / "coordinator.log", echo=False)
        swarm.url = _endpoint(swarm.coordinator, workdir / "coordinator" / "endpoint.json", time.monotonic() + 180)
        hostile = dict(spec.hostile)
        for index in range(spec.peers):
            _start_peer(swarm, index, slowdowns[index], hostile.get(index))
        started = time.monotonic()
        joiner_at = started + spec.joiner_at if spec.joiner_at is not None else float("inf")
        next_kill = started + spec.chaos_every if spec.chaos_every else float("inf")
        while time.monotonic() - started < spec.minutes * 60:
            if time.monotonic() >= next_kill:
                index = chooser.randrange(spec.peers)
                victim = swarm.peers[index]
                victim.process.kill()  # SIGKILL the peer process only: its children must follow it
                victim.process.wait(timeout=30)
                deadline = time.monotonic() + 15
                while group_alive(victim.process.pid) and time.monotonic() < deadline:
                    time.sleep(0.2)
                if group_alive(victim.process.pid):
                    leaked.append(f"peer-{index} (pid {victim.process.pid}): children alive 15 s after SIGKILL")
                    kill_group(victim.process.pid)
                victim.stop(grace=1)
                swarm.killed.append({"peer": index, "at": time.monotonic() - started})
                _start_peer(swarm, index, slowdowns[index], hostile.get(index))
                next_kill += spec.chaos_every
            if time.monotonic() >= joiner_at:
                maddrs = json.loads((workdir / "coordinator" / "endpoint.json").read_text())["maddrs"]
                _start_peer(swarm, spec.peers, 1.0, bootstrap=maddrs[:1])
                joiner_at = float("inf")
            time.sleep(0.5)
        for peer in swarm.peers.values():
            peer.interrupt()
        codes = {i: p.stop(grace=90) for i, p in swarm.peers.items()}
        swarm.coordinator.stop(grace=60)
    finally:
        for child in [swarm.coordinator, *swarm.peers.values()]:
            if child is not None and child.running:
                child.stop(grace=10)
    audit = Child("audit", "coordinator.audit", [
        "verify", "--ledger", str(workdir / "coordinator" / "ledger.jsonl"),
        "--public-key", str(workdir / "coordinator" / "coordinator.pub"),
        "--checkpoints", str(workdir / "coordinator" / "checkpoints")], workdir / "audit.log", echo=False)
    audited = audit.process.wait(timeout=600) == 0
    audit.stop(grace=1)
    summary = analyse(workdir, spec.peers, spec.round_seconds, skip=set(dict(spec.hostile)))
    summary.update(spec=spec.__dict__, slowdowns=slowdowns, killed=swarm.killed, exit_codes=codes,
                   audit_passed=audited, leaked=leaked)
    return summary


def analyse(workdir: Path, peers: int, round_seconds: float, skip: set[int] = frozenset()) -> dict[str, Any]:
    """What the peers' ``rounds.jsonl`` say (see the module docstring); peers in ``skip`` (hostile
    ones) are left out."""
    roots: dict[int, set[str]] = {}
    rows = []
    logs = []
    for index in range(peers):
        if index in skip:
            logs.append([])
            continue
        path = workdir / f"peer-{index}" / "rounds.jsonl"
        logs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else [])
    # the swarm is formed from the first round that took every peer's payload
    formed = min((r["round"] for log in logs for r in log if r["contributors"] >= peers), default=None)
    for index, rounds in enumerate(logs):
        if index in skip:
            continue
        for r in rounds:
            if r["failure"] is None:
                roots.setdefault(r["state_round"], set()).add(r["state_root"])
        by_round = {r["round"]: r for r in rounds}
        samples = sum(r["samples"] for r in rounds)
        # a payload a round did not take (left waiting, or announced too late) went back to the
        # residual: its samples are in the model if the next round takes this peer's payload
        within_two = sum(r["samples"] for r in rounds if _in_model(r, by_round))
        later = [r for r in rounds if formed is not None and r["round"] >= formed]
        later_samples = sum(r["samples"] for r in later)
        steady = rounds[1:]  # the first window was joined part way through
        compute = sum(r["compute_seconds"] for r in steady)
        rows.append({
            "peer": index,
            "rounds": len(rounds),
            "entered": sum(1 for r in rounds if r["entered"]),
            "waiting": sum(1 for r in rounds if r["waiting"]),
            "out_of_step": sum(1 for r in rounds if r["failure"] is not None),
            "samples": samples,
            "samples_in_within_two_rounds": within_two / samples if samples else 0.0,
            "formed_samples_in_within_two_rounds": (
                sum(r["samples"] for r in later if _in_model(r, by_round)) / later_samples if later_samples else 0.0),
            # over every window from its second to its last, those it missed included
            "compute_fraction": compute / ((steady[-1]["round"] - steady[0]["round"] + 1) * round_seconds)
            if steady else 0.0,
            "idle_seconds": sum(r["wait_seconds"] for r in rounds),
        })
    forks = sorted(r for r, found in roots.items() if len(found) > 1)
    return {"peers": rows, "rounds": len(roots), "forks": forks, "formed_at": formed,
            "roots": {r: sorted(found) for r, found in roots.items()}}


def _in_model(record: dict, by_round: dict[int, dict]) -> bool:
    """Whether a round's samples are in the model within two rounds (see the module docstring)."""
    return record["entered"] or (record["failure"] is None and record.get("void") is None
                                 and by_round.get(record["round"] + 1, {}).get("entered", False))
