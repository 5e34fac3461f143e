#!/usr/bin/env bash
# How much of the g-FID / diversity gap is sampling noise: the two trained MaskGITs sample 1,000
# images again with sample seeds 1 and 2 (same settings; seed 0 is the main run), one single-thread
# process per arm. Run from the repository root after 3_tokens_and_maskgit.sh.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=runs/fashion_chain
start=$(date +%s)
for arm in baseline deferred; do
  ( for seed in 1 2; do
      python generator_maskgit.py --tokenizer $OUT/vq_${arm}_fashion-mnist/best.pt --out $OUT/maskgit_reseed \
          --sample-only --checkpoint $OUT/maskgit/maskgit_vq_${arm}_fashion-mnist/best.pt \
          --sample 1000 --steps 8 --fid-images 2000 --sample-seed $seed --device cpu \
          --name maskgit_vq_${arm}_fashion-mnist_seed$seed
    done ) > $OUT/reseed_$arm.log 2>&1 &
done
wait
echo "sampling noise, 2 x 2 re-samplings: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
