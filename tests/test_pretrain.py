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


def test_pretrain_controlnet_writes_a_controlnet_that_diffusers_and_the_protocol_read(tmp_path):
    """`wadi.py pretrain --controlnet` for a few steps, then `evaluate.py --toy-controlnet` end to end on 8 samples
    (the teacher standing in for the student)."""
    from diffusers import ControlNetModel
    import evaluate
    import toy
    import wadi
    from controlnet import load_controlnet
    out = tmp_path / "controlnet"
    assert wadi.main(["pretrain", "--backbone", "toy", "--controlnet", "--out", str(out), "--steps", "3",
                      "--batch-size", "4"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pipe = load_pipeline("toy")
    ours = load_controlnet(str(out), pipe.unet, pipe.downsampling())
    assert ours.controlnet_mid_block.weight.abs().max() > 0  # trained away from its zero start
    ref = ControlNetModel.from_pretrained(str(out)).float().eval()
    x, t, context = torch.randn(2, 3, 32, 32), torch.tensor([10, 999]), pipe.encode_prompts(["a small red cross", ""]).embeds
    masks = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = ref(x, t, context, masks, return_dict=False), ours(x, t, context, masks)
    for a, b in zip([*got[0], got[1]], [*expected[0], expected[1]]):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-7

    teacher = os.path.join(BACKBONES["toy"].repo, "unet", "diffusion_pytorch_model.safetensors")
    assert evaluate.main(["--toy-controlnet", "--student", teacher, "--controlnet", str(out), "--num", "8",
                          "--out", str(tmp_path / "eval")]) == 0
    with open(tmp_path / "eval" / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["protocol"]["n"] == 8 and set(metrics["results"]) == set(toy.CONTROL_GENERATORS)
    results = metrics["results"]
    assert results["student_1_controlnet"] == results["teacher_1_controlnet"]  # the same network
    assert all(0 <= r[k] <= 1 for r in results.values() for k in ("position", "attributes"))
    from PIL import Image
    assert Image.open(tmp_path / "eval" / "grid.png").size == (8 * 32, 5 * 32)  # mask and four generators


def test_the_shipped_toy_controlnet_is_what_pretraining_writes():
    """assets/toy/controlnet: the teacher's encoder half with pretrain.py's conditioning embedding, in fp16."""
    from controlnet import load_controlnet
    repo = BACKBONES["toy"].repo
    with open(os.path.join(repo, "controlnet", "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(repo, "unet", "config.json")) as f:
        unet_config = json.load(f)
    assert config["conditioning_embedding_out_channels"] == list(pretrain.CONTROLNET_EMBEDDING)
    assert {k: v for k, v in config.items() if k in unet_config and k != "_class_name"} == {
        k: v for k, v in unet_config.items() if k not in ("_class_name", "up_block_types", "out_channels")}
    pipe = load_pipeline("toy")
    controlnet = load_controlnet(os.path.join(repo, "controlnet"), pipe.unet, pipe.downsampling())
    assert controlnet.controlnet_mid_block.weight.any()


def test_pretrain_command_routes_to_the_teacher_or_the_controlnet(monkeypatch, tmp_path):
    """New run directories by default (never the shipped assets), each with its own step and batch defaults."""
    import wadi
    calls = []
    monkeypatch.setattr(pretrain, "pretrain_toy", lambda *a, **k: calls.append(("teacher", a, k)))
    monkeypatch.setattr(pretrain, "pretrain_toy_controlnet", lambda *a, **k: calls.append(("controlnet", a, k)))
    monkeypatch.chdir(tmp_path)
    repo = BACKBONES["toy"].repo
    assert wadi.main(["pretrain", "--backbone", "toy"]) == 0
    assert wadi.main(["pretrain", "--backbone", "toy", "--controlnet", "--steps", "7"]) == 0
    assert calls == [("teacher", (os.path.join("runs", "pretrain-toy"),),
                      {"steps": 1500, "batch_size": 32, "lr": 1e-3, "seed": 0}),
                     ("controlnet", (os.path.join("runs", "pretrain-toy-controlnet"), repo),
                      {"steps": 7, "batch_size": 16, "lr": 1e-3, "seed": 0})]
