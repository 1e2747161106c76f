#!/usr/bin/env bash
# Download into .whl/ the wheels scripts/gpu_check.sh needs on a GPU machine without internet.
#
#   bash scripts/fetch_gpu_wheels.sh            # hydra-core, omegaconf, antlr4 (what train.py imports)
#   bash scripts/fetch_gpu_wheels.sh --all      # also datasets, wandb, submitit (~20 MB more)
#
# The GPU image (NVIDIA H200, Python 3.12, CUDA 13 torch/torchvision/transformers) already holds
# torch, torchvision, transformers, numpy, timm, scikit-learn, tifffile, pillow, matplotlib, tqdm,
# pyyaml and pytest; it lacks hydra-core, omegaconf and antlr4-python3-runtime, which train.py
# imports at start, and the optional datasets, wandb, submitit, pycocotools and nvidia-dali.
# Versions are requirements.txt's pins. antlr4-python3-runtime 4.9.3 is published as a source
# archive only, so it is built here into a pure-Python wheel. NVIDIA DALI is not fetched: its
# wheel is several hundred MB, beyond what a GPU call may carry (64 MiB), so gpu_check.sh's
# `dali` step reports FAIL (no module nvidia.dali) unless the image provides DALI.
# Keep .whl/ out of git (`echo /.whl/ >> .git/info/exclude`).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$REPO/.whl"
PY="${PYTHON:-python3}"
case "${1:-}" in
  "") EXTRA=() ;;
  --all) EXTRA=(datasets dill multiprocess wandb submitit hydra-submitit-launcher
                gitpython gitdb smmap sentry-sdk platformdirs pydantic pydantic-core
                annotated-types typing-inspection setproctitle) ;;
  --help|-h) sed -n '2,17p' "$0"; exit 0 ;;
  *) echo "error: unknown argument '$1': use --all or --help" >&2; exit 2 ;;
esac

pin() {  # the version requirements.txt pins, else the one installed here
  local v
  v=$(grep -i -E "^$1==" "$REPO/requirements.txt" | head -1 | cut -d= -f3 || true)
  [ -n "$v" ] || v=$("$PY" -c "import importlib.metadata as m; print(m.version('$1'))")
  echo "$1==$v"
}

mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do PLATFORMS+=(--platform "$p"); done

"$PY" -m pip wheel -q --no-deps -w "$DEST" "$(pin antlr4-python3-runtime)"
wanted=("$(pin hydra-core)" "$(pin omegaconf)")
for name in "${EXTRA[@]}"; do wanted+=("$(pin "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${wanted[@]}"
ls -la "$DEST"
du -sh "$DEST"
