"""The import direction of the package, read from the sources with ``ast`` (every import counts: module
level, inside functions, under TYPE_CHECKING):

    sigma_moe.kernels  <-  sigma_moe.layers  <-  sigma_moe.distributed  <-  sigma_moe.launch

kernels imports none of the other three, layers only kernels, distributed no launch. The modules at
the package root (``sigma_moe/*.py``: ``atomic_io``, ``config_check``, ``config_schema``) import only one
another, and every package may import them. Inside launch: data/, checkpoint/ and monitor/ import
nothing else of launch; guards/ import only the config modules; compare/ is the top (it runs the
training loop) and only the CLI imports it. data/ reads and tokenises without torch: only its
sampling module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# package -> its folder in the repository (pyproject.toml's package-dir)
FOLDERS = {
    "sigma_moe": "sigma_moe",
    "sigma_moe.kernels": "kernels",
    "sigma_moe.layers": "layers",
    "sigma_moe.distributed": "distributed",
    "sigma_moe.launch": "launch",
}
ROOT_MODULES = "sigma_moe.<root>"  # the modules of sigma_moe/ itself
LAYERS = ["sigma_moe.kernels", "sigma_moe.layers", "sigma_moe.distributed", "sigma_moe.launch"]
LAUNCH_CONFIG = {"sigma_moe.launch.config", "sigma_moe.launch.config_checks", "sigma_moe.launch.deepspeed_config"}
# launch subpackage -> what of launch outside itself it may import
LAUNCH_UNITS: dict[str, set[str] | None] = {
    "sigma_moe.launch.data": set(),
    "sigma_moe.launch.checkpoint": set(),
    "sigma_moe.launch.monitor": set(),
    "sigma_moe.launch.guards": LAUNCH_CONFIG,
    "sigma_moe.launch.compare": None,  # the top: anything
}
COMPARE_CLIENTS = {"sigma_moe.launch.cli"}
TORCH_FREE = ("sigma_moe.launch.data",)
TORCH_FREE_EXCEPT = {"sigma_moe.launch.data.sampling"}


def module_files() -> dict[str, Path]:
    """module name -> source file, for every module of the package."""
    out = {}
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        files = base.glob("*.py") if package == "sigma_moe" else base.rglob("*.py")
        for path in files:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def imports_of(name: str, source: str, is_package: bool) -> set[str]:
    """Every module ``source`` imports (absolute names; ``from a import b`` gives ``a.b`` as well as
    ``a``, since b may be a module)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py") for name, path in files.items()}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _layer(name: str) -> str | None:
    return next((p for p in LAYERS if _within(name, p)), None)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the rules of the module docstring, as 'importer -> imported: rule'."""
    known = set(graph)
    out = []
    for importer, imported in sorted(graph.items()):
        ours = sorted(m for m in imported if m in known and m != importer)  # sigma_moe modules only
        layer = _layer(importer)
        for target in ours:
            target_layer = _layer(target)
            if layer is None and target_layer is not None:
                out.append(f"{importer} -> {target}: modules at the package root import only one another")
            elif layer and target_layer and LAYERS.index(target_layer) > LAYERS.index(layer):
                out.append(
                    f"{importer} -> {target}: {layer} may not import {target_layer} "
                    f"(kernels <- layers <- distributed <- launch)"
                )
            elif layer == "sigma_moe.launch" and target_layer == "sigma_moe.launch":
                out += _launch_violations(importer, target)
        if any(_within(importer, p) for p in TORCH_FREE) and importer not in TORCH_FREE_EXCEPT:
            if any(m == "torch" or m.startswith("torch.") for m in imported):
                out.append(
                    f"{importer} -> torch: launch.data reads and tokenises without torch (only "
                    f"{sorted(TORCH_FREE_EXCEPT)} imports it)"
                )
    return out


def _launch_violations(importer: str, target: str) -> list[str]:
    unit = next((u for u in LAUNCH_UNITS if _within(importer, u)), None)
    target_unit = next((u for u in LAUNCH_UNITS if _within(target, u)), None)
    if unit is not None and unit == target_unit:
        return []
    if target_unit == "sigma_moe.launch.compare" and importer not in COMPARE_CLIENTS:
        return [f"{importer} -> {target}: only {sorted(COMPARE_CLIENTS)} imports launch.compare (the top)"]
    allowed = LAUNCH_UNITS.get(unit) if unit else None
    if unit is not None and allowed is not None and target not in allowed and target != "sigma_moe.launch":
        return [f"{importer} -> {target}: {unit} imports {sorted(allowed) or 'nothing'} of launch outside itself"]
    return []


def test_the_package_follows_its_import_direction():
    graph = import_graph()
    assert {"sigma_moe.kernels.cvmm", "sigma_moe.launch.data.splits", "sigma_moe.atomic_io"} <= set(graph)
    assert "sigma_moe.launch.checkpoint.manager" in graph["sigma_moe.launch.train"]  # imports are read
    assert violations(graph) == []


def test_a_wrong_import_is_caught():
    """Each rule, broken once in a copy of the real graph, is reported."""
    graph = import_graph()
    wrong = {
        "sigma_moe.kernels.cvmm": "sigma_moe.layers.routed",
        "sigma_moe.layers.routed": "sigma_moe.distributed.dispatcher",
        "sigma_moe.distributed.checkpoint": "sigma_moe.launch.checkpoint.manager",
        "sigma_moe.atomic_io": "sigma_moe.launch.config",
        "sigma_moe.launch.data.splits": "sigma_moe.launch.monitor.tags",
        "sigma_moe.launch.checkpoint.manager": "sigma_moe.launch.session",
        "sigma_moe.launch.monitor.routing": "sigma_moe.launch.config",
        "sigma_moe.launch.guards.run_lock": "sigma_moe.launch.data.cache",
        "sigma_moe.launch.train": "sigma_moe.launch.compare.spec",
        "sigma_moe.launch.data.corpora": "torch",
    }
    for importer, target in wrong.items():
        broken = {**graph, importer: graph[importer] | {target}}
        found = violations(broken)
        assert len(found) == 1 and found[0].startswith(f"{importer} -> {target}:"), (importer, target, found)


def test_relative_imports_resolve():
    got = imports_of(
        "sigma_moe.launch.data.splits", "from .cache import file_lock\nfrom . import sampling\n", is_package=False
    )
    assert {
        "sigma_moe.launch.data.cache",
        "sigma_moe.launch.data.cache.file_lock",
        "sigma_moe.launch.data.sampling",
    } <= got
    got = imports_of("sigma_moe.distributed", "from .groups import x\n", is_package=True)
    assert "sigma_moe.distributed.groups" in got
