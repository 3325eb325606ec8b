#!/usr/bin/env bash
# Wheels for an offline GPU machine whose image holds a CUDA torch and triton but not the rest of what
# the GPU check imports: DeepSpeed (no wheel on PyPI: built here from its sdist, pure Python) and its
# needs, and HF datasets (data.dataset=text reads files through it). Run where PyPI is reachable;
# the versions are this environment's, so the GPU runs what the tests here ran.
#
#   bash benchmarks/gpu_check_wheels.sh [DIR]      # default DIR .whl; PYVER (default 3.12) = the GPU's Python
#   WHEELS=DIR bash benchmarks/gpu_check.sh        # there: installed into $OUT/scratch/site, no index
#
# PACKAGES overrides the list (name==version ...). Only what an image lacks is needed: an image's own
# package is shadowed by the wheel's, so keep the list short.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PYVER=${PYVER:-3.12}
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
if [ -z "${PACKAGES:-}" ]; then
  PACKAGES=""
  for p in hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess; do
    PACKAGES+=" $p==$(version "$p")"
  done
fi
mkdir -p "$DIR"
platforms=()
for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" --platform manylinux2014_x86_64 --platform any -d "$DIR" $PACKAGES
"$PY" -m pip wheel -q --no-deps -w "$DIR" "deepspeed==$(version deepspeed)"
ls -la "$DIR"
