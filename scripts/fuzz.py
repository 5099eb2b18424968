"""Fuzz every decoder of untrusted bytes: only typed errors (``BarnraiseError``) may come out.

    python scripts/fuzz.py                        # 100,000 inputs per decoder
    python scripts/fuzz.py --quick                # 2,000 per decoder (tests/test_fuzz.py)
    python scripts/fuzz.py --only payload,http_ledger --count 20000 --seed 3
    python scripts/fuzz.py --only ledger_jsonl --seed 0 --input 1234    # one input again

Prints one line per decoder (inputs, seconds, peak RSS, accepted inputs, the error types seen)
and a final JSON line; exits 1 on any finding (an untyped exception, a broken promise, a hang,
or the peak RSS past --memory-limit-mib), after printing the decoder, the exception and the
input in hex. How inputs are made: bench/fuzz_inputs.py and bench/fuzz_framing.py; the decoders:
bench/fuzz_targets.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench.fuzz import cap_address_space, fuzz_all  # noqa: E402
from bench.fuzz_targets import TARGET_NAMES, builders, select  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs per decoder")
    parser.add_argument("--quick", action="store_true", help="2,000 inputs per decoder (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help=f"comma-separated decoders or families (of: {', '.join(TARGET_NAMES)})")
    parser.add_argument("--input", type=int, action="append", help="run only this input index (repeatable)")
    parser.add_argument("--hang-seconds", type=float, default=10.0, help="one input running longer is a finding")
    parser.add_argument("--memory-limit-mib", type=float, default=1536.0, help="peak RSS above this is a finding")
    args = parser.parse_args(argv)
    names = select(args.only.split(",")) if args.only else list(TARGET_NAMES)
    if not names:
        parser.error(f"--only {args.only!r} names no decoder")
    count = 2_000 if args.quick else args.count
    # Room for the largest legitimate input and the limit above; an input asking for more
    # fails in the allocator (a finding) instead of swapping the machine.
    cap_address_space(int(args.memory_limit_mib) + 2048)
    summary = fuzz_all(builders(names), count=count, seed=args.seed, hang_seconds=args.hang_seconds,
                       memory_limit_mib=args.memory_limit_mib, indices=args.input)
    print(json.dumps({"fuzz": summary}, sort_keys=True))
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
