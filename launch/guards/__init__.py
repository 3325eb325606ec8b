"""Checks that stop a run with a one-line error naming the problem, instead of a hang, an out-of-memory
kill or a silent NaN run. Import from ``launch`` only the config.

    memory_estimate  a lower bound of a step's memory per rank, checked before the model is built
    run_lock         one training run per run directory
    divergence       a non-finite loss, gradient or weight: stop, or skip the step
    rank_watch       heartbeats of every rank: the rank that held a collective up is named
"""
