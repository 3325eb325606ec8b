"""What one dispatcher's expert-parallel all-to-alls cost this process, as running totals: bytes sent
to other ranks and time spent in the collectives (forward and backward), token rows received for this
rank's experts and expert rows computed here (forward dispatches). Each :class:`AllToAllDispatcher`
owns one meter; whoever wants per-step figures reads :meth:`ExchangeMeter.totals` before and after the
step and takes the difference (nothing is ever drained, so two readers cannot steal from each other,
and evaluation traffic simply falls outside the training steps' windows).

Time is wall-clock around the collective on the CPU (gloo is synchronous). On a GPU the collective
is asynchronous to the host, so CUDA events bracket it on the stream and are read at ``totals``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class ExchangeTotals:
    bytes_sent: int = 0  # to other ranks, forward and backward
    seconds: float = 0.0  # inside the all-to-alls
    rows_received: int = 0  # token rows other ranks sent to this rank's experts (forward dispatch)
    expert_rows: int = 0  # (token, slot) rows this rank's experts computed (own and received; forward)

    def __add__(self, other: ExchangeTotals) -> ExchangeTotals:
        return ExchangeTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: ExchangeTotals) -> ExchangeTotals:
        return ExchangeTotals(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))


class ExchangeMeter:
    def __init__(self) -> None:
        self.bytes_sent = 0
        self.seconds = 0.0
        self.rows_received = 0
        self.expert_rows = 0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def measure(
        self, collective: Callable[[], object], x: torch.Tensor, input_splits: Sequence[int], rank: int
    ) -> None:
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
            if len(self._events) >= 1024:  # nobody reads the meter (e.g. evaluation only): keep it bounded
                self._fold_events()
            return
        t0 = time.perf_counter()
        collective()
        self.seconds += time.perf_counter() - t0

    def count_rows(self, *, received: int, computed: int) -> None:
        """One forward dispatch: ``received`` token rows came from other ranks, this rank's experts
        compute ``computed`` (token, slot) rows."""
        self.rows_received += int(received)
        self.expert_rows += int(computed)

    def totals(self) -> ExchangeTotals:
        """Everything since the meter was made (reads pending CUDA events: a sync on a GPU)."""
        self._fold_events()
        return ExchangeTotals(self.bytes_sent, self.seconds, self.rows_received, self.expert_rows)

    def _fold_events(self) -> None:
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3
        self._events = []
