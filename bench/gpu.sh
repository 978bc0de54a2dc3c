#!/usr/bin/env bash
# The device calls of a lent GPU, one short command each (bench/README.md, "The device call").
# Run by the device tool in the checkout's copy, carry [".whl", ".device-cache"]:
#
#   bash bench/gpu.sh check SHA [FLAGS]         the GPU check (python -m bench.gpucheck), starting
#                                               from .device-cache's archive of this GPU's kind
#   bash bench/gpu.sh rerun SHA STAGE...        those stages again on the still-warm machine, from
#                                               the caches the call before left (e.g. train inductor)
#   bash bench/gpu.sh spread SECONDS [FLAGS]    the paper preset on simple_spread (backend graphs)
#                                               for SECONDS (then SIGINT: it checkpoints), rows to $OUT
#
# Every call installs the wheels again when they are missing (a later call's copy of the tree has
# no .site) and leaves $OUT/compile-cache-<kind>.tar.gz (Inductor's and Triton's caches, one
# archive per GPU kind): keep it in .device-cache/ for the next lent GPU of that kind.
set -uo pipefail
: "${OUT:?run this on the device machine, where the device tool sets \$OUT}"
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
python3 -c 'import mpe2, pettingzoo, safetensors' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target .site .whl/*.whl || { echo "no wheels in .whl: carry [\".whl\"]" >&2; exit 2; }
python3 -c 'import safetensors' 2>/dev/null || { echo "no safetensors in .whl: fetch it with" \
  "bash ../shared/tools/device-wheels.sh safetensors" >&2; exit 2; }
WORK=${GPU_SH_WORK:-/tmp/gpu-sh}
KEPT=$WORK/kept  # the last call's archive, for a rerun on this machine
mkdir -p "$WORK" "$KEPT" "$OUT"
# the caches to start from: the last call's on this machine, else the kept ones of earlier GPUs
from=.device-cache
ls "$KEPT"/compile-cache-*.tar.gz >/dev/null 2>&1 && from=$KEPT
cmd=${1:-}
shift || true
case $cmd in
  check)
    [ $# -ge 1 ] || { echo "usage: bash bench/gpu.sh check SHA [gpucheck flags]" >&2; exit 2; }
    sha=$1
    shift
    python3 -m bench.gpucheck --out "$OUT" --commit "$sha" --work "$WORK/check" --compile-cache .device-cache "$@"
    rc=$?
    ;;
  rerun)
    [ $# -ge 2 ] || { echo "usage: bash bench/gpu.sh rerun SHA STAGE..." >&2; exit 2; }
    sha=$1
    shift
    python3 -m bench.gpucheck --out "$OUT" --commit "$sha" --work "$WORK/check" --stages "$@" --compile-cache "$from"
    rc=$?
    ;;
  spread)
    [[ ${1:-} =~ ^[0-9]+$ ]] || { echo "usage: bash bench/gpu.sh spread SECONDS [train flags]" >&2; exit 2; }
    secs=$1
    shift
    caches=$WORK/spread-cache
    python3 -m bench.gpucheck.compile_cache restore "$from" "$caches"
    rm -rf "$WORK/spread"
    TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton timeout -s INT "$secs" \
      python3 -m matwm_fast.train --preset paper --scenario simple_spread --backend graphs --seed 0 \
      --eval-every 500 --eval-episodes 50 --checkpoint-every 0 --run-dir "$WORK/spread" "$@" > "$OUT/train.log" 2>&1
    rc=$?
    cp "$WORK/spread/config.json" "$WORK/spread/metrics.jsonl" "$OUT/" 2>/dev/null
    python3 -m bench.gpucheck.compile_cache pack "$caches" "$OUT"
    tail -3 "$OUT/train.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh check SHA [FLAGS] | rerun SHA STAGE... | spread SECONDS [FLAGS]" >&2
    exit 2
    ;;
esac
# the archive this call leaves in $OUT is also what a following call on this machine starts from
cp "$OUT"/compile-cache-*.tar.gz "$KEPT/" 2>/dev/null
exit "$rc"
