"""Benchmark library: the shared reference task and the baseline contenders.

    counters          bytes on a network interface, diffed around a run
    task              the reference task every contender trains (model, data, budget, evaluation)
    ranks             starting, watching and reaping one process per peer
    summary           the summary dict every contender returns
    dataparallel      contender (a): fp32 gradient all-reduce with torch.distributed (gloo)
    hivemind_baseline contender (b): plain ``hivemind.Optimizer`` with fp16 gradient compression
    baselines_smoke   ``python -m bench.baselines_smoke``: run the baselines on a small task
    simulator, recipe, sweep, bytes_to_loss   the swarm in one process, and the recipes it sweeps
    round_bench       one round of an N-float tensor among 4 peer processes
    consensus_run     a real swarm of N peers of uneven speed (optionally SIGKILLed and restarted)
    protocol_sim      a discrete-event simulation of the round protocol at 10 to 1,000 peers

Scripts under ``scripts/bench_*.py`` parse arguments and call these modules.
"""
