#!/usr/bin/env bash
# The evaluation protocol's reporting runs (matwm_fast/protocol.py, split `report`): every row of
# the learning table's "Reporting episodes" tables, one stage at a time, each resumable — rerun a
# stage and it trains only what is missing (the sweep and tune.py skip finished seeds and configs).
#
#   bash bench/experiments/report.sh list                 # the stages and what each writes
#   bash bench/experiments/report.sh cpu simple_spread    # one stage
#   bash bench/experiments/report.sh all                  # every CPU stage in order, then the table
#   DRY=1 bash bench/experiments/report.sh all            # print the commands instead of running them
#
# Run from the repository root with the venv active (the baselines stage needs the `baselines`
# extra).  Trainings go to $RUNS (default runs/report), results to bench/results/learning/report/
# (what bench/learning_table.py reads), each seed's config, matchups and gzipped rows beside its
# table (what is committed); JOBS trainings at a time (default 2), one torch thread each.
# TRAIN_FLAGS go to every new training, e.g. TRAIN_FLAGS="--backend compile" (1.76x the eager `cpu`
# step on the Xeon below, docs/performance.md; tested equal to eager).  How a run ran is part of its
# saved config, so the sweep refuses to continue a row's runs with other flags than they started with.
# Wall times on the 2-core Xeon (family 6 model 167), two at a time: ~45 min per 20k-step seed of
# the cpu preset on simple_spread (7.4 env steps/s each); the baselines ~30 min per 30-config search.
set -euo pipefail
RUNS=${RUNS:-runs/report}
JOBS=${JOBS:-2}
RESULTS=bench/results/learning/report
SEEDS=(100 101 102 103 104)   # reporting training seeds: never used while tuning (protocol.SPLITS)
SCENARIOS=(simple_spread simple_tag)
# configurations scored on tuning episodes before the cpu preset's settings were chosen (the grid
# of bench/experiments/tuning.sh and tuning_extend.sh; bench/results/learning/README.md)
CPU_TRIED=30
# the paper's ablations (its Table 5): the cpu preset with one part switched off.  They are not
# chosen among alternatives, so they carry one configuration tried.
declare -A ABLATION=(
  [uniform]="--replay.priority-decay 1"    # prioritised replay off: uniform sampling
  [noteam]="--wm.teammates false"           # teammate predictor off
  [noscale]="--wm.action-scaling false"     # action scaling off
)

run() {  # the command, or with DRY set its words, quoted, on one line
  if [ -n "${DRY:-}" ]; then printf '%q ' "$@" && echo; else "$@"; fi
}

sweep() {  # variant steps configs_tried env [train flags...]
  local variant=$1 steps=$2 tried=$3 env=$4; shift 4
  # shellcheck disable=SC2206
  local flags=("$@" ${TRAIN_FLAGS:-})
  run python -m matwm_fast.sweep --split report --env "$env" --seeds "${SEEDS[@]}" --preset cpu \
    --steps "$steps" --eval-every 2000 --eval-episodes 50 --jobs "$JOBS" --threads 1 \
    --configs-tried "$tried" --out "$RUNS/$variant" --results "$RESULTS/$variant/$env" \
    ${flags[@]:+-- "${flags[@]}"}
  archive "$variant" "$env"
}

archive() {  # variant env: each seed's record beside the table (rows gzipped; plot and sweep read them as they are)
  local s src dst
  for s in "${SEEDS[@]}"; do
    src=$RUNS/$1/$2/seed$s dst=$RESULTS/$1/$2/seed$s
    [ -e "$src/metrics.jsonl" ] || continue
    run mkdir -p "$dst"
    run cp "$src/config.json" "$src/matchups.json" "$dst/"
    if [ -n "${DRY:-}" ]; then echo "gzip -9 -n -c $src/metrics.jsonl > $dst/metrics.jsonl.gz"
    else gzip -9 -n -c "$src/metrics.jsonl" > "$dst/metrics.jsonl.gz"; fi
  done
}

stage() {
  case "$1" in
    cpu)  # the frozen cpu preset at 20k
      sweep cpu 20000 "$CPU_TRIED" "$2" ;;
    cpu-50k)  # the 50k stretch: the same runs continued (copied first, so the 20k checkpoints stay)
      for s in "${SEEDS[@]}"; do
        local from=$RUNS/cpu/$2/seed$s to=$RUNS/cpu-50k/$2/seed$s
        if [ ! -e "$to" ] && [ -d "$from" ]; then run mkdir -p "$(dirname "$to")" && run cp -r "$from" "$to"; fi
      done
      sweep cpu-50k 50000 "$CPU_TRIED" "$2" ;;
    ablation)  # ablation NAME ENV
      [ -n "${ABLATION[$2]:-}" ] || { echo "report.sh: ablation '$2': allowed ${!ABLATION[*]}" >&2; exit 2; }
      # shellcheck disable=SC2086
      sweep "$2" 20000 1 "$3" ${ABLATION[$2]} ;;
    baselines)  # baselines ALGO ENV: the random search on tuning seeds 0-1, then the best on the reporting seeds
      run python bench/baselines/tune.py run --scenario "$3" --algo "$2" --configs "$CPU_TRIED" --seeds 0 1 \
        --jobs "$JOBS" --out "$RUNS/tune"
      run python bench/baselines/tune.py report --scenario "$3" --algo "$2" --seeds "${SEEDS[@]}" --jobs "$JOBS" \
        --out "$RUNS/tune-report" ;;
    heuristics)  # the scripted references and the random policy on the reporting episodes
      for env in "${SCENARIOS[@]}"; do
        run python bench/baselines/heuristics.py --scenario "$env" --split report --seeds "${SEEDS[@]}"
      done ;;
    table)
      run python bench/learning_table.py ;;
    *) echo "report.sh: stage '$1': allowed cpu, cpu-50k, ablation, baselines, heuristics, table, all, list" >&2
       exit 2 ;;
  esac
}

ALGOS=(mappo ippo qmix vdn iql)   # bench/baselines/model_free.py ALGOS
want() {  # want N "usage": the stage takes exactly N words (its name included)
  local n=$1 usage=$2; shift 2
  [ $# -eq "$n" ] || { echo "report.sh $1: got '${*:2}'; usage: report.sh $usage" >&2; exit 2; }
}

case "${1:-list}" in
  list)
    want 1 list "${@:-list}"
    cat <<EOF
cpu ENV             the cpu preset, 20k env steps        -> $RESULTS/cpu/ENV/
cpu-50k ENV         the same runs continued to 50k       -> $RESULTS/cpu-50k/ENV/
ablation NAME ENV   NAME in: ${!ABLATION[*]}   -> $RESULTS/NAME/ENV/
baselines ALGO ENV  ALGO in: ${ALGOS[*]}     -> $RESULTS/baselines/ENV/ALGO/
heuristics          scripted policies, both scenarios    -> $RESULTS/baselines/ENV/heuristics/
table               bench/results/learning/summary.md
all                 every stage above on ${SCENARIOS[*]}, then the table
(the paper preset runs on a GPU: bench/README.md)
EOF
    ;;
  all)
    want 1 all "$@"
    stage heuristics
    for env in "${SCENARIOS[@]}"; do
      stage cpu "$env"
      for algo in mappo ippo qmix; do stage baselines "$algo" "$env"; done
      for a in uniform noteam noscale; do stage ablation "$a" "$env"; done
      stage cpu-50k "$env"
    done
    stage table ;;
  cpu|cpu-50k)
    want 2 "$1 ENV (ENV: ${SCENARIOS[*]})" "$@"
    stage "$@" ;;
  heuristics|table)
    want 1 "$1" "$@"
    stage "$@" ;;
  ablation)
    want 3 "ablation NAME ENV (NAME: ${!ABLATION[*]})" "$@"
    stage "$@" ;;
  baselines)
    want 3 "baselines ALGO ENV (ALGO: ${ALGOS[*]})" "$@"
    [[ " ${ALGOS[*]} " == *" $2 "* ]] || { echo "report.sh baselines: algorithm '$2': allowed ${ALGOS[*]}" >&2; exit 2; }
    stage "$@" ;;
  *) stage "$1" ;;
esac
