#!/usr/bin/env bash
# Stage 2 resumed: the session that ran 3_tokens_and_maskgit.sh stopped during MaskGIT epoch 3; --resume continues
# each arm from its last.pt (end of epoch 2), the same command plus --resume.
# Run from the repository root. Ran at code commit d7ac63e.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=runs/fashion_chain
start=$(date +%s)
for arm in baseline deferred; do
  python generator_maskgit.py --tokenizer $OUT/vq_${arm}_fashion-mnist/best.pt --out $OUT/maskgit \
      --depth 4 --width 128 --heads 4 --mlp-dim 512 --batch-size 128 --lr 5e-4 --warmup-steps 200 \
      --epochs 4 --sample 1000 --steps 8 --fid-images 2000 --device cpu --resume >> $OUT/maskgit_$arm.log 2>&1 &
done
wait
echo "maskgit epochs 0-2: 1848 s (baseline) / 1843 s (deferred) before the stop; resumed epoch 3 + samples + metrics: $(( $(date +%s) - start )) s" | tee -a $OUT/time.txt
