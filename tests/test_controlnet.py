"""controlnet.py against diffusers' ControlNetModel, and unet.py's residual inputs against UNet2DConditionModel's."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import ControlledUNet, ControlNet, check_fits, load_controlnet, prepare_control_image, \
    read_control_images
from loading import LoadError, load_weights
from unet import UNet, skip_channels
from tests.conftest import (ONLY_CROSS, SD21_STYLE, randomize, relative_error, small_unet_config,
                            unet_reference)


def controlnet_config(**overrides):
    """A small ControlNet config (diffusers keys): the test U-Net's encoder half, a two-level conditioning
    embedding (the control image is twice the sample's size)."""
    unet_only = ("up_block_types", "out_channels", "sample_size")
    cfg = {k: v for k, v in small_unet_config(**overrides).items() if k not in unet_only}
    return {**cfg, "_class_name": "ControlNetModel", "conditioning_embedding_out_channels": [8, 16]}


def reference_controlnet(cfg, seed=0):
    """diffusers' ControlNet with random weights everywhere: the zero convolutions are not zero."""
    from diffusers import ControlNetModel
    torch.manual_seed(seed)
    ref = ControlNetModel.from_config(cfg).eval()
    return randomize(ref, 0.05)


def inputs(cfg, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    context = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=g)
    image = torch.rand(batch, 3, 2 * size, 2 * size, generator=g)
    return x, torch.tensor([3, 977])[:batch], context, image


@pytest.mark.parametrize("overrides", [{}, SD21_STYLE, ONLY_CROSS], ids=["sd15_style", "sd21_style", "only_cross"])
def test_parity_with_diffusers_controlnet(overrides, tmp_path):
    cfg = controlnet_config(**overrides)
    ref = reference_controlnet(cfg)
    ref.save_pretrained(str(tmp_path))  # config.json + diffusion_pytorch_model.safetensors, read as a user would
    ours = load_controlnet(str(tmp_path))
    x, t, context, image = inputs(cfg)
    with torch.no_grad():
        expected = ref(x, t, context, image, conditioning_scale=0.5, return_dict=False)
        got = ours(x, t, context, image, conditioning_scale=0.5)
    assert len(got[0]) == len(expected[0]) == len(skip_channels(ours.config)) == 9
    for a, b in zip([*got[0], got[1]], [*expected[0], expected[1]]):
        assert b.abs().max() > 0.1
        assert relative_error(a, b) < 1e-5


def test_unet_with_residuals_matches_diffusers():
    cfg = small_unet_config()
    ref = unet_reference(cfg)
    ours = load_weights(UNet.from_config(cfg), ref.state_dict()).eval()
    x, t, context, _ = inputs(cfg)
    g = torch.Generator().manual_seed(2)
    sizes = [16] * 3 + [8] * 3 + [4] * 3  # conv_in, two resnets and a downsampler per level but the last
    down = [torch.randn(2, c, s, s, generator=g) for c, s in zip(skip_channels(ours.config), sizes)]
    mid = torch.randn(2, 64, 4, 4, generator=g)
    with torch.no_grad():
        expected = ref(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        got = ours(x, t, context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        plain = ours(x, t, context)
    assert relative_error(got, expected) < 1e-5
    assert relative_error(plain, expected) > 0.01  # the residuals matter
    with pytest.raises(ValueError, match="both"):
        ours(x, t, context, down_block_additional_residuals=down)


def test_controlled_unet_equals_diffusers_pipeline_step():
    """ControlNet then U-Net on a CFG batch [uncond; cond] with one control image per sample, as diffusers'
    pipeline feeds them: the image repeated for both halves."""
    cfg = small_unet_config()
    ref_unet, ref_cn = unet_reference(cfg), reference_controlnet(controlnet_config(), seed=3)
    unet = load_weights(UNet.from_config(cfg), ref_unet.state_dict()).eval()
    cn = load_weights(ControlNet.from_config(controlnet_config()), ref_cn.state_dict()).eval()
    x, _, context, image = inputs(cfg)
    batch_x, batch_c = torch.cat([x, x]), torch.cat([torch.zeros_like(context), context])
    with torch.no_grad():
        down, mid = ref_cn(batch_x, 500, batch_c, torch.cat([image, image]), conditioning_scale=0.7, return_dict=False)
        expected = ref_unet(batch_x, 500, batch_c, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        got = ControlledUNet(unet, cn, image, 0.7)(batch_x, 500, batch_c)
    assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("name", ["sd-controlnet-canny"])
def test_full_config_on_meta_matches_diffusers(name):
    from diffusers import ControlNetModel
    with open(f"configs/{name}/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours, ref = ControlNet.from_config(cfg), ControlNetModel.from_config(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 361_279_120
    with open("configs/sd15/unet/config.json") as f:
        with torch.device("meta"):
            check_fits(ours, UNet.from_config(json.load(f)), downscale=8)  # SD1.5's VAE: 8x smaller latents
    with open("configs/sd21/unet/config.json") as f:
        with torch.device("meta"), pytest.raises(LoadError, match=r"cross_attention_dim 768 != 1024"):
            check_fits(ours, UNet.from_config(json.load(f)), downscale=8)


def test_from_unet_copies_the_encoder_and_starts_as_a_no_op():
    cfg = small_unet_config()
    unet = load_weights(UNet.from_config(cfg), unet_reference(cfg).state_dict()).eval()
    cn = ControlNet.from_unet(unet, conditioning_embedding_out_channels=(8, 16)).eval()
    assert torch.equal(cn.down_blocks[1].attentions[0].proj_in.weight, unet.down_blocks[1].attentions[0].proj_in.weight)
    x, t, context, image = inputs(cfg)
    with torch.no_grad():
        down, mid = cn(x, t, context, image)
        assert all(not r.any() for r in [*down, mid])
        assert torch.equal(ControlledUNet(unet, cn, image)(x, t, context), unet(x, t, context))


@pytest.mark.parametrize("key,value", [("controlnet_conditioning_channel_order", "bgr"),
                                        ("global_pool_conditions", True), ("mid_block_type", "UNetMidBlock2D")])
def test_unsupported_config_is_a_clear_error(key, value):
    with pytest.raises(ValueError, match=f"unsupported ControlNet config: {key}={value!r}"):
        ControlNet.from_config({**controlnet_config(), key: value})


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(LoadError, match="file not found"):
        load_controlnet(str(tmp_path / "missing.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**controlnet_config(), "global_pool_conditions": True}))
    with pytest.raises(LoadError, match="cannot build a ControlNet from the config of .*global_pool_conditions"):
        load_controlnet(str(tmp_path))
    with pytest.raises(LoadError, match="control image not found"):
        read_control_images([str(tmp_path / "nope.png")], 32)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(LoadError, match="cannot read the control image"):
        read_control_images([str(tmp_path / "bad.png")], 32)


def test_control_image_prepared_as_diffusers(tmp_path):
    from diffusers.image_processor import VaeImageProcessor
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 28), dtype=np.uint8)),  # greyscale, not square
              Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8))]  # RGBA
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    expected = torch.cat([processor.preprocess(im, height=48, width=48) for im in images])
    got = prepare_control_image(images, 48)
    assert got.shape == (2, 3, 48, 48) and torch.equal(got, expected)
    path = str(tmp_path / "edge.png")
    images[0].save(path)
    assert torch.equal(read_control_images([path], 48), expected[:1])


# ------------------------------------------------------------------------------------------------------------
# `wadi.py sample --controlnet` on the tiny SD repository of tests/repo.py

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from tests.repo import write_tiny_sd_repo
    return write_tiny_sd_repo(str(tmp_path_factory.mktemp("tiny-sd")))


@pytest.fixture(scope="module")
def saved_controlnet(tmp_path_factory):
    """A tiny ControlNet for the tiny repo's U-Net, saved by diffusers; its conditioning embedding halves the
    image, as the tiny VAE does."""
    from tests.repo import TEXT_DIM
    directory = str(tmp_path_factory.mktemp("controlnet"))
    reference_controlnet(controlnet_config(cross_attention_dim=TEXT_DIM), seed=4).save_pretrained(directory)
    return directory


def edge_image(path, seed=0):
    """A greyscale 24 x 40 'edge map' PNG: resized to the output resolution and made RGB on the way in."""
    edges = np.random.default_rng(seed).integers(0, 2, (24, 40), dtype=np.uint8) * 255
    Image.fromarray(edges).save(path)
    return path


def diffusers_parts(repo, controlnet_dir, prompt):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel
    from pipeline import load_pipeline
    ids = load_pipeline("sd15", repo, vae=False).tokenizer([prompt, ""])  # our tokenizer: tests/test_clip.py
    with torch.no_grad():
        text, null = CLIPTextModel.from_pretrained(os.path.join(repo, "text_encoder"))(ids).last_hidden_state.chunk(2)
    return (UNet2DConditionModel.from_pretrained(os.path.join(repo, "unet")),
            ControlNetModel.from_pretrained(controlnet_dir), AutoencoderKL.from_pretrained(os.path.join(repo, "vae")),
            text, null)


def test_sample_one_step_with_controlnet_equals_diffusers(repo, saved_controlnet, tmp_path):
    import wadi
    from diffusers.image_processor import VaeImageProcessor
    image = edge_image(str(tmp_path / "edges.png"))
    out = str(tmp_path / "one.png")
    assert wadi.main(["sample", "--model", repo, "--controlnet", saved_controlnet, "--control-image", image,
                      "--control-scale", "0.5", "--prompt", "a red cat", "--out", out, "--resolution", "32",
                      "--seed", "3"]) == 0
    got = np.asarray(Image.open(out))

    unet, cn, vae, text, _ = diffusers_parts(repo, saved_controlnet, "a red cat")
    cond = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False).preprocess(
        Image.open(image), height=32, width=32)
    z = torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(3))[None]
    with torch.no_grad():
        down, mid = cn(z, 999, text, cond, conditioning_scale=0.5, return_dict=False)
        eps = unet(z, 999, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        x0 = (z - (1 - 0.0047) ** 0.5 * eps) / 0.0047 ** 0.5  # paper Sec. 3.3, T = 999
        expected = vae.decode(x0 / vae.config.scaling_factor).sample
        plain = unet(z, 999, text).sample
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert (eps - plain).abs().max() > 0.1  # the ControlNet changes the image


def test_sample_ddim_with_controlnet_equals_diffusers_pipeline(repo, saved_controlnet, tmp_path):
    """The teacher: DDIM + CFG, two prompts with one control image each, against diffusers'
    StableDiffusionControlNetPipeline on the same latents and text embeddings."""
    import wadi
    from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline
    images = [edge_image(str(tmp_path / f"edges{i}.png"), seed=i) for i in range(2)]
    out = str(tmp_path / "ddim")
    assert wadi.main(["sample", "--model", repo, "--controlnet", saved_controlnet, "--control-image", images[0],
                      "--control-image", images[1], "--prompt", "a red cat", "--prompt", "a dog", "--out", out,
                      "--resolution", "32", "--steps", "3", "--guidance", "3", "--batch-size", "2"]) == 0
    got = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:05d}.png"))) for i in range(2)])

    unet, cn, vae, text0, null = diffusers_parts(repo, saved_controlnet, "a red cat")
    text1 = diffusers_parts(repo, saved_controlnet, "a dog")[3]
    scheduler = DDIMScheduler.from_pretrained(os.path.join(repo, "scheduler"))
    pipe = StableDiffusionControlNetPipeline(vae, None, None, unet, cn, scheduler, None, None,
                                             requires_safety_checker=False)
    z = torch.stack([torch.randn((4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in range(2)])
    expected = pipe(prompt_embeds=torch.cat([text0, text1]), negative_prompt_embeds=torch.cat([null, null]),
                    image=[Image.open(p) for p in images], height=32, width=32, num_inference_steps=3,
                    guidance_scale=3.0, latents=z, output_type="np").images
    assert np.abs(got.astype(int) - (expected * 255).round().astype(int)).max() <= 1


def test_sample_controlnet_errors_are_one_line(repo, saved_controlnet, tmp_path, capsys):
    import wadi
    from tests.repo import TEXT_DIM
    image = edge_image(str(tmp_path / "edges.png"))
    common = ["sample", "--model", repo, "--prompt", "a", "--out", str(tmp_path / "x.png"), "--resolution", "32"]

    def error(*args):
        assert wadi.main([*common, *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "go together" in error("--controlnet", saved_controlnet)
    assert "one per prompt (1 prompts, 2 images)" in error("--controlnet", saved_controlnet, "--control-image", image,
                                                          "--control-image", image)
    assert "control image not found: nope.png" in error("--controlnet", saved_controlnet, "--control-image", "nope.png")
    assert "file not found: none.safetensors" in error("--controlnet", "none.safetensors", "--control-image", image)
    other = str(tmp_path / "other")
    reference_controlnet(controlnet_config(cross_attention_dim=2 * TEXT_DIM)).save_pretrained(other)
    assert "does not fit this U-Net (cross_attention_dim 64 != 32)" in error("--controlnet", other,
                                                                              "--control-image", image)
    canny = str(tmp_path / "canny")  # SD1.5's ControlNet config, no weights: the fit is checked before reading them
    os.makedirs(canny)
    shutil.copy("configs/sd-controlnet-canny/config.json", canny)
    assert "a ControlNet for another backbone" in error("--controlnet", canny, "--control-image", image)


@pytest.mark.slow
def test_toy_student_follows_the_shipped_controlnet(tmp_path):
    """Issue 17: the default toy student (`wadi.py train --backbone toy`) with the shipped toy ControlNet, trained
    on the teacher only, puts the object where the mask is at least 0.9x as often as the 25-step teacher with it,
    and far more often than without it (512 prompts without position; toyeval.CONTROL_PROTOCOL)."""
    import evaluate
    import wadi
    assert wadi.main(["train", "--backbone", "toy", "--out", str(tmp_path)]) == 0
    assert evaluate.main(["--toy-controlnet", "--student", str(tmp_path / "student.safetensors"),
                          "--out", str(tmp_path / "controlnet")]) == 0
    with open(tmp_path / "controlnet" / "metrics.json") as f:
        m = {name: r["position"] for name, r in json.load(f)["results"].items()}
    assert m["student_1_controlnet"] >= 0.9 * m["teacher_25_controlnet"], m
    assert m["student_1_controlnet"] >= m["student_1"] + 0.5, m  # chance is 0.25
