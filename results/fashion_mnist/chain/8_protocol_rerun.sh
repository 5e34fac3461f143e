#!/usr/bin/env bash
# The Fashion-MNIST MaskGIT pair of 1_tokenizers.sh + 3_tokens_and_maskgit.sh again under the
# generator protocol of issue 17: augmented token dumps (10 views per training image, one drawn per
# image per epoch), a class-stratified 2,000-image g-FID reference (and 1,000-image r-FID subset),
# the default sampling (MaskGIT's sampler never truncates: its one row is the untruncated one; a VAR
# run would add <name>_untruncated), and two more samplings per trained model (sample seeds 1, 2, as
# 5_sampling_noise.sh did for the old pair, so both tables have three). Everything else as before, including --warmup-steps 200 (the
# old pair's warm-up, so that only the protocol changes; drop it for the new default of one epoch).
# The old chain's tokenizer checkpoints are gone (runs/fashion_chain), so both arms train again with
# the recipe of 1_tokenizers.sh. One single-thread process per arm, side by side.
#
# Resumable: a stage whose result exists is skipped; an interrupted training continues from its
# last.pt (--resume). Run from the repository root:
#     bash results/fashion_mnist/chain/8_protocol_rerun.sh
# A smoke run with tiny settings (the token dumps still cover all 55,000 training images):
#     OUT=/tmp/chain8 TOK_EPOCHS=1 TOK_STEPS=2 CONT=0 GEN_EPOCHS=1 SAMPLE=20 FID=0 \
#         bash results/fashion_mnist/chain/8_protocol_rerun.sh
# Then: python evaluate.py tables $OUT --out $OUT/report   (beside report.md's old numbers; the
# table's mean +- std over the three samplings of each arm).
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
FM=/usr/share/datasets/fashion-mnist
OUT=${OUT:-runs/fashion_chain_protocol}
TOK_EPOCHS=${TOK_EPOCHS:-12} TOK_STEPS=${TOK_STEPS:-250} CONT=${CONT:-4}
GEN_EPOCHS=${GEN_EPOCHS:-4} SAMPLE=${SAMPLE:-1000} FID=${FID:-1}
if [ "$FID" = 1 ]; then SKIP=""; else SKIP="--skip-fid --skip-lpips"; fi
mkdir -p $OUT
log() { echo "$1" | tee -a $OUT/time.txt; }
took() {  # stage name, its start: logs the seconds, unless the stage was skipped (it ran before: 0 s)
  local s=$(( $(date +%s) - $2 )); [ $s -gt 0 ] && log "$1: $s s"; start=$(date +%s)
}

resume_if() { [ -e "$1" ] && echo --resume; }  # --resume when the run's last.pt exists

tokenizer() {  # arm, extra flags
  local name=vq_$1_fashion-mnist
  [ -e $OUT/$name.json ] && return
  python imagenet_tokenizer.py --dataset fashion-mnist --data-dir $FM --out $OUT --ch 16 --ch-mult 1,2,2 \
    --num-res-blocks 1 --attn-resolutions '' --z-channels 16 --token-dim 8 --codebook-size 4096 --batch-size 64 \
    --lr 1e-3 --min-lr 1e-5 --lr-schedule cosine --epochs $TOK_EPOCHS --max-steps-per-epoch $TOK_STEPS \
    --select-by val_loss --fid-images 1000 --num-workers 0 --device cpu --seed 0 $SKIP \
    $(resume_if $OUT/$name/last.pt) "${@:2}"
}

dumps() {  # arm: training split with its 10 augmented views (the default), validation split plain
  local ckpt=$OUT/vq_$1_fashion-mnist/best.pt
  for split in train val; do
    [ -e $OUT/vq_$1_fashion-mnist/tokens_$split.pt ] || python imagenet_tokenizer.py --data-dir $FM --out $OUT \
      --num-workers 0 --device cpu --dump-tokens $split --checkpoint $ckpt || return 1
  done
}

maskgit() {  # arm
  local name=maskgit_vq_$1_fashion-mnist
  [ -e $OUT/maskgit/$name.json ] && return
  python generator_maskgit.py --tokenizer $OUT/vq_$1_fashion-mnist/best.pt --out $OUT/maskgit \
    --depth 4 --width 128 --heads 4 --mlp-dim 512 --batch-size 128 --lr 5e-4 --warmup-steps 200 \
    --epochs $GEN_EPOCHS --sample $SAMPLE --steps 8 --fid-images 2000 --device cpu $SKIP \
    $(resume_if $OUT/maskgit/$name/last.pt)
}

resample() {  # arm: samplings 1 and 2 of the trained MaskGIT (its run above is sampling 0)
  local name=maskgit_vq_$1_fashion-mnist seed
  for seed in 1 2; do
    [ -e $OUT/maskgit_reseed/${name}_seed$seed.json ] || python generator_maskgit.py \
      --tokenizer $OUT/vq_$1_fashion-mnist/best.pt --out $OUT/maskgit_reseed --sample-only \
      --checkpoint $OUT/maskgit/$name/best.pt --sample $SAMPLE --steps 8 --fid-images 2000 --sample-seed $seed \
      --device cpu --name ${name}_seed$seed $SKIP || return 1
  done
}

arm() {  # the whole chain of one arm, one process at a time
  local start=$(date +%s)
  if [ $1 = deferred ]; then tokenizer deferred --deferred --continuous-epochs $CONT; else tokenizer baseline; fi \
    || { log "$1: tokenizer failed"; return 1; }
  took "$1 tokenizer" $start
  dumps $1 || { log "$1: token dumps failed"; return 1; }
  took "$1 token dumps (train: 10 views)" $start
  maskgit $1 || { log "$1: maskgit failed"; return 1; }
  took "$1 maskgit + samples + metrics" $start
  resample $1 || { log "$1: re-sampling failed"; return 1; }
  took "$1 samplings 1 and 2" $start
}

log "start $(date -u +%FT%TZ) at code commit $(git rev-parse --short HEAD)"
arm baseline > $OUT/chain_baseline.log 2>&1 &
arm deferred > $OUT/chain_deferred.log 2>&1 &
wait
log "done $(date -u +%FT%TZ)"
