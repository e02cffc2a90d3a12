#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py says what it measures), runnable on a GPU machine with no network whose image
# has torch, transformers, peft and accelerate but not this project's pins of them, nor trl or datasets.
#
#   bash bench/gpu_check.sh --wheels    # here, once: download the wheels it needs into bench/gpu_wheels (~20 MB)
#   bash bench/gpu_check.sh             # there (carry bench/gpu_wheels): install them offline, run on cuda
#   bash bench/gpu_check.sh --cpu       # the CPU mode, on this machine
#
# On the device machine: run(command="bash bench/gpu_check.sh", carry=["bench/gpu_wheels"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=bench/gpu_wheels
# the project's pins (pyproject.toml) of what the check imports beyond the GPU image; installed --no-deps
PINS=$(sed -n 's/^ *"\(transformers\|peft\|trl\|datasets\)==\([^"]*\)",*$/\1==\2/p' pyproject.toml)
EXTRA="dill==0.4.1 multiprocess==0.70.19"   # datasets' own dependencies the image lacks

if [ "${1:-}" = "--wheels" ]; then
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # the GPU image's Python is 3.12; these are pure-Python wheels or built for it
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d "$WHEELS" $PINS $EXTRA
  du -sh "$WHEELS"; ls "$WHEELS"
  exit 0
fi

if [ "${1:-}" != "--cpu" ]; then
  # install the pinned versions where the image has others or none (offline, from the carried wheels)
  need=$($PY - "$PINS $EXTRA" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
need = []
for pin in sys.argv[1].split():
    name, wanted = pin.split("==")
    try:
        if version(name) != wanted:
            need.append(pin)
    except PackageNotFoundError:
        need.append(pin)
print(" ".join(need))
PYEOF
)
  if [ -n "$need" ]; then
    [ -d "$WHEELS" ] || { echo "gpu_check: $need missing and no $WHEELS: run 'bash bench/gpu_check.sh --wheels' here and carry $WHEELS" >&2; exit 2; }
    $PY -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" $need
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec timeout 480 $PY bench/gpu_check.py "$@"
