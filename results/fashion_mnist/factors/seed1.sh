#!/usr/bin/env bash
# Issue 15 "two seeds where the verdict turns": the verdict (failure = baseline perplexity below a
# quarter of Deferred's) turns between the base recipe and the VQGAN-network cell only, so both
# arms of these two cells run again with seed 1 (same recipe as command.sh). Run from the
# repository root after command.sh; resumable (a run whose JSON exists is skipped).
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=runs/fmnist_factors
COMMON="--dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --train-subset 10000 \
  --channels 32 --res-channels 16 --val-every 10 --num-workers 0 --device cpu --out $OUT \
  --codebook-size 4096 --epochs 10 --seed 1"
one() {  # method, run-name stem, extra flags
  local run="$OUT/$2_K4096_ep10_cont$([ "${1%%_*}" = baseline ] && echo 0 || echo 5)_s1_fashion-mnist"
  [ -f "$run.json" ] && return
  python cifar_sweep.py $COMMON --method "$1" "${@:3}" $([ -f "$run.pt" ] && echo --resume)
}
( one baseline_ema baseline_ema_vqgan --network vqgan; one baseline_ema baseline_ema ) >> $OUT/seed1_worker0.log 2>&1 &
( one deferred_ema deferred_ema_vqgan --network vqgan; one deferred_ema deferred_ema ) >> $OUT/seed1_worker1.log 2>&1 &
wait
