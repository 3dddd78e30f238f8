"""redilate.py: ScaleCrafter's re-dilation. Factor 1 is the plain network; a re-dilated convolution is F.conv2d
with the dilation and padding ScaleCrafter uses (a fractional factor: a stretched input, the plain output size); the
39 layers of SD1.5 and SD2.1 from their full configs; the DDIM window; the weights untouched and restored."""
import argparse
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import redilate
from diffusion import NoiseSchedule
from dit import PixArt
from tests.conftest import ROOT, randomize, small_unet_config
from unet import UNet


def small_unet(seed=0):
    torch.manual_seed(seed)
    return randomize(UNet.from_config(small_unet_config()), 0.05).eval()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("factor", [2, 3])
def test_integer_factors_are_dilated_convolutions(stride, factor):
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 4, 20, 20)
    expected = F.conv2d(x, conv.weight, conv.bias, stride, padding=factor, dilation=factor)
    assert torch.equal(redilate.redilated_conv(conv, x, factor), expected)
    assert expected.shape == conv(x).shape


@pytest.mark.parametrize("stride", [1, 2])
def test_a_fractional_factor_stretches_the_input_and_keeps_the_output_size(stride):
    """2.5 (ScaleCrafter's 1280 px): dilation 3 on the input stretched by 3 / 2.5 = 1.2, then resized back."""
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1)
    x = torch.randn(2, 4, 20, 20)
    stretched = F.interpolate(x, scale_factor=1.2, mode="bilinear")  # (2, 4, 24, 24)
    out = F.conv2d(stretched, conv.weight, conv.bias, stride, padding=3, dilation=3)
    expected = F.interpolate(out, size=(20 // stride, 20 // stride), mode="bilinear")
    got = redilate.redilated_conv(conv, x, 2.5)
    assert got.shape == conv(x).shape and torch.equal(got, expected)


def test_each_side_its_own_factor():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 16, 24)
    expected = F.conv2d(x, conv.weight, conv.bias, 1, padding=(2, 4), dilation=(2, 4))
    assert torch.equal(redilate.redilated_conv(conv, x, (2.0, 4.0)), expected)
    assert redilate.redilated_conv(conv, x, (1.0, 3.5)).shape == conv(x).shape


def test_factor_one_is_the_plain_network_and_the_forward_is_restored():
    unet = small_unet()
    x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = unet(x, t, c)
        with redilate.redilation(unet, 1):
            assert torch.equal(unet(x, t, c), plain)
        with redilate.redilation(unet, 2):
            dilated = unet(x, t, c)
        assert not torch.allclose(dilated, plain)
        assert all("forward" not in vars(m) for m in unet.modules())  # the class's forward again
        assert torch.equal(unet(x, t, c), plain)


def test_the_39_layers_of_sd15_and_sd21():
    """ResNet conv1 / conv2 and the samplers of down_blocks 1-3, the mid block and up_blocks 0-2 (not the
    highest-resolution blocks, attention, conv_in / conv_out or shortcuts), from the real full configs."""
    for backbone in ("sd15", "sd21"):
        cfg = json.load(open(os.path.join(ROOT, "configs", backbone, "unet", "config.json")))
        with torch.device("meta"):
            names = redilate.redilation_layers(UNet.from_config(cfg))
        assert len(names) == 39
        assert {n.split(".")[0] + "." + n.split(".")[1] for n in names if "blocks." in n} == {
            "down_blocks.1", "down_blocks.2", "down_blocks.3", "up_blocks.0", "up_blocks.1", "up_blocks.2"}
        assert sum("mid_block" in n for n in names) == 4
        assert [n for n in names if "samplers" in n] == [
            "down_blocks.1.downsamplers.0.conv", "down_blocks.2.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
            "up_blocks.1.upsamplers.0.conv", "up_blocks.2.upsamplers.0.conv"]
        assert not any(("attentions" in n or "shortcut" in n) for n in names)
    cfg = json.load(open(os.path.join(ROOT, "configs", "pixart-256", "transformer", "config.json")))
    with torch.device("meta"):
        assert redilate.redilation_layers(PixArt.from_config(cfg)) == []


def test_redilated_runs_dilated_only_in_its_window():
    unet = small_unet()
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    wrapped = redilate.Redilated(unet, redilate.Plan({n: 2 for n in redilate.redilation_layers(unet)}, 2),
                                 [801, 401, 1])
    with torch.no_grad():
        assert torch.equal(wrapped(x, torch.tensor([1]), c), unet(x, torch.tensor([1]), c))
        with redilate.redilation(unet, 2):
            expected = unet(x, torch.tensor([401]), c)
        assert torch.equal(wrapped(x, torch.tensor([401]), c), expected)


def test_the_ddim_window_and_the_plan():
    """ScaleCrafter dilates the first 30 of 50 DDIM steps for SD1.5 at 1024 px (t >= 401 under SD's leading
    spacing), 20 for SD2.1; the one-step student always; auto only above the training resolution."""
    steps = sd15_schedule().ddim_timesteps(50)
    unet = small_unet()
    assert [redilate.plan("auto", b, unet, (s, s), 512, steps)[1].split("t >= ")[1].split(")")[0]
            for b, s in (("sd15", 1024), ("sd21", 1024), ("sd15", 1280))] == ["401", "601", "301"]
    chosen, line = redilate.plan("auto", "sd15", unet, (1024, 1024), 512, [999])
    assert chosen == redilate.Plan({n: 2.0 for n in redilate.redilation_layers(unet)}, 1)
    assert line == ("re-dilation: factor 2 on 27 convolutions (1024x1024 px, trained at 512); "
                    "--redilate off turns it off")
    assert redilate.plan("auto", "sd15", unet, (1280, 1280), 512, steps)[0].steps == 35
    assert redilate.plan("auto", "sd15", unet, (512, 512), 512, [999])[0] is None
    assert redilate.plan("off", "sd15", unet, (1024, 1024), 512, [999])[1].endswith(
        "(1024x1024 px, trained at 512: --redilate off)")
    assert set(redilate.plan(3, "sd15", unet, (512, 512), 512, [999])[0].layers.values()) == {3.0}
    # no ScaleCrafter setting for 1024 x 1792: each side by its own ratio (the DDIM window of the larger)
    chosen, line = redilate.plan("auto", "sd15", unet, (1024, 1792), 512, steps)
    assert set(chosen.layers.values()) == {(2.0, 3.5)} and chosen.steps == 30
    assert "factor 2 x 3.5 (height x width)" in line and "t >= 401" in line
    assert set(redilate.plan("auto", "sd15", unet, (384, 1024), 512, [999])[0].layers.values()) == {(1.0, 2.0)}
    with pytest.raises(argparse.ArgumentTypeError):
        redilate.parse_option("0.5")
    assert redilate.parse_option("2.5") == 2.5 and redilate.parse_option("off") == "off"


def sd15_schedule():
    return NoiseSchedule.from_config(json.load(open(os.path.join(ROOT, "configs", "sd15", "scheduler",
                                                                 "scheduler_config.json"))))


def full_unet(backbone):
    with torch.device("meta"):
        return UNet.from_config(json.load(open(os.path.join(ROOT, "configs", backbone, "unet", "config.json"))))


def blocks(layers):
    """{block: the set of its factors} of a {layer: factor}."""
    out = {}
    for name, factor in layers.items():
        block = "mid_block" if name.startswith("mid") else ".".join(name.split(".")[:2])
        out.setdefault(block if "downsamplers" not in name or block != "down_blocks.2" else name, set()).add(factor)
    return out


def test_the_2048_class_recipe_is_scalecrafters():
    """At 2048 px (4x) `auto` is ScaleCrafter's assets/dilate_settings and ndcfg_dilate_settings files: SD1.5 2 / 3 / 4
    by block on the same 39 convolutions, noise-damped CFG on the 27 dilated by more than 2, both in the first 35 of
    50 DDIM steps; SD2.1 at 2048 x 2048 its own 40 (the highest-resolution up block included), ndcfg on 34, 37
    steps; SD2.1 at 2048 x 1024 SD1.5's factors with no ndcfg."""
    steps = sd15_schedule().ddim_timesteps(50)
    sd15, sd21 = full_unet("sd15"), full_unet("sd21")
    assert len(redilate.convolutions(sd15)) == 50  # ScaleCrafter's all_valid_convs.txt
    chosen, line = redilate.plan("auto", "sd15", sd15, (2048, 2048), 512, steps)
    ladder = {"down_blocks.1": {2}, "down_blocks.2": {3}, "down_blocks.2.downsamplers.0.conv": {3}, "down_blocks.3": {4},
              "mid_block": {4}, "up_blocks.0": {4}, "up_blocks.1": {3}, "up_blocks.2": {2}}
    assert set(chosen.layers) == set(redilate.redilation_layers(sd15)) and blocks(chosen.layers) == ladder
    assert len(chosen.damped) == 27 and blocks(chosen.damped) == {
        b: f for b, f in ladder.items() if b not in ("down_blocks.1", "up_blocks.2")}
    assert (chosen.steps, chosen.damped_steps, chosen.progressive) == (35, 35, True)
    assert line == ("re-dilation: factor 2/3/4 by block, progressive on 39 convolutions (2048x2048 px, trained at "
                    "512, DDIM steps at t >= 301, noise-damped CFG at t >= 301); --redilate off turns it off")
    assert redilate.plan("auto", "sd15", sd15, (1024, 2048), 512, steps)[0] == chosen  # ScaleCrafter's 2048x1024
    chosen = redilate.plan("auto", "sd21", sd21, (2048, 2048), 512, steps)[0]
    sd21_2048 = {"down_blocks.2": {3}, "down_blocks.2.downsamplers.0.conv": {4}, "down_blocks.3": {4},
                 "mid_block": {4}, "up_blocks.0": {4}, "up_blocks.1": {4}, "up_blocks.2": {3}, "up_blocks.3": {2}}
    assert len(chosen.layers) == 40 and blocks(chosen.layers) == sd21_2048
    assert len(chosen.damped) == 34 and (chosen.steps, chosen.damped_steps) == (37, 37)
    chosen = redilate.plan("auto", "sd21", sd21, (1024, 2048), 512, steps)[0]
    assert blocks(chosen.layers) == ladder and (chosen.steps, chosen.damped_steps) == (37, 0)
    # a given factor is one for all, as below 4x; the one-step student: the full factors, no ndcfg
    assert set(redilate.plan(4, "sd15", sd15, (2048, 2048), 512, steps)[0].layers.values()) == {4.0}
    one = redilate.plan("auto", "sd15", sd15, (2048, 2048), 512, [999])[0]
    assert one.at(0) == {n: f for n, f in one.layers.items()} and one.damped_steps == 0


def test_progressive_factors_shrink_over_the_window():
    """ScaleCrafter's max(ceil(f (tau - i) / tau), 2) at step i < tau, the plain network after."""
    chosen = redilate.Plan({"a": 4.0, "b": 3.0, "c": 2.0}, 35, True, {"a": 4.0}, 10)
    assert chosen.at(0) == {"a": 4, "b": 3, "c": 2}
    assert chosen.at(9) == {"a": 3, "b": 3, "c": 2}  # ceil(4 * 26 / 35) = 3, ceil(3 * 26 / 35) = 3
    assert chosen.at(18) == {"a": 2, "b": 2, "c": 2} and chosen.at(35) == {}
    assert chosen.at(5, damped=True) == {"a": 2} and chosen.at(10, damped=True) == {}


def test_noise_damped_cfg():
    """guided with a damped network: damped(x, t, c0) + s (net(x, t, c) - net(x, t, c0)); ddim_sample uses it in its
    first damped_steps only."""
    from diffusion import Text, ddim_sample, guided
    unet = small_unet()
    x, c, c0 = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32), torch.zeros(2, 5, 32)
    damped = redilate.Redilated(unet, redilate.Plan({}, 0, damped={n: 2 for n in redilate.redilation_layers(unet)},
                                                    damped_steps=1), [500], damped=True)
    t = torch.tensor([500, 500])
    with torch.no_grad():
        got = guided(unet, x, 500, Text(c), Text(c0), 3.0, damped)
        with redilate.redilation(unet, 2):
            base = unet(x, t, c0)
        expected = base + 3.0 * (unet(x, t, c) - unet(x, t, c0))
        assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, guided(
            unet, x, 500, Text(c), Text(c0), 3.0), atol=1e-3)
        calls = []

        def recording(x, t, c, mask):
            calls.append(int(t[0]))
            return torch.zeros_like(x)
        schedule = sd15_schedule()
        plain = ddim_sample(unet, schedule, x, Text(c), Text(c0), 3, 3.0)
        assert torch.equal(ddim_sample(unet, schedule, x, Text(c), Text(c0), 3, 3.0, damped=recording), plain)
        assert not torch.allclose(ddim_sample(unet, schedule, x, Text(c), Text(c0), 3, 3.0, damped=recording,
                                              damped_steps=2), plain)
        assert calls == [int(t) for t in schedule.ddim_timesteps(3)[:2]]


def test_sample_above_the_training_resolution(tmp_path, capsys):
    """`wadi.py sample` on the toy (trained at 32 px) at 64 px: re-dilation on by default, one line saying so; off
    when asked; a DiT backbone has nothing to dilate."""
    import numpy as np
    from PIL import Image

    import wadi
    out = str(tmp_path / "x.png")
    argv = ["sample", "--backbone", "toy", "--prompt", "a large red circle at the top left", "--out", out,
            "--resolution", "64"]
    assert wadi.main(argv) == 0
    assert "re-dilation: factor 2 on 19 convolutions (64x64 px, trained at 32); --redilate off turns it off" in \
        capsys.readouterr().out
    on = np.asarray(Image.open(out))
    assert on.shape == (64, 64, 3)
    assert wadi.main([*argv, "--redilate", "off"]) == 0
    assert "re-dilation: off (64x64 px, trained at 32: --redilate off)" in capsys.readouterr().out
    assert np.abs(np.asarray(Image.open(out)).astype(int) - on).max() > 0
    assert wadi.main(argv[:-2]) == 0 and "re-dilation" not in capsys.readouterr().out  # at 32 px: not a word
    assert wadi.main([*argv[:-1], "128", "--steps", "3"]) == 0  # the teacher, at 4x
    assert "re-dilation: factor 4 on 19 convolutions (128x128 px, trained at 32, DDIM steps at t >= 334)" in \
        capsys.readouterr().out  # no ScaleCrafter setting for the toy: one factor for all
    assert np.asarray(Image.open(out)).shape == (128, 128, 3)


def test_generate_with_the_2048_recipe_on_the_toy():
    """SD1.5's 2048 px recipe (`plan` with backbone sd15) on the toy teacher through Pipeline.generate: the
    noise-damped CFG pass changes the image; without it, the ladder alone still differs from no re-dilation."""
    import dataclasses

    import numpy as np

    from pipeline import load_pipeline
    pipe = load_pipeline("toy")
    recipe = redilate.plan("auto", "sd15", pipe.denoiser, (128, 128), 32, pipe.schedule.ddim_timesteps(4))[0]
    assert recipe.progressive and recipe.damped_steps == 3 and set(recipe.layers.values()) == {3.0, 4.0}
    args = (["a large red circle at the top left"], [0], 4, 3.0, 0.0047, 128)
    with_damping = pipe.generate(*args, redilate=recipe).astype(int)
    ladder = pipe.generate(*args, redilate=dataclasses.replace(recipe, damped_steps=0)).astype(int)
    plain = pipe.generate(*args).astype(int)
    assert np.abs(with_damping - ladder).max() > 0 and np.abs(ladder - plain).max() > 0


def test_sample_non_square_sizes(tmp_path, capsys):
    """--height / --width: a U-Net toy re-dilated side by side; the DiT toy has nothing to dilate; a side the
    network cannot take is one line."""
    import numpy as np
    from PIL import Image

    import wadi
    out = str(tmp_path / "x.png")
    common = ["--prompt", "a large red circle at the top left", "--out", out]
    assert wadi.main(["sample", "--backbone", "toy", "--height", "64", "--width", "96", *common]) == 0
    assert "factor 2 x 3 (height x width) on 19 convolutions (64x96 px, trained at 32)" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (64, 96, 3)
    assert wadi.main(["sample", "--backbone", "toy-dit", "--height", "32", "--width", "64", "--cache-dir",
                      str(tmp_path / "cache"), *common]) == 0
    assert "re-dilation: off (32x64 px, trained at 32: no convolutions to dilate)" in capsys.readouterr().out
    assert np.asarray(Image.open(out)).shape == (32, 64, 3)
    assert wadi.main(["sample", "--backbone", "toy-dit", "--width", "33", *common]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --width 33 is not a multiple of 2")


def test_freeu_matches_diffusers():
    """unet.freeu with FreeU's SD1.5 settings equals diffusers' enable_freeu (b1 1.2, b2 1.4, s1 0.9, s2 0.2),
    and the line `sample --freeu` prints."""
    from loading import load_weights
    from tests.conftest import unet_reference
    cfg = small_unet_config()
    ref = unet_reference(cfg)
    ours = load_weights(UNet.from_config(cfg), ref.state_dict()).eval()
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([500, 20]), torch.randn(2, 5, 32)
    ref.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert redilate.set_freeu(ours, "sd15", True) == "; FreeU on (b1 1.2, b2 1.4, s1 0.9, s2 0.2)"
    with torch.no_grad():
        expected = ref(x, t, c).sample
        assert torch.allclose(ours(x, t, c), expected, atol=1e-6, rtol=0)
        assert redilate.set_freeu(ours, "sd15", False) == "" and ours.freeu is None
        assert (ours(x, t, c) - expected).abs().max() > 1e-3  # FreeU changed the output
    cfg = json.load(open(os.path.join(ROOT, "configs", "pixart-256", "transformer", "config.json")))
    with torch.device("meta"):
        assert "not for this network" in redilate.set_freeu(PixArt.from_config(cfg), "pixart", True)


@pytest.mark.slow
def test_sample_at_1024_px_on_a_tiny_sd_repo(tmp_path, capsys):
    """`sample --resolution 1024` as a user runs it, on a tiny SD repo trained at 512 (about 80 s on 2 CPU cores,
    most of it the tiny VAE's attention over 512 x 512 latent positions): factor 2 on the U-Net's 27 convolutions.
    Its U-Net attends to the text only, so that 512 x 512 latents fit a CPU."""
    import shutil

    from diffusers import UNet2DConditionModel
    from PIL import Image

    import wadi
    from tests.repo import TEXT_DIM, write_tiny_sd_repo
    root = write_tiny_sd_repo(str(tmp_path / "tiny-sd"))
    shutil.rmtree(os.path.join(root, "unet"))
    torch.manual_seed(0)
    UNet2DConditionModel(**small_unet_config(cross_attention_dim=TEXT_DIM, only_cross_attention=True,
                                             mid_block_only_cross_attention=True)).save_pretrained(
        os.path.join(root, "unet"))
    out = str(tmp_path / "big.png")
    assert wadi.main(["sample", "--model", root, "--resolution", "1024", "--prompt", "a red cat", "--out", out]) == 0
    assert "re-dilation: factor 2 on 27 convolutions (1024x1024 px, trained at 512)" in capsys.readouterr().out
    assert Image.open(out).size == (1024, 1024)
