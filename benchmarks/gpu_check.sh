#!/usr/bin/env bash
# One GPU check, end to end (aim: < 5 min on one H100/H200); the steps are in benchmarks/gpu_check.py:
#   0. prerequisites: every module the steps import and a CUDA device, before anything runs
#   1. tests/kernels/test_triton_cvmm.py + tests/kernels/test_cvmm.py compiled for the GPU (TRITON_INTERPRET unset; the
#      first also compiles every autotune config for sm_90 with tools/triton_compile_check.py)
#   2. benchmarks/bench_triton_gpu.py: σ-MoE TFLOP/s vs cuBLAS dense and torch._grouped_mm, bf16
#   3. benchmarks/gpu_train_check.py: the default config through DeepSpeed in bf16 on the Triton backend
#      (loss falls; equals a torch-backend run and a training.compile run), a checkpoint saved and resumed
# Everything goes to $OUT (default /tmp/sigma-moe-gpu-check): logs, tests.xml, bench.json,
# train_check.json, summary.txt (the closing table) and summary.json. Exit status 0: every check passed;
# 1: a check failed; 2: something is missing (named).
#
#   bash benchmarks/gpu_check.sh               # on a GPU machine
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same steps at tiny sizes on the CPU, torch backend
#   bash benchmarks/gpu_check.sh --pack        # then all but the summaries into one tarball in $OUT
#
# Python: $PYTHON (default python3) must already hold torch (a CUDA build) and triton: the machine's own
# are used as they are, never installed or replaced (pyproject.toml's ranges admit torch >= 2.11 and the
# triton it pins). Missing pure-Python packages (DeepSpeed and its needs, say) can come as wheels
# (benchmarks/gpu_check_wheels.sh makes them where PyPI is reachable): WHEELS=folder installs the *.whl
# there whose package $PYTHON lacks into $OUT/scratch/site (no index, no dependencies; a package the
# image holds keeps its version; a torch, triton or nvidia-* wheel is refused) and puts it on
# PYTHONPATH. If $PYTHON runs inside a venv, this repo is installed into
# it (editable, no dependencies) unless it already imports from here; otherwise a venv ($VENV) is made
# with --system-site-packages first. Where pip cannot install, a small shim package on PYTHONPATH is used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sigma-moe-gpu-check}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/sigma-moe-gpu-venv}
for arg in "$@"; do
  case $arg in
    --cpu-smoke|--pack|--keep-scratch|--step-timeout=*|--total-timeout=*) ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --cpu-smoke, --pack, --keep-scratch, --step-timeout=S, --total-timeout=S)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
[[ " $* " == *" --cpu-smoke "* ]] || unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

"$PYTHON" -c 'import torch' 2>/dev/null \
  || { echo "gpu_check.sh: $PYTHON cannot import torch; set PYTHON to a Python with torch (a CUDA build)" >&2; exit 2; }
if [ -n "${WHEELS:-}" ]; then
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: WHEELS=$WHEELS holds no *.whl" >&2; exit 2; }
  # the wheels of packages $PYTHON lacks (a wheel's name is "dist-version-...": dist, - written _)
  missing=$("$PYTHON" - "$WHEELS"/*.whl <<'PY'
import importlib.metadata as m, pathlib, re, sys
for wheel in sys.argv[1:]:
    dist = pathlib.Path(wheel).name.split("-")[0]
    if re.match(r"(torch|triton|nvidia_)", dist.lower()):
        sys.exit(f"gpu_check.sh: {wheel}: the machine's own torch and triton are used; remove this wheel")
    try:
        print(f"skipped {dist} {m.version(dist)} (the machine's own)", file=sys.stderr)
    except m.PackageNotFoundError:
        print(wheel)
PY
  ) || exit 2
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$OUT/scratch/site" \
      $missing >"$OUT/wheels.log" 2>&1 || { echo "gpu_check.sh: installing $WHEELS failed (see $OUT/wheels.log)" >&2; exit 2; }
    echo "gpu_check.sh: from $WHEELS: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
    export PYTHONPATH="$OUT/scratch/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  PY=$PYTHON  # already a venv (its torch is not visible from a venv made on top of it)
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" || exit 2
  PY="$VENV/bin/python"
fi
# the repo, importable from here: already (e.g. `make setup`'s editable install), or installed now
if ! "$PY" -c 'import sys, pathlib, sigma_moe; sys.exit(pathlib.Path(sigma_moe.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())' 2>/dev/null; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "editable install failed (see $OUT/install.log); using a PYTHONPATH shim"
    shim=$OUT/scratch/shim && rm -rf "$shim" && mkdir -p "$shim/sigma_moe"
    ln -s "$PWD/sigma_moe/__init__.py" "$shim/sigma_moe/__init__.py"
    for d in kernels layers distributed launch; do ln -s "$PWD/$d" "$shim/sigma_moe/$d"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
exec "$PY" benchmarks/gpu_check.py --out "$OUT" "$@"
