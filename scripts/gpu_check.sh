#!/usr/bin/env bash
# One prepared check of every CUDA path of kfac-train, for a machine with one NVIDIA GPU.
#
#   bash scripts/gpu_check.sh                  # every step (<= 8 minutes), report in $OUT
#   bash scripts/gpu_check.sh --only oracle,ddp
#   bash scripts/gpu_check.sh --dry-run        # list steps, commands and budgets; run nothing
#
# Each step runs under its own time budget (timeout), its output goes to $OUT/<step>.log, and the
# script carries on past a failed step. $OUT/report.md gets one PASS/FAIL/TIMEOUT row per step
# and the figures each step printed; every figure is a ratio to a baseline measured in the same
# run. OUT defaults to ./gpu_report. Wheels of packages the GPU image lacks (hydra-core, ...;
# scripts/fetch_gpu_wheels.sh) are installed from .whl/ into /tmp/site first when present.
# Exit status: 0 when every step passed, 1 when one did not, 2 for bad arguments.
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_report}"
PY="${PYTHON:-python3}"

STEPS=(env oracle ddp resnet50 bert dali compile)
declare -A BUDGET=([env]=40 [oracle]=60 [ddp]=70 [resnet50]=100 [bert]=90 [dali]=50 [compile]=70)
declare -A WHAT=(
  [env]="GPU, torch build, and the wheels of .whl/ installed"
  [oracle]="K-FAC dense float64 oracle and dtype tests on CUDA"
  [ddp]="DDP K-FAC invariants I1-I3, 2 processes on the GPU"
  [resnet50]="train.py ResNet-50, bf16 autocast, channels_last: K-FAC vs SGD"
  [bert]="BERT-Large at phase-2 length (seq 512): K-FAC+LAMB vs LAMB"
  [dali]="DALI mixed (GPU) JPEG decoding vs torchvision"
  [compile]="train.py ResNet-20 K-FAC with torch.compile vs without"
)

# The train.py runs: synthetic data, a few logged windows of 5 steps each.
TRAIN_COMMON="data=synthetic trainer.device=cuda trainer.log_every=5 logger.progress=off"
R50="model=resnet50 $TRAIN_COMMON trainer.precision=bf16 trainer.channels_last=true \
batch.size=64 trainer.max_steps=25 kfac.factor_update_steps=10 kfac.inv_update_steps=100"
R20="model=resnet20 optim=kfac $TRAIN_COMMON batch.size=128 trainer.max_steps=40"
RUNS="$PY scripts/gpu_check_runs.py"

step_command() {
  case "$1" in
    env)
      echo "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
$PY -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available(), \
torch.cuda.get_device_name(0)); import hydra, omegaconf; print(\"hydra\", hydra.__version__)'" ;;
    oracle)
      echo "KFAC_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider \
tests/kfac/test_dense_reference.py tests/kfac/test_low_precision.py -k 'not gloo'" ;;
    ddp)
      # NCCL refuses two ranks on one GPU ("Duplicate GPU detected", NCCL >= 2.5): with one
      # GPU both ranks share it over gloo with CUDA tensors; with two or more, NCCL.
      echo "if [ \"\$(nvidia-smi -L | wc -l)\" -ge 2 ]; then B=nccl; else B=gloo; fi; \
echo \"backend \$B\"; KFAC_TEST_BACKEND=\$B KFAC_TEST_DEVICE=cuda $PY -m pytest -q \
-p no:cacheprovider tests/kfac/test_distributed_kfac.py \
-k 'world2 and (identical_parameters or same_update or world_of_w_ranks)'" ;;
    resnet50)
      echo "$RUNS run \$OUT/runs/r50-sgd -- $R50 optim=sgd && \
$RUNS run \$OUT/runs/r50-kfac -- $R50 optim=kfac && \
$RUNS compare \$OUT/runs/r50-sgd \$OUT/runs/r50-kfac --labels sgd kfac" ;;
    bert)
      echo "$PY scripts/bench_bert.py --model bert_large --device cuda --precision bf16 \
--micro-batch 8 --seq 512 --max-predictions 80 --steps 10 --warmup 2 --inv-every 10" ;;
    dali)
      echo "$PY -c 'import nvidia.dali as d; print(\"dali\", d.__version__)' && \
$PY scripts/bench_input.py --pipelines torchvision,dali-mixed --device cuda --images 256 \
--batches 6 --batch 32 --workers 8" ;;
    compile)
      echo "$RUNS run \$OUT/runs/r20-eager -- $R20 && \
$RUNS run \$OUT/runs/r20-compiled -- $R20 trainer.compile=true && \
$RUNS compare \$OUT/runs/r20-eager \$OUT/runs/r20-compiled --labels eager compiled" ;;
  esac
}

usage() {
  cat <<EOF
usage: bash scripts/gpu_check.sh [--dry-run] [--only STEP[,STEP...]] [--help]

Runs the GPU checks of kfac-train and writes \$OUT/report.md (OUT=${OUT}).
Steps (budget in seconds):
EOF
  for s in "${STEPS[@]}"; do printf '  %-9s %4ss  %s\n' "$s" "${BUDGET[$s]}" "${WHAT[$s]}"; done
}

die() { echo "error: $*" >&2; exit 2; }

DRY=0
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --dry-run) DRY=1 ;;
    --only) [ $# -ge 2 ] || die "--only needs a comma-separated list of steps: ${STEPS[*]}"
            ONLY="$2"; shift ;;
    --only=*) ONLY="${1#--only=}" ;;
    *) die "unknown argument '$1': use --dry-run, --only STEP[,STEP] or --help" ;;
  esac
  shift
done

SELECTED=("${STEPS[@]}")
if [ -n "$ONLY" ]; then
  SELECTED=()
  IFS=',' read -r -a wanted <<<"$ONLY"
  for w in "${wanted[@]}"; do
    [ -n "${BUDGET[$w]+x}" ] || die "--only: unknown step '$w'; choose from ${STEPS[*]}"
    SELECTED+=("$w")
  done
fi

cd "$REPO" || die "cannot enter $REPO"
for f in train.py scripts/gpu_check_runs.py scripts/bench_bert.py scripts/bench_input.py \
         tests/kfac/test_dense_reference.py tests/kfac/test_low_precision.py \
         tests/kfac/test_distributed_kfac.py; do
  [ -f "$f" ] || die "missing $f: run from a kfac-train checkout"
done

total=0
for s in "${SELECTED[@]}"; do total=$((total + BUDGET[$s])); done

if [ "$DRY" = 1 ]; then
  echo "dry run: ${#SELECTED[@]} steps, total budget ${total}s, report in $OUT/report.md"
  for s in "${SELECTED[@]}"; do
    echo "step $s (budget ${BUDGET[$s]}s): ${WHAT[$s]}"
    echo "  \$ $(step_command "$s")"
  done
  exit 0
fi

mkdir -p "$OUT/runs" || die "cannot create $OUT"
export OUT PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/wheels.log" 2>&1 \
    && export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "warning: installing .whl/ failed (see $OUT/wheels.log)" >&2
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

REPORT="$OUT/report.md"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Command: \`bash scripts/gpu_check.sh${ONLY:+ --only $ONLY}\` at commit" \
       "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
  echo
  echo "| step | result | seconds | budget | what |"
  echo "|---|---|---|---|---|"
} >"$REPORT"

failed=0
FIGURES=""
for s in "${SELECTED[@]}"; do
  log="$OUT/$s.log"
  echo "== $s (budget ${BUDGET[$s]}s): ${WHAT[$s]}"
  start=$(date +%s)
  timeout --kill-after=10 "${BUDGET[$s]}" bash -c "$(step_command "$s")" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then result=PASS
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result=TIMEOUT; failed=1
  else result="FAIL (exit $rc)"; failed=1
  fi
  echo "   $result in ${secs}s; log $log"
  echo "| $s | $result | $secs | ${BUDGET[$s]} | ${WHAT[$s]} |" >>"$REPORT"
  FIGURES+=$'\n'"## $s: $result"$'\n\n```\n'"$(tail -n 25 "$log")"$'\n```\n'
done
printf '%s\n' "$FIGURES" >>"$REPORT"
echo "report: $REPORT"
exit $failed
