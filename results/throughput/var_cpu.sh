#!/usr/bin/env bash
# VAR training throughput on a CPU (README table): an msvq tokenizer on Fashion-MNIST with the
# chain's architecture, cut to 1 epoch of 50 steps (only its token shapes matter here), token dumps,
# then generator_var.py for 4 minutes; images/s read from its progress bar. Single thread.
# Run from the repository root. Measured at commit ca7dc95: 1.54-1.57 s per step of 128 = ~82 images/s
# over the first 152 steps, the machine otherwise idle (2 cores).
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
FM=/usr/share/datasets/fashion-mnist
OUT=runs/throughput
eval python imagenet_tokenizer.py --dataset fashion-mnist --data-dir $FM --out $OUT --ch 16 --ch-mult 1,2,2 \
    --num-res-blocks 1 --attn-resolutions "''" --z-channels 16 --token-dim 8 --codebook-size 4096 \
    --quantizer msvq --scales 1,2,4,8 --batch-size 64 --epochs 1 --max-steps-per-epoch 50 \
    --skip-fid --skip-lpips --select-by val_loss --num-workers 0 --device cpu --name msvq_ips
for split in train val; do
  python imagenet_tokenizer.py --data-dir $FM --out $OUT --num-workers 0 --device cpu \
      --dump-tokens $split --checkpoint $OUT/msvq_ips/best.pt
done
timeout 240 python generator_var.py --tokenizer $OUT/msvq_ips/best.pt --out $OUT/var --depth 4 --width 128 \
    --batch-size 128 --epochs 1 --device cpu --sample 0 --skip-fid --skip-lpips
