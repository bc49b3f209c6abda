#!/usr/bin/env bash
# Creates .venv in the checkout (once) and installs qla_megatron with its pinned dependencies.
# Idempotent: a second run only re-checks the stamp. Used by `make run` and `make test`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
VENV=.venv
STAMP=$VENV/.qla-installed
REQ_HASH=$(cat requirements/cpu.txt setup.py scripts/setup_env.sh | sha1sum | cut -c1-12)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$REQ_HASH" ]; then
  exit 0
fi
echo "setup_env: creating $VENV with $($PY --version)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first: its CPU wheel on these machines; a later package must not pull a CUDA build.
$PIP install -q -r requirements/cpu.txt
# megatron-core 0.19.2 asks for Python >= 3.12 in its metadata but runs on 3.11 (DESIGN §4);
# its dependencies (numpy, packaging>=24.2) came in above.
$PIP install -q --no-deps --ignore-requires-python megatron-core==0.19.2
$PIP install -q --no-deps --no-build-isolation -e .
echo "$REQ_HASH" > "$STAMP"
echo "setup_env: ready ($($VENV/bin/python -c 'import torch, tilelang, megatron.core as m; print("torch", torch.__version__, "tilelang", tilelang.__version__, "megatron-core", m.__version__)' 2>/dev/null))"
