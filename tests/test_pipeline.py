"""pipeline.py: prompt files as editors and JourneyDB write them, the backbone and base model of a student
file, students as they are published (pickles), and tokenizer folders as transformers 5 writes them."""
import importlib.util
import json
import os
import shutil
import sys
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import wadi
from evaluate import caption_hash
from loading import LoadError
from cli import read_prompts, student_backbone
from pipeline import BACKBONES, load_pipeline, load_tokenizer
from tests.conftest import ROOT

PROMPTS = ["a photo of a cat", "a watercolor of a lighthouse, at dawn", "émigré café"]


@pytest.mark.parametrize("bom", [False, True])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_text_json_and_jsonl_read_the_same_with_a_bom_or_crlf(bom, newline, tmp_path):
    """Windows editors save with a byte-order mark and CRLF line ends: neither changes the prompts or the
    caption hash that evaluate.py logs."""
    prefix = "\ufeff" if bom else ""
    files = {"p.txt": newline.join(PROMPTS) + newline, "p.json": json.dumps(PROMPTS, ensure_ascii=False),
             "p.jsonl": newline.join(json.dumps({"Task2": {"Caption": p}}, ensure_ascii=False) for p in PROMPTS)}
    for name, text in files.items():
        (tmp_path / name).write_bytes((prefix + text).encode("utf-8"))
        got = read_prompts(str(tmp_path / name))
        assert got == (sorted(PROMPTS) if name.endswith(".jsonl") else PROMPTS), (name, got)
    assert caption_hash(read_prompts(str(tmp_path / "p.txt"))) == caption_hash(PROMPTS)


def test_journeydb_rows_without_a_caption_are_skipped_and_counted(tmp_path):
    rows = [{"Task2": {"Caption": "zeta"}}, {"Task2": {"Caption": None}}, {"Task2": {"caption": "alpha"}},
            {"Task2": {"Caption:": "beta"}}, {"Task2": {"Caption": ""}}, {"Task2": {"Caption": "   "}},
            {"Task2": {}}, {"prompt": "gamma"}, {"img_path": "./000/x.jpg"}]
    path = tmp_path / "train_anno.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lines = []
    assert read_prompts(str(path), log=lines.append) == ["alpha", "beta", "gamma", "zeta"]
    assert lines == [f"{path}: skipped 5 prompts without a caption"]
    path.write_text(json.dumps({"Task2": {"Caption": None}}) + "\n")
    with pytest.raises(LoadError, match="has no prompts"):
        read_prompts(str(path), log=lines.append)


def load_prompt_bench():
    spec = importlib.util.spec_from_file_location("prompt_file", os.path.join(ROOT, "bench", "prompt_file.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["train_anno.jsonl", "captions.txt"])
def test_prompt_files_are_read_line_by_line(name, tmp_path):
    """JourneyDB's 1.4M-row annotations took +3.0 GiB to read whole, +7.0 GiB once one caption held an emoji
    (then every character of the one big string takes 4 bytes). Read line by line, the peak is the prompts
    themselves: here a 4,000-row file in JourneyDB's layout (bench/prompt_file.py, 0.1% of the rows with emoji
    and CJK), whose whole-file reading peaked at 26x (.jsonl) and 4.7x (.txt) the prompts' bytes."""
    rows = tmp_path / "train_anno.jsonl"
    load_prompt_bench().write(str(rows), 4000, 0.001)
    path = tmp_path / name
    if name.endswith(".txt"):
        with open(rows, encoding="utf-8") as f:
            path.write_text("".join(json.loads(line)["Task2"]["Caption"] + "\n" for line in f), encoding="utf-8")
    tracemalloc.start()
    try:
        prompts = read_prompts(str(path), log=lambda _: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = sys.getsizeof(prompts) + sum(sys.getsizeof(p) for p in prompts)
    assert len(prompts) == (3600 if name.endswith(".jsonl") else 4000)  # every tenth row repeats a caption
    assert sum("\U0001f431" in p and "猫" in p for p in prompts) >= 4  # rows 0, 1000, 2000, 3000 (and repeats)
    assert peak < 1.5 * held, (peak, held)


def test_prompt_lines_end_only_at_line_ends(tmp_path):
    """A JSON string may hold U+2028, U+0085 or a form feed unescaped (json.dumps(..., ensure_ascii=False) writes
    them so); such a caption is one prompt, in JSON lines and in text alike (as the official loader's `for row in
    file`), and a bad row is named by its line."""
    caption = "a cat\u2028on a mat\x85at\x0cdawn"
    rows = tmp_path / "anno.jsonl"
    rows.write_text("\n".join(json.dumps({"Task2": {"Caption": c}}, ensure_ascii=False)
                              for c in (caption, "zeta")) + "\n", encoding="utf-8")
    assert read_prompts(str(rows)) == [caption, "zeta"]
    text = tmp_path / "p.txt"
    text.write_text(f"{caption}\r\nzeta\r\n", encoding="utf-8", newline="")
    assert read_prompts(str(text)) == [caption, "zeta"]
    rows.write_text('{"Task2": {"Caption": "a"}}\n\n{"Task2": {"Caption": "b",}}\n[1]\n')
    with pytest.raises(LoadError, match=r"anno.jsonl: line 3, column 27: Expecting property name"):
        read_prompts(str(rows))
    rows.write_text('{"Task2": {"Caption": "a"}}\n[1]\n')
    with pytest.raises(LoadError, match=r"anno.jsonl: line 2: expected a JSON object per line, got list$"):
        read_prompts(str(rows))
    rows.write_bytes(b'{"Task2": {"Caption": "a"}}\n{"Task2": {"Caption": "\xff"}}\n')
    with pytest.raises(LoadError, match="cannot read the prompt file .*anno.jsonl: 'utf-8' codec can't decode"):
        read_prompts(str(rows))


def test_a_student_file_brings_its_backbone_and_base_model(tmp_path):
    toy_unet = os.path.join(BACKBONES["toy"].repo, "unet", "diffusion_pytorch_model.safetensors")
    student = str(tmp_path / "student.safetensors")
    save_file(load_file(toy_unet), student, metadata={"backbone": "toy", "base_model": "/nowhere/on/this/machine"})
    assert student_backbone(None, None, student, "--unet") == ("toy", BACKBONES["toy"].repo)
    assert student_backbone("toy", "my/repo", student, "--unet") == ("toy", "my/repo")
    assert student_backbone(None, None, None, "--unet") == ("sd15", BACKBONES["sd15"].repo)
    with pytest.raises(LoadError, match="--backbone sd15 contradicts --unet .*a toy student"):
        student_backbone("sd15", None, student, "--unet")
    save_file(load_file(toy_unet), student, metadata={"backbone": "toy", "base_model": str(tmp_path)})
    assert student_backbone(None, None, student, "--unet") == ("toy", str(tmp_path))

    # the command: no --backbone needed, a contradicting one is one line
    out = str(tmp_path / "x.png")
    save_file(load_file(toy_unet), student, metadata={"backbone": "toy"})
    assert wadi.main(["sample", "--unet", student, "--prompt", "a large red circle at the top left", "--out", out]) == 0
    assert Image.open(out).size == (32, 32)
    assert wadi.main(["sample", "--unet", student, "--backbone", "sd21", "--prompt", "a", "--out", out]) == 2


def test_a_pickled_student_samples_as_its_safetensors_twin(tmp_path):
    """Published students often ship as pickled state dicts (DMD2's pytorch_model.bin)."""
    state = load_file(os.path.join(BACKBONES["toy"].repo, "unet", "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(0)
    state = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    save_file(state, str(tmp_path / "student.safetensors"))
    images = []
    for name in ("pytorch_model.bin", "student.safetensors"):
        out = str(tmp_path / f"{name}.png")
        assert wadi.main(["sample", "--backbone", "toy", "--unet", str(tmp_path / name), "--prompt",
                          "a small blue cross at the bottom right", "--seed", "4", "--out", out]) == 0
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images) and images[0].std() > 5


def test_the_tokenizer_folder_of_transformers_5(tmp_path):
    """A repo whose tokenizer/ holds only tokenizer.json + tokenizer_config.json (transformers 5's
    save_pretrained) loads, with the same ids as its vocab.json + merges.txt twin."""
    import transformers
    toy = BACKBONES["toy"].repo
    model = tmp_path / "toy"
    shutil.copytree(toy, model)
    shutil.rmtree(model / "tokenizer")
    transformers.CLIPTokenizer.from_pretrained(os.path.join(toy, "tokenizer")).save_pretrained(model / "tokenizer")
    assert sorted(os.listdir(model / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    prompts = ["a large red circle at the top left", "a small yellow cross at the bottom right", ""]
    assert load_tokenizer(str(model))(prompts).tolist() == load_tokenizer(toy)(prompts).tolist()
    assert torch.equal(load_pipeline("toy", str(model)).encode_prompts(prompts).embeds,
                       load_pipeline("toy", toy).encode_prompts(prompts).embeds)


def test_image_grid_enlarges_small_images_and_writes_labels():
    """Small images are enlarged by a whole factor, pixel for pixel (nearest); labels go under the images and row
    labels left of the rows, in black; images of 128 px or more are placed as they are."""
    from pipeline import image_grid
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    plain = np.asarray(image_grid(images, cols=3))
    assert plain.shape == (2 * 128, 3 * 128, 3)
    assert np.array_equal(plain[128:, 256:], images[5].repeat(4, 0).repeat(4, 1))
    labelled = np.asarray(image_grid(images, cols=3, labels=["a large red circle at the top left"] * 6))
    strip = labelled.shape[0] // 2 - 128  # the label strip under each row of images
    assert strip > 0 and np.array_equal(labelled[:128, :128], plain[:128, :128])
    assert (labelled[128:128 + strip, :128] < 128).any()  # the text
    rows = np.asarray(image_grid(images, cols=3, row_labels=["teacher", "student"]))
    left = rows.shape[1] - 3 * 128
    assert rows.shape[0] == 256 and left > 0 and (rows[:, :left] < 128).any()
    big = np.zeros((2, 256, 256, 3), dtype=np.uint8)
    assert np.asarray(image_grid(big, cols=2)).shape == (256, 512, 3)


def test_decode_in_chunks_equals_one_call(monkeypatch, tmp_path):
    """Pipeline.decode gives the VAE at most DECODE_PIXELS of images per call: the same images as one call."""
    import pipeline
    from tests.repo import write_tiny_sd_repo
    pipe = load_pipeline("sd15", write_tiny_sd_repo(str(tmp_path / "tiny-sd")))
    latents = torch.randn(5, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode(latents)  # 5 images of 32 x 32: one call
    calls = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z: calls.append(len(z)) or decode(z))
    monkeypatch.setattr(pipeline, "DECODE_PIXELS", 2 * 32 * 32)
    chunked = pipe.decode(latents)
    assert calls == [2, 2, 1] and np.abs(chunked.astype(int) - whole.astype(int)).max() <= 1
