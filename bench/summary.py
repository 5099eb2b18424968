"""The summary every contender returns, built from what its ranks reported.

Each rank writes one dict: ``rank``, ``seconds`` (training wall time without evaluation
pauses), ``compute_seconds``, ``wait_seconds`` (communication and waiting for peers),
``eval_seconds`` (evaluation pauses), ``steps`` (global optimizer steps it ended at) and
``samples`` (windows it really computed gradients for); rank 0 adds ``heldout_loss`` and
``curve``. ``summarize`` turns the ranks' dicts into the contender's summary:

    contender                 name of the contender, e.g. "dp-fp32"
    heldout_loss              final held-out loss (nats/byte), scored by rank 0
    curve                     [{"step", "seconds", "heldout_loss"}, ...]: time-to-target points;
                              "seconds" is training time since the start, evaluation excluded
    seconds                   rank 0's training wall time, evaluation pauses excluded
    compute_fraction          mean over ranks of compute / (compute + waiting)
    steps                     global optimizer steps rank 0 ended at
    tokens                    training tokens all ranks computed gradients for
    peers                     number of ranks
    eval_seconds              rank 0's evaluation pauses
    ranks                     the ranks' own dicts
    leftover_process_groups   ranks whose process group still had processes when reaped (0 is clean)

Bytes are not part of it: the caller diffs interface counters around the run (``bench.counters``).
"""

from __future__ import annotations

from typing import Any

from bench.task import TaskSpec

__all__ = ["summarize"]


def summarize(contender: str, spec: TaskSpec, ranks: list[dict[str, Any]], leftovers: int) -> dict[str, Any]:
    """One contender's summary from its ranks' reports (rank 0 first)."""
    lead = ranks[0]
    fractions = [r["compute_seconds"] / max(r["compute_seconds"] + r["wait_seconds"], 1e-9) for r in ranks]
    return {
        "contender": contender,
        "heldout_loss": lead["heldout_loss"],
        "curve": lead["curve"],
        "seconds": lead["seconds"],
        "compute_fraction": sum(fractions) / len(fractions),
        "steps": lead["steps"],
        "tokens": sum(r["samples"] for r in ranks) * spec.data.seq_len,
        "peers": spec.peers,
        "eval_seconds": lead["eval_seconds"],
        "ranks": ranks,
        "leftover_process_groups": leftovers,
    }
