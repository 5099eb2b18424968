"""Benchmark library: the shared reference task and the baseline contenders.

    counters          bytes on a network interface, diffed around a run
    task              the reference task every contender trains (model, data, budget, evaluation)
    ranks             starting, watching and reaping one process per peer
    summary           the summary dict every contender returns
    dataparallel      contender (a): fp32 gradient all-reduce with torch.distributed (gloo)
    hivemind_baseline contender (b): plain ``hivemind.Optimizer`` with fp16 gradient compression
    baselines_smoke   ``python -m bench.baselines_smoke``: run the baselines on a small task

Scripts under ``scripts/bench_*.py`` parse arguments and call these modules.
"""
