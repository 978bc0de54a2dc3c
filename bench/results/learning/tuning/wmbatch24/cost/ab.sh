#!/usr/bin/env bash
# A/B: the cpu preset on simple_spread, WM batch 12 (A) vs 24 (B), eager, 1 thread, alternated
cd "$(dirname "$0")/../../../../../.."  # the repository root; run with its venv active
lscpu | grep -E "Model name"
for r in 1 2; do
  for v in A B; do
    extra=""; [ $v = B ] && extra="--wm.batch-size 24 --replay.warmup 512"
    OMP_NUM_THREADS=1 python -m matwm_fast.profile --preset cpu --env simple_spread --device cpu --threads 1 \
      --backend eager --steps 40 --json /tmp/ab_${v}_$r.json $extra > /tmp/ab_${v}_$r.log 2>&1
    python3 -c "
import json; d=json.load(open('/tmp/ab_${v}_$r.json'))
b=d['backends'] if 'backends' in d else d
print('$v', '$r', json.dumps(b)[:400])"
  done
done
