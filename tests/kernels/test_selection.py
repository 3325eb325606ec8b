"""Routing-sort prep (``prepare_selection``) against plain Python."""

import pytest
import torch

from sigma_moe.kernels import prepare_selection


def _python_selection(idx: list[list[int]], n_experts: int):
    """The same sort written without torch: Python's sort is stable, so ties keep (token, slot) order."""
    k = len(idx[0]) if idx else 0
    flat = [e for row in idx for e in row]
    order = sorted(range(len(flat)), key=lambda i: flat[i])
    counts = [flat.count(e) for e in range(n_experts)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return {
        "expert_ids": [flat[i] for i in order],
        "order": order,
        "token_ids": [i // k for i in order],
        "counts": counts,
        "offsets": offsets,
    }


def _idx(case: str, n: int, k: int, e: int, gen: torch.Generator) -> torch.Tensor:
    if case == "one_expert":
        return torch.full((n, k), e - 1, dtype=torch.long)
    if case == "with_repeats":  # a token may pick the same expert twice: ties inside one token
        return torch.randint(0, e, (n, k), generator=gen)
    p = torch.ones(e)
    p[0] = p[e // 2] = 0.0  # two experts get no row
    return torch.multinomial(p.expand(n, e), k, replacement=False, generator=gen)


@pytest.mark.parametrize(
    "case,n,k,e",
    [
        ("empty_experts", 37, 3, 8),
        ("empty_experts", 5, 1, 4),
        ("one_expert", 9, 2, 5),
        ("with_repeats", 23, 4, 3),
        ("with_repeats", 0, 2, 3),
        ("k_is_all_but_empty", 6, 6, 8),
    ],
)
def test_prepare_selection_matches_python(case, n, k, e):
    gen = torch.Generator().manual_seed(n * 100 + k)
    idx = _idx(case, n, k, e, gen)
    sel = prepare_selection(idx, e)
    want = _python_selection(idx.tolist(), e)
    assert sel.expert_ids.tolist() == want["expert_ids"]
    assert sel.order.tolist() == want["order"]
    assert sel.token_ids.tolist() == want["token_ids"]
    assert sel.counts.tolist() == want["counts"]
    assert sel.offsets.tolist() == want["offsets"]
    assert (sel.n_tokens, sel.k, sel.n_rows, sel.n_experts) == (n, k, n * k, e)
    assert all(t.dtype == torch.long for t in (sel.expert_ids, sel.order, sel.token_ids, sel.counts, sel.offsets))


def test_sort_rows_follows_order():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    sel = prepare_selection(idx, 3)
    values = torch.tensor([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])  # value of (token t, slot s) = 10(t+1)+s
    # sorted by expert, stable: e0: (0,1), (1,0); e1: (1,1), (2,1); e2: (0,0), (2,0)
    assert sel.sort_rows(values).tolist() == [11.0, 20.0, 21.0, 31.0, 10.0, 30.0]
    per_row = torch.arange(12.0).view(3, 2, 2)  # trailing dims travel with their row
    assert torch.equal(sel.sort_rows(per_row), per_row.reshape(6, 2)[torch.tensor([1, 2, 3, 5, 0, 4])])


def test_prepare_selection_with_empty_slots_skips_them():
    """ids -1 route nowhere: the rows are those of the other slots, sorted as if the -1s were absent."""
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(-1, 5, (23, 3), generator=gen)
    idx[4] = -1  # a token with no row at all
    sel = prepare_selection(idx, 5, empty_slots=True)
    flat = idx.reshape(-1).tolist()
    kept = sorted((i for i, e in enumerate(flat) if e >= 0), key=lambda i: flat[i])
    assert sel.order.tolist() == kept
    assert sel.expert_ids.tolist() == [flat[i] for i in kept]
    assert sel.token_ids.tolist() == [i // 3 for i in kept]
    assert sel.counts.tolist() == [flat.count(e) for e in range(5)]
    assert (sel.n_rows, sel.n_tokens, sel.k) == (len(kept), 23, 3)
    values = torch.arange(23 * 3).view(23, 3)
    assert sel.sort_rows(values).tolist() == kept  # per-slot values follow their rows
    with pytest.raises(ValueError, match=r"expert ids must lie in \[-1, 5\)"):
        prepare_selection(torch.tensor([[-2, 0]]), 5, empty_slots=True)


@pytest.mark.parametrize(
    "idx,match",
    [
        (torch.tensor([[0, 4]]), r"expert ids must lie in \[0, 4\)"),
        (torch.tensor([[-1, 0]]), r"expert ids must lie in \[0, 4\)"),
        (torch.tensor([0, 1]), r"must be \[n_tokens, k\]"),
    ],
)
def test_prepare_selection_rejects_bad_input(idx, match):
    with pytest.raises(ValueError, match=match):
        prepare_selection(idx, 4)
