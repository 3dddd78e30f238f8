"""Tests of metrics.py: Frechet distance (closed form, pytorch-fid's scipy formula), precision/recall
(brute force), the common preprocessing and the statistics cache. pytorch-fid and scipy are test-only
dependencies."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import metrics
from loading import LoadError


# ---------------------------------------------------------------------------------------------
# Frechet distance

def test_frechet_distance_closed_form_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 32
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenvectors: the covariances commute
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_pytorch_fid_scipy_formula():
    from pytorch_fid.fid_score import calculate_frechet_distance  # scipy.linalg.sqrtm of sigma1 @ sigma2

    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 64))
    x = rng.standard_normal((500, 64)) @ mix
    y = 0.8 * rng.standard_normal((400, 64)) @ mix + 0.3 * rng.standard_normal((400, 64)) + 0.5
    mu1, sigma1 = metrics.feature_statistics(x)
    mu2, sigma2 = metrics.feature_statistics(y)
    want = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    got = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert want > 10
    assert got == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_a_sample_to_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 256)) ** 2  # fewer samples than dimensions: rank-99 covariance
    mu, sigma = metrics.feature_statistics(x)
    assert np.linalg.matrix_rank(sigma) < 256
    fd = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert abs(fd) < 1e-6 * np.trace(sigma)
    shifted = metrics.frechet_distance(mu, sigma, mu + 0.5, sigma)
    assert shifted == pytest.approx(0.25 * 256, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Precision and recall

def brute_force_precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 straight from the definition, with full distance matrices."""
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(points, centres, r):
        return (np.linalg.norm(points[:, None] - centres[None], axis=-1) <= r[None]).any(1)

    return inside(fake, real, radii(real)).mean(), inside(real, fake, radii(fake)).mean()


def test_precision_recall_matches_brute_force_and_is_batch_invariant():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((90, 8)).astype(np.float32)
    fake = (rng.standard_normal((70, 8)) + 1.0).astype(np.float32)
    want = brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=3)
    assert 0.1 < want[0] < 0.9 and 0.1 < want[1] < 0.9
    whole = metrics.precision_recall(real, fake, k=3, batch_size=1000)
    for batch_size in (5, 32):
        assert metrics.precision_recall(real, fake, k=3, batch_size=batch_size) == whole
    assert whole == pytest.approx(want, abs=1e-9)
    assert metrics.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=5, batch_size=16) == \
        pytest.approx(brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=5), abs=1e-9)


def test_precision_recall_known_cases():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16))
    assert metrics.precision_recall(x, x, batch_size=8) == (1.0, 1.0)
    assert metrics.precision_recall(x, x + 100.0, batch_size=8) == (0.0, 0.0)
    # a generated set collapsed onto one real image: fully precise, recall of that one image only
    collapsed = x[0] + 1e-3 * rng.standard_normal((6, 16))
    assert metrics.precision_recall(x, collapsed, batch_size=8) == (1.0, 1 / 50)
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.precision_recall(x, x[:3])


# ---------------------------------------------------------------------------------------------
# Preprocessing

def test_center_crop_resize_crops_the_centre_and_resizes_to_256():
    landscape = np.zeros((512, 768, 3), np.uint8)
    landscape[:, 128:640] = (200, 37, 91)  # the centre square; black margins that must be cut away
    out = metrics.center_crop_resize(Image.fromarray(landscape))
    assert out.size == (256, 256) and out.mode == "RGB"
    assert (np.asarray(out) == (200, 37, 91)).all()

    portrait = Image.fromarray(np.zeros((300, 200), np.uint8))  # greyscale in, RGB out
    assert metrics.center_crop_resize(portrait, size=64).size == (64, 64)
    assert metrics.center_crop_resize(portrait).mode == "RGB"


def test_center_crop_offsets_are_exact_when_no_resize_is_needed():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (256, 301, 3), dtype=np.uint8)  # odd margin of 45: 22 left, 23 right
    np.testing.assert_array_equal(np.asarray(metrics.center_crop_resize(Image.fromarray(wide))), wide[:, 22:278])
    tall = rng.integers(0, 256, (260, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(metrics.center_crop_resize(Image.fromarray(tall))), tall[2:258])


# ---------------------------------------------------------------------------------------------
# Statistics cache

def test_statistics_cache_round_trip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 8)).astype(np.float32)
    fingerprint = metrics.preprocessing_hash(reference="coco2014-val-30k")
    assert fingerprint != metrics.preprocessing_hash(reference="coco2017-val-5k")
    assert fingerprint == metrics.preprocessing_hash(reference="coco2014-val-30k")
    path = tmp_path / "ref.npz"
    metrics.save_statistics(path, feats, fingerprint)
    assert os.listdir(tmp_path) == ["ref.npz"]
    stats = metrics.load_statistics(path, fingerprint)
    mu, sigma = metrics.feature_statistics(feats)
    assert stats["count"] == 40 and stats["fingerprint"] == fingerprint
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
    np.testing.assert_array_equal(stats["features"], feats)
    with pytest.raises(LoadError, match="another preprocessing"):
        metrics.load_statistics(path, metrics.preprocessing_hash())
    with pytest.raises(LoadError, match="not found"):
        metrics.load_statistics(tmp_path / "missing.npz", fingerprint)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="cannot read"):
        metrics.load_statistics(tmp_path / "bad.npz", fingerprint)
