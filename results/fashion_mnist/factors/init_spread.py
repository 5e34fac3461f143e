"""Spread of the untrained encoders' outputs at initialisation (what a baseline's codebook is drawn
from at its step-0 switch): mean pairwise Euclidean distance (paper eq. 4) of a seeded sample of
common.SWITCH_SAMPLE encoder outputs of 640 Fashion-MNIST training images (40,960 vectors, the
10:1 switch at 4,096 codes), for cifar_sweep.py's two networks at token dims 32 and 8 and both
pixel ranges, and for imagenet_tokenizer.py's tokenizer itself (3-channel input). Seeds 0-2.
Run from the repository root: python results/fashion_mnist/factors/init_spread.py
"""
import os
import sys

import torch

sys.path.insert(0, os.getcwd())
import cifar_sweep  # noqa: E402
from common import build_tokenizer, embedding_sample, mean_pairwise_euclidean, seed_everything  # noqa: E402

FM = "/usr/share/datasets/fashion-mnist"
IMAGES = 640


def sweep_encoder(seed, **options):
    argv = ["--dataset", "fashion-mnist", "--channels", "32", "--res-channels", "16", "--method", "baseline_ema"]
    args = cifar_sweep.resolve_args(cifar_sweep.build_parser().parse_args(argv))
    vars(args).update(options)
    cifar_sweep.resolve_factor_options(args)
    seed_everything(seed)
    model = cifar_sweep.build_model(args).eval()
    return model.encode


def tokenizer_encoder(seed, token_dim):
    cfg = dict(quantizer="vq", codebook_size=4096, token_dim=token_dim, beta=0.25, ema_decay=None, simvq=False,
               ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32, z_channels=16)
    seed_everything(seed)
    model = build_tokenizer(cfg).eval()
    return lambda x: model.encode((x + 0.5).expand(-1, 3, -1, -1))  # its [0, 1] RGB input


def spread(encode, images, dim, seed):
    with torch.no_grad():
        z = encode(images)
    rows = z.permute(0, 2, 3, 1).reshape(-1, dim)
    sample = embedding_sample(rows, quantizer=None, seed=seed)
    return mean_pairwise_euclidean(sample), rows.norm(dim=1).mean().item()


def main():
    torch.set_num_threads(1)
    train = cifar_sweep.load_fashion(FM, train=True, download=False, subset=10000)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:IMAGES]
    images = train[pick].float().div(255.0).sub(0.5)  # cifar_sweep.to_input
    settings = [(f"cifar_sweep {net}, token dim {d}, pixels [-{r:g}, {r:g}]",
                 lambda s, net=net, d=d, r=r: sweep_encoder(s, network=net, token_dim=d, pixel_range=r), d)
                for net in ("vqvae", "vqgan") for d in (32, 8) for r in (0.5, 1.0)]
    settings += [(f"imagenet_tokenizer (3-channel input), token dim {d}", lambda s, d=d: tokenizer_encoder(s, d), d)
                 for d in (32, 8)]
    print(f"{'setting':<58} {'mean pairwise Euclidean (seeds 0, 1, 2)':<42} mean norm")
    for label, make, dim in settings:
        values = [spread(make(seed), images, dim, seed) for seed in range(3)]
        print(f"{label:<58} {', '.join(f'{v[0]:.4f}' for v in values):<42} {values[0][1]:.4f}")


if __name__ == "__main__":
    main()
