#!/usr/bin/env bash
# Probe: does a larger code dimension bring back the coverage failure? The gradient-codebook
# tokenizers of 1_tokenizers.sh with --token-dim 32 (the tokenizer's default, VAR's; cifar_sweep.py's
# Figure 5 runs use 32 too) instead of 8. Run from the repository root.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
FM=/usr/share/datasets/fashion-mnist
OUT=runs/fashion_chain
COMMON="--dataset fashion-mnist --data-dir $FM --out $OUT --ch 16 --ch-mult 1,2,2 --num-res-blocks 1 \
  --attn-resolutions '' --z-channels 16 --token-dim 32 --codebook-size 4096 --batch-size 64 --lr 1e-3 \
  --min-lr 1e-5 --lr-schedule cosine --epochs 12 --max-steps-per-epoch 250 --select-by val_loss \
  --fid-images 1000 --num-workers 0 --device cpu --seed 0"
start=$(date +%s)
eval python imagenet_tokenizer.py $COMMON --name vq_baseline_d32_fashion-mnist > $OUT/tok_baseline_d32.log 2>&1 &
eval python imagenet_tokenizer.py $COMMON --deferred --continuous-epochs 4 --name vq_deferred_d32_fashion-mnist \
  > $OUT/tok_deferred_d32.log 2>&1 &
wait
echo "token-dim 32 tokenizers: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
