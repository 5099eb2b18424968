"""Contender (a): synchronous data-parallel training, fp32 gradient all-reduce every step (gloo).

    PYTHONPATH=. python -m bench.baselines_smoke --contender dp

``run_dataparallel`` starts ``spec.peers`` processes (``python -m bench.dataparallel --rank r``)
that meet through torch.distributed's TCP store at ``master_addr``. Each step every rank
computes the gradient of its own ``bench.task.windows(rank, step)``, packs all gradients into
one flat fp32 buffer, all-reduces it (SUM, gloo: a ring, so each rank sends about
2 (N-1)/N times the buffer), divides by N, clips and takes an AdamW step at the task's
learning rate for that step (``TaskSpec.training_schedule``). All ranks start from
the same genesis parameters and apply the same update, so they stay identical.

Rank 0 scores held-out loss at ``bench.task.checkpoint_steps``; the other ranks wait for it at
a barrier, and that pause is left out of the reported training seconds.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench.ranks import Launcher, arm_watchdog, run_ranks, write_result
from bench.summary import summarize
from bench.task import TaskSpec, checkpoint_steps, evaluate, windows
from peer.data import Corpus, load_corpus
from peer.model import batch_loss, build_model

__all__ = ["run_dataparallel", "CONTENDER"]

CONTENDER = "dp-fp32"


def _free_port(address: str) -> int:
    """A port free at ``address``; when the address lives in another network namespace (so this
    process cannot bind it), a port free on this host's loopback, which that namespace has not used."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_dataparallel(
    spec: TaskSpec,
    workdir: Path,
    *,
    launcher: Launcher | None = None,
    master_addr: str = "127.0.0.1",
    port: int | None = None,
    gloo_ifname: str | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Train ``spec`` with fp32 all-reduce data parallelism; return the run's summary.

    ``master_addr`` is rank 0's address as the other ranks reach it (its namespace IP when
    each rank has its own network namespace); ``port`` defaults to one free on this host.
    ``gloo_ifname`` (environment GLOO_SOCKET_IFNAME) is the interface gloo advertises; it
    defaults to ``lo`` when ``master_addr`` is a loopback address. Bytes are not measured here:
    wrap the call in ``bench.counters.InterfaceBytes``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "task.json").write_text(json.dumps(spec.to_dict()))
    port = _free_port(master_addr) if port is None else port
    ifname = gloo_ifname or ("lo" if master_addr.startswith("127.") else None)
    rank_deadline = max(timeout_s - 15.0, timeout_s * 0.9)

    def rank_args(rank: int) -> list[str]:
        return [
            *("--rank", str(rank), "--workdir", str(workdir)),
            *("--master-addr", master_addr, "--port", str(port), "--timeout", f"{rank_deadline:.1f}"),
        ]

    results, leftovers = run_ranks(
        "bench.dataparallel",
        rank_args,
        peers=spec.peers,
        workdir=workdir,
        timeout_s=timeout_s,
        launcher=launcher,
        env={"GLOO_SOCKET_IFNAME": ifname} if ifname else None,
    )
    return summarize(CONTENDER, spec, results, leftovers)


@dataclass
class _Clock:
    """Seconds one rank spent computing, waiting in all-reduce, and pausing for evaluation."""

    compute: float = 0.0
    wait: float = 0.0
    evaluation: float = 0.0


class _FlatGradients:
    """All gradients of a model in one flat fp32 buffer, so one all-reduce moves them all."""

    def __init__(self, parameters: list[torch.nn.Parameter]):
        self.parameters = parameters
        self.buffer = torch.zeros(sum(p.numel() for p in parameters), dtype=torch.float32)  # [n_params]

    def pack(self) -> torch.Tensor:
        torch.cat([p.grad.reshape(-1) for p in self.parameters], out=self.buffer)
        return self.buffer

    def unpack(self, scale: float) -> None:
        self.buffer.mul_(scale)
        for parameter, chunk in zip(
            self.parameters, self.buffer.split([p.numel() for p in self.parameters]), strict=True
        ):
            parameter.grad.copy_(chunk.view_as(parameter))


def _checkpoint(model: torch.nn.Module, corpus: Corpus, spec: TaskSpec, rank: int, step: int, start: float,
                clock: _Clock, curve: list[dict[str, float]]) -> None:  # fmt: skip
    """Rank 0 scores held-out loss while the others wait; the pause does not count as training time."""
    began = time.perf_counter()
    if rank == 0:
        seconds = began - start - clock.evaluation
        curve.append({"step": step, "seconds": seconds, "heldout_loss": evaluate(model, corpus, spec)})
    dist.barrier()
    clock.evaluation += time.perf_counter() - began


def _train(spec: TaskSpec, rank: int, corpus: Corpus) -> dict[str, Any]:
    model = build_model(spec.model).train()
    parameters = list(model.parameters())  # tied embeddings appear once
    optimizer = torch.optim.AdamW(parameters, lr=spec.inner_lr, betas=spec.betas, weight_decay=spec.weight_decay)
    for parameter in parameters:
        parameter.grad = torch.zeros_like(parameter)
    flat, clock, curve = _FlatGradients(parameters), _Clock(), []
    checkpoints, schedule = set(checkpoint_steps(spec)), spec.training_schedule()
    dist.barrier()  # every rank has loaded its data: the clock starts together
    start = time.perf_counter()
    for step in range(spec.steps + 1):
        if step in checkpoints:
            _checkpoint(model, corpus, spec, rank, step, start, clock, curve)
        if step == spec.steps:
            break
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = schedule.inner_lr_at(step)
        optimizer.zero_grad(set_to_none=False)
        batch_loss(model, windows(corpus, spec, rank, step)).backward()
        buffer = flat.pack()
        reduce_began = time.perf_counter()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        reduce_ended = time.perf_counter()
        flat.unpack(1.0 / spec.peers)
        if spec.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
        optimizer.step()
        clock.compute += (reduce_began - began) + (time.perf_counter() - reduce_ended)
        clock.wait += reduce_ended - reduce_began
    seconds = time.perf_counter() - start - clock.evaluation
    result: dict[str, Any] = {"rank": rank, "seconds": seconds, "compute_seconds": clock.compute,
                              "wait_seconds": clock.wait, "eval_seconds": clock.evaluation,
                              "steps": spec.steps, "samples": spec.steps * spec.per_peer_batch}  # fmt: skip
    if rank == 0:
        result.update(heldout_loss=curve[-1]["heldout_loss"], curve=curve)
    return result


def _rank_main(rank: int, workdir: Path, master_addr: str, port: int, timeout_s: float) -> None:
    watchdog = arm_watchdog(timeout_s, f"dp rank {rank}")
    torch.set_num_threads(1)
    spec = TaskSpec.from_dict(json.loads((workdir / "task.json").read_text()))
    corpus = load_corpus(spec.data)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{master_addr}:{port}",
        rank=rank,
        world_size=spec.peers,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        write_result(workdir, rank, _train(spec, rank, corpus))
    finally:
        dist.destroy_process_group()
        watchdog.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank (started by ``run_dataparallel``)."""
    parser = argparse.ArgumentParser(description="One rank of the fp32 data-parallel baseline.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--master-addr", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True, help="seconds before this rank gives up")
    args = parser.parse_args(argv)
    _rank_main(args.rank, args.workdir, args.master_addr, args.port, args.timeout)


if __name__ == "__main__":
    main()
