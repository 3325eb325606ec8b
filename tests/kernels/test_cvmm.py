"""CVMM backends (all but Triton, which has test_triton_cvmm.py) against the pure-PyTorch reference:
forward and the gradients of x, both weights and the gates, on awkward shapes; gradcheck of the torch
path in float64; low-precision forward tolerance; input checks."""

import pytest
import torch

from sigma_moe.kernels import (
    available_backends,
    cvmm,
    cvmm_combine,
    cvmm_combine_reference,
    cvmm_reference,
    prepare_selection,
)
from sigma_moe.kernels.primitives import CVMMBackend
from sigma_moe.kernels.torch_backend import TorchBackend


class PrimitivesOnly(TorchBackend):
    """The torch backend's three primitives with the base class's combine backward (composed from
    them, the one the Triton backend uses) instead of its fused one, so that one is tested too."""

    name = "primitives_only"
    mm_scatter_backward = CVMMBackend.mm_scatter_backward


# A block of 3 rows splits every expert's segment into several blocks (with a ragged last one).
BACKENDS = {
    **{name: name for name in available_backends() if name not in ("auto", "reference", "triton")},
    "torch_block3": TorchBackend(block_rows=3),
    "torch_block7_pack3": TorchBackend(block_rows=7, pack_rows=3),
    "primitives_block3": PrimitivesOnly(block_rows=3),
}

# name: tokens N, slots K, experts E, d_in, d_out, routing, gated
CASES = {
    "uneven_empty_k3": (40, 3, 7, 13, 9, "uneven", True),
    "one_expert_k1_ungated": (30, 1, 4, 9, 13, "one", False),
    "k_equals_e_412": (6, 5, 5, 412, 7, "uniform", True),
    "wide_out_412_k2": (5, 2, 6, 7, 412, "uneven", True),
    "repeats_in_token": (17, 4, 3, 8, 6, "repeats", True),
    "no_tokens": (0, 2, 3, 5, 4, "uniform", True),
    "empty_slots_k3": (40, 3, 7, 13, 9, "empty_slots", True),  # as the expert-parallel dispatcher receives
    # 256 experts of a few rows each, several with none (their weight gradients must be exact zeros)
    "experts_256_k4": (150, 4, 256, 8, 12, "uneven", True),
}


def _expert_idx(n: int, k: int, e: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    if routing == "one":
        return torch.full((n, k), e - 1, dtype=torch.long)
    if routing == "repeats":  # a token may pick an expert twice: its two rows scatter to one token
        return torch.randint(0, e, (n, k), generator=gen)
    if routing == "empty_slots":  # about half the slots route nowhere (-1): a token has 0 to K rows
        idx = torch.multinomial(torch.ones(e).expand(n, e), k, replacement=False, generator=gen)
        return idx.masked_fill(torch.rand(n, k, generator=gen) < 0.5, -1)
    p = torch.ones(e)
    if routing == "uneven":  # skewed load; experts 1 and e-2 get no row
        p = torch.linspace(1.0, 8.0, e) ** 2
        p[1] = p[e - 2] = 0.0
    return torch.multinomial(p.expand(n, e), k, replacement=False, generator=gen).reshape(n, k)


def _inputs(case: str, dtype=torch.float64, seed: int = 0):
    n, k, e, d_in, d_out, routing, gated = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    sel = prepare_selection(_expert_idx(n, k, e, routing, gen), e, empty_slots=routing == "empty_slots")
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    w1 = torch.randn(e, d_in, d_out, generator=gen, dtype=dtype) / d_in**0.5
    w2 = torch.randn(e, d_out, d_in, generator=gen, dtype=dtype) / d_out**0.5
    gates = torch.rand(n, k, generator=gen, dtype=dtype) if gated else None
    return sel, x, w1, w2, gates


def _mlp(backend, sel, x, w1, w2, gates):
    """The σ-MoE expert MLP: both CVMM calls, ReLU between, gates per sorted row."""
    h = torch.relu(cvmm(x, sel, w1, backend=backend))
    return cvmm_combine(h, sel, w2, None if gates is None else sel.sort_rows(gates), backend=backend)


def _value_and_grads(fn, inputs, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", list(CASES))
def test_mlp_matches_reference(backend, case):
    sel, *inputs = _inputs(case)
    ref_out, ref_grads = _value_and_grads(lambda *a: _mlp("reference", sel, *a), inputs)
    out, grads = _value_and_grads(lambda *a: _mlp(BACKENDS[backend], sel, *a), inputs)
    assert out.shape == (sel.n_tokens, inputs[0].shape[1])
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for name, g, rg in zip(("x", "w1", "w2", "gates"), grads, ref_grads):
        if rg is None:
            assert g is None, name
            continue
        torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"grad {name}: {m}")
    if sel.n_tokens:  # the comparison is not vacuous: something flowed everywhere
        assert all(g is None or g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize("backend", ["torch", "torch_block3", "primitives_block3"])
@pytest.mark.parametrize("needs", ["gates", "weights", "h_and_gates"])
def test_combine_partial_gradients(backend, needs):
    """Only some inputs need a gradient: each branch of the backward still gives the right values."""
    sel, x, _, w2, gates = _inputs("uneven_empty_k3")
    h = torch.relu(x @ torch.randn(x.shape[1], 6, dtype=x.dtype, generator=torch.Generator().manual_seed(3)))
    h_rows, g_rows = h[sel.token_ids], sel.sort_rows(gates)
    w2 = w2[:, :6]  # d_in 6 of the combine
    wants = {"gates": (False, False, True), "weights": (False, True, False), "h_and_gates": (True, False, True)}
    inputs = [t.clone().requires_grad_(flag) for t, flag in zip((h_rows, w2, g_rows), wants[needs])]
    h_rows_, w2_, g_ = inputs
    grad_out = torch.randn(sel.n_tokens, w2.shape[2], dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    leaves = [t for t in inputs if t.requires_grad]
    got = torch.autograd.grad(cvmm_combine(h_rows_, sel, w2_, g_, backend=BACKENDS[backend]), leaves, grad_out)
    want = torch.autograd.grad(cvmm_combine_reference(h_rows_, sel, w2_, g_), leaves, grad_out)
    for g, wg in zip(got, want):
        torch.testing.assert_close(g, wg, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "torch_block3"])
@pytest.mark.parametrize("case", ["uneven_empty_k3", "repeats_in_token"])
def test_gradcheck_float64(backend, case):
    n, k, e, *_ = CASES[case]
    gen = torch.Generator().manual_seed(7)
    sel = prepare_selection(_expert_idx(n, k, e, CASES[case][5], gen), e)
    # small widths keep gradcheck's finite differences cheap
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(e, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(e, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(n, k, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _mlp(BACKENDS[backend], sel, *a), (x, w1, w2, gates))


# max |error| / max |exact| against the float64 reference
LOW_PRECISION_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOL))
@pytest.mark.parametrize("backend", ["torch", "torch_block3"])
@pytest.mark.parametrize("case", ["k_equals_e_412", "wide_out_412_k2", "uneven_empty_k3"])
def test_low_precision(dtype, backend, case):
    """fp32/bf16 against float64 on the same (rounded) inputs: the MLP's forward, and each CVMM's
    weight gradient alone (no ReLU, whose kink moves with rounding); bf16 blocks accumulate in fp32."""
    impl = BACKENDS[backend]
    sel, *inputs = _inputs(case)
    x, w1, w2, gates = [t.to(dtype).double() for t in inputs]  # exact values of the rounded inputs
    g_rows = sel.sort_rows(gates)
    h = torch.relu(cvmm_reference(x, sel, w1)).to(dtype).double()
    low = lambda t: t.to(dtype)  # noqa: E731
    results = [("out", _mlp(impl, sel, low(x), low(w1), low(w2), low(gates)), _mlp("reference", sel, x, w1, w2, gates))]
    for name, w, fast, exact in [
        ("grad w1", w1, lambda w: cvmm(low(x), sel, w, backend=impl), lambda w: cvmm_reference(x, sel, w)),
        (
            "grad w2",
            w2,
            lambda w: cvmm_combine(low(h), sel, w, low(g_rows), backend=impl),
            lambda w: cvmm_combine_reference(h, sel, w, g_rows),
        ),
    ]:
        w_low, w_exact = low(w).requires_grad_(), w.clone().requires_grad_()
        y = fast(w_low)
        grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
        y.backward(grad_y)
        exact(w_exact).backward(grad_y.double())
        results.append((name, w_low.grad, w_exact.grad))
    tol = LOW_PRECISION_TOL[dtype]
    for name, got, exact in results:
        assert got.dtype == dtype, name
        err = (got.double() - exact).abs().max() / exact.abs().max()
        assert err < tol, f"{name}: relative error {err:.2e} > {tol:.0e} in {dtype}"


def test_single_cvmm_matches_reference():
    """cvmm alone (no ReLU): the first projection row by row."""
    sel, x, w1, _, _ = _inputs("uneven_empty_k3")
    torch.testing.assert_close(cvmm(x, sel, w1, backend="torch"), cvmm_reference(x, sel, w1), rtol=1e-12, atol=1e-12)
    rows = x[sel.token_ids]
    manual = torch.stack([rows[r] @ w1[sel.expert_ids[r]] for r in range(sel.n_rows)])
    torch.testing.assert_close(cvmm(x, sel, w1, backend="torch"), manual, rtol=1e-12, atol=1e-12)


def test_input_errors():
    sel, x, w1, w2, gates = _inputs("uneven_empty_k3", dtype=torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        cvmm(x.double(), sel, w1)
    with pytest.raises(ValueError, match=r"x must be \[40, 13\]"):
        cvmm(x[:, :5], sel, w1)
    with pytest.raises(ValueError, match="n_experts=7"):
        cvmm(x, sel, w1[:3])
    h = torch.relu(cvmm(x, sel, w1))
    with pytest.raises(ValueError, match="one per sorted row"):
        cvmm_combine(h, sel, w2, gates)  # [N, K], not sorted rows
    with pytest.raises(ValueError, match="cast the gates"):
        cvmm_combine(h, sel, w2, sel.sort_rows(gates).double())
    with pytest.raises(ValueError, match="unknown CVMM backend"):
        cvmm(x, sel, w1, backend="nope")
    with pytest.raises(ValueError, match="block_rows"):
        TorchBackend(block_rows=0)


def test_bf16_weight_grad_accumulates_in_fp32():
    """512 one-row blocks of positive products into one expert: summed in bf16 the total would stall
    (each addend is below the sum's rounding step); fp32 accumulation keeps it to bf16's final rounding."""
    sel = prepare_selection(torch.zeros(512, 1, dtype=torch.long), 1)
    gen = torch.Generator().manual_seed(9)
    a = torch.rand(512, 4, generator=gen).to(torch.bfloat16)
    b = torch.rand(512, 3, generator=gen).to(torch.bfloat16)
    got = TorchBackend(block_rows=1).weight_grad(a, b, sel, a_is_tokens=True, b_is_tokens=False)
    exact = a.double().t() @ b.double()
    assert got.dtype == torch.bfloat16
    assert ((got[0].double() - exact).abs() / exact).max() < 2**-7


def test_torch_backend_allocates_no_row_by_d_model_tensor():
    """The CPU path's point: no [R, d_model] tensor (R = N·K rows) in forward or backward, only
    block-sized scratch and [N, d_model] outputs; the reference, for contrast, allocates several."""
    from torch.profiler import ProfilerActivity, profile

    n, k, e, d_model, d_hidden = 256, 4, 4, 256, 8
    gen = torch.Generator().manual_seed(11)
    sel = prepare_selection(_expert_idx(n, k, e, "uniform", gen), e)
    x = torch.randn(n, d_model, generator=gen, requires_grad=True)
    w1 = torch.randn(e, d_model, d_hidden, generator=gen, requires_grad=True)
    w2 = torch.randn(e, d_hidden, d_model, generator=gen, requires_grad=True)
    gates = torch.rand(n, k, generator=gen, requires_grad=True)
    rows_bytes = sel.n_rows * d_model * x.element_size()

    def largest_allocation(backend) -> int:
        """The most memory one op allocated itself (its children's not counted): the largest tensor.
        An op's total would add up its children, and which Python-level autograd nodes the profiler
        records changes between torch releases (2.11 records _GatherMMBackward, which holds the
        gradients of x and w1 together)."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = _mlp(backend, sel, x, w1, w2, gates)
            y.backward(torch.ones_like(y))
        return max(ev.self_cpu_memory_usage for ev in prof.events())

    assert largest_allocation(TorchBackend(block_rows=64)) <= n * d_model * x.element_size() < rows_bytes
    assert largest_allocation("reference") >= rows_bytes


@pytest.mark.parametrize(("block_rows", "pack_rows"), [(1, 1), (3, 3), (7, 3), (7, 7), (64, 5), (64, 64)])
def test_torch_backend_chunks_cut_rows_as_a_per_expert_loop(block_rows, pack_rows):
    """The chunk walk: consecutive chunks of <= block_rows rows; experts without rows get no segment;
    an expert's rows are cut as a per-expert loop in blocks of block_rows cuts them (so every matmul
    sees the same rows); experts of <= pack_rows rows share chunks of <= pack_rows rows, larger ones are
    alone; together the segments give every row its expert."""
    from sigma_moe.kernels.torch_backend import _chunks

    idx = torch.tensor([[2, 5], [2, 0], [5, 2], [2, 5], [0, 2], [5, 5], [2, 2], [0, 2]])  # 1, 3, 4 empty
    sel = prepare_selection(idx, 6)
    offsets = sel.offsets.tolist()
    expected_pieces = [
        (e, a, min(a + block_rows, offsets[e + 1]))
        for e in range(6)
        for a in range(offsets[e], offsets[e + 1], block_rows)
    ]
    pieces, expert_of_row, next_lo = [], [], 0
    for c in _chunks(sel, block_rows, pack_rows):
        assert c.lo == next_lo and 0 < c.hi - c.lo <= block_rows
        if len(c.segments) > 1:
            assert c.hi - c.lo <= pack_rows
        next_lo, covered = c.hi, 0
        for e, a, b in c.segments:
            assert a == covered and a < b <= c.hi - c.lo
            pieces.append((e, c.lo + a, c.lo + b))
            expert_of_row += [e] * (b - a)
            covered = b
        assert covered == c.hi - c.lo
    assert next_lo == sel.n_rows and expert_of_row == sel.expert_ids.tolist()
    assert pieces == expected_pieces
    if pack_rows == 64:  # all 16 rows (experts 0, 2 and 5 with 3, 8 and 5 rows) in one chunk
        assert len(list(_chunks(sel, block_rows, pack_rows))) == 1
    if pack_rows == 5:  # expert 2 (8 rows) is larger than a pack: three chunks of one expert each
        assert [len(c.segments) for c in _chunks(sel, block_rows, pack_rows)] == [1, 1, 1]
