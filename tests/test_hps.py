"""hps.py against its references on random weights: the ViT-H-14-layout towers against open_clip_torch, the
image transform and the score against the `hpsv2` package's own scorer (test-only, requirements-dev.txt);
then the HPD v2 protocol of `evaluate.py --hps` end to end on a tiny SD repository, a tiny random HPS
checkpoint and a handful of prompts per style: images, table, metrics.json, resume, --images, errors."""
import contextlib
import hashlib
import importlib
import importlib.util
import io
import json
import os
import shutil
import sys
import types
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import evaluate
import hps
import wadi
from openclip import VIT_H_14
from tests.repo import write_tiny_sd_repo
from tests.conftest import random_ids, relative_error, run_evaluate, write_clip_vocab

# ViT-H-14's layout, shrunk: head width 80 -> 20, patch 14 (4 x 4 patches), a text tower narrower than the
# vision tower, GELU, mlp_ratio 4
SMALL_H = {"embed_dim": 16,
           "vision_cfg": {"image_size": 56, "layers": 2, "width": 40, "head_width": 20, "patch_size": 14},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
# the CLIP BPE that open_clip_torch ships and the hpsv2 1.2.0 wheel lacks (the same bytes as in hpsv2's sources)
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
PROMPTS = {"anime": ["a girl with blue hair, anime style", "a cat samurai", "a dragon over a city at night"],
           "concept-art": ["a floating castle, concept art", "a robot in a desert"],
           "paintings": ["a lighthouse in a storm, oil painting", "sunflowers in a vase", "a portrait of an old man"],
           "photo": ["a red car on a mountain road", "a bowl of ramen on a wooden table"]}


def randomised(model, seed=0):
    """Every parameter (LayerNorms, embeddings, projections) moved off its initial value."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def hpsv2_img_score():
    """The hpsv2 package's scoring module, hpsv2.img_score. Its 1.2.0 wheel lacks the CLIP BPE file that its
    tokenizer module opens at import (src/open_clip/bpe_simple_vocab_16e6.txt.gz); open_clip_torch ships
    the same file, so, when it is missing, hpsv2's own tokenizer.py is run with open_clip's folder as its
    location. Nothing else of the package is touched."""
    package = os.path.dirname(importlib.util.find_spec("hpsv2").origin)
    if not os.path.isfile(os.path.join(package, "src", "open_clip", "bpe_simple_vocab_16e6.txt.gz")) and \
            "hpsv2.src.open_clip.tokenizer" not in sys.modules:
        bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
        with open(bpe, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == BPE_SHA256
        source = os.path.join(package, "src", "open_clip", "tokenizer.py")
        module = types.ModuleType("hpsv2.src.open_clip.tokenizer")
        module.__file__ = os.path.join(os.path.dirname(bpe), "tokenizer.py")
        with open(source) as f:
            exec(compile(f.read(), source, "exec"), module.__dict__)
        sys.modules[module.__name__] = module
    return importlib.import_module("hpsv2.img_score")


def write_hps_folder(directory, state, cfg, version="2.1"):
    """A local HPS folder: the checkpoint as the releases pickle it ({"state_dict": ..., plus other entries}),
    open_clip_config.json with the network's config, and the CLIP BPE. Returns the checkpoint's path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, hps.HPS_FILES[version])
    torch.save({"state_dict": state, "epoch": 1, "name": "test"}, path)
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f)
    write_clip_vocab(directory)
    return path


def write_prompts(directory, prompts=PROMPTS):
    os.makedirs(directory, exist_ok=True)
    for style, texts in prompts.items():
        with open(os.path.join(directory, f"{style}.json"), "w") as f:
            json.dump(texts, f)
    return str(directory)


def test_hpsv2_builds_vit_h_14():
    """The package's copy of open_clip's model configs has the ViT-H-14 of openclip.py (whose parameter count
    tests/test_openclip.py checks against open_clip's)."""
    package = os.path.dirname(importlib.util.find_spec("hpsv2").origin)
    with open(os.path.join(package, "src", "open_clip", "model_configs", "ViT-H-14.json")) as f:
        assert json.load(f) == VIT_H_14


def test_towers_match_open_clip_from_an_hps_checkpoint(tmp_path):
    torch.manual_seed(0)
    ref = randomised(open_clip.CLIP(**SMALL_H))
    path = write_hps_folder(tmp_path, ref.state_dict(), SMALL_H)
    ours, _, file = hps.load_hps(path, "2.1")
    assert file == path and ours.config.vision.num_attention_heads == 2 and not ours.logit_scale.requires_grad
    generator = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(4, 3, 56, 56, generator=generator), random_ids(4, generator)
    with torch.no_grad():
        errors = (relative_error(ours.encode_image(pixels), ref.encode_image(pixels)),
                  relative_error(ours.encode_text(ids), ref.encode_text(ids)))
    assert max(errors) < 1e-5, errors


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The hpsv2 package's model at SMALL_H, built as its scorer builds ViT-H-14 (create_model_and_transforms,
    precision "amp", light_augmentation), random weights saved as an HPS checkpoint, and its scorer module
    primed with this model so that it downloads nothing."""
    img_score = hpsv2_img_score()
    from hpsv2.src.open_clip import create_model_and_transforms, factory
    root = tmp_path_factory.mktemp("hps-ref")
    with open(root / "HPS-small.json", "w") as f:
        json.dump(SMALL_H, f)
    factory.add_model_config(root / "HPS-small.json")
    torch.manual_seed(0)
    model, _, preprocess_val = create_model_and_transforms(
        "HPS-small", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False,
        with_region_predictor=False)
    path = write_hps_folder(str(root / "hps"), randomised(model).state_dict(), SMALL_H)
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    img_score.root_path = str(root / "hpsv2-cache")
    return SimpleNamespace(img_score=img_score, preprocess=preprocess_val, path=path, root=root)


def test_preprocess_matches_hpsv2(reference):
    rng = np.random.default_rng(0)
    # landscape, portrait, odd paddings, down- and upscaling, exactly square at the size, greyscale, palette
    for w, h, mode in [(96, 61, "RGB"), (45, 100, "RGB"), (57, 57, "RGB"), (30, 21, "RGB"), (56, 56, "RGB"),
                       (64, 80, "L"), (77, 50, "P")]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
        got, want = hps.letterbox_image(img, 56), reference.preprocess(img)
        assert got.shape == want.shape == (3, 56, 56) and got.dtype == torch.float32
        assert (got - want).abs().max().item() < 1e-6, (w, h, mode)


def test_score_matches_hpsv2(reference, tmp_path):
    rng = np.random.default_rng(1)
    sizes = [(96, 61), (45, 100), (56, 56), (30, 21), (200, 120)]
    paths = []
    for i, (w, h) in enumerate(sizes):
        low = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3))  # smooth colour fields plus noise
        pixels = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), float)
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((pixels + rng.normal(0, 20, pixels.shape)).clip(0, 255).astype(np.uint8)).save(paths[-1])
    prompts = ["a photo of a cat", "Walter White dressed as a medieval-style king.", "",
               "A serene meadow with a tree, river, bridge, and mountains in the background under a slightly "
               "overcast sunrise sky, " * 3, "two dogs playing in the snow, 4k"]
    want = np.array([100 * reference.img_score.score(p, t, cp=reference.path)[0] for p, t in zip(paths, prompts)])
    model, tokenizer, _ = hps.load_hps(reference.path, "2.1")
    got = hps.hps_scores(model, tokenizer, paths, prompts, batch_size=2, show=False)
    assert got.dtype == np.float64 and got.shape == (5,)
    assert np.abs(want).max() > 5 and np.ptp(want) > 5  # a real test: cosines far from zero and from each other
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-5


def test_style_score_is_the_mean_of_80_prompt_chunks():
    scores = np.random.default_rng(2).normal(27, 2, 170)  # chunks of 80, 80 and 10
    means = [scores[:80].mean(), scores[80:160].mean(), scores[160:].mean()]
    assert hps.style_score(scores) == pytest.approx((np.mean(means), np.std(means)), rel=1e-12)
    assert hps.style_score(scores[:160])[0] == pytest.approx(scores[:160].mean(), rel=1e-12)  # whole chunks
    assert hps.style_score(scores[:7]) == pytest.approx((scores[:7].mean(), 0.0))


def test_benchmark_prompts(tmp_path, capsys):
    directory = write_prompts(tmp_path / "prompts")
    assert hps.benchmark_prompts(directory) == PROMPTS
    assert evaluate.main(["--hps", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --hps needs --hps-prompts DIR: the HPD v2 benchmark "
                                                   "prompts are the Hugging Face dataset zhwang/HPDv2's benchmark/")
    (tmp_path / "prompts" / "photo.json").write_text(json.dumps({"prompts": ["a cat"]}))
    with pytest.raises(hps.LoadError, match="photo.json is not a JSON list of prompt strings"):
        hps.benchmark_prompts(directory)
    os.remove(tmp_path / "prompts" / "photo.json")
    with pytest.raises(hps.LoadError, match="photo.json not found: the HPD v2 benchmark prompts are"):
        hps.benchmark_prompts(directory)


# ---------------------------------------------------------------------------------------------
# The protocol end to end

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps-eval")
    repo = write_tiny_sd_repo(str(root / "tiny-sd"))
    torch.manual_seed(1)
    checkpoint = write_hps_folder(str(root / "hps"), randomised(open_clip.CLIP(**SMALL_H), 1).state_dict(), SMALL_H)
    return SimpleNamespace(root=root, repo=repo, checkpoint=checkpoint, prompts=write_prompts(root / "prompts"),
                           unet=os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"))


def hps_args(env, out, *extra):
    return ["--hps", env.checkpoint, "--hps-prompts", env.prompts, "--batch-size", "4", "--out", str(out), *extra]


def generate_args(env):
    return ["--model", env.repo, "--unet", env.unet, "--resolution", "32"]


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def first(env):
    out, stdout = env.root / "run", io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert evaluate.main(hps_args(env, out, *generate_args(env))) == 0
    return SimpleNamespace(out=str(out), metrics=read_metrics(out), stdout=stdout.getvalue())


def test_full_run_writes_images_table_and_metrics(env, first):
    m, images = first.metrics, os.path.join(first.out, "images")
    assert sorted(os.listdir(images)) == sorted(hps.STYLES)
    for style, prompts in PROMPTS.items():
        files = sorted(os.listdir(os.path.join(images, style)))
        assert files == [f"{i:05d}.png" for i in range(len(prompts))] + ["generation.json"]
        assert all(Image.open(os.path.join(images, style, f)).size == (32, 32) for f in files[:-1])
        assert m["generator"][style]["captions_sha256"] == m["styles"][style]["prompts_sha256"] == \
            hashlib.sha256("".join(p + "\n" for p in prompts).encode()).hexdigest()
    assert m["protocol"] == "hpdv2" and m["hps_version"] == "2.1" and m["images"] == 10 and m["generated_now"] == 10
    assert m["generator"]["photo"]["unet"] == env.unet and m["checkpoint_file"] == env.checkpoint

    # the figures, from the images on disk
    model, tokenizer, _ = hps.load_hps(env.checkpoint, "2.1")
    scores = {s: hps.hps_scores(model, tokenizer, [os.path.join(images, s, f"{i:05d}.png") for i in range(len(p))],
                                p, show=False) for s, p in PROMPTS.items()}
    for style in PROMPTS:
        # 1e-4 on the scale of 100 x cosine: batches of other sizes round differently
        assert m["styles"][style]["hps"] == pytest.approx(scores[style].mean(), abs=1e-4)
        assert m["styles"][style]["std"] == 0.0 and m["styles"][style]["images"] == len(PROMPTS[style])
    assert m["hps"] == pytest.approx(np.concatenate(list(scores.values())).mean(), abs=1e-4)
    assert np.ptp(np.concatenate(list(scores.values()))) > 1  # the images and prompts are told apart
    lines = first.stdout.splitlines()
    assert f"  concept-art  {m['styles']['concept-art']['hps']:>6.2f}  0.0000" in lines
    assert lines[-1] == f"  average      {m['hps']:>6.2f}"

    # image i of a style is what `wadi.py sample --seed i` draws for prompt i of that style
    sample = str(env.root / "sample.png")
    assert wadi.main(["sample", *generate_args(env), "--prompt", PROMPTS["paintings"][2], "--seed", "2",
                      "--out", sample]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(sample)),
                                  np.asarray(Image.open(os.path.join(images, "paintings", "00002.png"))))


def test_rerun_generates_only_what_is_missing(env, first, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(first.out, out)
    photo = out / "images" / "photo"
    before = {p: os.stat(p).st_mtime_ns for p in (out / "images").glob("*/*.png")}
    os.remove(photo / "00001.png")
    assert evaluate.main(hps_args(env, out, *generate_args(env))) == 0
    m = read_metrics(out)
    assert m["generated_now"] == 1 and os.path.isfile(photo / "00001.png")
    assert {p: os.stat(p).st_mtime_ns for p in before if p != photo / "00001.png"} == \
        {p: t for p, t in before.items() if p != photo / "00001.png"}
    assert m["hps"] == pytest.approx(first.metrics["hps"], abs=1e-4)

    capsys.readouterr()  # other settings into the same folders are refused rather than mixed
    assert evaluate.main(hps_args(env, out, *generate_args(env), "--steps", "2")) == 2
    assert "holds images generated with other settings (a_T 0.0047 -> None; steps 1 -> 2" in capsys.readouterr().err


def test_images_mode_scores_the_packages_layout(env, first, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    for style, prompts in PROMPTS.items():  # the hpsv2 package's layout: <style>/00000.jpg
        (theirs / style).mkdir(parents=True)
        for i in range(len(prompts)):
            Image.open(os.path.join(first.out, "images", style, f"{i:05d}.png")).save(theirs / style / f"{i:05d}.jpg")
    out = tmp_path / "scored"
    assert evaluate.main(hps_args(env, out, "--images", str(theirs))) == 0
    m = read_metrics(out)
    assert m["generator"] is None and m["generated_now"] == 0 and m["image_folder"] == str(theirs)
    model, tokenizer, _ = hps.load_hps(env.checkpoint, "2.1")
    paths = [str(theirs / s / f"{i:05d}.jpg") for s, p in PROMPTS.items() for i in range(len(p))]
    want = hps.hps_scores(model, tokenizer, paths, [t for p in PROMPTS.values() for t in p], show=False)
    assert m["hps"] == pytest.approx(want.mean(), abs=1e-4)

    os.remove(theirs / "anime" / "00002.jpg")
    capsys.readouterr()
    assert evaluate.main(hps_args(env, tmp_path / "x", "--images", str(theirs))) == 2
    assert "anime lacks 1 of the 3 images (the first: number 2)" in capsys.readouterr().err


def test_checkpoint_errors_are_one_line(env, tmp_path, capsys):
    other = tmp_path / "v2"
    other.mkdir()
    for name in (hps.HPS_FILES["2.1"], "open_clip_config.json"):  # v2.1 under v2's name, the small config
        shutil.copy(os.path.join(os.path.dirname(env.checkpoint), name), other / hps.HPS_FILES["2"] if name.endswith(".pt") else other)
    cases = [(["--hps", str(other / hps.HPS_FILES["2"])], "is the HPS v2 checkpoint, but --hps-version is 2.1"),
             (["--hps", str(tmp_path / "missing.pt")], f"file not found: {tmp_path / 'missing.pt'}"),
             (["--hps", str(other), "--hps-version", "2.1"], f"{other} has no HPS_v2.1_compressed.pt (the HPS v2.1 checkpoint)")]
    for extra, message in cases:
        assert evaluate.main(hps_args(env, tmp_path / "o", "--images", str(tmp_path)) + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    state = torch.load(env.checkpoint, weights_only=True)
    torch.save({"state_dict": {k: v for k, v in state["state_dict"].items() if k != "visual.proj"}},
               other / hps.HPS_FILES["2"])
    with pytest.raises(hps.LoadError, match="1 missing keys: visual.proj$"):
        hps.load_hps(str(other), "2")


@pytest.mark.slow  # about 20 s on two shared cores
def test_two_processes_give_the_same_scores(env, first, tmp_path):
    out = tmp_path / "ddp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on the CPU, even on a one-GPU machine
        result = run_evaluate(*hps_args(env, out, *generate_args(env)),
                         launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_metrics(out)
    assert m["world_size"] == 2 and m["generated_now"] == 10
    for style, prompts in PROMPTS.items():
        for i in range(len(prompts)):
            got = np.asarray(Image.open(out / "images" / style / f"{i:05d}.png"), dtype=int)
            want = np.asarray(Image.open(os.path.join(first.out, "images", style, f"{i:05d}.png")), dtype=int)
            assert np.abs(got - want).max() <= 1
        assert m["styles"][style]["hps"] == pytest.approx(first.metrics["styles"][style]["hps"], abs=1e-4)
    assert m["hps"] == pytest.approx(first.metrics["hps"], abs=1e-4)
