#!/usr/bin/env bash
# The collapse timeline of docs/diagnostics.md: the few-shot tasks (benchmarks/bench_fewshot.py's, seed 0), then two
# runs at once (one core each): `stable` (configs/diagnostics/timeline.yaml, 5000 steps) and `collapse` (with
# configs/diagnostics/collapse.yaml on top), then the table (scripts/timeline_table.py) and the plots (trm report).
#   scripts/collapse_timeline.sh [OUT=runs/timeline] [extra trm options for both runs...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-runs/timeline}; shift || true
DATA="$OUT/data"
if [ ! -d "$DATA/train" ]; then
  "$PY" - "$DATA" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from benchmarks.bench_fewshot import make_tasks
from trm_lightning.data.fewshot_rules import FEWSHOT_FAMILIES
from trm_lightning.data.task_json import write_task_dir
tasks = make_tasks(list(FEWSHOT_FAMILIES), seed=0, n_train=4000)
write_task_dir(tasks.train, Path(sys.argv[1]) / "train")
write_task_dir(tasks.heldout, Path(sys.argv[1]) / "heldout")
print(f"timeline: {len(tasks.train)} training tasks, {len(tasks.heldout)} held-out tasks in {sys.argv[1]}")
PYEOF
fi
fit() {  # name, extra configs...
  local name=$1; shift
  OMP_NUM_THREADS=1 "$PY" -m trm_lightning fit --config configs/fewshot_cpu.yaml --config configs/diagnostics/timeline.yaml \
    "$@" --data.train_source="$DATA/train" --data.eval_source="$DATA/heldout" --seed_everything=0 \
    --trainer.logger.init_args.save_dir="$OUT" --trainer.logger.init_args.name="$name" \
    --trainer.logger.init_args.version=0 "${EXTRA[@]}" > "$OUT/$name.log" 2>&1
}
EXTRA=("$@")
fit stable & s=$!
fit collapse --config configs/diagnostics/collapse.yaml & c=$!
wait $s $c || true
"$PY" scripts/timeline_table.py "$OUT/stable/version_0" "$OUT/collapse/version_0" | tee "$OUT/timeline.md"
"$PY" -m trm_lightning report "$OUT" --baseline stable || true
