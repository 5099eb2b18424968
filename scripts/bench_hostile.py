"""One hostile volunteer cannot hurt a run: 5 peers on loopback, 1 (then 2) of them hostile.

    python scripts/bench_hostile.py
    python scripts/bench_hostile.py --only flip scale --minutes 3
    python scripts/bench_hostile.py --quick

Prints one row per behaviour: the held-out loss against the clean run's, local rounds, the
longest stall against one round deadline, forks, honest crashes and hostile roots in the ledger,
then one JSON line (bench/hostile_run.py says how each is measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.hostile_peer import BEHAVIOURS  # noqa: E402
from bench.hostile_run import run_behaviour, summarise  # noqa: E402

GOAL = 0.05
"""The held-out loss of a hostile run may be at most this much above the clean run's."""
ROUND_SECONDS, ROUND_DEADLINE = 8.0, 30.0
"""The runs' W and ``round_deadline_seconds`` (the manifest's defaults): no stall may last longer."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=BEHAVIOURS, help="these behaviours (default: all)")
    parser.add_argument("--two", nargs="*", default=["flip", "scale", "noise"],
                        help="behaviours also run with 2 of 5 peers hostile")
    parser.add_argument("--minutes", type=float, default=2.0, help="minutes of rounds per run")
    parser.add_argument("--workdir", type=Path, default=Path("runs/hostile"))
    parser.add_argument("--quick", action="store_true", help="clean, scale and round for 1 minute each (smoke)")
    args = parser.parse_args(argv)
    behaviours = ["scale", "round"] if args.quick else list(args.only or BEHAVIOURS)
    plan = [("clean", 0)] + [(b, 1) for b in behaviours] + ([] if args.quick else [(b, 2) for b in args.two])
    minutes = 1.0 if args.quick else args.minutes
    rows = []
    for behaviour, count in plan:
        workdir = args.workdir / f"{behaviour}-{count}"
        summary = run_behaviour(behaviour, count, workdir, minutes=minutes)
        rows.append(dataclasses.asdict(summarise(summary, workdir)))
        (workdir / "row.json").write_text(json.dumps(rows[-1]))  # kept, should a later run be cut short
        print(f"ran {behaviour} ({count} of 5 hostile): last checkpoint round {rows[-1]['checkpoint_round']}",
              flush=True)
    # every run is compared at the last checkpoint round all of them reached
    common = min(max(r["losses"]) for r in rows)
    clean = rows[0]["losses"].get(common)
    print(f"held-out loss at round {common} (the last checkpoint every run reached)")
    print(f"{'behaviour':<11} {'hostile':>7} {'loss':>7} {'vs clean':>8} {'local':>5} {'stall s':>7} "
          f"{'forks':>5} {'crash':>5} {'hostile roots':>13}  joiner")
    for row in rows:
        loss = row["losses"].get(common)
        row["heldout_loss"], row["compared_round"] = loss, common
        row["vs_clean"] = loss / clean if loss is not None and clean else None
        shown = "n/a" if row["vs_clean"] is None else f"{row['vs_clean']:.3f}"
        print(f"{row['behaviour']:<11} {row['hostile']:>5}/5 {'n/a' if loss is None else f'{loss:.3f}':>7} "
              f"{shown:>8} {row['local_rounds']:>5} {row['longest_stall_rounds'] * ROUND_SECONDS:>7.0f} {row['forks']:>5} "
              f"{row['crashed']:>5} {row['hostile_roots']:>13}  {row['joiner'] or ''}")
    met = all(r["vs_clean"] is not None and r["vs_clean"] <= 1 + GOAL and r["crashed"] == 0 and r["hostile_roots"] == 0
              and r["longest_stall_rounds"] * ROUND_SECONDS <= ROUND_DEADLINE for r in rows if r["hostile"] == 1)
    print(json.dumps({"rows": rows, "goal_met_1_of_5": met}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
