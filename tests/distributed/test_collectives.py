"""Collectives run on the device their process group serves (NCCL: CUDA only), and every collective of
the package goes through ``sigma_moe.distributed.collectives``.

On a CPU machine every tensor is a CPU tensor, so a CPU tensor handed to an NCCL collective can only be
caught by construction: the device choice per backend, and a scan that finds no collective called
anywhere else (the monitoring, evaluation and exchange figures used to all-reduce CPU tensors
directly, which NCCL refuses)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from launch_helpers import ROOT
from ranks import run_ranks
from sigma_moe.distributed.collectives import backend_device_types, collective_device

REPO = ROOT
PACKAGE_DIRS = ("sigma_moe", "kernels", "layers", "distributed", "launch")
HELPER = REPO / "distributed" / "collectives.py"
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "broadcast_object_list",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "barrier",
    "monitored_barrier",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}


def test_backend_device_types():
    assert backend_device_types("nccl") == ("cuda",)
    assert backend_device_types("gloo") == ("cpu",)
    assert backend_device_types("mpi") == ("cpu",)
    assert backend_device_types("ccl") == ("cpu",)
    assert backend_device_types("cpu:gloo,cuda:nccl") == ("cpu", "cuda")
    with pytest.raises(ValueError, match="'smoke'.*unknown device"):
        backend_device_types("smoke")


def test_collective_device_moves_cpu_tensors_to_the_accelerator_for_nccl():
    cpu, gpu1 = torch.device("cpu"), torch.device("cuda", 1)
    assert collective_device(cpu, "nccl").type == "cuda"  # the monitoring sums: CPU float64
    assert collective_device(gpu1, "nccl") == gpu1  # model tensors stay where they are
    assert collective_device(cpu, "gloo") == cpu
    assert collective_device(gpu1, "gloo") == cpu
    assert collective_device(cpu, "cpu:gloo,cuda:nccl") == cpu
    assert collective_device(gpu1, "cpu:gloo,cuda:nccl") == gpu1


def _torch_distributed_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names bound to torch.distributed or deepspeed.comm, collectives imported by name)."""
    modules, functions = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch.distributed", "deepspeed.comm"):
                    modules.add(a.asname or a.name)
                elif a.name == "torch" and a.asname is None:
                    modules.add("torch.distributed")
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if (node.module, a.name) in (("torch", "distributed"), ("deepspeed", "comm")):
                    modules.add(a.asname or a.name)
                elif node.module in ("torch.distributed", "deepspeed.comm") and a.name in COLLECTIVES:
                    functions.add(a.asname or a.name)
    return modules, functions


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def direct_collective_calls(path: Path) -> list[str]:
    """``file:line: call`` of each torch.distributed (or deepspeed.comm) collective called in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, functions = _torch_distributed_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (name := _dotted(node.func)):
            base, _, attr = name.rpartition(".")
            if (attr in COLLECTIVES and base in modules) or (not base and attr in functions):
                found.append((node.lineno, f"{path.name}:{node.lineno}: {name}(...)"))
    return [text for _, text in sorted(found)]


def test_the_scan_finds_direct_collectives(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import torch.distributed as dist\nfrom torch.distributed import barrier as b\n"
        "from deepspeed import comm\n"
        "def f(t):\n    dist.all_reduce(t)\n    b()\n    dist.get_rank()\n    comm.broadcast(t, 0)\n"
    )
    assert direct_collective_calls(probe) == [
        "probe.py:5: dist.all_reduce(...)",
        "probe.py:6: b(...)",
        "probe.py:8: comm.broadcast(...)",
    ]


def test_every_collective_goes_through_the_helper():
    files = [p for d in PACKAGE_DIRS for p in sorted((REPO / d).rglob("*.py")) if p != HELPER]
    assert len(files) > 40  # the scan sees the package
    offenders = [f"{p.parent.name}/{c}" for p in files for c in direct_collective_calls(p)]
    assert offenders == [], (
        "collectives called outside distributed/collectives.py (NCCL refuses CPU "
        "tensors there): " + "; ".join(offenders)
    )


def _collectives_on_ranks(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from sigma_moe.distributed.collectives import all_reduce_, all_to_all_single_, world_all_reduce_, world_barrier

    summed = world_all_reduce_(torch.tensor([rank + 0.5, 1.0], dtype=torch.float64))
    pair = dist.new_group([0, 1])  # every rank creates it; ranks 0 and 1 use it
    maxed = torch.tensor([float(rank)])
    if rank < 2:
        all_reduce_(maxed, op=dist.ReduceOp.MAX, group=pair)
    # rank r sends r + 1 rows to each rank q, tagged (r, q)
    x = torch.tensor([[rank, q] for q in range(world) for _ in range(rank + 1)], dtype=torch.int64)
    out = torch.empty(sum(r + 1 for r in range(world)), 2, dtype=torch.int64)
    all_to_all_single_(out, x, [r + 1 for r in range(world)], [rank + 1] * world)
    world_barrier()
    return {"summed": summed, "maxed": maxed, "received": out}


@pytest.mark.multiprocess
def test_collectives_on_real_ranks():
    results = run_ranks(_collectives_on_ranks, 3)
    for rank, res in enumerate(results):
        assert res["summed"].dtype == torch.float64
        assert res["summed"].tolist() == [0.5 + 1.5 + 2.5, 3.0]
        assert res["maxed"].tolist() == [1.0 if rank < 2 else float(rank)]
        want = [[r, rank] for r in range(3) for _ in range(r + 1)]
        assert res["received"].tolist() == want
