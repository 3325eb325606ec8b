"""Check a pip resolution report (``pip install --dry-run --report``) made from plain PyPI: the CUDA
build of torch resolves together with the triton it pins. Prints one line; exits 1 with the reason."""

from __future__ import annotations

import json
import re
import sys


def main(report_path: str) -> int:
    install = {i["metadata"]["name"].lower(): i["metadata"] for i in json.load(open(report_path))["install"]}
    torch = install.get("torch")
    if torch is None:
        print("plain PyPI: torch is not in the resolution", file=sys.stderr)
        return 1
    pins = [r for r in torch.get("requires_dist", []) if re.match(r"triton\b", r)]
    triton = install.get("triton")
    cuda = sorted(n for n in install if n.startswith(("nvidia-", "cuda-")))
    if pins and triton is None:
        print(
            f"plain PyPI: torch {torch['version']} requires {pins} but triton is not in the resolution", file=sys.stderr
        )
        return 1
    print(
        f"plain PyPI resolves: torch {torch['version']} (requires {'; '.join(pins) or 'no triton'}), "
        f"triton {triton['version'] if triton else '-'}, {len(cuda)} CUDA packages, {len(install)} in all"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
