"""`--backbone pixart` through every command on a tiny PixArt-alpha repository written by diffusers and
transformers themselves (tests/repo.py): train and an exact resume, export (diffusers loads it strictly),
one-step sampling against a manual diffusers + transformers computation, DDIM with CFG, the T5 prompt-
embedding cache (built once, never T5 again, invalidated by another prompt list or encoder, sharded under
torchrun) and the one-line errors."""
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cli
import t5
import textcache
import wadi
from diffusion import A_T
from loading import file_metadata
from pipeline import encode_text, load_pipeline, load_text_encoder, seeded_noise
from tests.repo import write_prompts, write_tiny_pixart_repo

PROMPTS = ["a red cat", "a blue dog on a sofa", "a green tree", "the sea at night", "a small house"]
TRAIN = ["train", "--backbone", "pixart", "--batch-size", "2", "--resolution", "16", "--rank", "4", "--rank-fake", "2",
         "--validate-every", "100"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_prompts(write_tiny_pixart_repo(str(tmp_path_factory.mktemp("tiny-pixart"))), PROMPTS)


def train_cli(repo, out, cache, *extra, prompts=None):
    return wadi.main([*TRAIN, "--model", repo, "--prompts", prompts or os.path.join(repo, "prompts.txt"),
                      "--out", str(out), "--cache-dir", str(cache), *extra])


@pytest.fixture(scope="module")
def run(repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart-run")
    assert train_cli(repo, root / "run", root / "cache", "--max-steps", "2", "--checkpoint-every", "2",
                     "--lr", "1e-2") == 0
    return SimpleNamespace(out=root / "run", cache=root / "cache")


class T5Built(Exception):
    """Raised instead of building a T5: proves a command did without one."""


def forbid_t5(monkeypatch):
    def refuse(cfg):
        raise T5Built
    monkeypatch.setattr(t5.T5Encoder, "from_config", refuse)


def test_resume_is_exact_and_a_cached_run_never_builds_t5(repo, run, tmp_path, monkeypatch):
    forbid_t5(monkeypatch)  # the run fixture cached these prompts: neither leg of this run may build T5
    split = tmp_path / "split"
    assert train_cli(repo, split, run.cache, "--max-steps", "1", "--checkpoint-every", "1", "--lr", "1e-2") == 0
    assert train_cli(repo, split, run.cache, "--max-steps", "2", "--checkpoint-every", "1", "--lr", "1e-2",
                     "--resume", "latest") == 0
    a = load_file(str(run.out / "checkpoint-0000002.safetensors"))
    b = load_file(str(split / "checkpoint-0000002.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("opt_fake.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    assert max(v.abs().max().item() for k, v in a.items() if k.endswith("theta_a")) > 0
    other = tmp_path / "other.txt"
    other.write_text("a red cat\na yellow bird\n")
    with pytest.raises(T5Built):  # another prompt list is another cache
        train_cli(repo, tmp_path / "other", run.cache, "--max-steps", "1", prompts=str(other))


def test_prompt_cache_holds_t5s_embeddings_and_is_keyed_by_prompts_and_encoder(repo, tmp_path, monkeypatch, capsys):
    built = []
    real = t5.T5Encoder.from_config.__func__
    monkeypatch.setattr(t5.T5Encoder, "from_config", classmethod(lambda cls, cfg: built.append(1) or real(cls, cfg)))
    prompts = PROMPTS + ["", "cat " * 130]
    pipe = load_pipeline("pixart", repo)
    assert pipe.text_encoder is None and not built  # T5 is not loaded with the pipeline
    pipe.prepare_prompts(prompts, str(tmp_path))
    assert len(built) == 1
    assert capsys.readouterr().err.count("warning: 1 of 7 prompts are longer than 120 T5 tokens") == 1
    text = pipe.encode_prompts(prompts[::-1])
    want = encode_text(load_text_encoder(repo), pipe.tokenizer, prompts[::-1])  # a second T5, built here
    assert torch.equal(text.mask, want.mask) and text.embeds.shape == want.embeds.shape == (7, 120, 32)
    assert torch.equal(text.embeds[text.mask.bool()], want.embeds[want.mask.bool()])  # valid tokens exactly
    assert not text.embeds[~text.mask.bool()].any()  # padding is not stored
    assert text.mask[1].tolist() == [1] + [0] * 119  # "": eos only
    with pytest.raises(KeyError, match="not in the prompt cache"):
        pipe.encode_prompts(["never prepared"])

    load_pipeline("pixart", repo).prepare_prompts(prompts, str(tmp_path))  # same list, encoder and dtype
    assert len(built) == 2
    load_pipeline("pixart", repo).prepare_prompts(prompts + ["one more"], str(tmp_path))
    assert len(built) == 3
    retrained = tmp_path / "retrained"  # same file names and sizes, other weights
    shutil.copytree(repo, retrained)
    shards = sorted(f for f in os.listdir(retrained / "text_encoder") if f.endswith(".safetensors"))
    state = load_file(str(retrained / "text_encoder" / shards[0]))
    save_file({k: v + 0.01 for k, v in state.items()}, str(retrained / "text_encoder" / shards[0]),
              metadata={"format": "pt"})
    load_pipeline("pixart", str(retrained)).prepare_prompts(prompts, str(tmp_path))
    assert len(built) == 4


def test_a_torchrun_job_writes_one_part_per_rank(repo, tmp_path, monkeypatch):
    """Under torchrun rank r encodes the prompts r::world into part r; lookups equal a one-part cache."""
    monkeypatch.setattr(textcache.dist, "barrier", lambda: None)
    monkeypatch.setattr(textcache.dist, "broadcast_object_list", lambda objects, src: None)
    pipe = load_pipeline("pixart", repo)
    encoder = load_text_encoder(repo)
    prompts = PROMPTS + [""]
    for name, ranks in (("one", [0]), ("two", [1, 0])):  # rank 0 last: it finishes the cache
        for rank in ranks:
            textcache.write(str(tmp_path / name), prompts, lambda b: encode_text(encoder, pipe.tokenizer, b), 32,
                            torch.float32, 120, batch_size=2, rank=rank, world=len(ranks))
    one, two = (textcache.PromptCache(str(tmp_path / n), prompts) for n in ("one", "two"))
    assert (two.parts, len(os.listdir(tmp_path / "two"))) == (2, 5)
    a, b = one.lookup(prompts[::-1]), two.lookup(prompts[::-1])
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.mask, b.mask)


def test_export_loads_in_diffusers_and_matches_the_adapted_student(repo, run, tmp_path):
    from diffusers import PixArtTransformer2DModel
    exported = str(tmp_path / "student.safetensors")
    assert wadi.main(["export", "--run", str(run.out), "--out", exported]) == 0
    meta = file_metadata(exported)
    assert (meta["a_T"], meta["backbone"], meta["base_model"]) == ("0.0047", "pixart", repo)
    ref = PixArtTransformer2DModel.from_pretrained(os.path.join(repo, "transformer"))
    ref.load_state_dict(load_file(exported), strict=True)
    _, _, pipe, student, _ = cli.load_run(str(run.out))
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([999, 400]), torch.randn(2, 6, 32)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    with torch.no_grad():
        got = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        expected, teacher = student(x, t, text, mask), pipe.denoiser(x, t, text, mask)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5
    assert (teacher - expected).abs().max() > 1e-4  # the student is not the teacher


def test_one_step_sample_equals_diffusers_and_transformers(repo, run, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer
    student = str(tmp_path / "student.safetensors")
    assert wadi.main(["export", "--run", str(run.out), "--out", student]) == 0
    out = str(tmp_path / "one.png")
    prompt = "a red cat under a tree"
    # backbone and base model from the file's metadata; --transformer is --unet
    assert wadi.main(["sample", "--transformer", student, "--prompt", prompt, "--seed", "3", "--out", out,
                      "--resolution", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    got = np.asarray(Image.open(out))
    assert got.shape == (16, 16, 3)

    tokens = T5Tokenizer.from_pretrained(os.path.join(repo, "tokenizer"))(
        [prompt], padding="max_length", max_length=120, truncation=True, return_tensors="pt")
    ref = PixArtTransformer2DModel.from_pretrained(os.path.join(repo, "transformer"))
    ref.load_state_dict(load_file(student), strict=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(repo, "vae"))
    z = seeded_noise((4, 8, 8), [3])
    with torch.no_grad():
        embeds = T5EncoderModel.from_pretrained(os.path.join(repo, "text_encoder"))(
            tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        eps = ref(z, encoder_hidden_states=embeds, timestep=torch.tensor([999]),
                  encoder_attention_mask=tokens.attention_mask).sample[:, :4]
        x0 = (z - (1 - A_T) ** 0.5 * eps) / A_T ** 0.5
        image = vae.decode(x0 / vae.config.scaling_factor).sample
    expected = ((image.clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1 and expected.std() > 5

    forbid_t5(monkeypatch)  # the same prompt again: from the cache; DDIM + CFG on the teacher needs "" too
    assert wadi.main(["sample", "--transformer", student, "--prompt", prompt, "--seed", "3", "--out", out,
                      "--resolution", "16", "--cache-dir", str(tmp_path / "cache")]) == 0
    with pytest.raises(T5Built):
        wadi.main(["sample", "--backbone", "pixart", "--model", repo, "--steps", "3", "--guidance", "1.5",
                   "--prompt", prompt, "--out", out, "--cache-dir", str(tmp_path / "cache")])
    monkeypatch.undo()
    assert wadi.main(["sample", "--backbone", "pixart", "--model", repo, "--steps", "3", "--guidance", "1.5",
                      "--prompt", prompt, "--seed", "3", "--out", out, "--resolution", "16",
                      "--cache-dir", str(tmp_path / "cache")]) == 0
    teacher = np.asarray(Image.open(out))
    assert teacher.shape == (16, 16, 3) and np.abs(teacher.astype(int) - got.astype(int)).max() > 0


def test_analyze_a_pixart_run(repo, run, tmp_path):
    """analyze on the run directory: the teacher is the base model's transformer/, and the adapted layers
    are the DiT student's (every nn.Linear but adaln_single.*: 10 per block, caption projection, proj_out)."""
    assert wadi.main(["analyze", "--student", str(run.out), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["teacher"] == f"{repo}/transformer"
    adapted = [layer["name"] for layer in report["layers"] if layer["adapted"]]
    assert len(adapted) == 2 * 10 + 2 + 1 and not any(name.startswith("adaln_single.") for name in adapted)
    assert report["summary"]["adapted"]["direction_mean"] > 0


def test_dry_run_counts_and_memory_without_t5(capsys):
    assert wadi.main(["train", "--backbone", "pixart", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable 81.22M" in out and "trainable 20.13M" in out and "total   610.86M" in out
    assert "text encoder 4762.31M" in out and "not counted below" in out
    weights = float(out.split("frozen weights ")[1].split(" GiB")[0])
    assert 2.0 < weights < 3.0  # the DiT and the VAE in fp32, without T5's 17.7 GiB
    assert wadi.main(["train", "--backbone", "pixart", "--resolution", "1024", "--dry-run"]) == 0
    assert "total   611.35M" in capsys.readouterr().out  # the 1024-MS model's micro-condition embedders


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_errors_are_one_line(repo, tmp_path, capsys):
    transformer = os.path.join(repo, "transformer", "diffusion_pytorch_model.safetensors")
    toy_unet = os.path.join(wadi.BACKBONES["toy"].repo, "unet", "diffusion_pytorch_model.safetensors")
    out = str(tmp_path / "x.png")
    common = ["--prompt", "a", "--out", out, "--cache-dir", str(tmp_path / "cache")]
    assert wadi.main(["sample", "--backbone", "toy", "--unet", transformer, *common]) == 2
    assert "is a PixArt transformer (it has adaln_single.linear.weight), not the U-Net this backbone needs: it goes " \
           "with --backbone pixart" in one_line(capsys)
    assert wadi.main(["sample", "--backbone", "pixart", "--model", repo, "--transformer", toy_unet, *common]) == 2
    assert "is a U-Net (it has conv_in.weight), not the PixArt transformer this backbone needs: it goes with " \
           "--backbone sd15, sd21 or sdxl" in one_line(capsys)
    assert wadi.main(["sample", "--backbone", "pixart", "--model", repo, "--resolution", "18", *common]) == 2
    assert one_line(capsys) == "error: --resolution 18 is not a multiple of 4 (the autoencoder's downsampling x the " \
                               "denoiser's patch size 2)"

    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    os.remove(broken / "tokenizer" / "spiece.model")
    assert wadi.main(["sample", "--backbone", "pixart", "--model", str(broken), *common]) == 2
    assert one_line(capsys) == f"error: {broken}/tokenizer/spiece.model not found (a local model directory needs " \
                               f"the Hugging Face repo layout)"
    shutil.copy(os.path.join(repo, "tokenizer", "spiece.model"), broken / "tokenizer")
    os.remove(broken / "text_encoder" / "model-00002-of-00002.safetensors")
    assert wadi.main(["sample", "--backbone", "pixart", "--model", str(broken), *common]) == 2
    assert one_line(capsys) == f"error: {broken}/text_encoder/model-00002-of-00002.safetensors not found (a local " \
                               f"model directory needs the Hugging Face repo layout)"
    config = json.loads((broken / "transformer" / "config.json").read_text())
    (broken / "transformer" / "config.json").write_text(json.dumps({**config, "norm_type": "layer_norm"}))
    assert wadi.main(["sample", "--backbone", "pixart", "--model", str(broken), *common]) == 2
    assert one_line(capsys).endswith("transformer/config.json: unsupported PixArt config: norm_type='layer_norm' "
                                     "(supported: 'ada_norm_single')")
