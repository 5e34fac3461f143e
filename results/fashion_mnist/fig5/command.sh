#!/usr/bin/env bash
# Figure 5 on Fashion-MNIST (README "Real images"): 38 runs, 2 seeds, two single-thread workers.
# Run from the repository root; rerunning continues (finished runs are skipped, started ones resumed).
set -u
source ~/.cache/dq-venv/*/bin/activate
mkdir -p runs/fmnist
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
COMMON="--dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --epochs 10 \
  --train-subset 10000 --channels 32 --res-channels 16 --val-every 10 --num-workers 0 --device cpu \
  --out runs/fmnist"
start=$(date +%s)
for i in 0 1; do
  ( for s in 0 1; do
      python cifar_sweep.py --grid cpu-fig5 --grid-shard $(( (i + s) % 2 ))/2 --seed $s $COMMON
      python cifar_sweep.py --grid cpu-table11 --grid-shard $(( (i + s) % 2 ))/2 --seed $s $COMMON
    done ) > runs/fmnist/worker$i.log 2>&1 &
done
wait
echo "wall seconds: $(( $(date +%s) - start ))" | tee runs/fmnist/time.txt
# then (what is committed here): the JSONs and the rendered tables / figures
mkdir -p results/fashion_mnist/fig5/runs && cp runs/fmnist/*.json results/fashion_mnist/fig5/runs/
python evaluate.py tables results/fashion_mnist/fig5/runs --out results/fashion_mnist/fig5
# Measured here: 1989 s wall (33 min) on 2 cores while other jobs shared the machine (load 4-5),
# code at commit 3467f63.
