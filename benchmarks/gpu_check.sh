#!/usr/bin/env bash
# The GPU check in one command, from a fresh GPU machine that has only torch (and the packages of
# its image): installs the wheels carried in .whl/ (if any), then runs benchmarks/gpu_check.py.
#
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a GPU: <= 8 minutes on one H100/H200
#   bash benchmarks/gpu_check.sh OUT_DIR --dry-run  # the same steps on CPU, tiny sizes
#
# Fill .whl/ beforehand with the commands in benchmarks/README.md ("The GPU check").
# Writes OUT_DIR/gpu_check.json, OUT_DIR/summary.txt and one log (+ JSON) per step.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]" >&2
  exit 2
fi
OUT_DIR=$1
shift
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON=${PYTHON:-python3}
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  SITE=${DDPO_RL_SITE:-/tmp/site}
  echo "gpu_check: installing $(ls "$ROOT"/.whl/*.whl | wc -l) carried wheels into $SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$ROOT"/.whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" benchmarks/gpu_check.py "$OUT_DIR" "$@"
