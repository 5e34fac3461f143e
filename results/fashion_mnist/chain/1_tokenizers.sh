#!/usr/bin/env bash
# The real-image chain, stage 1: MaskGIT tokenizers on Fashion-MNIST, baseline and Deferred
# Quantization side by side (one single-thread process each).
# Run from the repository root. Ran at code commit 6143d39.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
FM=/usr/share/datasets/fashion-mnist
OUT=runs/fashion_chain
COMMON="--dataset fashion-mnist --data-dir $FM --out $OUT --ch 16 --ch-mult 1,2,2 --num-res-blocks 1 \
  --attn-resolutions '' --z-channels 16 --token-dim 8 --codebook-size 4096 --batch-size 64 --lr 1e-3 \
  --min-lr 1e-5 --lr-schedule cosine --epochs 12 --max-steps-per-epoch 250 --select-by val_loss \
  --fid-images 1000 --num-workers 0 --device cpu --seed 0"
mkdir -p $OUT
start=$(date +%s)
# the split file is shared: make it once before the two arms start
eval python imagenet_tokenizer.py $COMMON > $OUT/tok_baseline.log 2>&1 &
sleep 60
eval python imagenet_tokenizer.py $COMMON --deferred --continuous-epochs 4 > $OUT/tok_deferred.log 2>&1 &
wait
echo "tokenizers: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
