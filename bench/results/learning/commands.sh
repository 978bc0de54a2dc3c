#!/usr/bin/env bash
# The commands that produced bench/results/learning/ (2-core shared CPU, torch CPU, no GPU).
# Run from the repository root with the venv active.  Wall times are in the summary of
# docs/learning.md; the machine was shared with other engineers' jobs (load average 5-8).
set -euo pipefail

# seed 0 of each scenario, trained directly (two processes at once, one thread each); the sweep
# below finds them complete and does not retrain them
for env in simple_spread simple_tag; do
  OMP_NUM_THREADS=1 python -m matwm_fast.train --preset cpu --scenario $env --seed 0 --steps 3000 \
    --run-dir runs/learning/$env/seed0 --eval-every 500 --train.eval-episodes 50 --device cpu &
done
wait

# seeds 1 and 2, the matchups on every final checkpoint, the table and the plots
python -m matwm_fast.sweep --env simple_spread simple_tag --seeds 0 1 2 --preset cpu --steps 3000 \
  --eval-every 500 --eval-episodes 50 --jobs 2 --out runs/learning --results bench/results/learning

# the discount-factor probe on simple_spread (seed 0): flags after -- go to train
python -m matwm_fast.sweep --env simple_spread --seeds 0 --preset cpu --steps 3000 --eval-every 500 \
  --eval-episodes 50 --threads 1 --out runs/learning_gamma095 --results bench/results/learning/gamma095 \
  -- --ac.gamma 0.95

# rebuild table and plots from the run directories without training
python -m matwm_fast.sweep --env simple_spread simple_tag --seeds 0 1 2 --preset cpu --steps 3000 \
  --eval-every 500 --eval-episodes 50 --out runs/learning --results bench/results/learning --aggregate-only
