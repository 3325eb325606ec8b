"""Expert parallelism with real processes (gloo) against one process on the concatenated batch.

Each rank holds a different number of tokens. A rank's loss is ``W / N_total · Σ_its tokens y·t``
plus the layers' aux losses (global quantities), so the engine's average over W ranks is the global
batch mean. What is compared: every rank's forward output with its rows of the one-process output,
and every parameter's gradient *after DeepSpeed's reduction* (what the optimizer sees) with the
one-process gradient (for expert shards: the rows of this rank's global experts). One spawn per world
size runs all its cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from ranks import run_ranks
from sigma_moe.distributed.groups import ExpertParallelLayout
from sigma_moe.layers import RoutedExperts, SBase, SBaseConfig, SigmaMoE, SigmaMoEConfig, Switch, SwitchConfig

pytestmark = pytest.mark.multiprocess

D = 8
N_EXPERTS = 8
LR = 0.5


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # "mixed" | "one_expert" | "all_experts"
    ep_size: int
    sizes: tuple[int, ...]  # tokens on each rank
    zero_stage: int = 0
    grad_clip: float = 0.0  # > 0: one SGD step with clipping; what is compared is the step / LR
    expert: int = 0  # "one_expert": the expert every token goes to
    seed: int = 0


class PositiveScale(nn.Module):
    """x · exp(s): a non-expert parameter in front of the routed layer that keeps x > 0."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        return x * self.s.exp()


def build_model(case: Case) -> nn.Module:
    torch.manual_seed(case.seed)
    if case.model == "mixed":  # σ-MoE (regulariser on), Switch (balance loss on), S-BASE
        return nn.Sequential(
            nn.Linear(D, D),
            SigmaMoE(SigmaMoEConfig(n_experts=N_EXPERTS, expert_size=4, k=3, entropy_reg=0.5), d_model=D, n_layers=2),
            Switch(SwitchConfig(n_experts=N_EXPERTS, expert_size=4, k=2, aux_loss_coef=0.5), d_model=D, n_layers=2),
            SBase(SBaseConfig(n_experts=N_EXPERTS, expert_size=4, k=2), d_model=D, n_layers=2),  # global Sinkhorn
        )
    if case.model == "one_expert":  # x > 0 and selector rows -1 except +1 for `expert`: all tokens choose it
        layer = SigmaMoE(
            SigmaMoEConfig(n_experts=N_EXPERTS, expert_size=4, k=1, entropy_reg=0.5), d_model=D, n_layers=2
        )
        with torch.no_grad():
            layer.selector.fill_(-1.0)
            layer.selector[case.expert] = 1.0
        return nn.Sequential(PositiveScale(), layer)
    if case.model == "all_experts":  # k = n_experts
        layer = SigmaMoE(
            SigmaMoEConfig(n_experts=N_EXPERTS, expert_size=4, k=N_EXPERTS, entropy_reg=0.5), d_model=D, n_layers=2
        )
        return nn.Sequential(nn.Linear(D, D), layer)
    raise ValueError(case.model)


def global_batch(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + case.seed)
    n = sum(case.sizes)
    x = torch.rand(n, D, generator=g) + 0.1 if case.model == "one_expert" else torch.randn(n, D, generator=g)
    return x, torch.randn(n, D, generator=g)


def rank_rows(case: Case, rank: int) -> slice:
    start = sum(case.sizes[:rank])
    return slice(start, start + case.sizes[rank])


def loss_fn(model: nn.Module, y: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    aux = sum(m.aux_loss for m in model.modules() if isinstance(m, RoutedExperts))
    return (y * target).sum() * scale + aux


# ---------------------------------------------------------------- worker (runs on every rank)


@dataclass(frozen=True)
class EP:
    expert_parallel_size: int
    transport: str = "torch"


def _run_case(rank: int, world: int, case: Case) -> dict:
    import deepspeed

    from sigma_moe.distributed import global_grad_norm, moe_param_groups, parallelize, use_exact_clipping

    model = parallelize(build_model(case), EP(case.ep_size))
    optimizer = torch.optim.SGD(moe_param_groups(list(model.parameters())), lr=LR)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": case.zero_stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": case.grad_clip,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    use_exact_clipping(engine)
    x, target = global_batch(case)
    rows = rank_rows(case, rank)
    y = engine(x[rows])
    engine.backward(loss_fn(model, y, target[rows], world / sum(case.sizes)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if case.zero_stage == 0 and not case.grad_clip:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        norm = global_grad_norm(model.parameters())
    else:  # ZeRO keeps reduced gradients in its partitions, clipping happens in the step: one SGD step
        engine.step()
        grads = {n: (before[n] - p.detach()) / LR for n, p in model.named_parameters()}
        norm = engine.get_global_grad_norm()
    dispatchers = {n: repr(m.dispatcher) for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
    meters = (
        {
            n: m.dispatcher.meter.totals()
            for n, m in model.named_modules()
            if hasattr(getattr(m, "dispatcher", None), "meter")
        }
        if case.ep_size > 1
        else {}
    )
    return {
        "y": y.detach(),
        "grads": grads,
        "norm": norm,
        "params": before,
        "dispatchers": dispatchers,
        "meters": meters,
    }


def _check_errors(world: int) -> dict:
    from sigma_moe.distributed import parallelize

    messages = {}
    for e in (3, 8):  # 3 does not divide n_experts = 8; 8 divides it but not W = 4
        try:
            parallelize(build_model(Case("err", "mixed", e, (1,) * world)), EP(e))
        except ValueError as err:
            messages[e] = str(err)
    return messages


def meter_splits(rank: int, world: int) -> list[int]:
    """Rows rank ``rank`` sends to each rank in the meter check: uneven, some to itself."""
    return [(rank + i) % 3 + i for i in range(world)]


def _meter_check(rank: int, world: int) -> tuple[int, float]:
    """Bytes and seconds the exchange meter records for one all-to-all of [rows, 3] fp32 and its backward."""
    import torch.distributed as dist

    from sigma_moe.distributed import ExchangeMeter, all_to_all

    dist.barrier()
    meter = ExchangeMeter()
    send = meter_splits(rank, world)
    recv = [meter_splits(src, world)[rank] for src in range(world)]
    x = torch.ones(sum(send), 3, requires_grad=True)
    all_to_all(x, output_splits=recv, input_splits=send, group=dist.group.WORLD, meter=meter).sum().backward()
    all_to_all(x, output_splits=recv, input_splits=send, group=dist.group.WORLD)  # no meter: not counted
    totals = meter.totals()
    return totals.bytes_sent, totals.seconds


def bf16_model() -> nn.Module:
    """σ-MoE alone (no global Sinkhorn or balance loss), in bf16: the dispatcher's payload carries the
    expert ids as int64 bits in bf16 words, which must arrive unchanged."""
    torch.manual_seed(5)
    layer = SigmaMoE(SigmaMoEConfig(n_experts=N_EXPERTS, expert_size=4, k=3), d_model=D, n_layers=2)
    return nn.Sequential(layer).to(torch.bfloat16)


def _bf16_forward_backward(rank: int, world: int) -> dict:
    from sigma_moe.distributed import parallelize

    case = Case("bf16", "mixed", world, (7, 12))
    model = parallelize(bf16_model(), EP(world))
    x = global_batch(case)[0][rank_rows(case, rank)].bfloat16().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    return {"y": y.detach().float(), "grad_x": x.grad.float(), "grad_w1": model[0].w1.grad.float()}


def _worker(rank: int, world: int, cases: tuple[Case, ...], ep_sizes: tuple[int, ...]) -> dict:
    import torch.distributed as dist

    from sigma_moe.distributed.groups import expert_parallel_groups

    out = {"cases": {c.name: _run_case(rank, world, c) for c in cases}, "groups": {}}
    out["meter"] = _meter_check(rank, world)
    if world == 2:
        out["bf16"] = _bf16_forward_backward(rank, world)
    for e in ep_sizes:
        g = expert_parallel_groups(e)
        out["groups"][e] = (dist.get_process_group_ranks(g.ep_group), dist.get_process_group_ranks(g.edp_group))
    if world == 4:
        out["errors"] = _check_errors(world)
    return out


# ---------------------------------------------------------------- checks (in the pytest process)


def reference(case: Case) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, tuple[str, ...]]]:
    """One process, the whole batch, the global-batch mean loss."""
    model = build_model(case)
    x, target = global_batch(case)
    y = model(x)
    if case.model == "one_expert":  # the premise of the case: every token chose case.expert
        want = torch.zeros(N_EXPERTS, dtype=torch.long)
        want[case.expert] = x.shape[0]
        assert torch.equal(model[1].routing.tokens_per_expert, want)
    loss_fn(model, y, target, 1.0 / x.shape[0]).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    norm = torch.stack([g.square().sum() for g in grads.values()]).sum().sqrt()
    if case.grad_clip:  # torch's clip coefficient
        grads = {n: g * (case.grad_clip / (norm + 1e-6)).clamp(max=1.0) for n, g in grads.items()}
    experts = {n: m.expert_param_names for n, m in model.named_modules() if isinstance(m, RoutedExperts)}
    expert_params = {f"{m}.{p}" for m, names in experts.items() for p in names}
    return y.detach(), grads, norm, expert_params


def check_case(case: Case, results: list[dict]) -> None:
    y_ref, g_ref, norm_ref, expert_params = reference(case)
    if case.grad_clip:
        assert norm_ref > 10 * case.grad_clip  # the premise: clipping is active
    layout = ExpertParallelLayout(len(results), case.ep_size)
    for rank, res in enumerate(results):
        res = res["cases"][case.name]
        torch.testing.assert_close(
            res["y"],
            y_ref[rank_rows(case, rank)],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, rank=rank: f"{case.name} rank {rank} output: {m}",
        )
        torch.testing.assert_close(
            torch.as_tensor(res["norm"]).float(),
            norm_ref,
            rtol=1e-5,
            atol=0,
            msg=lambda m, rank=rank: f"{case.name} rank {rank} global grad norm: {m}",
        )
        assert set(res["grads"]) == set(g_ref)
        for name, grad in res["grads"].items():
            want = g_ref[name]
            if name in expert_params and case.ep_size > 1:
                experts = layout.expert_range(N_EXPERTS, layout.ep_rank(rank))
                want = want[experts.start : experts.stop]
            torch.testing.assert_close(
                grad,
                want,
                rtol=1e-4,
                atol=1e-6,
                msg=lambda m, rank=rank, name=name: f"{case.name} rank {rank} grad {name}: {m}",
            )
    check_meters(case, [res["cases"][case.name]["meters"] for res in results])


def check_meters(case: Case, meters: list[dict]) -> None:
    """Each dispatcher's meter: every (token, slot) row is computed once somewhere, one forward."""
    if case.ep_size == 1:
        assert meters == [{}] * len(meters)  # no all-to-all dispatcher
        return
    model = build_model(case)
    for name in meters[0]:
        k = model.get_submodule(name).k
        assert sum(m[name].expert_rows for m in meters) == sum(case.sizes) * k, name
        assert all(m[name].bytes_sent >= 0 and m[name].seconds > 0 for m in meters)
    if case.model == "one_expert":  # every token goes to `expert`: its EP rank computes them all
        layout = ExpertParallelLayout(len(meters), case.ep_size)
        owner = [r for r in range(len(meters)) if case.expert in layout.expert_range(N_EXPERTS, layout.ep_rank(r))]
        for rank, m in enumerate(meters):
            (t,) = m.values()
            if rank in owner:
                senders = [r for r in range(len(meters)) if r != rank and _same_ep_group(layout, r, rank)]
                assert t.rows_received == sum(case.sizes[r] for r in senders)
                assert t.expert_rows == case.sizes[rank] + t.rows_received
            else:
                assert t.rows_received == 0 and t.expert_rows == 0


def _same_ep_group(layout: ExpertParallelLayout, a: int, b: int) -> bool:
    return any(a in g and b in g for g in layout.ep_groups())


CASES_2 = (
    Case("mixed_E2", "mixed", 2, (7, 12)),
    Case("mixed_E1", "mixed", 1, (7, 12)),  # pure data parallel: only the token sums are global
    Case("mixed_E2_clip", "mixed", 2, (7, 12), grad_clip=1e-3),  # fp32, no ZeRO: our clipping
)
CASES_4 = (
    Case("mixed_E2", "mixed", 2, (5, 11, 2, 8)),
    Case("mixed_E4", "mixed", 4, (5, 11, 2, 8)),
    Case("mixed_E2_zero2", "mixed", 2, (5, 11, 2, 8), zero_stage=2, grad_clip=1e-3),  # DeepSpeed's clipping
    Case("mixed_E4_clip", "mixed", 4, (5, 11, 2, 8), grad_clip=1e-3),
    Case("one_expert_E4", "one_expert", 4, (5, 11, 2, 8), expert=0),  # ranks 1-3 receive nothing
    Case("one_expert_E2", "one_expert", 2, (6, 3, 9, 4), expert=7),  # ranks 0, 2 receive nothing
    Case("all_experts_E4", "all_experts", 4, (6, 0, 3, 9)),  # k = n_experts; rank 1 has no tokens
)


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_worker, 2, CASES_2, (2,), timeout=150)


@pytest.fixture(scope="module")
def four_ranks() -> list[dict]:
    return run_ranks(_worker, 4, CASES_4, (2, 4), timeout=200)


@pytest.mark.parametrize("case", CASES_2, ids=lambda c: c.name)
def test_two_ranks_equal_one_process(two_ranks, case):
    check_case(case, two_ranks)


@pytest.mark.parametrize("case", CASES_4, ids=lambda c: c.name)
def test_four_ranks_equal_one_process(four_ranks, case):
    check_case(case, four_ranks)


def test_shards_are_slices_of_the_one_process_init(four_ranks):
    case = CASES_4[1]  # E = 4: each rank holds 2 of the 8 experts
    full = dict(build_model(case).named_parameters())
    for rank, res in enumerate(four_ranks):
        params = res["cases"][case.name]["params"]
        torch.testing.assert_close(params["1.w1"], full["1.w1"][2 * rank : 2 * rank + 2], rtol=0, atol=0)
        torch.testing.assert_close(params["2.w2"], full["2.w2"][2 * rank : 2 * rank + 2], rtol=0, atol=0)
        torch.testing.assert_close(params["1.selector"], full["1.selector"], rtol=0, atol=0)
        assert res["cases"][case.name]["dispatchers"]["1"] == (
            f"AllToAllDispatcher(n_experts=8, ep_size=4, ep_rank={rank}, experts=[{2 * rank}, {2 * rank + 2}))"
        )


def test_bf16_two_ranks_match_one_process(two_ranks):
    case = Case("bf16", "mixed", 2, (7, 12))
    model = bf16_model()
    x = global_batch(case)[0].bfloat16().requires_grad_()
    y = model(x)
    y.float().square().sum().backward()
    for rank, res in enumerate(two_ranks):
        got, rows = res["bf16"], rank_rows(case, rank)
        # bf16: the ranks sum a token's expert outputs in another order than one process does
        torch.testing.assert_close(got["y"], y[rows].detach().float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got["grad_x"], x.grad[rows].float(), rtol=3e-2, atol=3e-2)
        experts = slice(4 * rank, 4 * rank + 4)  # this rank's shard; its gradient sums both ranks' tokens
        torch.testing.assert_close(got["grad_w1"], model[0].w1.grad[experts].float(), rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("world", [2, 4])
def test_exchange_meter_counts_bytes_to_other_ranks_both_ways(two_ranks, four_ranks, world):
    for rank, res in enumerate({2: two_ranks, 4: four_ranks}[world]):
        rows_out = sum(n for dst, n in enumerate(meter_splits(rank, world)) if dst != rank)  # forward
        rows_back = sum(meter_splits(src, world)[rank] for src in range(world) if src != rank)  # gradients
        sent, seconds = res["meter"]
        assert sent == (rows_out + rows_back) * 3 * 4
        assert seconds > 0


def test_deepspeed_groups_follow_the_layout(four_ranks):
    for rank, res in enumerate(four_ranks):
        assert res["groups"][2] == ([[0, 1], [2, 3]][rank // 2], [[0, 2], [1, 3]][rank % 2])
        assert res["groups"][4] == ([0, 1, 2, 3], [rank])


def test_parallelize_rejects_sizes_that_do_not_divide(four_ranks):
    for res in four_ranks:
        assert (
            "n_experts = 8" in res["errors"][3]
            and "not divisible by distributed.expert_parallel_size = 3" in res["errors"][3]
        )
        assert (
            "expert_parallel_size = 8 needs 8 or more processes, this job has 4: choose one of [1, 2, 4]"
            in res["errors"][8]
        )
