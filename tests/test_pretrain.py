"""The toy teacher's pretraining (pretrain.py) writes a repository the SD loader reads."""
import inspect
import json
import os

import pytest
import torch

import pretrain
from pipeline import BACKBONES, load_pipeline


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_pretrain_writes_a_loadable_repo(tmp_path, prediction_type):
    out = str(tmp_path / "toy")
    pretrain.pretrain_toy(out, steps=3, batch_size=8, classifier_steps=2, eval_samples=16,
                          prediction_type=prediction_type, log=lambda *a: None)
    for f in ("unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "tokenizer/vocab.json", "scheduler/scheduler_config.json", "classifier/model.safetensors"):
        assert os.path.isfile(os.path.join(out, f)), f
    assert not os.path.exists(os.path.join(out, "vae"))  # pixel space
    with open(os.path.join(out, "teacher_metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["protocol"]["n"] == 16 and set(metrics["results"]) == {"teacher_25", "teacher_1"}
    pipe = load_pipeline("toy", out)
    assert pipe.vae is None and pipe.latent_shape() == (3, 32, 32)
    assert pipe.schedule.prediction_type == prediction_type
    images = pipe.generate(["a large red circle at the top left"], [0], steps=2, guidance=3.0)
    assert images.shape == (1, 32, 32, 3) and images.dtype.name == "uint8"
    assert torch.isfinite(pipe.encode_prompts([""]).embeds).all()


def test_the_shipped_toy_repo_has_the_pretraining_configs():
    """assets/toy is what `wadi.py pretrain` writes today: the same U-Net config and prediction type."""
    repo = BACKBONES["toy"].repo
    with open(os.path.join(repo, "unet", "config.json")) as f:
        assert json.load(f) == pretrain.UNET_CONFIG
    with open(os.path.join(repo, "scheduler", "scheduler_config.json")) as f:
        recipe = inspect.signature(pretrain.pretrain_toy).parameters["prediction_type"].default
        assert json.load(f)["prediction_type"] == recipe == "v_prediction"
