"""Checkpoints of a training run: DeepSpeed's files plus each rank's state, saved atomically, checked
against a manifest before loading, resumable at another expert-parallel size. Imports nothing else of
``launch``; the expert files themselves are :mod:`sigma_moe.distributed.checkpoint`'s.

    manager         CheckpointManager (save, prune, find the newest intact), load_checkpoint
    safe_unpickle   refuse pickles that would run code; a rank's state through the weights-only unpickler
    manifest        every file's size and SHA-256, written last
    elastic_resume  AdamW's state re-sharded by global expert id
"""
