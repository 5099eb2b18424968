"""Contender (c): Barnraise itself, as volunteers run it: a coordinator and N ``barnraise-peer``
processes on the reference task, for the same number of training tokens as the baselines.

A recipe (``bench.recipe``) fixes H (inner steps per round), the codec, the outer step and overlap;
``run_toml`` writes it as the RUN.toml a coordinator launches. ``steps`` global steps of
``global_batch`` windows become ``steps // H`` rounds of H inner steps of ``per_peer_batch``
windows on each of the N peers: the same tokens. Peers join by multiaddr with the coordinator's
key pinned, so each builds genesis locally (nothing is downloaded at start), and the
coordinator takes no checkpoints during the run (its state downloads would be extra bytes);
its DHT traffic (tracking progress) is counted with everything else. At the end every peer
writes its consensus parameters (``--save-state``); the held-out loss is scored here, on the
same windows as the baselines; peer 0 also writes snapshots of the consensus on the way
(``--snapshot-every``), scored here afterwards for the held-out curve (no evaluation slows a peer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file

from bench.ranks import Launcher, RankFailed, child_env
from bench.recipe import Recipe, run_config
from bench.task import TaskSpec, evaluate, swarm_peer_key
from coordinator.children import group_alive, kill_group
from peer.data import load_corpus
from peer.model import build_model, load_parameters
from peer.workdir import write_atomic
from protocol.errors import ConfigError
from protocol.manifest import CheckpointConfig

__all__ = ["run_barnraise", "run_toml"]

_REAP_SECONDS = 20.0


_ROUND_DEADLINE_SECONDS = 30.0
ROUND_SECONDS = 20.0
"""Rounds long enough that every peer of the reference task takes all H steps on 2 shared cores
(it then waits for the window to close): the same tokens as the baselines and the simulator."""
START_IN = 45.0
"""Round 0 opens this long after the coordinator's launch: every peer has joined by then."""


def run_toml(spec: TaskSpec, recipe: Recipe, eval_windows: int, *, round_seconds: float = ROUND_SECONDS) -> str:
    """The RUN.toml of a recipe on the task: same model, data, batch and AdamW as the baselines;
    every peer in every round (G ≥ N); no checkpoints during the run."""
    if not recipe.swarm_can_run:
        raise ConfigError(f"recipe {recipe.name}: the swarm runs only sync or arrival rounds of a codec,"
                          " weighted by samples, at one speed and a fixed H")
    averaging = {"round_seconds": round_seconds, "max_contributors": max(16, spec.peers),
                 "round_deadline_seconds": _ROUND_DEADLINE_SECONDS}
    config = run_config(spec, recipe, averaging=averaging, eval_windows=eval_windows)
    config = dataclasses.replace(config, checkpoints=CheckpointConfig(every_rounds=1_000_000))
    return config.to_toml()


def _start(argv: list[str], log: Path, launcher: Launcher | None, rank: int) -> subprocess.Popen[bytes]:
    command = launcher(rank, argv) if launcher else argv
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)


def _wait_for_endpoint(workdir: Path, coordinator: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if coordinator.poll() is not None:
            raise RankFailed(f"the coordinator exited with {coordinator.returncode} (see {workdir / 'coord.log'})")
        try:
            return json.loads((workdir / "coord" / "endpoint.json").read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
    raise RankFailed(f"the coordinator did not serve within {timeout_s:.0f} s")


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every group, wait a bounded time, SIGKILL what is left (hivemind's p2pd included)."""
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + _REAP_SECONDS
    while time.monotonic() < deadline and any(group_alive(p.pid) for p in processes):
        time.sleep(0.2)
    for process in processes:
        kill_group(process.pid)
        try:
            process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            pass


def _peer_argv(
    spec: TaskSpec, workdir: Path, rank: int, endpoint: dict, rounds: int, host: str, every: int, device: str
) -> list[str]:
    folder = workdir / f"p{rank}"
    # a fixed key: the peer trains on the windows of a known peer id (the simulator's replica ``rank``)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "peer.key", swarm_peer_key(rank).to_pem(), mode=0o600)
    argv = [
        sys.executable,
        "-m",
        "peer.cli",
        "join",
        "--initial-peers",
        *endpoint["maddrs"],
        "--coordinator-key",
        str(workdir / "coord" / "coordinator.pub"),
        "--workdir",
        str(folder),
        "--host",
        host,
        "--max-rounds",
        str(rounds),
        "--threads",
        "1",
        "--device",
        device,
        "--save-state",
        str(folder / "final.safetensors"),
    ]
    return argv + (["--snapshot-every", str(every)] if rank == 0 and every > 0 else [])


def run_barnraise(
    spec: TaskSpec,
    recipe: Recipe,
    workdir: Path,
    *,
    timeout_s: float = 1800.0,
    launcher: Launcher | None = None,
    host_ips: list[str] | None = None,
    coordinator_ip: str = "127.0.0.1",
    device: str = "cpu",
    round_seconds: float = ROUND_SECONDS,
) -> dict[str, Any]:
    """Train the task with Barnraise; the caller measures bytes around this call."""
    rounds = max(1, spec.steps // recipe.inner_steps)
    eval_windows = spec.eval_windows or spec.data.eval_windows
    every = max(1, rounds // spec.curve_points)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "RUN.toml").write_text(run_toml(spec, recipe, eval_windows, round_seconds=round_seconds))
    started = time.monotonic()
    coordinator = _start(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "launch",
            str(workdir / "RUN.toml"),
            "--workdir",
            str(workdir / "coord"),
            "--host",
            coordinator_ip,
            "--http-port",
            "0",
            "--start-in",
            str(START_IN),
        ],
        workdir / "coord.log",
        None,
        -1,
    )
    processes = [coordinator]
    try:
        endpoint = _wait_for_endpoint(workdir, coordinator, 120.0)
        started, wall_start = time.monotonic(), time.time()
        for rank in range(spec.peers):
            host = host_ips[rank] if host_ips else "127.0.0.1"
            argv = _peer_argv(spec, workdir, rank, endpoint, rounds, host, every, device)
            processes.append(_start(argv, workdir / f"p{rank}.log", launcher, rank))
        _wait_peers(processes[1:], workdir, started + timeout_s)
        seconds = time.monotonic() - started
    finally:
        _stop_all(processes)
    return _summary(spec, recipe, workdir, rounds, seconds, wall_start)


def _wait_peers(peers: list[subprocess.Popen[bytes]], workdir: Path, deadline: float) -> None:
    while any(p.poll() is None for p in peers):
        if time.monotonic() > deadline:
            raise RankFailed(f"peers still running at the deadline (logs in {workdir})")
        time.sleep(0.5)
    for rank, peer in enumerate(peers):
        if peer.returncode != 0:
            tail = (workdir / f"p{rank}.log").read_text(errors="replace").splitlines()[-3:]
            raise RankFailed(f"peer {rank} exited with {peer.returncode}: {' | '.join(tail)}")


def _snapshots(folder: Path, model, corpus, spec: TaskSpec) -> list[dict[str, Any]]:
    """Held-out loss of each consensus snapshot, with its round and Unix time, in round order."""
    points = []
    for path in sorted(folder.glob("r*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        load_parameters(model, load_file(str(path)))
        points.append({"round": int(metadata["round"]), "time": float(metadata["time"]),
                       "heldout_loss": evaluate(model, corpus, spec)})
    return points


def _summary(spec: TaskSpec, recipe: Recipe, workdir: Path, rounds: int, seconds: float,
             wall_start: float) -> dict[str, Any]:
    corpus = load_corpus(spec.data)
    model = build_model(spec.model)
    losses = []
    for rank in range(spec.peers):
        load_parameters(model, load_file(str(workdir / f"p{rank}" / "final.safetensors")))
        losses.append(evaluate(model, corpus, spec))
    logs = [
        [json.loads(line) for line in (workdir / f"p{r}" / "rounds.jsonl").read_text().splitlines()]
        for r in range(spec.peers)
    ]
    flat = [r for log in logs for r in log]
    compute = sum(r["compute_seconds"] for r in flat) / spec.peers
    curve = _snapshots(workdir / "p0" / "snapshots", model, corpus, spec)
    training_start = curve[0]["time"] if curve else wall_start
    seconds -= training_start - wall_start  # joining (imports, DHT, waiting for the others) is not training
    wall_start = training_start
    # the consensus of round b holds b rounds of H steps
    step_of = lambda b: b * recipe.inner_steps  # noqa: E731
    return {
        "contender": f"barnraise-{recipe.name}",
        "recipe": recipe.to_dict(),
        "heldout_loss": losses[0],
        "heldout_loss_peers": losses,
        "rounds": rounds,
        "averaged_fraction": sum(1 for r in flat if r["averaged"]) / max(1, len(flat)),
        "full_group_fraction": sum(1 for r in flat if r["contributors"] == spec.peers) / max(1, len(flat)),
        "tokens": sum(r["samples"] for r in flat) * spec.data.seq_len,
        "payload_bytes": flat[0]["payload_bytes"] if flat else 0,
        "seconds": seconds,
        "compute_fraction": min(1.0, compute / seconds) if seconds > 0 else 0.0,
        "curve": [
            {"step": step_of(c["round"]), "seconds": c["time"] - wall_start, "heldout_loss": c["heldout_loss"]} for c in curve
        ],
    }
