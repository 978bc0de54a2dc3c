#!/usr/bin/env bash
# The exact commands behind bench/results/learning/baselines/ (the model-free baselines: MAPPO, IPPO).
# Environment: a venv with torch 2.13.0 (CPU) and this project's baselines extra:
#   pip install torch==2.13.0 && pip install -e '.[baselines]'
# (the numbers were produced in a throwaway venv holding torch 2.13.0+cpu, benchmarl 1.5.2,
# torchrl 0.11.1, tensordict 0.11.0, torchvision 0.28.0, pettingzoo 1.27.0, mpe2 1.1.1, with this
# checkout on the path, which the script puts there itself).
# One run at a time, one torch thread, on 2 CPU cores shared with two MATWM trainings.
# Policies go outside the repository (about 0.3 MB per policy and team); RUNS is where they went.
set -euo pipefail
cd "$(dirname "$0")/../../../.."
RUNS=${RUNS:-/work/baselines_runs}
export OMP_NUM_THREADS=1
for scenario in simple_spread simple_tag; do
  for algo in mappo ippo; do
    for seed in 0 1 2; do
      # trains to 50,000 env steps (10 PPO iterations of 5,000), keeps the policy at 20,000 and
      # 50,000, evaluates both: 50 episodes, greedy, sampled, random, <team>_vs_random
      python bench/baselines/model_free.py train --scenario "$scenario" --algo "$algo" --seed "$seed" \
        --budgets 20000 50000 --episodes 50 --threads 1 \
        --results bench/results/learning/baselines --run-dir "$RUNS/$scenario/$algo/seed$seed"
    done
  done
done
python bench/baselines/model_free.py table --results bench/results/learning/baselines
