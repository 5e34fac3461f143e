#!/usr/bin/env bash
# The factor study of issue 15 (README "When does coverage failure appear?"): where between the
# failing recipe (cifar_sweep.py's Fashion-MNIST VQ-VAE, Baseline + EMA at 4,096 codes: perplexity
# ~25) and imagenet_tokenizer.py's (results/fashion_mnist/chain/1_tokenizers.sh: no failure) does
# token coverage failure appear? Cells = cifar_sweep.FACTORS (--grid cpu-factors), each with both
# arms: the baseline switching at step 0 and Deferred Quantization after 5 of 10 epochs; 4,096
# codes, seed 0, the rest of the recipe from COMMON below (the Figure 5 run's):
#    1 base (failing recipe)     baseline_ema / deferred_ema: VQ-VAE ch 32/16, token dim 32, EMA 0.99,
#                                Adam amsgrad lr 3e-4 constant, batch 128, MSE only, 10:1 sample init,
#                                pixels [-0.5, 0.5]
#    2 network: VQGAN blocks     --network vqgan (ch 16, ch-mult 1,2,2, 1 res block, no attention but the
#                                mid block's, z-channels 16: the chain tokenizer's)
#    3 codebook update: gradient baseline / deferred (codebook loss instead of EMA)
#    4 token dim 8               --token-dim 8
#    5 lr 1e-3                   --lr 1e-3
#    6 cosine schedule           --lr-schedule cosine --min-lr 1e-5 (at lr 3e-4)
#    7 LPIPS weight 1            --lpips-weight 1
#    8 batch 64                  --batch-size 64
#    9 ratio 2                   --ratio 2
#   10 pixels in [-1, 1]         --pixel-range 1
#   11 Adam (0.5, 0.9)           --adam-betas 0.5,0.9 --no-amsgrad
#   12 k-means init              --init-method kmeans (not the tokenizer's: the other init)
#   13 all: tokenizer recipe     every change of 2-11 at once, gradient codebook
# Any cell reruns alone with its flags, e.g. cell 4, seed 1, baseline arm:
#   python cifar_sweep.py $COMMON --method baseline_ema --codebook-size 4096 --epochs 10 --token-dim 8 --seed 1
# or the whole grid for another seed: SEED=1 bash results/fashion_mnist/factors/command.sh
#
# Said before the runs (what would count against the paper's mechanism, C1 / section 4 / Figure 3):
# the paper says a baseline fails because its codebook is drawn from the narrow outputs of an
# untrained encoder. Measured before any training (init_spread.txt): the untrained VQ-VAE's outputs
# spread 0.08 (token dim 32), the untrained VQGAN encoder's 1.37, near the Deferred VQ-VAE's final
# codebook (2.0). Expected: cell 2 (network) removes the failure (perplexity ratio baseline / Deferred >= 1/4)
# with a wide switch spread; cells that leave the switch spread narrow keep it. Against the paper:
# (a) a cell whose baseline switch spread stays as narrow as the base's (within 2x) but does not fail,
# or (b) a cell whose baseline fails although its switch spread is as wide as Deferred's (within 2x).
# If cell 13 still fails, a difference outside this list decides (see the README's table: data
# seen per run, 3-channel input, loss over the padding, best-checkpoint selection).
#
# Run from the repository root; rerunning continues: runs whose JSON exists are skipped, started
# ones resumed from their .pt (cifar_sweep --grid). Two single-thread workers: worker 0 runs every
# baseline arm, worker 1 every Deferred arm, so the two arms of a cell run side by side.
set -u
source ~/.cache/dq-venv/*/bin/activate
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
SEED=${SEED:-0}
OUT=runs/fmnist_factors
COMMON="--dataset fashion-mnist --data-dir /usr/share/datasets/fashion-mnist --train-subset 10000 \
  --channels 32 --res-channels 16 --val-every 10 --num-workers 0 --device cpu --out $OUT"
mkdir -p $OUT
start=$(date +%s)
for i in 0 1; do
  python cifar_sweep.py --grid cpu-factors --grid-shard $i/2 --seed $SEED $COMMON >> $OUT/worker$i.log 2>&1 &
done
wait
echo "seed $SEED: $(( $(date +%s) - start )) s wall" | tee -a $OUT/time.txt
# then (what is committed here): the JSONs, the table and figure, the codebook pictures of cells 1 and 13
mkdir -p results/fashion_mnist/factors/runs && cp $OUT/*.json results/fashion_mnist/factors/runs/
python evaluate.py tables results/fashion_mnist/factors/runs --out results/fashion_mnist/factors \
  --only "Factor study: where coverage failure appears (cifar_sweep --grid cpu-factors, issue 15)"
for name in baseline_ema_K4096_ep10_cont0_s${SEED}_fashion-mnist deferred_ema_K4096_ep10_cont5_s${SEED}_fashion-mnist \
    baseline_lr0.001_vqgan_d8_cos_lpips1_bs64_ratio2_px1_betas0.5-0.9_noams_K4096_ep10_cont0_s${SEED}_fashion-mnist \
    deferred_lr0.001_vqgan_d8_cos_lpips1_bs64_ratio2_px1_betas0.5-0.9_noams_K4096_ep10_cont5_s${SEED}_fashion-mnist; do
  [ -e results/fashion_mnist/factors/codebook_$name.png ] || \
    python evaluate.py codebook $OUT/$name.pt --plot results/fashion_mnist/factors/codebook_$name.png
done
