"""The COCO protocol of evaluate.py end to end on a tiny fake COCO folder (real JPEG files and the real
annotation format), a tiny SD repository, a tiny random OpenCLIP and the full FID Inception network
with random weights: generation, resume, the reference cache, scoring a folder, two processes under
torchrun, caption selection and the one-line errors. The full runs are real `python evaluate.py`
processes; their numbers are recomputed here from the files they leave."""
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import inception
import metrics
import wadi
from loading import LoadError
from openclip import load_open_clip, load_open_clip_tokenizer
from tests.repo import write_tiny_pixart_repo, write_tiny_sd_repo, write_tiny_sdxl_repo
from tests.conftest import (OPENCLIP_SMALL, openclip_reference, random_fid_inception_state,
                            run_evaluate, write_clip_vocab, write_openclip_repo)

NUM = 4  # generated images (precision/recall with k = 3 needs 4); the fake val2014 holds 6


def write_annotations(path, images, captions):
    """A COCO captions file: `images` [(id, file name)], `captions` [(annotation id, image id, text)]."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"info": {"description": "fake"}, "licenses": [],
                   "images": [{"id": i, "file_name": name, "height": 64, "width": 64} for i, name in images],
                   "annotations": [{"id": a, "image_id": i, "caption": c} for a, i, c in captions]}, f)


def write_fake_coco(directory):
    """val2014/ with six JPEGs of different sizes and orientations (one greyscale) and their captions,
    two per image: the first listed has the higher annotation id and stray whitespace, and the images
    and annotations are listed out of id order. Returns the folder and the expected first captions."""
    rng = np.random.default_rng(0)
    sizes = [(96, 64), (64, 80), (120, 90), (70, 70), (50, 100), (88, 60)]
    first = ["A red bus on a street", "two cats on a sofa", "A plate of food", "a man riding a horse",
             "a clock tower at night", "A boat on a lake"]
    os.makedirs(os.path.join(directory, "val2014"))
    images = []
    for i, (w, h) in enumerate(sizes, start=1):
        low = rng.uniform(0, 255, (h // 8 + 1, w // 8 + 1, 3))  # smooth colour fields plus fine noise
        pixels = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC), float)
        img = Image.fromarray((pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8))
        images.append((i, f"COCO_val2014_{i:012d}.jpg"))
        (img.convert("L") if i == 4 else img).save(os.path.join(directory, "val2014", images[-1][1]), quality=90)
    annotations = [(200 + i, i, "  " + first[i - 1].replace(" ", " \n ", 1) + " ") for i in range(6, 0, -1)]
    annotations += [(100 + i, i, f"another caption of image {i}") for i in range(1, 7)]
    write_annotations(os.path.join(directory, "annotations", "captions_val2014.json"), images[::-1], annotations)
    return str(directory), first


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco-eval")
    coco, captions = write_fake_coco(root / "coco")
    repo = write_tiny_sd_repo(str(root / "tiny-sd"))
    (root / "clip").mkdir()
    clip = write_openclip_repo(root / "clip", openclip_reference(OPENCLIP_SMALL), OPENCLIP_SMALL)
    write_clip_vocab(clip)
    inception = str(root / "pt_inception-random.pth")
    torch.save(random_fid_inception_state(), inception)
    return SimpleNamespace(root=root, coco=coco, captions=captions, repo=repo, clip=clip, inception=inception,
                           unet=os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"),
                           cache=str(root / "cache"))


def coco_args(env, out, *extra, cache=None):
    # --num-images, not its alias --num, which torchrun would take for its own --numa-binding
    return ["--coco", "2014", "--coco-dir", env.coco, "--num-images", str(NUM), "--inception", env.inception,
            "--clip", env.clip, "--cache-dir", cache or env.cache, "--batch-size", "4", "--out", str(out), *extra]


def generate_args(env):
    return ["--model", env.repo, "--unet", env.unet, "--resolution", "32"]


def low_rank_fid(x, y):
    """FID of two small feature sets (n < D) through their n x n products: with sigma_x = A^T A and
    sigma_y = B^T B (A, B the centred features over sqrt(n - 1)), tr sqrt(sqrt(sigma_x) sigma_y sqrt(sigma_x))
    is the nuclear norm of A B^T. Cheap, and another formula than metrics.frechet_distance's."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    a, b = (x - x.mean(0)) / np.sqrt(len(x) - 1), (y - y.mean(0)) / np.sqrt(len(y) - 1)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + (a * a).sum() + (b * b).sum()
                 - 2 * np.linalg.svd(a @ b.T, compute_uv=False).sum())


def read_metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


def assert_same_metrics(got, want):
    """The metrics of images equal to `want`'s up to one level per pixel (another process split, a GPU's fp16):
    FID, precision and recall within 1e-4 relative. Random-weight CLIP scores are near zero (-0.0135), where a
    relative tolerance means nothing: two processes' images one level apart moved it by 7e-6 (measured), so its
    bound is absolute, 5e-5."""
    for key in ("fid", "precision", "recall"):
        assert got[key] == pytest.approx(want[key], rel=1e-4), key
    assert got["clip_score"] == pytest.approx(want["clip_score"], rel=1e-4, abs=5e-5)


@pytest.fixture(scope="module")
def first(env):
    out = env.root / "run"
    result = run_evaluate(*coco_args(env, out, *generate_args(env)))
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(out=str(out), metrics=read_metrics(out), stdout=result.stdout)


def test_full_run_writes_images_metrics_and_grid(env, first):
    m = first.metrics
    files = sorted(os.listdir(os.path.join(first.out, "images")))
    assert files == ["00000.png", "00001.png", "00002.png", "00003.png", "generation.json"]
    assert all(Image.open(os.path.join(first.out, "images", f)).size == (32, 32) for f in files[:-1])
    assert Image.open(os.path.join(first.out, "grid.png")).size == (2 * 256, 2 * 256)  # 4 images at 256 px
    assert m["protocol"] == "coco2014" and m["images"] == NUM and m["generated_now"] == NUM
    assert m["generator"]["unet"] == env.unet and m["generator"]["steps"] == 1 and m["generator"]["a_T"] == 0.0047
    assert m["reference"]["images"] == 6 and not m["reference"]["statistics_cached"]

    # the caption list: the first listed caption of images 1..4, whitespace collapsed, and its hash
    captions = env.captions[:NUM]
    sha = hashlib.sha256(("\n".join(captions) + "\n").encode()).hexdigest()
    assert m["captions"]["sha256"] == sha == m["generator"]["captions_sha256"]
    assert m["captions"]["source"].endswith(os.path.join("annotations", "captions_val2014.json"))

    # the numbers, from the reference features cached by the run and the images' features computed here
    with np.load(m["reference"]["statistics"]) as cache:
        real = cache["features"]
    assert real.shape == (6, 2048)
    paths = [os.path.join(first.out, "images", f) for f in files[:-1]]
    images = [metrics.center_crop_resize(Image.open(p)) for p in paths]
    fake = inception.inception_features(inception.load_inception(env.inception), images, batch_size=4)
    assert np.isfinite(m["fid"]) and m["fid"] > 0
    assert m["fid"] == pytest.approx(low_rank_fid(real, fake), rel=1e-5)
    assert (m["precision"], m["recall"]) == metrics.precision_recall(real, fake, k=3)
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    # the random Inception separates the images: features are far from constant
    assert real.std(0).mean() > 1e-3 * np.abs(real).mean() and np.abs(fake[0] - fake[1]).max() > 1e-3
    want = metrics.clip_score(load_open_clip(env.clip), load_open_clip_tokenizer(env.clip), images,
                               ["A photo depicts " + c for c in captions])
    assert -1 <= m["clip_score"] <= 1 and m["clip_score"] == pytest.approx(want, abs=1e-5)
    assert sha in first.stdout and f"{m['fid']:.2f}" in first.stdout and f"{m['recall']:.4f}" in first.stdout

    # image i is what `wadi.py sample --seed i` draws for caption i
    sample = str(env.root / "sample.png")
    assert wadi.main(["sample", *generate_args(env), "--prompt", captions[2], "--seed", "2", "--out", sample]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(sample)), np.asarray(Image.open(paths[2])))


@pytest.mark.parametrize("backbone, write", [("pixart", write_tiny_pixart_repo), ("sdxl", write_tiny_sdxl_repo)])
def test_other_backbones_generate_what_sample_draws(env, first, tmp_path, backbone, write):
    """pixart: T5 encodes the captions into the prompt cache and is freed; sdxl: both text encoders, the
    pooled text and time ids. Either way image i is what `wadi.py sample` draws for caption i and seed i,
    and the metrics follow."""
    repo = write(str(tmp_path / backbone))
    out = tmp_path / "run"
    assert evaluate.main(coco_args(env, out, "--backbone", backbone, "--model", repo, "--resolution", "16")) == 0
    m = read_metrics(out)
    assert (m["generator"]["backbone"], m["generator"]["model"], m["generator"]["a_T"]) == (backbone, repo, 0.0047)
    assert m["generated_now"] == NUM and m["reference"]["statistics_cached"] and np.isfinite(m["fid"])
    assert backbone != "pixart" or os.listdir(os.path.join(env.cache, "prompts"))  # T5's embeddings
    sample = str(tmp_path / "sample.png")
    assert wadi.main(["sample", "--backbone", backbone, "--model", repo, "--resolution", "16", "--prompt",
                      env.captions[2], "--seed", "2", "--out", sample, "--cache-dir", str(tmp_path / "c")]) == 0
    image = np.asarray(Image.open(sample))
    np.testing.assert_array_equal(image, np.asarray(Image.open(out / "images" / "00002.png")))
    assert image.shape == (16, 16, 3) and image.std() > 5


def test_rerun_resumes_and_reuses_the_reference_cache(env, first, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(first.out, out)
    images = out / "images"
    before = {f: os.stat(images / f).st_mtime_ns for f in os.listdir(images)}
    kept = np.asarray(Image.open(images / "00003.png"), dtype=int)
    os.remove(images / "00003.png")
    cache = first.metrics["reference"]["statistics"]
    cache_time = os.stat(cache).st_mtime_ns
    result = run_evaluate(*coco_args(env, out, *generate_args(env)))
    m = read_metrics(out)
    assert result.returncode == 0 and m["generated_now"] == 1
    assert {f: os.stat(images / f).st_mtime_ns for f in before if f != "00003.png"} == \
        {f: t for f, t in before.items() if f != "00003.png"}
    again = np.asarray(Image.open(images / "00003.png"), dtype=int)  # seed 3, caption 3 again
    assert np.abs(again - kept).max() <= 1  # equal on the CPU; fp16 on a GPU may round differently
    assert m["reference"]["statistics_cached"] and os.stat(cache).st_mtime_ns == cache_time
    assert_same_metrics(m, first.metrics)

    # other settings into the same folder are refused rather than mixed
    capsys.readouterr()
    assert evaluate.main(coco_args(env, out, *generate_args(env), "--steps", "2")) == 2
    assert "holds images generated with other settings" in capsys.readouterr().err
    assert sorted(os.listdir(images)) == sorted(before)


def test_images_mode_scores_a_folder_by_index(env, first, tmp_path, capsys):
    folder = tmp_path / "theirs"
    folder.mkdir()
    for i in range(NUM):  # another project's naming: 0.png, 1.png, ...
        shutil.copy(os.path.join(first.out, "images", f"{i:05d}.png"), folder / f"{i}.png")
    shutil.copy(os.path.join(first.out, "images", "00000.png"), folder / "17.png")  # beyond --num: ignored
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "scored"
    result = run_evaluate(*coco_args(env, out, "--images", str(folder), "--no-pr"))
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_metrics(out)
    assert m["generator"] is None and m["generated_now"] == 0 and m["image_folder"] == str(folder)
    assert m["reference"]["statistics_cached"]
    assert m["fid"] == pytest.approx(first.metrics["fid"], rel=1e-6)
    assert m["clip_score"] == pytest.approx(first.metrics["clip_score"], rel=1e-6)
    assert m["precision"] is None and m["recall"] is None and result.stdout.rstrip().endswith("-")

    os.remove(folder / "3.png")
    assert evaluate.main(coco_args(env, tmp_path / "x", "--images", str(folder))) == 2
    assert "lacks 1 of the 4 images (the first: number 3)" in capsys.readouterr().err


@pytest.mark.slow  # about 20 s on two shared cores
def test_two_processes_give_the_same_metrics(env, first, tmp_path):
    out, cache = tmp_path / "ddp", str(tmp_path / "cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CUDA_VISIBLE_DEVICES", "")  # gloo on the CPU, even on a one-GPU machine
        result = run_evaluate(*coco_args(env, out, *generate_args(env), cache=cache),
                         launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    m = read_metrics(out)
    assert m["world_size"] == 2 and m["generated_now"] == NUM
    for i in range(NUM):  # each rank generated its share (0, 2 and 1, 3) with the same seeds
        got = np.asarray(Image.open(out / "images" / f"{i:05d}.png"), dtype=int)
        want = np.asarray(Image.open(os.path.join(first.out, "images", f"{i:05d}.png")), dtype=int)
        assert np.abs(got - want).max() <= 1
    with np.load(m["reference"]["statistics"]) as got, np.load(first.metrics["reference"]["statistics"]) as want:
        np.testing.assert_allclose(got["features"], want["features"], rtol=1e-4,
                                   atol=1e-5 * np.abs(want["features"]).max())  # gathered in order
    assert_same_metrics(m, first.metrics)


# ---------------------------------------------------------------------------------------------
# Caption selection and image folders

def test_coco_captions_first_per_image_in_id_order(tmp_path):
    images = [(42, "d.jpg"), (7, "b.jpg"), (19, "c.jpg"), (3, "a.jpg")]
    captions = [(100, 19, "  a red\n bus  "), (101, 7, "a cat"), (102, 19, "second of 19"), (5, 42, "a dog"),
                (104, 3, "x"), (1, 7, "lower id, later in the file")]
    write_annotations(str(tmp_path / "annotations" / "captions_val2017.json"), images, captions)
    names, got = evaluate.coco_captions(str(tmp_path), "val2017")
    assert names == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] and got == ["x", "a cat", "a red bus", "a dog"]

    (tmp_path / "val2017").mkdir()
    for _, name in images:
        Image.new("RGB", (8, 8)).save(tmp_path / "val2017" / name)
    captions, source, refs = evaluate.coco_protocol("2017", str(tmp_path), num=3)
    assert captions == ["x", "a cat", "a red bus"] and source.endswith("captions_val2017.json")
    assert refs == [str(tmp_path / "val2017" / n) for n in ("a.jpg", "b.jpg", "c.jpg")]  # those images only
    with pytest.raises(LoadError, match="has 4 captions, fewer than the 5000 to evaluate"):
        evaluate.coco_protocol("2017", str(tmp_path))
    os.remove(tmp_path / "val2017" / "b.jpg")
    with pytest.raises(LoadError, match="1 COCO images not found, e.g. .*b.jpg"):
        evaluate.coco_protocol("2017", str(tmp_path), num=3)
    (tmp_path / "annotations" / "captions_val2017.json").write_text(json.dumps({"images": []}))
    with pytest.raises(LoadError, match="not in the COCO captions format"):
        evaluate.coco_captions(str(tmp_path), "val2017")


def test_coco2014_uses_a_captions_file_and_every_val2014_image(env, tmp_path):
    captions, source, refs = evaluate.coco_protocol("2014", env.coco, num=NUM)
    assert captions == env.captions[:NUM] and len(refs) == 6  # every val2014 image, whatever --num
    assert refs == sorted(refs) and refs[0].endswith("COCO_val2014_000000000001.jpg")
    listed = tmp_path / "captions.txt"
    listed.write_text("".join(f"caption number {i} \n" for i in range(7)))
    captions, source, refs2 = evaluate.coco_protocol("2014", env.coco, str(listed), num=NUM)
    assert captions == [f"caption number {i}" for i in range(NUM)] and source == str(listed) and refs2 == refs
    assert evaluate.caption_hash(captions) != evaluate.caption_hash(env.captions[:NUM])
    with pytest.raises(LoadError, match="captions file not found"):
        evaluate.coco_protocol("2014", env.coco, str(tmp_path / "missing.txt"))


def test_indexed_images(tmp_path):
    for name in ("0.png", "00001.jpg", "2.webp", "003.png.tmp", "four.png", "12.png"):
        (tmp_path / name).write_bytes(b"")
    assert evaluate.indexed_images(str(tmp_path), 3) == [str(tmp_path / n) for n in ("0.png", "00001.jpg", "2.webp")]
    with pytest.raises(LoadError, match="lacks 9 of the 12 images"):
        evaluate.indexed_images(str(tmp_path), 12)
    (tmp_path / "000.png").write_bytes(b"")
    with pytest.raises(LoadError, match="two images numbered 0"):
        evaluate.indexed_images(str(tmp_path), 3)


# ---------------------------------------------------------------------------------------------
# Errors: one line, exit code 2

def test_errors_are_one_line(env, tmp_path, capsys):
    result = run_evaluate(*coco_args(env, tmp_path / "o"), "--coco-dir", str(tmp_path / "no-coco"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"error: COCO images not found: {tmp_path / 'no-coco' / 'val2014'} (--coco-dir is the " \
                            f"folder holding val2014/ and annotations/)\n"

    cases = [(["--captions", str(tmp_path / "captions.txt")], f"captions file not found: {tmp_path / 'captions.txt'}"),
             (["--inception", str(tmp_path / "fid.pth")], f"file not found: {tmp_path / 'fid.pth'}"),
             (["--clip", str(tmp_path / "no-clip")], f"model directory {tmp_path / 'no-clip'} not found"),
             (["--num", "7"], "has 6 captions, fewer than the 7 to evaluate"),
             (["--steps", "1000"], "--steps 1000: 1000 DDIM steps with this scheduler's 'leading' spacing and "
                                   "steps_offset 1 would start at t = 1000")]
    for extra, message in cases:
        assert evaluate.main(coco_args(env, tmp_path / "o", *generate_args(env)) + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    for extra in (["--images", str(tmp_path), "--unet", env.unet], ["--num", "3"]):
        with pytest.raises(SystemExit) as exit_:
            evaluate.main(coco_args(env, tmp_path / "o") + extra)
        assert exit_.value.code == 2


@pytest.mark.parametrize("damage", ["half", "empty", "text"])
def test_a_broken_image_is_one_line_naming_it(env, first, tmp_path, capsys, damage):
    """A PNG cut to half its bytes, an empty file, or a text file named .png: in --images, and among the
    generated images of a resumed --coco run (found before any image is generated)."""
    folder = tmp_path / "theirs"
    shutil.copytree(os.path.join(first.out, "images"), folder)
    bad = folder / "00002.png"
    data = bad.read_bytes()
    bad.write_bytes({"half": data[:len(data) // 2], "empty": b"", "text": b"not an image\n"}[damage])
    want = {"half": "the PNG is cut short", "empty": "the file is empty",
            "text": "not an image file"}[damage]
    capsys.readouterr()
    assert evaluate.main(coco_args(env, tmp_path / "x", "--images", str(folder))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot read the image {bad}: {want}"), lines

    os.remove(folder / "00003.png")  # a resumed run would generate image 3: the check comes first
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.move(str(folder), resumed / "images")
    assert evaluate.main(coco_args(env, resumed, *generate_args(env))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot read the image {resumed / 'images' / '00002.png'}: {want}")
    assert not (resumed / "images" / "00003.png").exists()
