"""Re-dilation for images above the training resolution (ScaleCrafter, He et al., ICLR 2024;
docs/highres.md): a U-Net trained at 512 px and asked for 1024 px draws repeated objects and broken
layouts, because its convolutions see too small a part of the larger canvas. ScaleCrafter runs the
chosen 3x3 convolutions dilated by the resolution factor instead, with no training:

- a factor f gives dilation d = ceil(f) with padding d (a k x k kernel: d (1 + (k - 3) / 2)); a
  fractional f (2.5 at 1280 px) first resizes the input bilinearly by d / f and the output back to
  the size the plain convolution gives (a "fractional dilated convolution");
- the convolutions are the ResNets' conv1 / conv2 and the down- and upsamplers' of every block but the
  highest-resolution ones (down_blocks.0, the last up block); never attention, conv_in / conv_out or
  the shortcuts: 39 in SD1.5 and SD2.1 (`redilation_layers`);
- DDIM runs dilated only in its first, high-noise steps (ScaleCrafter's dilate_tau of 50 steps:
  SD1.5 30 at 1024 px, SD2.1 20, both 35 at 1280 px); WaDi's one-step student makes a single call at
  t = 999, which is the first step: re-dilation is simply on for it.

The weights are untouched; `redilation` swaps the convolutions' forward for the call and restores it.
ScaleCrafter also turns FreeU on by default (unet.freeu); here it is an option (`set_freeu`), off by
default, since its effect on a one-step student is untested.
"""
import argparse
import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import FREEU

# ScaleCrafter's DDIM window, in steps of 50 dilated, by backbone and factor (its configs/*.yaml);
# elsewhere the SD1.5 1024 px share, 30 of 50
DILATE_TAU = {("sd15", 2.0): 30, ("sd15", 2.5): 35, ("sd21", 2.0): 20, ("sd21", 2.5): 35}


def redilation_layers(unet):
    """The names of the convolutions ScaleCrafter re-dilates in `unet` (module docstring); none in a
    network without up blocks (PixArt's transformer)."""
    if not hasattr(unet, "up_blocks"):
        return []
    last_up = f"up_blocks.{len(unet.up_blocks) - 1}."
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and name.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv")
            and (".resnets." in name or ".downsamplers." in name or ".upsamplers." in name)
            and not name.startswith(("down_blocks.0.", last_up))]


def redilated_conv(conv: nn.Conv2d, x, factor):
    """conv(x) (B, C, H, W) re-dilated by `factor` (a number, or (height, width) factors: a
    non-square image dilates each side by its own ratio): dilation ceil(factor) on x stretched by
    ceil(factor) / factor, the output resized back to the plain convolution's (H / s, W / s)."""
    factors = factor if isinstance(factor, tuple) else (factor, factor)
    dilation = tuple(math.ceil(f) for f in factors)
    stretch = tuple(d / f for d, f in zip(dilation, factors))
    size = (x.shape[-2] // conv.stride[0], x.shape[-1] // conv.stride[1])
    if stretch != (1, 1):
        x = F.interpolate(x, scale_factor=stretch, mode="bilinear")
    padding = tuple(d * (1 + (k - 3) // 2) for d, k in zip(dilation, conv.kernel_size))
    out = F.conv2d(x, conv.weight, conv.bias, conv.stride, padding, dilation, conv.groups)
    return out if stretch == (1, 1) else F.interpolate(out, size=size, mode="bilinear")


@contextlib.contextmanager
def redilation(unet, factor, names=None):
    """Within the block, the convolutions `names` (default: `redilation_layers`) of `unet` run
    re-dilated by `factor`."""
    convs = [unet.get_submodule(n) for n in (redilation_layers(unet) if names is None else names)]
    for conv in convs:
        conv.forward = functools.partial(redilated_conv, conv, factor=factor)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


class Redilated(nn.Module):
    """`net` (called as net(x, t, ...)) with the convolutions of `unet` (default: `net` itself; a
    ControlNet's U-Net) re-dilated by `factor` at the timesteps t >= t_min (DDIM's first steps; 0:
    every call, as the one-step student's)."""

    def __init__(self, net, factor, t_min=0, unet=None):
        super().__init__()
        self.net, self.factor, self.t_min, self.unet = net, factor, t_min, unet or net

    def forward(self, x, t, *args, **kwargs):
        if torch.as_tensor(t).max().item() < self.t_min:
            return self.net(x, t, *args, **kwargs)
        with redilation(self.unet, self.factor):
            return self.net(x, t, *args, **kwargs)


def auto_factor(size, native):
    """--redilate auto for images of `size` (H, W) px from a network trained at `native` px: each
    side's ratio to it (at least 1), a single number when they are equal (1024 / 512 = 2 and 1280 /
    512 = 2.5, ScaleCrafter's two square settings), or None (off) when neither side is above it.
    ScaleCrafter has no setting for other shapes (e.g. 1024 x 1792); dilating each side by its own
    ratio gives every side the receptive field, relative to the canvas, it had in training."""
    ratios = tuple(max(1.0, side / native) for side in size)
    if max(ratios) == 1:
        return None
    return ratios[0] if ratios[0] == ratios[1] else ratios


def dilated_from(timesteps, backbone, factor):
    """The smallest timestep DDIM runs dilated, for its `timesteps` (first to last): the first
    DILATE_TAU / 50 of them (rounded up)."""
    tau = DILATE_TAU.get((backbone, float(max(factor) if isinstance(factor, tuple) else factor)), 30)
    return int(timesteps[max(1, math.ceil(len(timesteps) * tau / 50)) - 1])


def parse_option(text):
    """An argparse type for --redilate: auto, off, or a factor >= 1."""
    if text in ("auto", "off"):
        return text
    try:
        factor = float(text)
    except ValueError:
        factor = 0.0
    if not (math.isfinite(factor) and factor >= 1):
        raise argparse.ArgumentTypeError(f"must be auto, off or a number >= 1, got {text!r}")
    return factor


def plan(option, backbone, unet, size, native, timesteps):
    """(factor or None, the smallest timestep run dilated, one line saying what was chosen) for
    `--redilate option` (auto, off or a factor >= 1) on `unet` sampling images of `size` (H, W) px
    (trained at `native`) with the DDIM `timesteps` (one step: [999])."""
    factor = auto_factor(size, native) if option == "auto" else None if option == "off" \
        else float(option)
    layers, shown = redilation_layers(unet), f"{size[0]}x{size[1]} px, trained at {native}"
    if not layers or not factor or factor == 1:
        why = ("no convolutions to dilate" if not layers else "--redilate off" if option == "off"
               else "not above the training resolution" if option == "auto" else "factor 1")
        return None, 0, f"re-dilation: off ({shown}: {why})"
    t_min = dilated_from(timesteps, backbone, factor) if len(timesteps) > 1 else 0
    steps = f", DDIM steps at t >= {t_min}" if len(timesteps) > 1 else ""
    named = " x ".join(f"{f:g}" for f in factor) + " (height x width)" if isinstance(factor, tuple) \
        else f"{factor:g}"
    return factor, t_min, (f"re-dilation: factor {named} on {len(layers)} convolutions ({shown}{steps}); "
                           f"--redilate off turns it off")


def set_freeu(unet, backbone, on):
    """Switch FreeU (unet.freeu) on with the backbone's published settings (unet.FREEU; SD1.5's for
    the toys) or off; returns the words to add to the re-dilation line."""
    if not hasattr(unet, "freeu"):
        return "; FreeU: not for this network (no U-Net up blocks)" if on else ""
    unet.freeu = FREEU.get(backbone, FREEU["sd15"]) if on else None
    if not on:
        return ""
    (b1, s1), (b2, s2) = unet.freeu
    return f"; FreeU on (b1 {b1:g}, b2 {b2:g}, s1 {s1:g}, s2 {s2:g})"
