"""Checkpoints of a training run: DeepSpeed's files plus each rank's state, saved atomically, checked
against a manifest before loading, resumable at another expert-parallel size. Imports nothing else of
``launch`` (the config imports :class:`.config.CheckpointConfig` from here); the expert files themselves
are :mod:`sigma_moe.distributed.checkpoint`'s.

    config          CheckpointConfig, the run config's ``checkpoint`` section
    manager         CheckpointManager: save, load, prune, find the newest intact
    safe_unpickle   refuse pickles that would run code; a rank's state through the weights-only unpickler
    manifest        every file's size and SHA-256, written last
    elastic_resume  AdamW's state re-sharded by global expert id
"""
