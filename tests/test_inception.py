"""Tests of inception.py: the FID Inception network against pytorch-fid on random weights, its weight
loading (pickle, safetensors, strict keys, download failure), batching and its input resize. pytorch-fid
and torchvision are test-only dependencies."""
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

import inception
from loading import LoadError
from tests.conftest import random_fid_inception_state


# ---------------------------------------------------------------------------------------------
# Inception-V3 against pytorch-fid


def test_inception_matches_pytorch_fid(monkeypatch, tmp_path):
    import pytorch_fid.inception as pfid

    state = random_fid_inception_state()
    path = tmp_path / "pt_inception-random.pth"
    torch.save(state, path)
    # pytorch-fid builds torchvision's Inception3 (weights=None, no download), swaps in its FID blocks
    # and then fetches the weight file: hand it our random state dict instead, loaded strictly.
    monkeypatch.setattr(pfid, "load_state_dict_from_url", lambda *args, **kwargs: state)
    ref = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], use_fid_inception=True).eval()
    ours = inception.load_inception(path)

    # The same 299 x 299 image: ours takes [0, 255] and scales it as clean-fid does, (x - 128) / 128;
    # pytorch-fid takes y in [0, 1] and feeds 2 y - 1, so y = (x - 128) / 256 + 1 / 2 gives the network the
    # same input (its bilinear resize to 299 is the identity at this size).
    torch.manual_seed(1)
    x = torch.rand(2, 3, 299, 299) * 255
    with torch.no_grad():
        want = ref((x - 128) / 256 + 0.5)[0].flatten(1)  # (2, 2048)
        got = ours(x)  # (2, 2048)
        pytorch_fid_input = ref(x / 255)[0].flatten(1)  # pytorch-fid's own scaling of the same image
    assert got.shape == (2, 2048)
    assert want.abs().max() > 0.1 and want.std() > 0.01
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
    assert not torch.allclose(got[0], got[1], rtol=1e-2)
    assert ((got - pytorch_fid_input).abs().max() / want.abs().max()).item() > 1e-3  # the scalings differ


def test_inception_input_is_clean_fids():
    """clean-fid's InceptionV3W feeds the TF graph (x - 128) / 128 of the resized [0, 255] image: the first
    convolution of ours sees exactly that."""
    seen = []
    model = inception.InceptionV3().eval()
    model.Conv2d_1a_3x3.conv.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    x = torch.tensor([0.0, 128.0, 255.0]).view(1, 3, 1, 1).expand(1, 3, 299, 299)
    with torch.no_grad():
        model(x)
    assert seen[0][0, :, 0, 0].tolist() == [-1.0, 0.0, 127 / 128]


def test_load_inception_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.half() for k, v in random_fid_inception_state().items()}
    save_file(state, tmp_path / "inception.safetensors")
    model = inception.load_inception(tmp_path / "inception.safetensors")
    loaded = model.state_dict()
    assert loaded.keys() == {k for k in state if not k.startswith("fc.") and "num_batches_tracked" not in k}
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], state[k].float()) for k in loaded)


def test_load_inception_is_strict_and_names_keys(tmp_path):
    state = inception.InceptionV3().state_dict()
    del state["Mixed_6b.branch7x7_2.bn.running_var"]
    state["Mixed_8a.conv.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(LoadError, match="Mixed_6b.branch7x7_2.bn.running_var") as err:
        inception.load_inception(path)
    assert "Mixed_8a.conv.weight" in str(err.value)

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="garbage.pth"):
        inception.load_inception(tmp_path / "garbage.pth")
    with pytest.raises(LoadError, match="not found"):
        inception.load_inception(tmp_path / "missing.pth")


def test_inception_download_failure_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(LoadError) as err:
        inception.load_inception()
    message = str(err.value)
    assert "\n" not in message and inception.FID_WEIGHTS_URL in message and "--inception PATH" in message


def test_inception_features_batches_pil_images():
    torch.manual_seed(0)
    model = inception.InceptionV3().eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(2)]
    feats = inception.inception_features(model, iter(images), batch_size=1)
    with torch.no_grad():
        want = model(torch.stack([inception.inception_resize(img) for img in images]))
    assert feats.shape == (2, 2048) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-4, atol=1e-5 * np.abs(feats).max())


def test_inception_resize_is_clean_fid_bicubic_without_quantisation():
    ramp = np.tile(np.linspace(0, 255, 256).astype(np.uint8)[None, :, None], (256, 1, 3))
    ramp[:, :, 1] = ramp[:, ::-1, 1]
    img = Image.fromarray(ramp)
    x = inception.inception_resize(img)
    assert x.shape == (3, 299, 299) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 255
    quantised = np.asarray(img.resize((299, 299), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    assert np.abs(x.numpy() - quantised).max() <= 0.5 + 1e-3  # same filter, only PIL's rounding differs
    assert (x.numpy() != np.round(x.numpy())).mean() > 0.5  # float values kept
    flat = inception.inception_resize(Image.new("RGB", (256, 256), (12, 200, 255)))
    assert torch.equal(flat, torch.tensor([12.0, 200.0, 255.0])[:, None, None].expand(3, 299, 299))
