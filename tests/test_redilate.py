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


def test_redilated_runs_dilated_only_from_its_timestep():
    unet = small_unet()
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    wrapped = redilate.Redilated(unet, 2, t_min=401)
    with torch.no_grad():
        assert torch.equal(wrapped(x, torch.tensor([400]), c), unet(x, torch.tensor([400]), c))
        with redilate.redilation(unet, 2):
            expected = unet(x, torch.tensor([401]), c)
        assert torch.equal(wrapped(x, torch.tensor([401]), c), expected)


def test_the_ddim_window_and_the_plan():
    """ScaleCrafter dilates the first 30 of 50 DDIM steps for SD1.5 at 1024 px (t >= 401 under SD's leading
    spacing), 20 for SD2.1; the one-step student always; auto only above the training resolution."""
    schedule = NoiseSchedule.from_config(json.load(open(os.path.join(ROOT, "configs", "sd15", "scheduler",
                                                                     "scheduler_config.json"))))
    steps = schedule.ddim_timesteps(50)
    assert redilate.dilated_from(steps, "sd15", 2) == 401 and redilate.dilated_from(steps, "sd21", 2) == 601
    assert redilate.dilated_from(steps, "sd15", 2.5) == 301
    unet = small_unet()
    assert redilate.plan("auto", "sd15", unet, (1024, 1024), 512, [999]) == (
        2.0, 0, "re-dilation: factor 2 on 27 convolutions (1024x1024 px, trained at 512); --redilate off turns it off")
    assert redilate.plan("auto", "sd15", unet, (1280, 1280), 512, steps)[:2] == (2.5, 301)
    assert redilate.plan("auto", "sd15", unet, (512, 512), 512, [999])[0] is None
    assert redilate.plan("off", "sd15", unet, (1024, 1024), 512, [999])[2].endswith(
        "(1024x1024 px, trained at 512: --redilate off)")
    assert redilate.plan(3, "sd15", unet, (512, 512), 512, [999])[0] == 3
    # no ScaleCrafter setting for 1024 x 1792: each side by its own ratio (the DDIM window of the larger)
    factor, t_min, line = redilate.plan("auto", "sd15", unet, (1024, 1792), 512, steps)
    assert factor == (2.0, 3.5) and t_min == 401 and "factor 2 x 3.5 (height x width)" in line
    assert redilate.plan("auto", "sd15", unet, (384, 1024), 512, [999])[0] == (1.0, 2.0)
    with pytest.raises(argparse.ArgumentTypeError):
        redilate.parse_option("0.5")
    assert redilate.parse_option("2.5") == 2.5 and redilate.parse_option("off") == "off"


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
