"""What the expert-parallel all-to-alls cost this process: bytes sent to other ranks and time spent in
them, forward and backward, accumulated until :meth:`ExchangeMeter.take` (the training loop takes it
every step and logs the per-step means).

Time is wall-clock around the collective on the CPU (gloo is synchronous). On a GPU the collective
is asynchronous to the host, so CUDA events bracket it on the stream and are read at ``take``.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


class ExchangeMeter:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def measure(self, collective: Callable[[], object], x: torch.Tensor, input_splits: Sequence[int], rank: int) -> None:
        """Run ``collective()``, an all-to-all of ``x``'s rows in ``input_splits`` chunks (chunk i to
        rank i; this process is ``rank``); count the rows it sends to other ranks."""
        row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
        self.bytes_sent += (sum(input_splits) - input_splits[rank]) * row_bytes
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            collective()
            end.record()
            self._events.append((start, end))
            if len(self._events) >= 1024:  # nobody takes the meter (e.g. evaluation only): keep it bounded
                self._fold_events()
            return
        t0 = time.perf_counter()
        collective()
        self.seconds += time.perf_counter() - t0

    def take(self) -> tuple[int, float]:
        """(bytes sent, seconds) since the last ``take``; resets both."""
        self._fold_events()
        out = (self.bytes_sent, self.seconds)
        self.bytes_sent, self.seconds = 0, 0.0
        return out

    def _fold_events(self) -> None:
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3
        self._events = []


EXCHANGE_METER = ExchangeMeter()  # the one meter of this process, fed by all_to_all
