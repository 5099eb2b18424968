"""Hostile volunteers on loopback: a clean run, then one run per behaviour, side by side.

    python scripts/bench_hostile.py                 # every behaviour, 1 of 5 hostile, then 2 of 5
    python scripts/bench_hostile.py --quick         # clean and 2 behaviours, short (a smoke run)

Each run is ``bench.consensus_run``'s swarm (a coordinator and 5 peers of the demo model; the
same minutes, the same clock) with peer 0 (and peer 1 in the 2-of-5 rows) running
``bench.hostile_peer`` with one behaviour. The behaviours that attack state downloads also start a
sixth, honest peer by multiaddrs alone once round 0 has lapsed: it must load a state from the
swarm. For each run, from the honest peers' ``rounds.jsonl`` and the coordinator's ledger:

- the held-out loss of the ledger's last checkpoint, and its ratio to the clean run's;
- local rounds: honest rounds out of step (a failure) or void;
- the longest stall: the most consecutive rounds in which no honest peer applied an update
  (in seconds, against one round deadline);
- forks (rounds after which honest peers held different roots), honest crashes (exit code not 0);
- hostile roots in the ledger: checkpoints whose state no honest peer ever held.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from bench.consensus_run import SwarmRunSpec, run_swarm
from protocol.hashing import checkpoint_root
from protocol.ledger import entries_from_jsonl

__all__ = ["HostileRow", "run_behaviour", "summarise"]

STATE_ATTACKS = ("poison", "endless")
"""Behaviours that only bite a peer that loads a state: their runs add a late joiner."""


@dataclass(frozen=True)
class HostileRow:
    behaviour: str
    hostile: int
    heldout_loss: float | None
    checkpoint_round: int
    losses: dict[int, float | None]
    """Held-out loss of every checkpoint in the ledger, by round (runs are compared at a round
    every run reached: runs of the same minutes on a busy machine reach slightly different ones)."""
    local_rounds: int
    honest_rounds: int
    longest_stall_rounds: int
    forks: int
    crashed: int
    hostile_roots: int
    joiner: str | None
    """What the late joiner's log says about the state it loaded (state attacks only)."""


def run_behaviour(behaviour: str, hostile: int, workdir: Path, *, peers: int = 5, minutes: float = 2.0,
                  start_in: float = 30.0, round_seconds: float = 8.0) -> dict[str, Any]:
    """One run; ``behaviour`` "clean" runs every peer honest."""
    if workdir.exists():
        shutil.rmtree(workdir)
    late = behaviour in STATE_ATTACKS
    spec = SwarmRunSpec(
        peers=peers, minutes=minutes + (1.0 if late else 0.0), spread=1.5, round_seconds=round_seconds,
        start_in=start_in, hostile=tuple((i, behaviour) for i in range(hostile)) if behaviour != "clean" else (),
        joiner_at=start_in + 11 * round_seconds if late else None,
    )
    summary = run_swarm(spec, workdir)
    summary["behaviour"], summary["hostile_count"] = behaviour, hostile if behaviour != "clean" else 0
    return summary


def _state_root(folder: Path) -> str | None:
    """The consensus root (as peers log it) of a checkpoint folder's model and outer files."""
    try:
        named = {f"model/{n}": t for n, t in load_file(str(folder / "model.safetensors")).items()}
        named.update({f"outer/{n}": t for n, t in load_file(str(folder / "outer.safetensors")).items()})
    except (OSError, SafetensorError):
        return None
    return checkpoint_root(named)


def summarise(summary: dict[str, Any], workdir: Path) -> HostileRow:
    hostile = summary["hostile_count"]
    ledger = entries_from_jsonl((workdir / "coordinator" / "ledger.jsonl").read_text())
    last = ledger[-1]
    honest_logs = []
    for index in range(hostile, summary["spec"]["peers"] + 1):
        path = workdir / f"peer-{index}" / "rounds.jsonl"
        if path.exists():
            honest_logs.append([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
    rounds = [r for log in honest_logs for r in log]
    applied = {r["round"] for r in rounds if r["failure"] is None and r.get("void") is None and r["contributors"] > 0}
    seen = sorted({r["round"] for r in rounds})
    stall = longest = 0
    for round_ in seen[1:]:  # the first window was joined part way through
        stall = 0 if round_ in applied else stall + 1
        longest = max(longest, stall)
    # a hostile root: a checkpoint whose state no honest peer ever held (at any round)
    honest_roots = {root for found in summary["roots"].values() for root in found}
    hostile_roots = sum(1 for e in ledger if e.kind == "checkpoint"
                        and _state_root(workdir / "coordinator" / "checkpoints" / f"r{e.round:06d}") not in honest_roots)
    honest_codes = [code for index, code in summary["exit_codes"].items() if int(index) >= hostile]
    joiner = None
    log = workdir / f"peer-{summary['spec']['peers']}.0.log"
    if log.exists():
        lines = [line for line in log.read_text().splitlines() if "vouched" in line or "could not load" in line
                 or "caught up" in line or "joined run" in line]
        joiner = lines[-1].split("] ", 1)[-1][:160] if lines else "no state loaded"
    return HostileRow(
        behaviour=summary["behaviour"], hostile=hostile, heldout_loss=last.heldout_loss, checkpoint_round=last.round,
        losses={e.round: e.heldout_loss for e in ledger},
        local_rounds=sum(1 for r in rounds if r["failure"] is not None or r.get("void") is not None),
        honest_rounds=len(rounds), longest_stall_rounds=longest, forks=len(summary["forks"]),
        crashed=sum(1 for code in honest_codes if code != 0), hostile_roots=hostile_roots, joiner=joiner,
    )
