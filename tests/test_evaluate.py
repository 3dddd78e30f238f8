"""Tests of evaluate.py: Frechet distance (closed form, pytorch-fid's scipy formula), the Inception
network (pytorch-fid parity on random weights), precision/recall (brute force), preprocessing and
the statistics cache. pytorch-fid, torchvision and scipy are test-only dependencies."""
import math
import os
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
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
    got = evaluate.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert got == pytest.approx(want, rel=1e-10)
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)


def test_frechet_distance_matches_pytorch_fid_scipy_formula():
    from pytorch_fid.fid_score import calculate_frechet_distance  # scipy.linalg.sqrtm of sigma1 @ sigma2

    rng = np.random.default_rng(1)
    mix = rng.standard_normal((64, 64))
    x = rng.standard_normal((500, 64)) @ mix
    y = 0.8 * rng.standard_normal((400, 64)) @ mix + 0.3 * rng.standard_normal((400, 64)) + 0.5
    mu1, sigma1 = evaluate.feature_statistics(x)
    mu2, sigma2 = evaluate.feature_statistics(y)
    want = calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
    got = evaluate.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert want > 10
    assert got == pytest.approx(want, rel=1e-8)


def test_frechet_distance_of_a_sample_to_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((100, 256)) ** 2  # fewer samples than dimensions: rank-99 covariance
    mu, sigma = evaluate.feature_statistics(x)
    assert np.linalg.matrix_rank(sigma) < 256
    fd = evaluate.frechet_distance(mu, sigma, mu, sigma)
    assert abs(fd) < 1e-6 * np.trace(sigma)
    shifted = evaluate.frechet_distance(mu, sigma, mu + 0.5, sigma)
    assert shifted == pytest.approx(0.25 * 256, rel=1e-6)


def test_frechet_distance_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        evaluate.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------
# Inception-V3 against pytorch-fid

def random_fid_inception_state(seed=0):
    """A state dict in the layout of pytorch-fid's weight file (torchvision's Inception3 with 1008
    classes, no aux head), built without any download, with random convolutions (He-scaled, so the
    activations keep their size through 94 layers) and random batch-norm statistics."""
    from pytorch_fid.inception import _inception_v3

    torch.manual_seed(seed)
    state = _inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.normal_(0, math.sqrt(2 / value[0].numel()))
        elif key.endswith("bn.weight") or key.endswith("bn.running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("bn.bias") or key.endswith("bn.running_mean"):
            value.normal_(0, 0.2)
    return state


def test_inception_matches_pytorch_fid(monkeypatch, tmp_path):
    import pytorch_fid.inception as pfid

    state = random_fid_inception_state()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)
    # pytorch-fid builds torchvision's Inception3 (weights=None, no download), swaps in its FID blocks
    # and then fetches the weight file: hand it our random state dict instead, loaded strictly.
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *args, **kwargs: state)
    ref = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    ours = evaluate.load_inception(path)

    # The same 299 x 299 image: ours takes [0, 255], pytorch-fid takes [0, 1] and maps it to [-1, 1]
    # itself (its bilinear resize to 299 is the identity at this size).
    torch.manual_seed(1)
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        want = ref(x / 255)[0].flatten(1)  # (2, 2048)
        got = ours(x)  # (2, 2048)
    assert got.shape == (2, 2048)
    assert want.abs().max() > 0.1 and want.std() > 0.01
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    assert not torch.allclose(got[0], got[1], rtol=1e-2)


def test_load_inception_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.half() for k, v in random_fid_inception_state().items()}
    save_file(state, tmp_path / "inception.safetensors")
    model = evaluate.load_inception(tmp_path / "inception.safetensors")
    loaded = model.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], state[k].float()) for k in loaded)


def test_load_inception_is_strict_and_names_keys(tmp_path):
    state = evaluate.InceptionV3().state_dict()
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    state["Mixed_8a.conv.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(LoadError, match="Mixed_6b.branch7x7_2.bn.running_var") as err:
        evaluate.load_inception(path)
    assert "Mixed_8a.conv.weight" in str(err.value)

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="garbage.pth"):
        evaluate.load_inception(tmp_path / "garbage.pth")
    with pytest.raises(LoadError, match="not found"):
        evaluate.load_inception(tmp_path / "missing.pth")


def test_inception_download_failure_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(LoadError) as err:
        evaluate.load_inception()
    message = str(err.value)
    assert "\n" not in message and evaluate.FID_WEIGHTS_URL in message and "--inception PATH" in message


def test_inception_features_batches_pil_images():
    torch.manual_seed(0)
    model = evaluate.InceptionV3().eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    feats = evaluate.inception_features(model, iter(images), batch_size=1)
    with torch.no_grad():
        want = model(torch.stack([evaluate.inception_resize(img) for img in images]))
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(feats).max())


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
    whole = evaluate.precision_recall(real, fake, k=3, batch_size=1000)
    for batch_size in (5, 32):
        assert evaluate.precision_recall(real, fake, k=3, batch_size=batch_size) == whole
    assert whole == pytest.approx(want, abs=1e-9)
    assert evaluate.precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=5, batch_size=16) == \
        pytest.approx(brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), k=5), abs=1e-9)


def test_precision_recall_known_cases():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 16))
    assert evaluate.precision_recall(x, x, batch_size=8) == (1.0, 1.0)
    assert evaluate.precision_recall(x, x + 100.0, batch_size=8) == (0.0, 0.0)
    # a generated set collapsed onto one real image: fully precise, recall of that one image only
    collapsed = x[0] + 1e-3 * rng.standard_normal((6, 16))
    assert evaluate.precision_recall(x, collapsed, batch_size=8) == (1.0, 1 / 50)
    with pytest.raises(ValueError, match="more than 3 samples"):
        evaluate.precision_recall(x, x[:3])


# ---------------------------------------------------------------------------------------------
# Preprocessing

def test_center_crop_resize_crops_the_centre_and_resizes_to_256():
    landscape = np.zeros((512, 768, 3), np.uint8)
    landscape[:, 128:640] = (200, 37, 91)  # the centre square; black margins that must be cut away
    out = evaluate.center_crop_resize(Image.fromarray(landscape))
    assert out.size == (256, 256) and out.mode == "RGB"
    assert (np.asarray(out) == (200, 37, 91)).all()

    portrait = Image.fromarray(np.zeros((300, 200), np.uint8))  # greyscale in, RGB out
    assert evaluate.center_crop_resize(portrait, size=64).size == (64, 64)
    assert evaluate.center_crop_resize(portrait).mode == "RGB"


def test_center_crop_offsets_are_exact_when_no_resize_is_needed():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (256, 301, 3), dtype=np.uint8)  # odd margin of 45: 22 left, 23 right
    np.testing.assert_array_equal(np.asarray(evaluate.center_crop_resize(Image.fromarray(wide))), wide[:, 22:278])
    tall = rng.integers(0, 256, (260, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(evaluate.center_crop_resize(Image.fromarray(tall))), tall[2:258])


def test_inception_resize_is_clean_fid_bicubic_without_quantisation():
    ramp = np.tile(np.linspace(0, 255, 256).astype(np.uint8)[None, :, None], (256, 1, 3))
    ramp[:, :, 1] = ramp[:, ::-1, 1]
    img = Image.fromarray(ramp)
    x = evaluate.inception_resize(img)
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 255
    quantised = np.asarray(img.resize((299, 299), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(x.numpy() - quantised).max() <= 0.5 + 1e-3  # same filter, only PIL's rounding differs
    assert (x.numpy() != np.round(x.numpy())).mean() > 0.5  # float values kept
    flat = evaluate.inception_resize(Image.new("RGB", (256, 256), (12, 200, 255)))
    assert torch.equal(flat, torch.tensor([12.0, 200.0, 255.0])[:, None, None].expand(3, 299, 299))


# ---------------------------------------------------------------------------------------------
# Statistics cache

def test_statistics_cache_round_trip_and_fingerprint(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((40, 8)).astype(np.float32)
    fingerprint = evaluate.preprocessing_hash(reference="coco2014-val-30k")
    assert fingerprint != evaluate.preprocessing_hash(reference="coco2017-val-5k")
    assert fingerprint == evaluate.preprocessing_hash(reference="coco2014-val-30k")
    path = tmp_path / "ref.npz"
    evaluate.save_statistics(path, feats, fingerprint)
    assert os.listdir(tmp_path) == ["ref.npz"]
    stats = evaluate.load_statistics(path, fingerprint)
    mu, sigma = evaluate.feature_statistics(feats)
    assert stats["count"] == 40 and stats["fingerprint"] == fingerprint
    np.testing.assert_array_equal(stats["mu"], mu)
    np.testing.assert_array_equal(stats["sigma"], sigma)
    np.testing.assert_array_equal(stats["features"], feats)
    with pytest.raises(LoadError, match="another preprocessing"):
        evaluate.load_statistics(path, evaluate.preprocessing_hash())
    with pytest.raises(LoadError, match="not found"):
        evaluate.load_statistics(tmp_path / "missing.npz", fingerprint)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(LoadError, match="cannot read"):
        evaluate.load_statistics(tmp_path / "bad.npz", fingerprint)
