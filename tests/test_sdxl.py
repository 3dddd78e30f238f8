"""sdxl.py and `--backbone sdxl` through every command on a tiny SDXL repo written by diffusers /
transformers (tests/repo.py): the one-step image equal to a manual computation with diffusers'
StableDiffusionXLPipeline's own conditioning (encode_prompt, _get_add_time_ids), the DDIM teacher
equal to that pipeline with zeros for the empty prompt, the exact dry-run counts of the full config,
train, export (diffusers, pipeline, single-file, lora), analyze and an SDXL ControlNet."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import wadi
from diffusion import A_T, Text
from lorad import add_adapters, count_trainable, shared_copy
from pipeline import BACKBONES, load_pipeline, seeded_noise
from tests.conftest import randomize
from tests.repo import write_prompts, write_tiny_sdxl_repo
from unet import UNet

PROMPTS = ["a red cat", "a blue dog on the grass", "the sea at night"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_prompts(write_tiny_sdxl_repo(str(tmp_path_factory.mktemp("tiny-sdxl"))), PROMPTS)


@pytest.fixture(scope="module")
def run(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    assert wadi.main(["train", "--backbone", "sdxl", "--model", repo, "--prompts", os.path.join(repo, "prompts.txt"),
                      "--batch-size", "2", "--resolution", "16", "--rank", "4", "--rank-fake", "2", "--lr", "1e-2",
                      "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "100", "--out", str(out)]) == 0
    return out


def sample(tmp_path, name, *argv):
    out = str(tmp_path / f"{name}.png")
    assert wadi.main(["sample", "--prompt", "a red cat", "--out", out, *argv]) == 0
    return np.asarray(Image.open(out)).astype(int)


def diffusers_pipeline(repo):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(repo, local_files_only=True)


def to_uint8(images):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) as pipeline.Pipeline.decode rounds."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("height, width", [(16, 16), (16, 32)])
def test_one_step_image_equals_diffusers_conditioning(repo, tmp_path, height, width):
    """`sample --backbone sdxl` (one step) = x0 = (z - sqrt(1 - a_T) eps) / sqrt(a_T) with diffusers' U-Net
    given StableDiffusionXLPipeline's encode_prompt and _get_add_time_ids (original = target = (H, W), no crop),
    decoded by diffusers' VAE at its config's scaling factor 0.13025."""
    ref = diffusers_pipeline(repo)
    assert ref.vae.config.scaling_factor == 0.13025 and ref.vae.config.force_upcast
    z = seeded_noise((4, height // 2, width // 2), [5])
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)
        time_ids = ref._get_add_time_ids((height, width), (0, 0), (height, width), embeds.dtype,
                                         text_encoder_projection_dim=ref.text_encoder_2.config.projection_dim)
        eps = ref.unet(z, 999, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        x0 = (z - (1 - A_T) ** 0.5 * eps) / A_T ** 0.5
        image = ref.vae.decode(x0 / ref.vae.config.scaling_factor).sample
    ours = load_pipeline("sdxl", repo)
    text = ours.encode_prompts(["a red cat"], resolution=(height, width))
    assert torch.equal(text.time_ids, time_ids) and time_ids.tolist() == [[height, width, 0, 0, height, width]]
    assert (text.embeds - embeds).abs().max() < 1e-5 and (text.pooled - pooled).abs().max() < 1e-5
    got = ours.generate(["a red cat"], [5], resolution=(height, width))
    decoded = ours.vae.decode(x0)  # our VAE on diffusers' x0
    assert (decoded - image).abs().max() < 1e-4
    assert np.abs(got.astype(int) - to_uint8(image).astype(int)).max() <= 1 and got.std() > 5
    cli = sample(tmp_path, "cli", "--backbone", "sdxl", "--model", repo, "--height", str(height), "--width",
                 str(width), "--seed", "5")
    assert np.array_equal(cli, got[0].astype(int))


def test_ddim_teacher_equals_diffusers_with_zeros_for_the_empty_prompt(repo, tmp_path):
    """`sample --steps 3 --guidance 5`: diffusers' StableDiffusionXLPipeline with a DDIMScheduler of the repo's
    schedule (no negative prompt: force_zeros_for_empty_prompt), the same noise; 5 is SDXL's default scale."""
    from diffusers import DDIMScheduler
    assert BACKBONES["sdxl"].guidance == 5.0
    ref = diffusers_pipeline(repo)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    z = seeded_noise((4, 8, 8), [2])
    image = ref("a red cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16, latents=z,
                output_type="np").images[0]
    got = sample(tmp_path, "ddim", "--backbone", "sdxl", "--model", repo, "--resolution", "16", "--steps", "3",
                 "--seed", "2")
    assert np.abs(np.round(image * 255) - got).max() <= 1 and got.std() > 5
    pipe = load_pipeline("sdxl", repo)
    null = pipe.null_text(16)
    assert not null.embeds.any() and not null.pooled.any() and null.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]]


def test_text_fields_follow_the_batch():
    """diffusion.Text keeps SDXL's pooled text and time ids with their rows through expand, cat, where and to."""
    a = Text(torch.ones(1, 3, 4), pooled=torch.ones(1, 2), time_ids=torch.full((1, 6), 16.0))
    b = Text(torch.zeros(2, 3, 4), pooled=torch.zeros(2, 2), time_ids=torch.full((2, 6), 32.0))
    both = a.expand(2).cat(b)
    assert both.pooled.shape == (4, 2) and both.time_ids[:, 0].tolist() == [16, 16, 32, 32] and both.mask is None
    mixed = a.expand(2).where(torch.tensor([True, False]), b)
    assert mixed.pooled[:, 0].tolist() == [1, 0] and mixed.time_ids[:, 0].tolist() == [16, 32]
    half = both.to(dtype=torch.float16)
    assert half.embeds.dtype == half.pooled.dtype == torch.float16 and half.time_ids.dtype == torch.float32


def test_dry_run_counts_of_the_full_config(capsys):
    """The full SDXL U-Net on the meta device: LoRaD at the default rank 128 trains 265,297,920 parameters,
    10.3% of 2,567,463,684 (SD1.5's paper student: 9.7%); at the SD rule's 256, 530,595,840 (20.7%); the fake
    score at 32, 64,491,520; both text encoders 817.72M."""
    assert wadi.main(["train", "--backbone", "sdxl", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "ranks 128 / 32" in out and "total  2567.46M" in out
    assert "trainable 265.30M (265,297,920, 10.3% of the teacher)" in out
    assert "trainable 64.49M (64,491,520, 2.5% of the teacher)" in out
    assert "text encoder (both) 817.72M, VAE 83.65M" in out
    with open(os.path.join(BACKBONES["sdxl"].configs, "unet", "config.json")) as f:
        with torch.device("meta"):
            unet = UNet.from_config(json.load(f))
    assert count_trainable(add_adapters(shared_copy(unet), "student", 256)) == 530_595_840


def test_train_export_sample_analyze(repo, run, tmp_path, capsys):
    """A two-step run: its student samples from its file alone (backbone and base model in its metadata);
    --format pipeline samples our image in diffusers' StableDiffusionXLPipeline; --format single-file loads in
    diffusers' from_single_file with the merged U-Net and both text encoders exact; --format lora; analyze."""
    from diffusers import StableDiffusionXLPipeline
    with open(run / "run.json") as f:
        assert json.load(f)["backbone"] == "sdxl"
    student = load_file(str(run / "student.safetensors"))
    base = load_file(os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(student[k], base[k]) for k in base)
    ours = sample(tmp_path, "student", "--unet", str(run), "--resolution", "16", "--seed", "3")

    folder = str(tmp_path / "pipe")
    assert wadi.main(["export", "--run", str(run), "--format", "pipeline", "--out", folder]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    image = pipe("a red cat", num_inference_steps=1, guidance_scale=0.0, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(np.round(image * 255) - ours).max() <= 1 and ours.std() > 5

    single = str(tmp_path / "single.safetensors")
    assert wadi.main(["export", "--run", str(run), "--format", "single-file", "--out", single]) == 0
    state = load_file(single)
    assert {k.split(".")[0] for k in state} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    loaded = StableDiffusionXLPipeline.from_single_file(single, config=folder, local_files_only=True)
    assert loaded.unet.state_dict().keys() == student.keys()
    assert all(torch.equal(loaded.unet.state_dict()[k], v) for k, v in student.items())
    for part in ("text_encoder", "text_encoder_2"):
        want, got = load_file(os.path.join(repo, part, "model.safetensors")), getattr(loaded, part).state_dict()
        assert want.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in want.items()), part

    lora = str(tmp_path / "lora.safetensors")
    capsys.readouterr()
    assert wadi.main(["export", "--run", str(run), "--format", "lora", "--rank", "2", "--out", lora]) == 0
    assert 0 < float(capsys.readouterr().out.split("relative weight error ")[1].split()[0]) < 1
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_") for k in load_file(lora))

    assert wadi.main(["analyze", "--student", str(run), "--out", str(tmp_path / "analysis")]) == 0
    with open(tmp_path / "analysis" / "analysis.json") as f:
        report = json.load(f)
    assert report["summary"]["adapted"]["direction_mean"] > 0


def test_sdxl_controlnet_one_step_equals_diffusers(repo, tmp_path):
    """An SDXL ControlNet (diffusers' ControlNetModel.from_unet of the tiny U-Net, random weights: its add
    embedding takes the pooled text and time ids too) steers the one-step sample as diffusers computes it."""
    from diffusers import ControlNetModel
    ref = diffusers_pipeline(repo)
    torch.manual_seed(0)
    controlnet = randomize(ControlNetModel.from_unet(ref.unet, conditioning_embedding_out_channels=(8, 16)), 0.05)
    controlnet.save_pretrained(tmp_path / "controlnet")
    edges = np.zeros((16, 16, 3), np.uint8)
    edges[4:12, 6] = 255
    Image.fromarray(edges).save(tmp_path / "edges.png")
    got = sample(tmp_path, "control", "--backbone", "sdxl", "--model", repo, "--resolution", "16", "--seed", "1",
                 "--controlnet", str(tmp_path / "controlnet"), "--control-image", str(tmp_path / "edges.png"))
    z = seeded_noise((4, 8, 8), [1])
    cond = torch.from_numpy(edges).float().permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        embeds, _, pooled, _ = ref.encode_prompt("a red cat", device="cpu", do_classifier_free_guidance=False)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
        down, mid = controlnet(z, 999, embeds, controlnet_cond=cond, added_cond_kwargs=added, return_dict=False)
        eps = ref.unet(z, 999, embeds, added_cond_kwargs=added, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
        plain = ref.unet(z, 999, embeds, added_cond_kwargs=added).sample
        image = ref.vae.decode((z - (1 - A_T) ** 0.5 * eps) / A_T ** 0.5 / ref.vae.config.scaling_factor).sample
    assert (eps - plain).abs().max() > 0.1  # the ControlNet changes the prediction
    assert np.abs(got - to_uint8(image)[0].astype(int)).max() <= 1


def test_one_line_errors(repo, tmp_path, capsys):
    """A repo of the other family, SD's --official-prompts and learned embeddings on SDXL: one line, exit 2."""
    toy = BACKBONES["toy"].repo
    for argv, message in (
            (["sample", "--backbone", "sdxl", "--model", toy, "--prompt", "a", "--out", str(tmp_path / "x.png")],
             "is not SDXL's (no addition_embed_type text_time): it goes with --backbone sd15 or sd21"),
            (["sample", "--backbone", "sd15", "--model", repo, "--prompt", "a", "--out", str(tmp_path / "x.png")],
             "is SDXL's (addition_embed_type text_time): give --backbone sdxl"),
            (["train", "--backbone", "sdxl", "--official-prompts", "--dry-run"],
             "--official-prompts is the official SD code's CLIP mask"),
            (["sample", "--backbone", "sdxl", "--model", repo, "--prompt", "a", "--embedding", "x.pt", "--resolution",
              "16", "--out", str(tmp_path / "x.png")], "not PixArt's T5 or SDXL's two")):
        assert wadi.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
