#!/usr/bin/env bash
# The device calls of a lent GPU, one short command each (bench/README.md, "The device call").
# Run by the device tool in the checkout's copy, carry [".whl", ".device-cache"]:
#
#   bash bench/gpu.sh check SHA [FLAGS]         the GPU check, starting from the kept compile cache
#   bash bench/gpu.sh rerun SHA STAGE...        those stages again on the still-warm machine, from
#                                               the cache the check before left (e.g. speed train)
#   bash bench/gpu.sh spread SECONDS [FLAGS]    the paper preset on simple_spread for SECONDS
#                                               (then SIGINT: it checkpoints and stops), rows to $OUT
#
# Every call installs the wheels again when they are missing (a later call's copy of the tree has
# no .site), compiles into one Inductor cache on the machine (/tmp/gpu-sh/inductor) and leaves
# $OUT/compile-cache.tar.gz: keep the last call's in .device-cache/ for the next lent GPU.
set -uo pipefail
: "${OUT:?run this on the device machine, where the device tool sets \$OUT}"
export PYTHONPATH=$PWD/.site:$PWD PYTHONUNBUFFERED=1
python3 -c 'import mpe2, pettingzoo' 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile \
  --no-cache-dir --upgrade --target .site .whl/*.whl || { echo "no wheels in .whl: carry [\".whl\"]" >&2; exit 2; }
WORK=${GPU_SH_WORK:-/tmp/gpu-sh}
CACHE=$WORK/inductor
KEPT=$WORK/compile-cache.tar.gz  # the last call's archive, for a rerun on this machine
mkdir -p "$WORK" "$OUT"
cmd=${1:-}
shift || true
case $cmd in
  check)
    [ $# -ge 1 ] || { echo "usage: bash bench/gpu.sh check SHA [gpucheck flags]" >&2; exit 2; }
    sha=$1
    shift
    python3 -m matwm_fast.gpucheck --out "$OUT" --commit "$sha" --work "$WORK/check" \
      --compile-cache .device-cache/compile-cache.tar.gz "$@"
    rc=$?
    ;;
  rerun)
    [ $# -ge 2 ] || { echo "usage: bash bench/gpu.sh rerun SHA STAGE..." >&2; exit 2; }
    sha=$1
    shift
    python3 -m matwm_fast.gpucheck --out "$OUT" --commit "$sha" --work "$WORK/check" --stages "$@" \
      --compile-cache "$KEPT"
    rc=$?
    ;;
  spread)
    [[ ${1:-} =~ ^[0-9]+$ ]] || { echo "usage: bash bench/gpu.sh spread SECONDS [train flags]" >&2; exit 2; }
    secs=$1
    shift
    [ -f "$KEPT" ] || [ ! -f .device-cache/compile-cache.tar.gz ] || cp .device-cache/compile-cache.tar.gz "$KEPT"
    [ -f "$KEPT" ] && python3 -c "import sys; from matwm_fast.tools import compile_cache as cc; cc.restore(sys.argv[1], sys.argv[2])" \
      "$KEPT" "$CACHE"
    rm -rf "$WORK/spread"
    TORCHINDUCTOR_CACHE_DIR=$CACHE timeout -s INT "$secs" python3 -m matwm_fast.train --preset paper \
      --scenario simple_spread --seed 0 --eval-every 500 --eval-episodes 50 --checkpoint-every 0 \
      --run-dir "$WORK/spread" "$@" > "$OUT/train.log" 2>&1
    rc=$?
    cp "$WORK/spread/config.json" "$WORK/spread/metrics.jsonl" "$OUT/" 2>/dev/null
    python3 -c "import sys; from matwm_fast.tools import compile_cache as cc; print(cc.pack(sys.argv[1], sys.argv[2], skip=cc.bundled_skip()))" \
      "$CACHE" "$OUT/compile-cache.tar.gz"
    tail -3 "$OUT/train.log"
    ;;
  *)
    echo "usage: bash bench/gpu.sh check SHA [FLAGS] | rerun SHA STAGE... | spread SECONDS [FLAGS]" >&2
    exit 2
    ;;
esac
# the archive this call leaves in $OUT is also what a following call on this machine starts from
[ -f "$OUT/compile-cache.tar.gz" ] && cp "$OUT/compile-cache.tar.gz" "$KEPT"
exit "$rc"
