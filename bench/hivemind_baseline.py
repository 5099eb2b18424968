"""Contender (b): plain ``hivemind.Optimizer``, gradients averaged in fp16 every global step.

    PYTHONPATH=. python -m bench.baselines_smoke --contender hivemind

``run_hivemind`` starts ``spec.peers`` processes (``python -m bench.hivemind_baseline --rank r``),
each with its own ``hivemind.DHT``: rank 0 starts first and writes its visible multiaddrs to
the work folder, the others bootstrap from them. Each rank wraps the same genesis model in
``hivemind.Optimizer`` with ``target_batch_size = spec.global_batch`` and
``batch_size_per_step = spec.per_peer_batch``, so one hivemind epoch is one global step; it
trains on ``bench.task.windows(rank, k)`` at its local step k until ``opt.local_epoch`` reaches
``spec.steps``. Gradients travel as fp16 (``Float16Compression``); everything else keeps
hivemind's defaults, including averaging the parameters (fp32) in the background every
``average_state_every`` epochs. The averaged gradient is clipped to ``spec.grad_clip`` before
AdamW steps, as in the data-parallel baseline.

Plain hivemind does not hold every peer to one batch per epoch: a peer that is faster, or
learns late that the target was reached, contributes more, so ``tokens`` (counted from the
batches really computed) may exceed ``spec.tokens``.

Rank 0 scores held-out loss when the epoch reaches each of ``bench.task.checkpoint_steps``
while every rank waits at a barrier; that pause is left out of the training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bench.ranks import (
    Launcher,
    RankFailed,
    arm_watchdog,
    arrive,
    file_barrier,
    rendezvous_dir,
    run_ranks,
    write_result,
)
from bench.summary import summarize
from bench.task import TaskSpec, checkpoint_steps, evaluate, windows
from peer.data import Corpus, load_corpus
from peer.model import batch_loss, build_model
from protocol.errors import ConfigError, DeadlineExceeded

if TYPE_CHECKING:  # the parent never needs hivemind; ranks import it once HIVEMIND_LOGLEVEL is set
    import hivemind

__all__ = ["run_hivemind", "HivemindOptions", "CONTENDER"]

CONTENDER = "hivemind-fp16"
_MADDRS_FILE = "dht_maddrs.json"


@dataclass(frozen=True, kw_only=True)
class HivemindOptions:
    """The few hivemind settings the baseline fixes; everything else is hivemind's default."""

    matchmaking_time: float = 2.0
    """Seconds a peer looks for groupmates before an averaging round (a full group starts at once)."""
    request_timeout: float = 1.0
    """Deadline of one matchmaking request; hivemind warns unless it is below ``matchmaking_time``."""
    averaging_timeout: float = 30.0
    """Deadline of one averaging round."""
    average_state_every: int = 1
    """Average parameters every this many epochs (hivemind's default: 1)."""
    target_group_size: int | None = None
    """Largest averaging group; None means all peers (a full group starts without waiting)."""
    verbose: bool = False
    """Let hivemind log each epoch and averaging round (with HIVEMIND_LOGLEVEL=INFO) to the rank logs."""

    def __post_init__(self) -> None:
        if not 0 < self.request_timeout < self.matchmaking_time:
            raise ConfigError("hivemind request_timeout must be positive and below matchmaking_time")
        if self.averaging_timeout <= self.matchmaking_time:
            raise ConfigError("hivemind averaging_timeout must exceed matchmaking_time")
        if self.average_state_every <= 0:
            raise ConfigError("hivemind average_state_every must be positive")
        if self.target_group_size is not None and self.target_group_size < 2:
            raise ConfigError("hivemind target_group_size must be at least 2")


def run_hivemind(
    spec: TaskSpec,
    workdir: Path,
    *,
    launcher: Launcher | None = None,
    host_ip: str | Sequence[str] = "127.0.0.1",
    options: HivemindOptions | None = None,
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Train ``spec`` with ``hivemind.Optimizer`` (fp16 gradients); return the run's summary.

    ``host_ip`` is the address every rank's DHT binds to (one for all, or one per rank when each
    rank has its own network namespace). Bytes are not measured here: wrap the call in
    ``bench.counters.InterfaceBytes``.
    """
    options = options or HivemindOptions()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "task.json").write_text(json.dumps(spec.to_dict()))
    group_size = options.target_group_size or spec.peers
    settings = {**dataclasses.asdict(options), "target_group_size": group_size}
    (workdir / "hivemind.json").write_text(json.dumps(settings))
    ips = [host_ip] * spec.peers if isinstance(host_ip, str) else list(host_ip)
    if len(ips) != spec.peers:
        raise ConfigError(f"host_ip names {len(ips)} addresses for {spec.peers} peers")
    rank_deadline = max(timeout_s - 20.0, timeout_s * 0.9)

    def rank_args(rank: int) -> list[str]:
        return [
            *("--rank", str(rank), "--workdir", str(workdir)),
            *("--host-ip", ips[rank], "--timeout", f"{rank_deadline:.1f}"),
        ]

    results, leftovers = run_ranks(
        "bench.hivemind_baseline",
        rank_args,
        peers=spec.peers,
        workdir=workdir,
        timeout_s=timeout_s,
        launcher=launcher,
        env={"HIVEMIND_LOGLEVEL": os.environ.get("HIVEMIND_LOGLEVEL", "ERROR")},
    )
    return summarize(CONTENDER, spec, results, leftovers)


class _ClippedAdamW(torch.optim.AdamW):
    """AdamW that first clips the global norm of the (averaged) gradient, as the DP baseline does."""

    def __init__(self, params: Iterable[torch.Tensor], *, max_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    def step(self, closure: Any = None) -> Any:
        if self.max_norm > 0:
            grads = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, self.max_norm)
        return super().step(closure)


def _join_dht(rank: int, workdir: Path, host_ip: str, timeout_s: float) -> hivemind.DHT:
    """Rank 0 starts the swarm and publishes its addresses; the others join through them."""
    import hivemind

    host_maddrs = [f"/ip4/{host_ip}/tcp/0"]
    published = rendezvous_dir(workdir) / _MADDRS_FILE
    if rank == 0:
        dht = hivemind.DHT(host_maddrs=host_maddrs, start=True)
        partial_file = published.with_suffix(".partial")
        partial_file.write_text(json.dumps([str(a) for a in dht.get_visible_maddrs()]))
        partial_file.replace(published)
        return dht
    deadline = time.monotonic() + timeout_s
    while not published.exists():
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"rank 0 did not publish its DHT addresses within {timeout_s:.0f} s")
        time.sleep(0.1)
    return hivemind.DHT(initial_peers=json.loads(published.read_text()), host_maddrs=host_maddrs, start=True)


def _make_optimizer(
    dht: hivemind.DHT, model: torch.nn.Module, spec: TaskSpec, options: dict[str, Any]
) -> hivemind.Optimizer:
    import hivemind
    from hivemind.compression import Float16Compression
    from hivemind.optim.grad_averager import GradientAverager

    adamw = partial(
        _ClippedAdamW, max_norm=spec.grad_clip, lr=spec.inner_lr, betas=spec.betas, weight_decay=spec.weight_decay
    )
    group = {"target_group_size": options["target_group_size"], "request_timeout": options["request_timeout"]}
    sigint = signal.getsignal(signal.SIGINT)  # hivemind's averagers set SIGINT to "ignore" in this process
    try:
        return hivemind.Optimizer(
            dht=dht,
            run_id="bench",
            target_batch_size=spec.global_batch,
            batch_size_per_step=spec.per_peer_batch,
            params=model.parameters(),
            optimizer=adamw,
            use_local_updates=False,
            matchmaking_time=options["matchmaking_time"],
            averaging_timeout=options["averaging_timeout"],
            average_state_every=options["average_state_every"],
            grad_compression=Float16Compression(),
            # the task's rate per global step (hivemind's epoch): the same schedule as every contender
            scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=_lr_factor(spec)),
            grad_averager_factory=partial(GradientAverager, **group),
            averager_opts=group,
            verbose=options["verbose"],
        )
    finally:
        signal.signal(signal.SIGINT, sigint)


def _lr_factor(spec: TaskSpec):
    schedule = spec.training_schedule()
    return lambda epoch: schedule.inner_lr_at(epoch) / spec.inner_lr


@dataclass
class _RankRun:
    """What one rank measured while training."""

    rank: int
    start: float
    compute: float = 0.0
    wait: float = 0.0
    evaluation: float = 0.0
    warm_up: float = 0.0
    local_steps: int = 0

    def train_step(self, opt: hivemind.Optimizer, model: torch.nn.Module, corpus: Corpus, spec: TaskSpec) -> None:
        """One local batch: gradient, then ``opt.step()`` (waiting time: everything inside it)."""
        began = time.perf_counter()
        batch_loss(model, windows(corpus, spec, self.rank, self.local_steps)).backward()
        computed = time.perf_counter()
        opt.step()  # accumulates locally; at the epoch's end averages with peers and steps AdamW
        opt.zero_grad()
        self.compute += computed - began
        self.wait += time.perf_counter() - computed
        self.local_steps += 1

    def checkpoint(self, model: torch.nn.Module, corpus: Corpus, spec: TaskSpec, epoch: int, pending: list[int],
                   curve: list[dict[str, float]], workdir: Path, deadline: float) -> None:  # fmt: skip
        """Once the epoch passes the next checkpoint(s), rank 0 scores held-out loss while all ranks wait.

        Every rank pauses, as in the data-parallel baseline, so that rank 0's evaluation does not
        change who joins the next averaging rounds; the pause is left out of training time.
        """
        crossed = [step for step in pending if step <= epoch]
        if not crossed:
            return
        del pending[: len(crossed)]
        began = time.perf_counter()
        if self.rank == 0:
            loss = evaluate(model, corpus, spec)
            curve.append({"step": epoch, "seconds": began - self.start - self.evaluation, "heldout_loss": loss})
        for step in crossed[:-1]:  # a rank that jumped epochs (state download) passes several at once
            arrive(workdir, f"checkpoint-{step}", rank=self.rank)
        barrier = f"checkpoint-{crossed[-1]}"
        file_barrier(workdir, barrier, rank=self.rank, peers=spec.peers, timeout_s=deadline - time.monotonic())
        self.evaluation += time.perf_counter() - began


def _warm_up(opt: hivemind.Optimizer, model: torch.nn.Module, corpus: Corpus, spec: TaskSpec, run: _RankRun,
             workdir: Path, deadline: float) -> None:  # fmt: skip
    """Take local step 0 together, then wait until this rank's progress tracker sees every peer.

    hivemind's tracker only lists peers that have reported samples, and a tracker that sees
    no one else estimates the epoch's end from its own speed and steps alone: without this,
    the first epochs race by as solo steps, which would not be a fair picture of hivemind.
    """
    began = time.perf_counter()
    batch_loss(model, windows(corpus, spec, run.rank, 0)).backward()
    computed = time.perf_counter()
    file_barrier(workdir, "computed-step-0", rank=run.rank, peers=spec.peers, timeout_s=deadline - time.monotonic())
    opt.step()  # reports this rank's first samples; no peer has reported before, so no epoch ends here
    opt.zero_grad()
    run.local_steps = 1
    while opt.tracker.global_progress.num_peers < spec.peers:
        if time.monotonic() > deadline:
            seen = opt.tracker.global_progress.num_peers
            raise DeadlineExceeded(f"rank {run.rank}'s progress tracker saw {seen} of {spec.peers} peers")
        time.sleep(0.05)
    file_barrier(workdir, "swarm-visible", rank=run.rank, peers=spec.peers, timeout_s=deadline - time.monotonic())
    if opt.local_epoch != 0:
        raise RankFailed(f"rank {run.rank} ended epoch 0 alone during warm-up; the comparison would be unfair")
    run.compute += computed - began
    run.wait += time.perf_counter() - computed
    run.warm_up = time.perf_counter() - began


def _train(opt: hivemind.Optimizer, model: torch.nn.Module, corpus: Corpus, spec: TaskSpec, rank: int,
           workdir: Path, deadline: float) -> dict[str, Any]:  # fmt: skip
    run = _RankRun(rank=rank, start=time.perf_counter())
    pending, curve = checkpoint_steps(spec), []
    run.checkpoint(model, corpus, spec, 0, pending, curve, workdir, deadline)
    _warm_up(opt, model, corpus, spec, run, workdir, deadline)
    while opt.local_epoch < spec.steps:
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"rank {rank} reached epoch {opt.local_epoch} of {spec.steps} by its deadline")
        run.checkpoint(model, corpus, spec, opt.local_epoch, pending, curve, workdir, deadline)
        run.train_step(opt, model, corpus, spec)
    seconds = time.perf_counter() - run.start - run.evaluation
    run.checkpoint(model, corpus, spec, max(opt.local_epoch, spec.steps), pending, curve, workdir, deadline)
    result: dict[str, Any] = {"rank": rank, "seconds": seconds, "compute_seconds": run.compute,
                              "wait_seconds": run.wait, "eval_seconds": run.evaluation,
                              "warm_up_seconds": run.warm_up, "steps": opt.local_epoch,
                              "samples": run.local_steps * spec.per_peer_batch}  # fmt: skip
    if rank == 0:
        result.update(heldout_loss=curve[-1]["heldout_loss"], curve=curve)
    return result


def _rank_main(rank: int, workdir: Path, host_ip: str, timeout_s: float) -> None:
    watchdog = arm_watchdog(timeout_s, f"hivemind rank {rank}")
    deadline = time.monotonic() + timeout_s - 10.0  # leaves time to shut hivemind down cleanly
    torch.set_num_threads(1)
    spec = TaskSpec.from_dict(json.loads((workdir / "task.json").read_text()))
    options = json.loads((workdir / "hivemind.json").read_text())
    corpus = load_corpus(spec.data)
    dht = _join_dht(rank, workdir, host_ip, deadline - time.monotonic())
    try:
        model = build_model(spec.model).train()
        opt = _make_optimizer(dht, model, spec, options)
        try:
            file_barrier(workdir, "ready", rank=rank, peers=spec.peers, timeout_s=deadline - time.monotonic())
            result = _train(opt, model, corpus, spec, rank, workdir, deadline)
            # Stay in the swarm until every rank is done: a straggler may need our state to catch up.
            file_barrier(workdir, "done", rank=rank, peers=spec.peers, timeout_s=deadline - time.monotonic())
        finally:
            opt.shutdown()
    finally:
        dht.shutdown()
    write_result(workdir, rank, result)
    watchdog.cancel()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one rank (started by ``run_hivemind``)."""
    parser = argparse.ArgumentParser(description="One rank of the plain-hivemind baseline.")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--host-ip", required=True, help="address this rank's DHT binds to")
    parser.add_argument("--timeout", type=float, required=True, help="seconds before this rank gives up")
    args = parser.parse_args(argv)
    _rank_main(args.rank, args.workdir, args.host_ip, args.timeout)


if __name__ == "__main__":
    main()
