#!/usr/bin/env bash
# The 50k stretch of the tuning runs: continue a finished 20k run of tuning.sh to $TO env steps, in a copy
# ($RUNS/<variant>-<TO/1000>k/<env>/seed<k>) so the 20k run and its results stay as they were.  The copy
# resumes from the 20k checkpoint (replay buffer, optimisers, generators included), so steps
# 0–20k are the 20k run's own and the 50k figure continues that very run.
#   usage: tuning_extend.sh VARIANT ENV SEED      (same venv and $RUNS as tuning.sh; run from runs/)
set -euo pipefail
TO=${TO:-50000}
RUNS=${RUNS:-runs/i15}
v=$1 env=$2 seed=$3
src=$RUNS/$v/$env/seed$seed
dst=$RUNS/$v-$((TO / 1000))k/$env/seed$seed
[ -f "$dst/checkpoints/step_$(printf %09d "$TO").pt" ] && exit 0  # finished before
if [ ! -f "$dst/checkpoints/latest" ]; then
  [ -f "$src/checkpoints/step_000020000.pt" ] || { echo "$src has no 20k checkpoint" >&2; exit 2; }
  mkdir -p "$dst/checkpoints"
  cp "$src"/{config.json,metrics.jsonl,metrics.csv,train.log} "$dst/"
  cp "$src/checkpoints/step_000020000.pt" "$dst/checkpoints/"
  echo step_000020000.pt > "$dst/checkpoints/latest"
fi
python -m matwm_fast.train --resume "$dst" --steps "$TO" >> "$dst/train.log" 2>&1
