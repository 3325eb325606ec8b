"""Contiguous-stream batching: columns continue from step to step, W ranks × A micro-batches see what
one process sees, exact resume, epochs, and stream evaluation covering every target once."""

import numpy as np
import pytest
import torch

from sigma_moe.launch.data.sampling import IGNORE_INDEX, StreamSampler, WindowSampler, eval_batches

TOKENS = np.arange(10_000) % 9973  # position-like ids: a window's first id tells where it starts


def _positions(x: torch.Tensor) -> np.ndarray:
    return x[:, 0].numpy()


def test_columns_are_contiguous_across_steps_and_targets_shifted():
    tokens = np.arange(5_000)
    s = StreamSampler(tokens, batch_size=4, seq_len=10, seed=3)
    x0, y0 = s.next_batch()
    x1, y1 = s.next_batch()
    torch.testing.assert_close(y0, torch.from_numpy(tokens)[x0 + 1])  # ids are positions here
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)  # the next T tokens of the same column
    assert torch.equal(x1, x0 + 10)
    # columns L = (5000 - 10) // 4 = 1247 apart, behind the epoch's offset in [0, T)
    starts = x0[:, 0].numpy()
    assert np.all(np.diff(starts) == (5_000 - 10) // 4) and 0 <= starts[0] < 10


@pytest.mark.parametrize("world, accumulation", [(2, 1), (4, 1), (2, 2), (1, 4)])
def test_ranks_and_micro_batches_together_equal_one_process(world, accumulation):
    one = StreamSampler(TOKENS, batch_size=8, seq_len=7, seed=1)
    per_rank = 8 // (world * accumulation)
    ranks = [
        StreamSampler(
            TOKENS, batch_size=per_rank, seq_len=7, seed=1, rank=r, world_size=world, accumulation=accumulation
        )
        for r in range(world)
    ]
    for _ in range(5):
        want = one.next_batch()[0]
        micro = [[r.next_batch()[0] for r in ranks] for _ in range(accumulation)]
        got = torch.cat([x for m in micro for x in m])  # micro-batch a, then rank r, then row
        assert torch.equal(got, want)


def test_resume_is_exact_and_state_is_rank_independent():
    a = StreamSampler(TOKENS, batch_size=2, seq_len=5, seed=4, rank=1, world_size=2, accumulation=2)
    for _ in range(6):
        a.next_batch()
    state = a.state_dict()
    b = StreamSampler(TOKENS, batch_size=2, seq_len=5, seed=0, rank=1, world_size=2, accumulation=2)
    b.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    # the same global batch on another layout (1 rank, no accumulation) continues the same columns
    c = StreamSampler(TOKENS, batch_size=8, seq_len=5, seed=0)
    c.load_state_dict(state)
    assert state["segment"] == 3 and c.step == 3


def test_epochs_wrap_with_a_new_offset_and_mark_the_stream_start():
    tokens = np.arange(200)
    s = StreamSampler(tokens, batch_size=2, seq_len=10, seed=0)  # L = 95, 9 segments per epoch
    assert s.segments_per_epoch == 9
    starts, flags = [], []
    for _ in range(20):
        flags.append(s.at_stream_start)
        starts.append(_positions(s.next_batch()[0]))
    assert [i for i, f in enumerate(flags) if f] == [0, 9, 18]
    offsets = [starts[0][0], starts[9][0], starts[18][0]]
    assert all(0 <= o < 10 for o in offsets) and len(set(offsets)) > 1
    assert all(np.array_equal(starts[i + 1], starts[i] + 10) for i in range(8))
    assert max(int(x.max()) for x in starts) < 200  # never past the end


def test_bad_sizes_and_mixed_states_are_clear_errors():
    with pytest.raises(ValueError, match="too few"):
        StreamSampler(np.arange(90), batch_size=8, seq_len=10, seed=0)  # 10 per column < 11
    stream = StreamSampler(TOKENS, batch_size=2, seq_len=5, seed=0)
    window = WindowSampler(TOKENS, batch_size=2, seq_len=5, seed=0)
    with pytest.raises(ValueError, match="batching=stream"):
        window.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="batching=random"):
        stream.load_state_dict(window.state_dict())
    other = StreamSampler(TOKENS, batch_size=4, seq_len=5, seed=0)
    with pytest.raises(ValueError, match="n_columns"):
        other.load_state_dict(stream.state_dict())


@pytest.mark.parametrize("n, batch, world, seq_len", [(1000, 3, 1, 16), (1000, 2, 2, 7), (37, 4, 2, 5), (10, 8, 1, 4)])
def test_stream_evaluation_covers_every_target_once_in_column_order(n, batch, world, seq_len):
    tokens = np.arange(n)
    seen = []
    lengths = set()
    for rank in range(world):
        batches = list(
            eval_batches(tokens, batch_size=batch, seq_len=seq_len, rank=rank, world_size=world, stream=True)
        )
        lengths.add(len(batches))
        x = torch.cat([b[0] for b in batches], dim=1)  # each row: its column, in order
        y = torch.cat([b[1] for b in batches], dim=1)
        for row_x, row_y in zip(x, y):
            real = row_y != IGNORE_INDEX
            k = int(real.sum())
            assert bool(real[:k].all()), "padding only after a column's end"
            assert torch.equal(row_y[:k], row_x[:k] + 1)
            if k > 1:
                assert torch.equal(row_x[1:k], row_x[: k - 1] + 1)  # contiguous across batches
            seen += row_y[:k].tolist()
    assert len(lengths) == 1  # every rank runs the same number of forwards
    assert sorted(seen) == list(range(1, n))


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("batch_size, world_size", [(1, 1), (1, 2), (3, 1)])
def test_eval_padding_never_reaches_the_inputs(stream, batch_size, world_size):
    """A micro-batch of one sequence: the padded targets' IGNORE_INDEX used to be written into the
    inputs too (the two slices shared memory), and the embedding then failed with an IndexError."""
    tokens = np.arange(1, 51, dtype=np.int64)  # 49 targets: the last window is short, so there is padding
    batches = [
        b
        for rank in range(world_size)
        for b in eval_batches(tokens, batch_size=batch_size, seq_len=8, rank=rank, world_size=world_size, stream=stream)
    ]
    assert all(int(x.min()) >= 0 for x, _ in batches)  # padding inputs are 0, never IGNORE_INDEX
    assert sum(int((y == IGNORE_INDEX).sum()) for _, y in batches) > 0
