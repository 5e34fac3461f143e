#!/usr/bin/env bash
# The real-image chain, stage 2: token dumps of both tokenizers, then MaskGIT on each, side by side
# (one single-thread process per arm), samples, g-FID / pixel distance / LPIPS diversity.
# Run from the repository root. Ran at code commit d7ac63e.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
FM=/usr/share/datasets/fashion-mnist
OUT=runs/fashion_chain
start=$(date +%s)
for arm in baseline deferred; do
  ( for split in train val; do
      python imagenet_tokenizer.py --data-dir $FM --out $OUT --num-workers 0 --device cpu \
          --dump-tokens $split --checkpoint $OUT/vq_${arm}_fashion-mnist/best.pt
    done ) > $OUT/dump_$arm.log 2>&1 &
done
wait
echo "token dumps: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
start=$(date +%s)
for arm in baseline deferred; do
  python generator_maskgit.py --tokenizer $OUT/vq_${arm}_fashion-mnist/best.pt --out $OUT/maskgit \
      --depth 4 --width 128 --heads 4 --mlp-dim 512 --batch-size 128 --lr 5e-4 --warmup-steps 200 \
      --epochs 4 --sample 1000 --steps 8 --fid-images 2000 --device cpu > $OUT/maskgit_$arm.log 2>&1 &
done
wait
echo "maskgit + samples + metrics: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
