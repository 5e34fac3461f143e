#!/usr/bin/env bash
# Issue 17 item 7, one factor: the rerun of 8_protocol_rerun.sh changed three things at once against
# the old pair (augmented token views, a class-stratified g-FID reference, retrained tokenizers). This
# trains the same MaskGIT pair again on the same tokenizers and dumps with --no-augment (every
# image's plain view, as the old pair trained), everything else as in 8_protocol_rerun.sh, so the
# two runs differ only in the augmentation. Both arms side by side, one single-thread process each.
# Needs the outputs of 8_protocol_rerun.sh in $OUT. Resumable (a finished run is skipped, a started
# one continues from its last.pt). Run from the repository root:
#     bash results/fashion_mnist/chain/9_no_augment.sh
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
OUT=${OUT:-runs/fashion_chain_protocol}
log() { echo "$1" | tee -a $OUT/time.txt; }

plain() {  # arm
  local name=maskgit_vq_$1_fashion-mnist_plain start=$(date +%s)
  [ -e $OUT/maskgit_plain/$name.json ] && return
  python generator_maskgit.py --tokenizer $OUT/vq_$1_fashion-mnist/best.pt --out $OUT/maskgit_plain --name $name \
    --no-augment --depth 4 --width 128 --heads 4 --mlp-dim 512 --batch-size 128 --lr 5e-4 --warmup-steps 200 \
    --epochs 4 --sample 1000 --steps 8 --fid-images 2000 --device cpu \
    $([ -e $OUT/maskgit_plain/$name/last.pt ] && echo --resume) || { log "$1 --no-augment: failed"; return 1; }
  log "$1 maskgit --no-augment + samples + metrics: $(( $(date +%s) - start )) s"
}

plain baseline > $OUT/plain_baseline.log 2>&1 &
plain deferred > $OUT/plain_deferred.log 2>&1 &
wait
