"""Check a pip resolution report (``pip install --dry-run --report``) made from plain PyPI: the CUDA
build of torch resolves together with the one triton it pins (our triton range admits it, so no
second triton is asked for), inside pyproject.toml's torch range. ``--torch V``: the resolution must
hold torch V (the oldest release of the range, asked for beside the package). Prints one line; exits 1
with the reason."""

from __future__ import annotations

import argparse
import json
import re
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="pip's --report JSON")
    parser.add_argument("--torch", default=None, help="the torch version the resolution must hold")
    args = parser.parse_args(argv)
    install = {i["metadata"]["name"].lower(): i["metadata"] for i in json.load(open(args.report))["install"]}
    torch = install.get("torch")
    if torch is None:
        print("plain PyPI: torch is not in the resolution", file=sys.stderr)
        return 1
    if args.torch is not None and torch["version"].split("+")[0] != args.torch:
        print(f"plain PyPI: expected torch {args.torch}, the resolution holds {torch['version']}", file=sys.stderr)
        return 1
    pins = [r for r in torch.get("requires_dist", []) if re.match(r"triton\b", r)]
    triton = install.get("triton")
    cuda = sorted(n for n in install if n.startswith(("nvidia-", "cuda-")))
    if pins and triton is None:
        print(
            f"plain PyPI: torch {torch['version']} requires {pins} but triton is not in the resolution", file=sys.stderr
        )
        return 1
    pinned = [m.group(1) for r in pins if (m := re.search(r"==\s*([\w.]+)", r))]
    if triton is not None and pinned and triton["version"] not in pinned:
        print(
            f"plain PyPI: torch {torch['version']} pins triton {pinned[0]}, the resolution holds {triton['version']}",
            file=sys.stderr,
        )
        return 1
    print(
        f"plain PyPI resolves: torch {torch['version']} (requires {'; '.join(pins) or 'no triton'}), "
        f"triton {triton['version'] if triton else '-'}, numpy {install.get('numpy', {}).get('version', '-')}, "
        f"{len(cuda)} CUDA packages, {len(install)} in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
