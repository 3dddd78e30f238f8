"""dreambench.py and openclip.load_transformers_clip: the benchmark's prompt file read as 30 subjects
and 2 x 25 prompts, CLIP-I / CLIP-T embeddings equal to transformers' CLIPModel on random weights and the
scores equal to a hand computation, and `evaluate.py --dreambooth` end to end on a tiny SD repo with the
vendored subject images (the fine-tuned teacher, and a one-step model with the run added), resumable."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dreambench
import evaluate
import wadi
from dino import load_dino
from openclip import load_open_clip_tokenizer, load_transformers_clip, open_clip_tokenize
from tests.repo import write_byte_tokenizer

DATASET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dreambooth")


def test_read_benchmark():
    classes, templates = dreambench.read_benchmark(DATASET)
    assert len(classes) == 30 and classes["cat"] == "cat" and classes["bear_plushie"] == "stuffed animal"
    assert sum(c in dreambench.LIVE_CLASSES for c in classes.values()) == 9  # cat, cat2, dog ... dog8
    assert [len(templates[k]) for k in ("object", "live")] == [25, 25]
    prompts, texts = dreambench.subject_prompts(templates["live"], "cat", "sks")
    assert prompts[0] == "a sks cat in the jungle" and texts[0] == "a cat in the jungle"
    assert prompts[-1] == "a cube shaped sks cat" and texts[13] == "a cat wearing a black top hat and a monocle"
    assert dreambench.subject_prompts(templates["object"], "toy", "sks", keep_identifier=True)[1][0] == \
        "a sks toy in the jungle"


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """A tiny transformers CLIPModel (with byte-level tokenizer files) and a tiny DINO ViT, saved by
    transformers; returns (clip dir, dino dir, the reference CLIPModel)."""
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("scorers")
    clip_dir, dino_dir = str(root / "clip"), str(root / "dino")
    text = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=16)
    ref = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    ref.save_pretrained(clip_dir)
    write_byte_tokenizer(clip_dir)
    ViTModel(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                       image_size=32, patch_size=16), add_pooling_layer=False).save_pretrained(dino_dir)
    return clip_dir, dino_dir, ref


def features(output):
    """transformers 5 returns a model output from get_*_features, 4 a tensor."""
    return output if torch.is_tensor(output) else output.pooler_output


def test_clip_matches_transformers(scorers):
    clip_dir, _, ref = scorers
    ours, tokenizer = load_transformers_clip(clip_dir), load_open_clip_tokenizer(clip_dir)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = open_clip_tokenize(tokenizer, ["a cat in the jungle", "a red sneaker", "x"], 77)
    with torch.no_grad():
        assert torch.allclose(ours.encode_image(pixels), features(ref.get_image_features(pixel_values=pixels)),
                              atol=1e-5)
        assert torch.allclose(ours.encode_text(ids), features(ref.get_text_features(input_ids=ids)), atol=1e-5)


def test_scores_against_a_hand_computation(scorers):
    clip_dir, dino_dir, _ = scorers
    clip, dino, tokenizer = load_transformers_clip(clip_dir), load_dino(dino_dir), load_open_clip_tokenizer(clip_dir)
    gen = torch.Generator().manual_seed(2)
    images = [Image.fromarray((torch.rand(40, 48, 3, generator=gen) * 255).byte().numpy()) for _ in range(5)]
    generated, real, texts = images[:3], images[3:], ["a cat", "a dog on the beach", "a cube shaped cat"]
    scores = dreambench.score_subject(generated, real, texts, dino, clip, tokenizer)
    g, r = dreambench.clip_embed(clip, generated), dreambench.clip_embed(clip, real)
    t = clip.encode_text(open_clip_tokenize(tokenizer, texts, 77))
    pairs = [F.cosine_similarity(a, b, dim=0).item() for a in g for b in r]
    assert abs(scores["clip_i"] - sum(pairs) / 6) < 1e-6
    assert abs(scores["clip_t"] - sum(F.cosine_similarity(g, t).tolist()) / 3) < 1e-6
    assert -1 <= scores["dino"] <= 1 and scores["dino"] != scores["clip_i"]
    own = dreambench.real_row(real, dino, clip)  # two real images: their one distinct pair
    assert abs(own["clip_i"] - F.cosine_similarity(r[0], r[1], dim=0).item()) < 1e-6


def test_evaluate_dreambooth_end_to_end(repo, scorers, tmp_path, capsys):
    clip_dir, dino_dir, _ = scorers
    run = str(tmp_path / "runs" / "cat")
    assert wadi.main(["dreambooth", "--model", repo, "--instance-dir", os.path.join(DATASET, "cat"),
                      "--instance-prompt", "a sks cat", "--class-prompt", "a cat", "--num-class-images", "2",
                      "--class-steps", "2", "--resolution", "16", "--steps", "2", "--out", run,
                      "--cache-dir", str(tmp_path)]) == 0
    common = ["--dreambooth", DATASET, "--runs", str(tmp_path / "runs"), "--subjects", "cat", "--per-prompt", "1",
              "--model", repo, "--resolution", "16", "--dino", dino_dir, "--clip-i", clip_dir]
    for name, extra in (("teacher", ["--steps", "2"]), ("one-step", ["--unet", os.path.join(run, "unet.safetensors")])):
        out = tmp_path / name
        assert evaluate.main([*common, *extra, "--out", str(out)]) == 0
        assert "| generated (1 subjects) |" in capsys.readouterr().out
        metrics = json.load(open(out / "metrics.json"))
        assert set(metrics["mean"]) == {"dino", "clip_i", "clip_t"}
        assert all(-1 <= v <= 1 for v in metrics["mean"].values())
        assert len([f for f in os.listdir(out / "cat") if f.endswith(".png")]) == 25
        generation = json.load(open(out / "cat" / "generation.json"))
        assert generation["steps"] == (2 if name == "teacher" else 1)
        assert generation.get("adapters") == (None if name == "teacher" else [run])
    # resumed: the scores are read back, nothing is drawn or scored again
    os.remove(tmp_path / "one-step" / "cat" / "00000.png")
    assert evaluate.main([*common, "--unet", os.path.join(run, "unet.safetensors"), "--out",
                          str(tmp_path / "one-step")]) == 0
    assert not os.path.exists(tmp_path / "one-step" / "cat" / "00000.png")
    capsys.readouterr()
    assert evaluate.main([*common[:2], "--out", str(tmp_path / "x")]) == 2
    assert "--dreambooth needs --out DIR and --runs DIR" in capsys.readouterr().err
    os.makedirs(tmp_path / "none")
    assert evaluate.main([*common, "--runs", str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "no dreambooth run for cat" in capsys.readouterr().err
    assert evaluate.main([*common[:2], "--subjects", "nope", "--runs", "r", "--out", str(tmp_path / "y"),
                          "--dino", dino_dir, "--clip-i", clip_dir]) == 2
    assert "nope not in the benchmark" in capsys.readouterr().err
