"""The coverage diagnostic suite (paper appendix A.2, common.py section 3) against direct
O(S^2) / O(S^3) computations in float64 / numpy."""
import math

import numpy as np
import pytest
import torch

from common import (UsageCounter, UserError, codebook_metrics, mean_pairwise_cosine_distance,
                    mean_pairwise_euclidean, perplexity_from_counts, vendi_score, vendi_score_centred)


def direct_euclidean(codes):
    t = codes.double()
    s = len(t)
    return sum((t[i] - t[j]).norm().item() for i in range(s) for j in range(i + 1, s)) / (s * (s - 1) / 2)


def direct_cosine(codes):
    t = codes.double().numpy()
    s = len(t)
    cos = (t @ t.T) / np.outer(np.linalg.norm(t, axis=1), np.linalg.norm(t, axis=1))
    return float((1 - cos)[np.triu_indices(s, 1)].mean())


def direct_vendi(codes, centred=False):
    t = codes.double().numpy()
    k = t @ t.T  # the full S x S inner-product kernel, eq. 6
    if centred:  # double centring of the kernel, H K H with H = I - 11^T / S (never centres t itself)
        h = np.eye(len(t)) - 1.0 / len(t)
        k = h @ k @ h
    lam = np.linalg.eigvalsh(k / np.trace(k))
    lam = lam[lam > 1e-15]
    return float(np.exp(-(lam * np.log(lam)).sum()))


@pytest.mark.parametrize("shape", [(2, 3), (37, 5), (150, 16)])
def test_euclidean_against_pairwise_loop(shape):
    codes = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 3 + 1
    assert mean_pairwise_euclidean(codes) == pytest.approx(direct_euclidean(codes), rel=1e-6)


@pytest.mark.parametrize("tile", [1, 7, 64, 1024])
def test_euclidean_any_tile_against_cdist(tile):
    codes = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    d = torch.cdist(codes.double(), codes.double())
    expected = d[torch.triu(torch.ones(300, 300, dtype=torch.bool), 1)].mean().item()
    assert mean_pairwise_euclidean(codes, tile=tile) == pytest.approx(expected, rel=1e-6)


def test_euclidean_precision_far_from_origin():
    g = torch.Generator().manual_seed(2)
    # float32 codes at 1e4 with spread 1: the uncentred expansion would cancel to noise
    codes = 1e4 + torch.randn(200, 8, generator=g)
    assert mean_pairwise_euclidean(codes) == pytest.approx(direct_euclidean(codes), rel=1e-4)
    # float64 codes at 1e4 with spread 1e-3 (below float32 resolution there): centring happens
    # in float64, also through codebook_metrics, which must not round the codes first
    codes64 = 1e4 + 1e-3 * torch.randn(200, 8, generator=g, dtype=torch.float64)
    expected = direct_euclidean(codes64)
    assert mean_pairwise_euclidean(codes64) == pytest.approx(expected, rel=1e-4)
    assert codebook_metrics(codes64)["euclidean"] == pytest.approx(expected, rel=1e-4)


def test_euclidean_duplicates_and_tiny_codebooks():
    assert mean_pairwise_euclidean(torch.ones(50, 4) * 7) == 0.0
    assert mean_pairwise_euclidean(torch.randn(1, 4)) == 0.0
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert mean_pairwise_euclidean(two) == pytest.approx(5.0, rel=1e-7)


def test_cosine_against_direct_matrix():
    codes = torch.randn(120, 6, generator=torch.Generator().manual_seed(3)) + 0.5
    assert mean_pairwise_cosine_distance(codes) == pytest.approx(direct_cosine(codes), rel=1e-9)
    # scale invariant, and 0 for codes on one ray, 1 for orthogonal ones
    assert mean_pairwise_cosine_distance(codes * 1e3) == pytest.approx(direct_cosine(codes), rel=1e-9)
    ray = torch.arange(1.0, 11.0)[:, None] * torch.tensor([[1.0, 2.0, 3.0]])
    assert mean_pairwise_cosine_distance(ray) == pytest.approx(0.0, abs=1e-12)
    assert mean_pairwise_cosine_distance(torch.eye(5) * 3) == pytest.approx(1.0, abs=1e-12)


def test_cosine_zero_code_counts_as_orthogonal():
    codes = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    # pairs: (0,1) distance 0, (0,2) and (1,2) distance 1 -> mean 2/3
    assert mean_pairwise_cosine_distance(codes) == pytest.approx(2 / 3, abs=1e-12)


@pytest.mark.parametrize("shape", [(10, 4), (60, 8), (40, 40), (30, 64)])
def test_vendi_against_full_kernel_eigenvalues(shape):
    codes = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[1])) + 0.3
    assert vendi_score(codes) == pytest.approx(direct_vendi(codes), rel=1e-8)


def test_vendi_invariants():
    g = torch.Generator().manual_seed(4)
    codes = torch.randn(80, 12, generator=g)
    v = vendi_score(codes)
    assert 1.0 <= v <= 12.0  # at most min(S, d) effective codes
    assert vendi_score(codes * 17.0) == pytest.approx(v, rel=1e-6)  # scale invariant (up to float32 rounding)
    rank_one = torch.randn(50, 1, generator=g) * torch.randn(1, 9, generator=g)
    assert vendi_score(rank_one) == pytest.approx(1.0, abs=1e-9)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert vendi_score(q * 2.5) == pytest.approx(16.0, rel=1e-10)  # orthonormal, equal norms -> d
    assert vendi_score(torch.zeros(5, 3)) == 1.0


@pytest.mark.parametrize("shape", [(10, 4), (60, 8), (40, 40), (30, 64)])
def test_centred_vendi_against_the_doubly_centred_kernel(shape):
    codes = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.5 + 2.0
    assert vendi_score_centred(codes) == pytest.approx(direct_vendi(codes, centred=True), rel=1e-8)


def test_centred_vendi_ignores_a_common_offset_the_raw_one_does_not():
    g = torch.Generator().manual_seed(8)
    codes = torch.randn(200, 16, generator=g, dtype=torch.float64)
    offset = 10.0 * torch.randn(1, 16, generator=g, dtype=torch.float64)
    assert vendi_score_centred(codes + offset) == pytest.approx(vendi_score_centred(codes), rel=1e-10)
    assert vendi_score(codes + offset) < 0.2 * vendi_score(codes)  # the offset direction dominates K
    # like the raw score, the centred one counts directions, not their scale
    assert vendi_score_centred(0.1 * codes + offset) == pytest.approx(vendi_score_centred(codes), rel=1e-10)
    assert vendi_score_centred(torch.full((7, 3), 0.3)) == 1.0 and vendi_score_centred(torch.randn(1, 5)) == 1.0


def test_perplexity_invariants():
    assert perplexity_from_counts(torch.full((64,), 3.0)) == pytest.approx(64.0)
    assert perplexity_from_counts(torch.tensor([0, 0, 9, 0])) == pytest.approx(1.0)
    counts = np.array([1.0, 2.0, 3.0, 0.0])
    p = counts[counts > 0] / counts.sum()
    assert perplexity_from_counts(counts) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert perplexity_from_counts(torch.zeros(8)) is None  # nothing counted: no distribution (issue 16)


def test_usage_counter_accumulates_batches():
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 10, (4, 3, 3), generator=g) for _ in range(5)]
    counter = UsageCounter(16)
    for b in batches:
        counter.update(b)
    counter.all_reduce()  # a no-op in one process
    flat = torch.cat([b.reshape(-1) for b in batches])
    expected = np.bincount(flat.numpy(), minlength=16)
    assert counter.counts.tolist() == expected.tolist()
    assert counter.used_codes() == int((expected > 0).sum())
    assert counter.perplexity() == pytest.approx(perplexity_from_counts(expected))


def test_codebook_metrics_dict_and_bad_input():
    codes = torch.randn(40, 5, generator=torch.Generator().manual_seed(6))
    m = codebook_metrics(codes)
    assert set(m) == {"num_codes", "dim", "euclidean", "cosine", "vendi", "vendi_centred"}
    assert (m["num_codes"], m["dim"]) == (40, 5)
    assert m["euclidean"] == pytest.approx(direct_euclidean(codes), rel=1e-6)
    assert m["cosine"] == pytest.approx(direct_cosine(codes), rel=1e-6)
    assert m["vendi"] == pytest.approx(direct_vendi(codes), rel=1e-6)
    assert m["vendi_centred"] == pytest.approx(direct_vendi(codes, centred=True), rel=1e-6)
    counts = np.array([0, 5, 5] + [0] * 37)
    m = codebook_metrics(codes.numpy(), counts)
    assert m["perplexity"] == pytest.approx(2.0) and m["used_codes"] == 2
    for bad, message in ((torch.randn(10), "a codebook is a"), (torch.randn(0, 4), "a codebook is a"),
                         (torch.tensor([[1.0, float("nan")]]), "NaN or infinite")):
        with pytest.raises(UserError, match=message):
            codebook_metrics(bad)
