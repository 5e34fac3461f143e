#!/usr/bin/env bash
# Figure 5 and Table 9 on Fashion-MNIST on the paper's schedule (README "Figure 5 on the paper's
# schedule"): 300 epochs, Deferred 150 + 150, the 10-epoch run's subset and width (10,000 training
# images, channels 32 / residual 16), full 10,000-image test split evaluated every 10 epochs.
# Two single-thread workers (WORKERS=1 for one, beside another job); run from the repository root.
# Rerunning continues: a run whose JSON exists is skipped, a started one (its .pt exists) resumes
# bit-for-bit. Locks left by a killed run on another host (a new session) are refused: delete them
# first (`rm -f runs/fmnist_long/*.lock`) when nothing else is running.
# Order = priority (what lands first if the budget ends): both arms at 4,096 and 1,024 codes (the
# per-epoch curves), then 256 and 16,384, then Table 9's Continuous Phase lengths at 4,096, then a
# second seed at 1,024 and 4,096, then 512 / 2,048 / 8,192, then the paper's two other Table 9 lengths
# (60, 100; the issue asked for 0 / 10 / 20 / 40 / 80 / 150).
# State: deferred_ema 4,096 s0 finished in the first session; the baselines at 4,096 and 1,024 codes
# were paused at epochs 209 / 159 (second session) and finished in the third, after the quantizer
# began flushing subnormal EMA state (commit d76384c; README "Training throughput on a CPU"), which
# made their later epochs 12-17x faster. Fourth session (2026-12-03/04, code f312f8b): the 16,384 pair and
# Table 9's Continuous 10 and 20 finished; Continuous 80 and the seed-1 4,096 baseline were running at
# the stop (they resume from their .pt in runs/fmnist_long). Fifth session (2026-12-04, code
# 423fa4b): everything up to the 8,192 pair finished; Continuous 60 / 100 were running at the stop.
# To continue the grid elsewhere, copy the committed JSONs into $OUT first (`cp results/fashion_mnist/fig5_long/runs/*.json runs/fmnist_long/`), so finished
# runs are skipped.
set -u
source ~/.cache/dq-venv/*/bin/activate
OUT=${OUT:-runs/fmnist_long}
WORKERS=${WORKERS:-2}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
COMMON="--dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --train-subset 10000 \
  --channels 32 --res-channels 16 --val-every 10 --num-workers 0 --device cpu --out $OUT"

run() {  # method size continuous total seed
  local name="$1_K$2_ep$4_cont$3_s$5_fashion-mnist" resume=""
  [ -f "$OUT/$name.json" ] && { echo "skip $name"; return; }
  [ -f "$OUT/$name.pt" ] && resume="--resume"
  local t0=$(date +%s)
  python cifar_sweep.py --method "$1" --codebook-size "$2" --continuous-epochs "$3" --epochs "$4" --seed "$5" \
    $COMMON $resume || return 0  # refused (the other worker holds its lock) or failed: the log says which
  echo "$name: $(( $(date +%s) - t0 )) s" >> "$OUT/time.txt"
}

worker() {  # every worker walks the whole plan in order and takes the first run nobody holds: a run
  # the other worker is training is refused by its lock (common.RunLock), so both cores stay busy to
  # the end and the two arms of a cell still run side by side
  while read -r m k c e s; do
    run "$m" "$k" "$c" "$e" "$s"
  done <<'PLAN'
deferred_ema 4096 150 300 0
baseline_ema 4096 0 300 0
baseline_ema 1024 0 300 0
deferred_ema 1024 150 300 0
deferred_ema 256 150 300 0
baseline_ema 256 0 300 0
baseline_ema 16384 0 300 0
deferred_ema 16384 150 300 0
deferred_ema 4096 10 160 0
deferred_ema 4096 80 230 0
deferred_ema 4096 20 170 0
deferred_ema 4096 40 190 0
baseline_ema 4096 0 300 1
deferred_ema 4096 150 300 1
deferred_ema 1024 150 300 1
baseline_ema 1024 0 300 1
deferred_ema 4096 0 150 0
baseline_ema 512 0 300 0
deferred_ema 512 150 300 0
baseline_ema 2048 0 300 0
deferred_ema 2048 150 300 0
baseline_ema 8192 0 300 0
deferred_ema 8192 150 300 0
deferred_ema 4096 60 210 0
deferred_ema 4096 100 250 0
PLAN
}
for w in $(seq 0 $(( WORKERS - 1 ))); do
  worker > "$OUT/worker$w.log" 2>&1 &
  sleep 5  # the first worker takes its lock before the second reads the plan
done
wait
# then (what is committed): the JSONs, and the tables / figures rendered from them
#   mkdir -p results/fashion_mnist/fig5_long/runs && cp $OUT/*.json results/fashion_mnist/fig5_long/runs/
#   python evaluate.py tables results/fashion_mnist/fig5_long/runs --out results/fashion_mnist/fig5_long
