#!/usr/bin/env bash
# The tuning experiments: the paper's ablations and the variants tried on simple_spread, 3 seeds each, cpu preset, 20k env
# steps, greedy evaluation every 1,000 steps on 50 episodes (the sweep's protocol).  Every run is
# the command the sweep itself would issue (so `sweep --aggregate-only` below accepts the runs),
# two at a time, one torch thread each, compiled (the figures do not depend on the backend).
# Run from the repository root with the venv active; runs go to $RUNS/<variant>/<env>/seed<k>.
# (The runs reported were made by a frozen, non-installed-editable copy of commit 96d3e6b:
#   git worktree add /work/exp 96d3e6b && python -m venv /work/exp-venv && pip install torch==2.13.0 /work/exp
#   cd runs && PATH=/work/exp-venv/bin:$PATH RUNS=$PWD/i15 AGGREGATE=0 bash ../bench/experiments/tuning.sh
# so that editing the working tree during the hours they took could not change what later runs ran.)
# The 50k stretch continues finished 20k runs: tuning_extend.sh VARIANT ENV SEED (same install, same $RUNS),
# or runs to 50k from the start: STEPS=50000 RUNS=runs/i15-50k (JOBS trainings at a time, default 2).
set -uo pipefail
STEPS=${STEPS:-20000}
RUNS=${RUNS:-runs/i15}
job() {  # variant env seed [train flags...]
  local v=$1 env=$2 seed=$3; shift 3
  local d=$RUNS/$v/$env/seed$seed
  [ -f "$d/checkpoints/step_$(printf %09d "$STEPS").pt" ] && return 0  # finished before
  mkdir -p "$d"
  if [ -f "$d/checkpoints/latest" ]; then
    python -m matwm_fast.train --resume "$d" --steps "$STEPS" >> "$d/train.log" 2>&1
  else
    python -m matwm_fast.train --preset cpu --scenario "$env" --seed "$seed" --run-dir "$d" --overwrite \
      --steps "$STEPS" --eval-every 1000 --eval-episodes 50 --threads 1 --backend compile "$@" >> "$d/train.log" 2>&1
  fi
}
export -f job
export STEPS RUNS
# variant: train flags (the ablations of the paper's Table 5, then the variants tried).  The grid
# compares against the paper's entropy weight 3e-4, the cpu preset's until the entropy variant made it 3e-3 on
# simple_spread: so every variant names its entropy (the runs were made by 96d3e6b, where 3e-4 was
# the default everywhere)
E="--ac.entropy 3e-4"
declare -A FLAGS=(
  [base]="$E"
  [uniform]="$E --replay.priority-decay 1"           # ablation: prioritised replay off (also: does the world model memorise recent layouts?)
  [noteam]="$E --wm.teammates false"                  # ablation: teammate predictor off
  [noscale]="$E --wm.action-scaling false"            # ablation: action scaling off (also: does the world model use the acting agent's identity?)
  [ent3e-3]="--ac.entropy 3e-3"                       # entropy: keep the policy from collapsing
  [wmreg]="$E --wm.dropout 0.1 --wm.recon-symlog true"  # world-model regularisers: STORM's dropout, DreamerV3's symlog targets
  [ent3e-3-uniform]="--ac.entropy 3e-3 --replay.priority-decay 1"  # entropy and uniform replay together
  [ent3e-3-imag128]="--ac.entropy 3e-3 --ac.imag-batch 128"  # the entropy variant's noise: twice the imagined trajectories
  [ent3e-3-noscale]="--ac.entropy 3e-3 --wm.action-scaling false"  # entropy and no action scaling together
  [wmlr]="$E --wm.lr 3e-5"                            # the paper's world-model learning rate
  [ent1e-2]="--ac.entropy 1e-2"                       # entropy one step further: the dose-response
  # the world model's side (the diagnosis: it resolves one agent's action effect poorly), over the entropy variant
  [wmbatch24]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512"  # twice the sequences per update (8 per agent need 512 warm-up steps)
  [latent32]="--ac.entropy 3e-3 --wm.latent-vars 32 --wm.latent-classes 32"  # the paper's 32 × 32 latent
  [wmlr1e-3]="--ac.entropy 3e-3 --wm.lr 1e-3"         # the world-model learning rate the other way (3e-5 cost every seed)
  [wmbatch48]="--ac.entropy 3e-3 --wm.batch-size 48 --replay.warmup 1024"  # wmbatch24's dose-response
  # wmbatch24 with the two variants that came closest over the entropy variant alone (each shares or adds data the
  # actor's update sees: one action column for all agents; twice the imagined trajectories)
  [wmbatch24-noscale]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --wm.action-scaling false"
  [wmbatch24-imag128]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --ac.imag-batch 128"
  # batch 24 on simple_tag, whose cpu preset keeps the paper's entropy (seeds 0 and 1 resumed from a checkpoint)
  [wmbatch24-ent3e-4]="--ac.entropy 3e-4 --wm.batch-size 24 --replay.warmup 512"
  # batch 24 with the paper's imagination horizon for three agents (12; the cpu preset has 8)
  [wmbatch24-h12]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --ac.horizon 12"
  # batch 24 with two world-model updates per env step, each on its own batch: more updates, not
  # more sequences per update (batch 48 was that, and worse); made by commit e85bed0
  [wmbatch24-wmupd2]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --train.wm-updates 2"
  # batch 24 with the two changes aimed at the world model's memorising of layouts (the diagnosis):
  # the world-model regularisers (dropout, symlog targets) and uniform replay; made by commit 08b8ece
  [wmbatch24-wmreg]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --wm.dropout 0.1 --wm.recon-symlog true"
  [wmbatch24-uniform]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --replay.priority-decay 1"
  # the discount: 0.985 looks ~67 steps ahead in 25-step episodes, so the lambda-returns lean on
  # the critic's estimate of a far future the model resolves least; 0.95 (~20 steps) and 0.9 (~10)
  # weigh the near reward more.  The return scale S shrinks with gamma, so the entropy bonus's
  # weight in return units (eta * S, the learning log's note on the return scale) falls with it
  [wmbatch24-gamma95]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --ac.gamma 0.95"
  [wmbatch24-gamma90]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --ac.gamma 0.9"  # a 10-step horizon
  # the dose-response's next point (0.985 -> 0.95 -> 0.9 rose one way): about 5 steps ahead
  [wmbatch24-gamma80]="--ac.entropy 3e-3 --wm.batch-size 24 --replay.warmup 512 --ac.gamma 0.8"
)
ORDER=${ORDER:-"base:simple_spread ent3e-3:simple_spread wmreg:simple_spread uniform:simple_spread base:simple_tag noteam:simple_spread noscale:simple_spread ent3e-3-imag128:simple_spread ent3e-3-noscale:simple_spread uniform:simple_tag noteam:simple_tag noscale:simple_tag wmlr:simple_spread ent1e-2:simple_spread ent3e-3:simple_tag wmbatch24:simple_spread latent32:simple_spread wmlr1e-3:simple_spread wmbatch48:simple_spread wmbatch24-noscale:simple_spread wmbatch24-imag128:simple_spread wmbatch24-ent3e-4:simple_tag wmbatch24-h12:simple_spread wmbatch24-wmupd2:simple_spread wmbatch24-wmreg:simple_spread wmbatch24-uniform:simple_spread wmbatch24-gamma95:simple_spread wmbatch24-gamma90:simple_spread wmbatch24-gamma80:simple_spread"}
for item in $ORDER; do
  v=${item%%:*}; env=${item##*:}
  for seed in 0 1 2; do echo "$v $env $seed ${FLAGS[$v]}"; done
done | xargs -P "${JOBS:-2}" -I{} bash -c 'job {}'
# tables, curves and matchups per variant (the runs' own config.json say what ran)
[ "${AGGREGATE:-1}" = 1 ] || exit 0
for item in $ORDER; do
  v=${item%%:*}; env=${item##*:}
  python -m matwm_fast.sweep --env "$env" --seeds 0 1 2 --preset cpu --steps "$STEPS" --eval-every 1000 \
    --eval-episodes 50 --out $RUNS/$v --results bench/results/learning/tuning/$v/$env --aggregate-only \
    -- --threads 1 --backend compile ${FLAGS[$v]}
  for seed in 0 1 2; do  # each seed's record; rows gzipped (read as they are by plot and sweep)
    src=$RUNS/$v/$env/seed$seed dst=bench/results/learning/tuning/$v/$env/seed$seed
    mkdir -p "$dst" && cp "$src"/{config.json,matchups.json} "$dst"/
    gzip -9 -n -c "$src/metrics.jsonl" > "$dst/metrics.jsonl.gz"
  done
done
