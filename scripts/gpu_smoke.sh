#!/usr/bin/env bash
# GPU smoke test: bf16-mixed (+ DDP when several GPUs exist) for 50 steps at the ARC model size.
# Asserts a finite loss and that checkpoint and event files were written; prints steps/s and peak memory.
# Usage: scripts/gpu_smoke.sh [extra trm args...]     (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
# the trm command: .venv/bin/trm, else trm on PATH, else the module (a machine with the package on PYTHONPATH)
if [ -x .venv/bin/trm ]; then TRM=(.venv/bin/trm); elif command -v trm >/dev/null; then TRM=(trm)
else TRM=(python3 -m trm_lightning); fi
OUT=${OUT_DIR:-runs/gpu_smoke}
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "gpu_smoke: no CUDA device visible" >&2; exit 1; }
STRATEGY=auto; [ "$NGPU" -gt 1 ] && STRATEGY=ddp
BATCH=${BATCH:-$((64 * NGPU))}
START=$(date +%s.%N)
"${TRM[@]}" fit --config configs/arc1/encoder_trm.yaml \
  --trainer.accelerator gpu --trainer.devices "$NGPU" --trainer.strategy "$STRATEGY" \
  --trainer.precision bf16-mixed --trainer.max_steps 50 --trainer.log_every_n_steps 10 \
  --trainer.limit_val_batches 2 --trainer.val_check_interval 50 \
  --data.global_batch_size "$BATCH" --data.episodes_per_epoch $((BATCH * 50)) --data.num_workers 4 \
  --trainer.logger.init_args.save_dir "$OUT" --trainer.logger.init_args.name smoke \
  --trainer.callbacks+=callbacks.gpu_stats.GPUStats "$@"
END=$(date +%s.%N)
RUN=$(ls -td "$OUT"/smoke/version_* | head -1)
python3 - "$RUN" <<'PY'
import glob, math, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sys.argv[1]
assert glob.glob(f"{run}/checkpoints/last.ckpt"), f"no last.ckpt in {run}"
assert glob.glob(f"{run}/events.out.tfevents.*"), f"no event file in {run}"
ea = EventAccumulator(run); ea.Reload()
loss = [e.value for e in ea.Scalars("train/lm_loss")]
assert loss and all(math.isfinite(v) for v in loss), f"non-finite train/lm_loss: {loss}"
sps = [e.value for e in ea.Scalars("gpu/steps_per_s")] if "gpu/steps_per_s" in ea.Tags()["scalars"] else []
mem = [e.value for e in ea.Scalars("gpu/peak_memory_gib")] if "gpu/peak_memory_gib" in ea.Tags()["scalars"] else []
print(f"gpu_smoke: OK lm_loss {loss[0]:.4f} -> {loss[-1]:.4f}, steps/s {sps[-1] if sps else float('nan'):.3f}, "
      f"peak memory {max(mem) if mem else float('nan'):.2f} GiB, run {run}")
PY
echo "gpu_smoke: wall $(python3 -c "print(round($END - $START, 1))") s"
