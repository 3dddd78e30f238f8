"""export.py: every `wadi.py export --format` read by its real consumer on tiny repositories written by
diffusers / transformers. pipeline: diffusers' own StableDiffusionPipeline / PixArtAlphaPipeline with one step
and no guidance gives our `sample` image; single-file: diffusers' single-file loader rebuilds our merged U-Net,
VAE and text encoder exactly; lora: kohya's layout, W + up down per layer and the printed error; --base:
rotate(W_other, theta) exactly; one-line errors."""
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import wadi
from tests.conftest import train_cli
from tests.repo import write_tiny_pixart_repo
from tests.test_pixart_pipeline import PROMPTS
from tests.test_pixart_pipeline import train_cli as pixart_train


@pytest.fixture(scope="module")
def sd_run(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd-run") / "run"
    assert train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "2", "--lr", "1e-2") == 0
    return out


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory):
    root = write_tiny_pixart_repo(str(tmp_path_factory.mktemp("tiny-pixart")))
    with open(os.path.join(root, "prompts.txt"), "w") as f:
        f.write("\n".join(PROMPTS) + "\n")
    out = tmp_path_factory.mktemp("pixart-run")
    assert pixart_train(root, out / "run", out / "cache", "--max-steps", "2", "--checkpoint-every", "2") == 0
    return out


def ours(unet, seed, tmp_path, *extra):
    """`wadi.py sample` of the student at 16 px, as uint8 (16, 16, 3)."""
    out = str(tmp_path / f"ours-{seed}.png")
    assert wadi.main(["sample", "--unet", str(unet), "--prompt", "a red cat", "--seed", str(seed),
                      "--resolution", "16", "--out", out, *extra]) == 0
    return np.asarray(Image.open(out)).astype(int)


def test_pipeline_format_samples_our_image_in_diffusers(sd_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = str(tmp_path / "pipe")
    assert wadi.main(["export", "--run", str(sd_run), "--format", "pipeline", "--out", out]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.alphas_cumprod[999].item() == pytest.approx(0.0047, rel=1e-5)
    for seed in (0, 3):
        image = pipe("a red cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(seed)).images[0]  # (16, 16, 3) in [0, 1]
        expected = ours(sd_run, seed, tmp_path)
        assert np.abs(np.round(image * 255) - expected).max() <= 1 and expected.std() > 5
    assert wadi.main(["export", "--run", str(sd_run), "--format", "pipeline", "--out", out]) == 2


def test_pixart_pipeline_format(pixart_run, tmp_path, capsys):
    from diffusers import PixArtAlphaPipeline
    out = str(tmp_path / "pipe")
    assert wadi.main(["export", "--run", str(pixart_run / "run"), "--format", "pipeline", "--out", out]) == 0
    pipe = PixArtAlphaPipeline.from_pretrained(out, local_files_only=True)
    image = pipe("a red cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="np",
                 use_resolution_binning=False, generator=torch.Generator().manual_seed(2)).images[0]
    expected = ours(pixart_run / "run", 2, tmp_path, "--cache-dir", str(pixart_run / "cache"))
    assert np.abs(np.round(image * 255) - expected).max() <= 1 and expected.std() > 5

    for fmt, message in (("single-file", "is Stable Diffusion's layout (sd15, sd21, sdxl), not pixart's"),
                         ("lora", "kohya's layout is for U-Nets")):
        assert wadi.main(["export", "--run", str(pixart_run / "run"), "--format", fmt,
                          "--out", str(tmp_path / "x.safetensors")]) == 2
        assert message in capsys.readouterr().err


def test_single_file_loads_in_diffusers(repo, sd_run, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = str(tmp_path / "wadi.safetensors")
    student = str(tmp_path / "student.safetensors")
    assert wadi.main(["export", "--run", str(sd_run), "--format", "single-file", "--out", out]) == 0
    assert wadi.main(["export", "--run", str(sd_run), "--out", student]) == 0
    state = load_file(out)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in state
    folder = str(tmp_path / "pipe")  # a config with model_index.json, which from_single_file needs
    assert wadi.main(["export", "--run", str(sd_run), "--format", "pipeline", "--out", folder]) == 0
    pipe = StableDiffusionPipeline.from_single_file(out, config=folder, local_files_only=True)
    merged = load_file(student)
    assert pipe.unet.state_dict().keys() == merged.keys()
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in merged.items())
    text = load_file(os.path.join(repo, "text_encoder", "model.safetensors"))
    got = pipe.text_encoder.state_dict()
    assert all(torch.equal(got[k], v) for k, v in text.items() if k in got)


def test_lora_format(repo, sd_run, tmp_path, capsys):
    import kohya
    from loading import read_weights
    student, lora = str(tmp_path / "student.safetensors"), str(tmp_path / "lora.safetensors")
    assert wadi.main(["export", "--run", str(sd_run), "--out", student]) == 0
    assert wadi.main(["export", "--run", str(sd_run), "--format", "lora", "--rank", "2", "--out",
                      str(tmp_path / "new" / "lora.safetensors")]) == 0  # its folder is made
    capsys.readouterr()
    assert wadi.main(["export", "--run", str(sd_run), "--format", "lora", "--rank", "2", "--out", lora]) == 0
    printed = float(capsys.readouterr().out.split("relative weight error ")[1].split()[0])
    base, merged = read_weights(repo, "unet"), load_file(student)
    applied = kohya.apply_lora(base, load_file(lora))
    changed = [k for k in merged if not torch.equal(merged[k], base[k])]
    assert changed and all(k.startswith(("down", "mid", "up")) for k in changed)
    num = sum(((merged[k] - applied[k]) ** 2).sum() for k in changed)
    den = sum(((merged[k] - base[k]) ** 2).sum() for k in changed)
    assert printed == pytest.approx((num / den).sqrt().item(), abs=1e-4) and 0 < printed < 1
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in load_file(lora))


def test_base_rotates_another_fine_tune(repo, sd_run, tmp_path):
    """A fine-tune of the same base (the base's U-Net plus noise) takes the run's rotation: the export equals
    rotate(W_other, theta) where the run adapted, W_other elsewhere."""
    from checkpoint import find_checkpoint
    from lorad import rotate_pairs
    from loading import read_tensors, read_weights
    other = {k: v + 0.01 * torch.randn_like(v) for k, v in read_weights(repo, "unet").items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    out = str(tmp_path / "rotated.safetensors")
    assert wadi.main(["export", "--run", str(sd_run), "--base", str(tmp_path / "other.safetensors"),
                      "--out", out]) == 0
    got = load_file(out)
    adapters = read_tensors(find_checkpoint(str(sd_run), "latest"))
    rotated = 0
    for key, value in got.items():
        layer = key[:-len(".weight")]
        a, b = adapters.get(f"ema.{layer}.theta_a", adapters.get(f"student.{layer}.theta_a")), \
            adapters.get(f"ema.{layer}.theta_b", adapters.get(f"student.{layer}.theta_b"))
        if key.endswith(".weight") and a is not None:
            torch.testing.assert_close(value, rotate_pairs(other[key], a @ b), rtol=0, atol=1e-6)
            rotated += 1
        else:
            assert torch.equal(value, other[key]), key
    assert rotated > 10


def test_one_line_errors(sd_run, tmp_path, capsys):
    def error(*argv):
        assert wadi.main(["export", "--run", str(sd_run), *argv]) == 2
        return capsys.readouterr().err.strip()
    assert "give a file name ending in .safetensors" in error("--out", str(tmp_path / "x.ckpt"))
    (tmp_path / "x.safetensors").write_text("")
    assert "already exists; pass --overwrite" in error("--out", str(tmp_path / "x.safetensors"))
    assert "give a directory" in error("--format", "pipeline", "--out", str(tmp_path / "x.safetensors"))
