#!/usr/bin/env bash
# The GPU step's measurements (README: "The GPU step") in one prepared run, for a lent GPU
# machine whose session has 15 minutes of device time with the machine's start included:
# everything below fits in GPU_CHECK_BUDGET seconds (default 510), each step under its own
# `timeout`, the most important first, so whatever ran is written under $OUT even when a later step is cut.
#
#   run(command="bash scripts/gpu_check.sh", carry=[".devkit"], timeout_s=600)    # device tool
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh     # the same command lines, tiny sizes, on a CPU
#
# Steps (cap in seconds; a step that would start with under 20 s of budget left is skipped):
#   1. gpu        scripts/benchmark.py --sections gpu: images-per-step sweep 4/32/128 (the fixed
#                 cost per step), 32 images x 5 questions, AdamW foreach vs fused, Lightning vs
#                 bare loop, torchvision ResNet-101 alone; MFU for each                    (150)
#   2. e2e        train.py experiment=vqav2_resnet101_bert on the synthetic set at 448 px for
#                 E2E_SECONDS (default 60) of training, questions/s from step timestamps;
#                 it leaves last.ckpt for step 5                                          (150)
#   3. host_syncs pytest tests/test_host_syncs.py with VQA_TEST_DEVICE=cuda                (60)
#   4. graphs     eager vs torch.compile(mode="reduce-overhead") (CUDA graphs), last of the
#                 long steps: compiling ResNet-101 + bert-base takes minutes              (240)
#   5. eval       python -m vqa.cli.eval on step 2's checkpoint: questions/s on the val split  (60)
#   6. ops        scripts/benchmark.py --sections ops on the device: aten ops and host syncs
#                 per training step, per fusion block                                      (60)
# Results: $OUT/<step>/ (benchmark.json/.md, metrics.json, ...), $OUT/<step>.log, and
# $OUT/steps.tsv (step, exit status, seconds, note). Exit status 0 unless step 1 failed.
#
# Python: $PYTHON, else .venv/bin/python, else the device image's python3 with the kit
# (`source .devkit/env.sh`: hydra-core, omegaconf, datasets). Neither the image's list nor the
# kit has pytest: copy its pure-Python packages beside the kit before the call, e.g.
#   mkdir -p .devkit/pylib && cp -r .venv/lib/python3.11/site-packages/{pytest,_pytest,pluggy,iniconfig,py.py} .devkit/pylib/
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=${GPU_CHECK_QUICK:-0}
BUDGET=${GPU_CHECK_BUDGET:-510}
E2E_SECONDS=${E2E_SECONDS:-60}
HOST_SYNC_TEST=${GPU_CHECK_HOST_SYNC_TEST:-tests/test_host_syncs.py}
OUT=${OUT:-logs/gpu_check}
WORK=${GPU_CHECK_WORK:-/tmp/gpu_check}  # checkpoints stay here: too large to bring back
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
START=$SECONDS

if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  # shellcheck disable=SC1091
  source .devkit/env.sh || { echo "no .venv and no working .devkit/env.sh" >&2; exit 2; }
  PY=python3
fi
if [[ -d .devkit/pylib ]]; then
  export PYTHONPATH="$PWD/.devkit/pylib${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

if [[ $QUICK == 1 ]]; then
  SIZES=(--quick --gpu-smoke --data-dir "$WORK/data")
  TEST_DEVICE=cpu
  TRAINER=default
  E2E_SECONDS=${GPU_CHECK_QUICK_E2E_SECONDS:-30}
else
  SIZES=()
  TEST_DEVICE=cuda
  TRAINER=gpu
fi

printf 'step\texit\tseconds\tnote\n' > "$OUT/steps.tsv"
{
  echo "quick=$QUICK budget=${BUDGET}s e2e_seconds=$E2E_SECONDS python=$PY"
  git rev-parse HEAD 2>/dev/null || true
  "$PY" -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

note() {  # note STEP EXIT NOTE: a step that did not run
  printf '%s\t%s\t0\t%s\n' "$1" "$2" "$3" >> "$OUT/steps.tsv"
  echo "== $1: $3"
}

step() {  # step NAME CAP COMMAND...: run it under timeout, log to $OUT/NAME.log
  local name=$1 cap=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if ((left < 20)); then
    note "$name" skipped "budget spent (${left}s left)"
    return 1
  fi
  local limit=$((cap < left ? cap : left)) begin=$SECONDS rc
  echo "== $name (timeout ${limit}s, ${left}s of budget left)"
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  local why="timeout ${limit}s"
  ((rc == 124 || rc == 137)) && why="TIMED OUT after ${limit}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" "$why" >> "$OUT/steps.tsv"
  echo "-- $name: exit $rc in $((SECONDS - begin))s"
  ((rc == 0)) || tail -n 15 "$OUT/$name.log"
  return $rc
}

summary() {  # the tables and findings of a benchmark.md, without the long set-up paragraphs
  [[ -f $1 ]] && grep -E '^(\||- |## )' "$1" | cut -c1-400
}

# 1. the bare step's fixed cost and its neighbours
step gpu 150 "$PY" scripts/benchmark.py --sections gpu \
  --gpu-rows sweep grouped optimizer lightning anchor --out "$OUT/gpu" "${SIZES[@]}"
gpu_rc=$?
summary "$OUT/gpu/benchmark.md"

# 2. the recipe through train.py (its loader, Lightning, callbacks), leaving a checkpoint
rm -rf "$WORK/e2e"
step e2e 150 "$PY" scripts/benchmark.py --sections gpu --gpu-rows e2e \
  --e2e-seconds "$E2E_SECONDS" --e2e-dir "$WORK/e2e" --out "$OUT/e2e" "${SIZES[@]}"
summary "$OUT/e2e/benchmark.md"
for f in steps.json run/csv/metrics.csv run/.hydra/overrides.yaml; do
  [[ -f $WORK/e2e/$f ]] && mkdir -p "$OUT/e2e/$(dirname "$f")" && cp "$WORK/e2e/$f" "$OUT/e2e/$f"
done
[[ -f $WORK/e2e/train.log ]] && tail -c 20000 "$WORK/e2e/train.log" > "$OUT/e2e/train.log.tail"

# 3. no host syncs in the training step, on the device itself
if [[ ! -f $HOST_SYNC_TEST ]]; then
  note host_syncs skipped "$HOST_SYNC_TEST does not exist in this checkout"
elif ! "$PY" -c "import pytest" 2> /dev/null; then
  note host_syncs skipped "pytest is not importable (see .devkit/pylib in this script's header)"
else
  step host_syncs 60 env VQA_TEST_DEVICE=$TEST_DEVICE "$PY" -m pytest -p no:xdist \
    -p no:cacheprovider -q -rA "$HOST_SYNC_TEST"
  tail -n 15 "$OUT/host_syncs.log"
fi

# 4. CUDA graphs (perf_hints: torch logs why it skips cudagraphs, if it does)
step graphs 240 env TORCH_LOGS=perf_hints "$PY" scripts/benchmark.py --sections gpu \
  --gpu-rows graphs --out "$OUT/graphs" "${SIZES[@]}"
summary "$OUT/graphs/benchmark.md"
grep -i "skipping cudagraphs" "$OUT/graphs.log" 2> /dev/null | sort | uniq -c | head -n 10

# 5. inference throughput of the checkpoint step 2 wrote
CKPT=$WORK/e2e/run/checkpoints/last.ckpt
if [[ -f $CKPT ]]; then
  step eval 60 "$PY" -m vqa.cli.eval "ckpt_path=$CKPT" "trainer=$TRAINER" \
    "paths.output_dir=$OUT/eval" extras.print_config=false
  [[ -f $OUT/eval/metrics.json ]] && head -c 600 "$OUT/eval/metrics.json" && echo
else
  note eval skipped "no checkpoint from step 2 ($CKPT)"
fi

# 6. op and sync counts with CUDA tensors (the default CPU run has them too)
step ops 60 "$PY" scripts/benchmark.py --sections ops --fusions parallel film \
  --out "$OUT/ops" "${SIZES[@]}"
summary "$OUT/ops/benchmark.md"

echo "== done in $((SECONDS - START))s"
column -t -s $'\t' "$OUT/steps.tsv" 2> /dev/null || cat "$OUT/steps.tsv"
exit $((gpu_rc == 0 ? 0 : 1))
