#!/usr/bin/env bash
# benchmarks/demo_grid.py on a lent GPU machine, within one device call: prepare SEEDS in parallel, then WORKERS
# processes share the grid until DEADLINE seconds after the start; results and the summary land in $OUT.
#   bash benchmarks/demo_grid_gpu.sh GRID "0 1 2 3" 8 520
set -u
grid=$1; seeds=$2; workers=$3; deadline=$4
start=$(date +%s); out=/tmp/demo-grid; mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONPATH=/tmp/site:$PWD/src
if ! python -c "import diffusers" 2>/dev/null; then pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" || true
for s in $seeds; do python benchmarks/demo_grid.py prepare $out --seed $s ${PREP_ARGS:-} > "$OUT/logs/prepare$s.log" 2>&1 & done; wait
echo "prepared in $(( $(date +%s) - start ))s"; tail -q -n 1 "$OUT"/logs/prepare*.log | tr "\r" "\n" | tail -n 3
left=$(( deadline - ($(date +%s) - start) ))
for w in $(seq 0 $((workers - 1))); do
  timeout $left python benchmarks/demo_grid.py work $out "$grid" --worker $w --workers $workers > "$OUT/logs/work$w.log" 2>&1 &
done; wait
tar czf "$OUT/grid.tgz" -C $out results $(cd $out && ls -d seed*/base.json)  # one file: the device returns only a few
grep -h "\[grid\]" "$OUT"/logs/work*.log | sort | tail -80
python benchmarks/demo_grid.py summary $out | tee "$OUT/summary.jsonl"
echo "total $(( $(date +%s) - start ))s"
