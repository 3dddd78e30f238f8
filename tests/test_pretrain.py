"""The toy teachers' pretraining (pretrain.py) writes repositories the loaders read: the toy in SD's layout,
the toy DiT in PixArt's (read by diffusers and transformers too)."""
import inspect
import json
import os

import pytest
import torch

import pretrain
import toy
import toyeval
from pipeline import BACKBONES, load_pipeline
from t5 import T5Tokenizer


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


def test_pretrain_toy_dit_writes_a_pixart_repo_that_diffusers_and_transformers_read(tmp_path):
    """A few steps of `pretrain_toy_dit`: PixArt's folders, the transformer read by diffusers'
    PixArtTransformer2DModel and the encoder by transformers' T5EncoderModel (strict, equal outputs), the
    SentencePiece tokenizer by transformers' T5Tokenizer (equal ids), and our pipeline generating from it."""
    import transformers
    from diffusers import PixArtTransformer2DModel
    out, cache = str(tmp_path / "toy-dit"), str(tmp_path / "cache")
    pretrain.pretrain_toy_dit(out, steps=3, batch_size=4, eval_samples=16, cache_dir=cache, log=lambda *a: None)
    for f in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
              "text_encoder/model.safetensors", "tokenizer/spiece.model", "scheduler/scheduler_config.json",
              "classifier/model.safetensors", "teacher_metrics.json"):
        assert os.path.isfile(os.path.join(out, f)), f
    with open(os.path.join(out, "teacher_metrics.json")) as f:
        assert json.load(f)["protocol"]["n"] == 16
    pipe = load_pipeline("toy-dit", out)
    assert pipe.vae is None and pipe.text_encoder is None and pipe.schedule.prediction_type == "v_prediction"
    pipe.prepare_prompts(["a large red circle at the top left", ""], cache)
    assert pipe.generate(["a large red circle at the top left"], [0], steps=2, guidance=3.0).shape == (1, 32, 32, 3)

    prompts = [toy.prompt(a) for a in toy.all_attributes()]
    ours_tok = T5Tokenizer(os.path.join(out, "tokenizer"))
    ids, mask = ours_tok(prompts)
    ref_tok = transformers.T5Tokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    expected = ref_tok(prompts, max_length=120, padding="max_length", truncation=True, return_tensors="pt")
    assert torch.equal(ids, expected.input_ids) and torch.equal(mask, expected.attention_mask)
    assert (mask.sum(1) == 9).all() and not (ids == ours_tok.specials["<unk>"]).any()  # 8 words + eos

    from pipeline import load_text_encoder
    encoder = load_text_encoder(out)
    ref_encoder = transformers.T5EncoderModel.from_pretrained(os.path.join(out, "text_encoder")).eval()
    with torch.no_grad():
        text = encoder(ids[:4], mask[:4])
        assert (text - ref_encoder(ids[:4], attention_mask=mask[:4]).last_hidden_state).abs().max() < 1e-5
        ref_dit = PixArtTransformer2DModel.from_pretrained(os.path.join(out, "transformer")).eval()
        x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 250, 500, 999])
        got = pipe.denoiser(x, t, text, encoder_attention_mask=mask[:4])
        want = ref_dit(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask[:4],
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    assert got.shape == (4, 6, 32, 32) and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_the_shipped_toy_dit_repo_has_the_pretraining_configs():
    """assets/toy-dit is what `wadi.py pretrain --backbone toy-dit` writes today."""
    repo = BACKBONES["toy-dit"].repo
    with open(os.path.join(repo, "transformer", "config.json")) as f:
        assert json.load(f) == pretrain.DIT_CONFIG
    with open(os.path.join(repo, "text_encoder", "config.json")) as f:
        assert json.load(f) == {**pretrain.T5_CONFIG, "vocab_size": len(toy.WORDS) + 3 + 100}
    with open(os.path.join(repo, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f) == pretrain.scheduler_config("v_prediction")


@pytest.mark.parametrize("backbone", toy.BACKBONES)
def test_the_shipped_teacher_figures_belong_to_the_shipped_teacher(backbone):
    """`train`'s table (512 samples) and `evaluate.py --toy` (2,048) reuse the teacher figures shipped in the
    repo instead of minutes of 25-step sampling; figures of another teacher (a stale file after a rebuild)
    would be skipped without a word, so each must carry the shipped weights' fingerprint."""
    repo = BACKBONES[backbone].repo
    weights = toyeval.teacher_fingerprint(load_pipeline(backbone, repo))
    for n in (toyeval.REPORT_SAMPLES, toyeval.PROTOCOL["n"]):
        results, path = toyeval.cached_teacher_metrics(repo, {**toyeval.PROTOCOL, "n": n}, weights)
        assert results is not None, f"{repo}: no teacher figures for {n} samples under the shipped weights"
        assert set(results) == {"teacher_25", "teacher_1"}, path


def test_pretrain_controlnet_writes_a_controlnet_that_diffusers_and_the_protocol_read(tmp_path):
    """`wadi.py pretrain --controlnet` for a few steps, then `evaluate.py --toy-controlnet` end to end on 8 samples
    (the teacher standing in for the student)."""
    from diffusers import ControlNetModel
    import evaluate
    import wadi
    from controlnet import load_controlnet
    out = tmp_path / "controlnet"
    assert wadi.main(["pretrain", "--backbone", "toy", "--controlnet", "--out", str(out), "--steps", "3",
                      "--batch-size", "4"]) == 0
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pipe = load_pipeline("toy")
    ours = load_controlnet(str(out), pipe.denoiser, pipe.downsampling())
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
    assert metrics["protocol"]["n"] == 8 and set(metrics["results"]) == set(toyeval.CONTROL_GENERATORS)
    results = metrics["results"]
    assert results["student_1_controlnet"] == results["teacher_1_controlnet"]  # the same network
    assert all(0 <= r[k] <= 1 for r in results.values() for k in ("position", "attributes"))
    from PIL import Image
    assert Image.open(tmp_path / "eval" / "grid.png").size[1] == 5 * 128  # mask and four generators, shown 4x


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
    controlnet = load_controlnet(os.path.join(repo, "controlnet"), pipe.denoiser, pipe.downsampling())
    assert controlnet.controlnet_mid_block.weight.any()


def test_pretrain_command_routes_to_the_teacher_or_the_controlnet(monkeypatch, tmp_path):
    """New run directories by default (never the shipped assets), each with its own step and batch defaults."""
    import wadi
    calls = []
    monkeypatch.setattr(pretrain, "pretrain_toy", lambda *a, **k: calls.append(("teacher", a, k)))
    monkeypatch.setattr(pretrain, "pretrain_toy_controlnet", lambda *a, **k: calls.append(("controlnet", a, k)))
    monkeypatch.setattr(pretrain, "pretrain_toy_dit", lambda *a, **k: calls.append(("dit", a, k)))
    monkeypatch.chdir(tmp_path)
    repo = BACKBONES["toy"].repo
    assert wadi.main(["pretrain", "--backbone", "toy"]) == 0
    assert wadi.main(["pretrain", "--backbone", "toy", "--controlnet", "--steps", "7"]) == 0
    assert wadi.main(["pretrain", "--backbone", "toy-dit", "--cache-dir", "c"]) == 0
    assert wadi.main(["pretrain", "--backbone", "toy-dit", "--controlnet"]) == 2
    assert calls == [("teacher", (os.path.join("runs", "pretrain-toy"),),
                      {"steps": 1500, "batch_size": 32, "lr": 1e-3, "seed": 0}),
                     ("controlnet", (os.path.join("runs", "pretrain-toy-controlnet"), repo),
                      {"steps": 7, "batch_size": 16, "lr": 1e-3, "seed": 0}),
                     ("dit", (os.path.join("runs", "pretrain-toy-dit"),),
                      {"steps": pretrain.DIT_STEPS, "batch_size": 32, "lr": 1e-3, "seed": 0, "cache_dir": "c"})]
