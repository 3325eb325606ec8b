"""Triton CVMM kernels against the pure-PyTorch reference, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here, before anything
imports triton's kernels (the backend imports them lazily on first use), so the same tests never skip.
On a CUDA machine the tensors live on the GPU and the kernels run compiled.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from launch_helpers import ROOT
from sigma_moe.kernels import (  # noqa: E402
    cvmm,
    cvmm_combine,
    cvmm_combine_reference,
    cvmm_reference,
    prepare_selection,
    resolve_backend_name,
)
from sigma_moe.kernels.triton_backend import (  # noqa: E402
    TritonBackend,
    gather_mm_impl,
    mm_scatter_impl,
    wgrad_chunk_rows,
    worst_case_blocks,
)
from sigma_moe.kernels.triton_kernels import INTERPRET  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not INTERPRET:
    raise RuntimeError("sigma_moe.kernels.triton_kernels was imported before TRITON_INTERPRET=1 was set")

# max |error| / max |exact| allowed; the exact value is computed in float64
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}

# name: tokens, k, experts, d_in, d_out, dtype, routing, gated
CASES = {
    "uneven_empty_k3": (40, 3, 7, 36, 20, torch.float32, "uneven", True),
    "one_expert_k1": (50, 1, 4, 20, 36, torch.float32, "one", False),
    "k8_bf16": (12, 8, 12, 36, 20, torch.bfloat16, "uneven", True),
    "k2_wide_in_fp16": (6, 2, 3, 412, 20, torch.float16, "uniform", True),
    "k4_wide_out_bf16": (5, 4, 6, 20, 412, torch.bfloat16, "uneven", False),
    "many_tiny_experts": (30, 2, 40, 36, 20, torch.float32, "uniform", True),  # most blocks ragged
    "empty_slots_k3": (40, 3, 7, 36, 20, torch.float32, "empty_slots", True),  # fewer rows than N·K
}


def _expert_idx(n: int, k: int, e: int, routing: str, gen: torch.Generator) -> torch.Tensor:
    if routing == "one":
        return torch.full((n, k), e - 1, dtype=torch.long)
    if routing == "empty_slots":  # about half the slots route nowhere (-1), as expert parallelism receives
        idx = torch.multinomial(torch.ones(e).expand(n, e), k, replacement=False, generator=gen)
        return idx.masked_fill(torch.rand(n, k, generator=gen) < 0.5, -1)
    p = torch.ones(e)
    if routing == "uneven":  # skewed load, and experts 1 and e-2 get no row
        p = torch.linspace(1.0, 8.0, e) ** 2
        p[1] = p[e - 2] = 0.0
    return torch.multinomial(p.expand(n, e), k, replacement=False, generator=gen)


def _leaf(shape, dtype, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(DEVICE, dtype).requires_grad_()


def _assert_close(actual: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    err = (actual.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    scale = max(exact.abs().max().item() if exact.numel() else 0.0, 1e-6)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g} ({dtype})"


def _grads(fn, inputs, grad_out):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, grad_out)
    return out, grads


def _exact(fn, inputs, grad_out):
    """The reference in float64 on float64 copies of the same inputs."""
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    return _grads(fn, inputs64, grad_out.double())


@pytest.mark.parametrize("case", CASES)
def test_cvmm_forward_backward(case):
    n, k, e, d_in, d_out, dtype, routing, _ = CASES[case]
    gen = torch.Generator().manual_seed(1)
    sel = prepare_selection(_expert_idx(n, k, e, routing, gen).to(DEVICE), e, empty_slots=routing == "empty_slots")
    x, w = _leaf((n, d_in), dtype, gen), _leaf((e, d_in, d_out), dtype, gen, d_in**-0.5)
    grad_out = torch.randn(sel.n_rows, d_out, generator=gen, dtype=torch.float64).to(DEVICE)

    out, grads = _grads(lambda a, b: cvmm(a, sel, b, backend="triton"), [x, w], grad_out.to(dtype))
    out_ref, grads_ref = _exact(lambda a, b: cvmm_reference(a, sel, b), [x, w], grad_out)
    _assert_close(out, out_ref, dtype, "out")
    for name, g, g_ref in zip(("x", "w"), grads, grads_ref):
        _assert_close(g, g_ref, dtype, f"grad {name}")


@pytest.mark.parametrize("case", CASES)
def test_cvmm_combine_forward_backward(case):
    n, k, e, d_in, d_out, dtype, routing, gated = CASES[case]
    gen = torch.Generator().manual_seed(2)
    sel = prepare_selection(_expert_idx(n, k, e, routing, gen).to(DEVICE), e, empty_slots=routing == "empty_slots")
    h, w = _leaf((sel.n_rows, d_in), dtype, gen), _leaf((e, d_in, d_out), dtype, gen, d_in**-0.5)
    gates = torch.rand(n, k, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
    grad_out = torch.randn(n, d_out, generator=gen, dtype=torch.float64).to(DEVICE)

    def run(impl):
        if gated:
            return lambda a, b, g: impl(a, sel, b, sel.sort_rows(g))
        return lambda a, b: impl(a, sel, b, None)

    inputs = [h, w, gates] if gated else [h, w]
    out, grads = _grads(run(lambda *a: cvmm_combine(*a, backend="triton")), inputs, grad_out.to(dtype))
    out_ref, grads_ref = _exact(run(cvmm_combine_reference), inputs, grad_out)
    _assert_close(out, out_ref, dtype, "out")
    for name, g, g_ref in zip(("h", "w", "gates"), grads, grads_ref):
        _assert_close(g, g_ref, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_split_into_chunks(dtype):
    """Experts spanning several chunks are summed by the fp32 atomics; empty experts stay zero."""
    gen = torch.Generator().manual_seed(4)
    counts = [70, 0, 3, 33, 0, 16]
    idx = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    idx = idx[torch.randperm(idx.numel(), generator=gen)].view(-1, 2)  # 61 tokens, k = 2
    sel = prepare_selection(idx.to(DEVICE), len(counts))
    x = torch.randn(idx.shape[0], 36, generator=gen).to(DEVICE, dtype)
    rows = torch.randn(sel.n_rows, 20, generator=gen).to(DEVICE, dtype)
    backend = TritonBackend(wgrad_chunk_rows=16)

    x_rows = x.double()[sel.token_ids]
    exact = torch.stack(
        [x_rows[sel.expert_ids == e].T @ rows.double()[sel.expert_ids == e] for e in range(len(counts))]
    )
    _assert_close(backend.weight_grad(x, rows, sel, a_is_tokens=True, b_is_tokens=False), exact, dtype, "x^T g")
    _assert_close(
        backend.weight_grad(rows, x, sel, a_is_tokens=False, b_is_tokens=True), exact.transpose(1, 2), dtype, "g^T x"
    )


def test_strided_operands_are_read_in_place():
    """A transposed weight view and a column slice of x give the right result without any copy of
    them (the launchers run under a dispatch mode that sees every aten op they issue)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gen = torch.Generator().manual_seed(5)
    e, d_in, d_out = 5, 36, 20
    sel = prepare_selection(_expert_idx(30, 3, e, "uneven", gen).to(DEVICE), e)
    x = torch.randn(30, d_in + 8, generator=gen).to(DEVICE)[:, 4:-4]
    w_t = torch.randn(e, d_out, d_in, generator=gen).to(DEVICE).transpose(1, 2)
    h = torch.randn(sel.n_rows, d_out + 8, generator=gen).to(DEVICE)[:, 4:-4]
    # what .contiguous() / .clone() / .to() issue (the interpreter's own write-back is a storage copy_)
    copy_ops = (torch.ops.aten.clone, torch.ops.aten._to_copy)

    class BigCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in copy_ops and out.numel() >= min(x.numel(), w_t.numel()):
                self.seen.append(str(func))
            return out

    with BigCopies() as mode:
        out = gather_mm_impl(x, w_t, sel.token_ids, sel.counts, sel.offsets)
        y = mm_scatter_impl(h, w_t.transpose(1, 2), None, sel.order, sel.counts, sel.offsets, 30, 3)
    assert mode.seen == [], f"operands were copied: {mode.seen}"
    _assert_close(out, cvmm_reference(x.double(), sel, w_t.double()), torch.float32, "gather_mm")
    _assert_close(
        y, cvmm_combine_reference(h.double(), sel, w_t.transpose(1, 2).double(), None), torch.float32, "mm_scatter"
    )


def test_worst_case_blocks_bounds_every_split():
    """The grid bound: Σ_e ceil(count_e / B) never exceeds worst_case_blocks (else rows go unread)."""
    gen = torch.Generator().manual_seed(7)
    for n_experts, block in ((7, 16), (40, 128), (3, 1)):
        splits = [torch.ones(n_experts, dtype=torch.long)] + [
            torch.bincount(torch.randint(0, n_experts, (n,), generator=gen), minlength=n_experts)
            for n in (0, 1, 5 * block + 3, 31 * block)
        ]
        for counts in splits:
            needed = int(((counts + block - 1) // block).sum())
            assert needed <= worst_case_blocks(int(counts.sum()), n_experts, block)


def test_deterministic_weight_grad_uses_one_chunk_per_expert():
    assert wgrad_chunk_rows(131072, 2048, 128, n_sm=132, deterministic=True) >= 131072
    chunk = wgrad_chunk_rows(131072, 2048, 128, n_sm=132, deterministic=False)
    assert 256 <= chunk < 131072 and chunk % 128 == 0


def test_backend_choice_and_errors():
    assert resolve_backend_name("auto", torch.device("cpu")) == "torch"
    assert resolve_backend_name("auto", torch.device("cuda")) == "triton"
    sel = prepare_selection(torch.tensor([[0], [1]], device=DEVICE), 2)
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        cvmm(
            torch.ones(2, 3, dtype=torch.float64, device=DEVICE),
            sel,
            torch.ones(2, 3, 4, dtype=torch.float64, device=DEVICE),
            backend="triton",
        )
    with pytest.raises(ValueError, match="all tensors must be on"):
        gather_mm_impl(
            torch.ones(2, 3, device=DEVICE),
            torch.ones(2, 3, 4, device=DEVICE),
            sel.token_ids,
            sel.counts.to("meta"),
            sel.offsets,
        )
    # without the interpreter, CPU tensors get an error that names the way out
    script = (
        "import torch; from sigma_moe.kernels import cvmm, prepare_selection\n"
        "sel = prepare_selection(torch.tensor([[0], [1]]), 2)\n"
        "cvmm(torch.ones(2, 3), sel, torch.ones(2, 3, 4), backend='triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr and "backend='torch'" in proc.stderr


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) kernels and AOT dispatch of the three custom ops agree with the real ones."""
    from sigma_moe.kernels import triton_backend as tb

    gen = torch.Generator().manual_seed(9)
    n, k, e, d, g = 11, 2, 4, 20, 36
    sel = prepare_selection(_expert_idx(n, k, e, "uneven", gen).to(DEVICE), e)
    x, h = torch.randn(n, d, generator=gen).to(DEVICE), torch.randn(n * k, g, generator=gen).to(DEVICE)
    w = torch.randn(e, d, g, generator=gen).to(DEVICE)
    gates = torch.rand(n * k, generator=gen).to(DEVICE)
    torch.library.opcheck(tb.cvmm_gather_mm, (x, w, sel.token_ids, sel.counts, sel.offsets))
    torch.library.opcheck(tb.cvmm_mm_scatter, (h, w.transpose(1, 2), gates, sel.order, sel.counts, sel.offsets, n, k))
    torch.library.opcheck(tb.cvmm_weight_grad, (x, h, sel.token_ids, None, sel.counts, sel.offsets, 0))


def test_custom_ops_trace_under_torch_compile():
    """The custom ops' fake kernels let torch.compile capture the expert MLP in one graph."""
    gen = torch.Generator().manual_seed(6)
    e, d, d_ff = 4, 20, 36
    sel = prepare_selection(_expert_idx(9, 2, e, "uniform", gen).to(DEVICE), e)
    x, w1, w2 = (
        _leaf((9, d), torch.float32, gen),
        _leaf((e, d, d_ff), torch.float32, gen),
        _leaf((e, d_ff, d), torch.float32, gen),
    )
    gates = torch.rand(9, 2, generator=gen).to(DEVICE).requires_grad_()

    def mlp(x, w1, w2, gates, backend):
        h = torch.relu(cvmm(x, sel, w1, backend=backend))
        return cvmm_combine(h, sel, w2, sel.sort_rows(gates), backend=backend)

    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True)
    inputs = [x, w1, w2, gates]
    out, grads = _grads(lambda *a: compiled(*a, "triton"), inputs, torch.ones(9, d, device=DEVICE))
    out_ref, grads_ref = _exact(lambda *a: mlp(*a, "reference"), inputs, torch.ones(9, d, device=DEVICE))
    _assert_close(out, out_ref, torch.float32, "out")
    for g, g_ref in zip(grads, grads_ref):
        _assert_close(g, g_ref, torch.float32, "grad")


def test_kernels_compile_for_hopper():
    """Without a GPU the kernels above only run interpreted; this compiles them to sm_90 cubins (in a
    process without TRITON_INTERPRET) with the launchers' specialisation, so a kernel that the
    interpreter accepts but the GPU compiler rejects fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "tools" / "triton_compile_check.py")
    proc = subprocess.run(
        [sys.executable, script, "--quick", "--arch", "90"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "all kernels compiled" in proc.stdout, proc.stdout + proc.stderr


def test_sigma_moe_layer_on_triton_matches_torch_backend():
    """The real layer (routing, sort, both CVMMs, regulariser) gives the same output and gradients on
    the Triton backend as on the PyTorch one."""
    from sigma_moe.layers import SigmaMoEConfig, build_feedforward

    torch.manual_seed(8)
    cfg = SigmaMoEConfig(n_experts=6, expert_size=16, k=3, backend="torch")
    ref = build_feedforward(cfg, d_model=20, n_layers=2).to(DEVICE)
    fast = build_feedforward(
        SigmaMoEConfig(n_experts=6, expert_size=16, k=3, backend="triton"), d_model=20, n_layers=2
    ).to(DEVICE)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 20, device=DEVICE)
    results = []
    for layer in (ref, fast):
        y = layer(x)
        (y.square().sum() + layer.aux_loss).backward()
        results.append((y, {n: p.grad for n, p in layer.named_parameters()}))
    (y_ref, g_ref), (y, g) = results
    _assert_close(y, y_ref, torch.float32, "out")
    for name in g_ref:
        _assert_close(g[name], g_ref[name], torch.float32, f"grad {name}")


def test_triton_36_interpreter_with_numpy_24_names_the_pin():
    """Triton 3.6's interpreter fails with numpy >= 2.4 (20 of these tests would, each with a TypeError
    deep in triton): the kernels say what to pin instead. Triton 3.7 and numpy 2.3 are fine."""
    from sigma_moe.kernels.triton_backend import interpreter_problem

    problem = interpreter_problem("3.6.0", "2.4.1")
    assert problem == (
        "the interpreter of triton 3.6.0 fails with numpy 2.4.1 (fixed in triton 3.7): pip install 'numpy<2.4' "
        "(compiled GPU kernels are not affected)"
    )
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.1", "2.4.6") is None and interpreter_problem("3.9.0", "2.5.0rc1") is None
    assert interpreter_problem() is None, interpreter_problem()  # the environment the suite runs in
