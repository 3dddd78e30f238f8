"""DINO ViT-S/16 (dino.py) against transformers' ViTModel and ViTImageProcessor (PIL backend) with the
settings of the Hub repo facebook/dino-vits16: random full-size weights saved as transformers saves
them and read back by our loader, key sets and parameter counts, the preprocessing, the score."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import ViTConfig, ViTModel
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from dino import DINO, DINO_VITS16, dino_embed, dino_score, load_dino, mean_cosine, preprocess, vit_key
from loading import LoadError
from tests.conftest import randomize

# the Hub repo's preprocessor_config.json (after its "Fix image mean and std" commit)
HUB_PREPROCESSOR = {"do_normalize": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
                    "image_std": [0.229, 0.224, 0.225], "resample": 2, "size": 224}
VITS16_PARAMS = 21_665_664  # without transformers' pooler (384 * 384 + 384 = 147,840 more)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A transformers ViTModel of the ViT-S/16 config with a pooler, random weights, saved by
    save_pretrained (the Hub's key names), and our model loaded from that directory."""
    torch.manual_seed(0)
    ref = randomize(ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=True), 0.05).eval()
    directory = tmp_path_factory.mktemp("dino-vits16")
    ref.save_pretrained(directory)
    return ref, load_dino(str(directory)), str(directory)


def test_matches_transformers_vit(reference):
    ref, ours, directory = reference
    file = load_file(os.path.join(directory, "model.safetensors"))
    assert "pooler.dense.weight" in file and "encoder.layer.11.attention.attention.query.weight" in file
    assert {vit_key(k) for k in ours.state_dict()} == file.keys() - {"pooler.dense.weight", "pooler.dense.bias"}
    assert sum(p.numel() for p in ours.parameters()) == VITS16_PARAMS
    assert sum(p.numel() for p in ref.parameters()) == VITS16_PARAMS + 384 * 384 + 384
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state[:, 0]
        got = ours(pixels)
    assert got.shape == (2, 384) and expected.std() > 0.3
    assert (got - expected).abs().max() < 1e-5


def test_full_size_on_meta_without_pooler():
    """The Hub file has no pooler (86.7 MB = 21.67 M fp32 values): a ViTModel without one has our count
    and tensor shapes (transformers 5 names its modules otherwise at run time and renames on save, so the
    key sets are compared on the saved file, above)."""
    with torch.device("meta"):
        ref = ViTModel(ViTConfig(**DINO_VITS16), add_pooling_layer=False)
        ours = DINO.from_config(DINO_VITS16)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters()) == VITS16_PARAMS
    shapes = sorted(tuple(v.shape) for v in ours.state_dict().values())
    assert shapes == sorted(tuple(v.shape) for v in ref.state_dict().values())


def test_preprocess_matches_vit_image_processor():
    processor = ViTImageProcessorPil(**HUB_PREPROCESSOR)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 257, 3), dtype=np.uint8),
              rng.integers(0, 256, (181, 413, 3), dtype=np.uint8)]
    expected = processor(images, return_tensors="pt").pixel_values
    got = preprocess(images)
    assert got.shape == expected.shape == (2, 3, 224, 224)
    assert (got - expected).abs().max() < 1e-5
    # float images in [0, 1] are rounded to uint8 first, as saving them to PNG would
    floats = torch.from_numpy(np.stack([images[0], images[0]]).astype(np.float32) / 255)
    assert (preprocess(floats) - expected[:1]).abs().max() < 1e-5


def test_embed_matches_processor_and_vit(reference):
    ref, ours, _ = reference
    images = np.random.default_rng(1).integers(0, 256, (3, 240, 320, 3), dtype=np.uint8)
    pixels = ViTImageProcessorPil(**HUB_PREPROCESSOR)(list(images), return_tensors="pt").pixel_values
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state[:, 0]
    got = dino_embed(ours, images, batch_size=2)
    assert (got - expected).abs().max() < 1e-5


def test_dino_score(reference):
    _, ours, _ = reference
    image = np.random.default_rng(2).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert dino_score(ours, [image] * 2, [image] * 3) == pytest.approx(1.0, abs=1e-6)
    a, b = torch.randn(3, 384), torch.randn(4, 384) + 0.3
    pairs = [float(x @ y) / (float(x.norm()) * float(y.norm())) for x in a for y in b]
    assert mean_cosine(a, b) == pytest.approx(sum(pairs) / len(pairs), abs=1e-6)
    assert mean_cosine(a, b) != pytest.approx(mean_cosine(a, a), abs=1e-3)


def test_loader_errors(reference, tmp_path):
    _, _, directory = reference
    state = load_file(os.path.join(directory, "model.safetensors"))
    del state["encoder.layer.3.output.dense.bias"]
    save_file(state, tmp_path / "model.safetensors")
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"1 missing keys \(encoder\.layer\.3\.output\.dense\.bias\)") as e:
        load_dino(str(tmp_path))
    assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, qkv_bias=False)))
    with pytest.raises(LoadError, match="qkv_bias"):
        load_dino(str(tmp_path))
