#!/usr/bin/env bash
# One GPU check of the Triton CVMM kernels (aim: < 5 min on one H100/H200):
#   1. tests/test_triton_cvmm.py compiled for the GPU (TRITON_INTERPRET unset), plus tests/test_cvmm.py
#   2. benchmarks/bench_triton_gpu.py (σ-MoE vs dense MLPs, bf16), results as JSON
# Outputs (logs, junit xml, bench.json) go to $OUT if set, else /tmp/sigma-moe-gpu-check.
#
# Python: $PYTHON (default python3) must already hold a CUDA build of torch and triton; GPU machines are
# often offline, so nothing heavy is installed. If $PYTHON runs inside a venv, this repo is installed
# into it (editable, no dependencies); otherwise a venv ($VENV) is made with --system-site-packages
# first. Where pip cannot install, the repo is put on PYTHONPATH through a small shim package instead.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/sigma-moe-gpu-check}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-/tmp/sigma-moe-gpu-venv}
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

if "$PYTHON" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  PY=$PYTHON  # already a venv (its torch is not visible from a venv made on top of it)
else
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV" || exit 2
  PY="$VENV/bin/python"
fi
if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
  echo "editable install failed (see $OUT/install.log); using a PYTHONPATH shim"
  shim=$(mktemp -d)/shim && mkdir -p "$shim/sigma_moe"
  ln -s "$PWD/sigma_moe/__init__.py" "$shim/sigma_moe/__init__.py"
  for d in kernels layers distributed launch; do ln -s "$PWD/$d" "$shim/sigma_moe/$d"; done
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import pytest" 2>/dev/null || "$PY" -m pip install -q pytest \
  || { echo "pytest is missing and could not be installed"; exit 2; }
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt" || exit 2
import sys, torch, triton, sigma_moe.kernels
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this check needs a GPU")
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
EOF

status=0
tests=(tests/test_triton_cvmm.py)
[ -f tests/test_cvmm.py ] && tests+=(tests/test_cvmm.py) || echo "note: tests/test_cvmm.py not found, skipped"
t0=$SECONDS
"$PY" -m pytest -q -p no:cacheprovider --durations=10 --junitxml="$OUT/tests.xml" "${tests[@]}" 2>&1 \
  | tee "$OUT/tests.log" || status=1
echo "tests took $((SECONDS - t0)) s"
t0=$SECONDS
"$PY" benchmarks/bench_triton_gpu.py --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" || status=1
echo "benchmark took $((SECONDS - t0)) s"
exit $status
