"""The engine side: from a YAML config to a trained, checkpointed, monitored run, and grids of runs.

    cli.py            ``sigma-moe train | eval | size | compare | config``
    config.py         the typed run config (+ config_checks.py, deepspeed_config.py)
    world.py          the process world: group, CPU threads, JIT-op folder (+ world_env.py, cpu_memory.py)
    optim.py          optimizer parameter groups, the warm-up cosine schedule
    engine.py         the DeepSpeed engine
    session.py        what training and evaluation both start with: world, data, model in its engine
    train.py          the training loop (``python -m sigma_moe.launch.train``)
    evaluate.py       loss, perplexity and bits per byte of a split
    data/             corpora, tokenizers, the token cache, training and evaluation windows
    checkpoint/       atomic, verified, expert-sharded checkpoints; resume at another size
    monitor/          TensorBoard and the progress bar: losses, routing, throughput
    guards/           memory bound, run lock, divergence, rank watch: one-line errors, not hangs
    compare/          ``sigma-moe compare``: a parameter-equal grid of runs and its report

Import direction (tests/test_import_rules.py): data, checkpoint and monitor import nothing else of
``launch``; guards import only the config modules; compare sits on top and only the CLI imports it.
"""
