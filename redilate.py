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
  t = 999, which is the first step: re-dilation is simply on for it;
- at 2048 px from 512 (4x, "2048-class") ScaleCrafter gives each block its own factor (`ladder`:
  SD1.5 2 / 3 / 4 from the shallowest dilated block to the deepest), shrinking over the DDIM window
  ("progressive": max(ceil(f (tau - i) / tau), 2) at step i), and takes the unconditional base of
  CFG from a second pass with only the layers dilated by more than 2 ("noise-damped CFG").

The weights are untouched; `redilation` swaps the convolutions' forward for the call and restores it.
ScaleCrafter also turns FreeU on by default (unet.freeu); here it is an option (`set_freeu`), off by
default, since its effect on a one-step student is untested.
"""
import argparse
import contextlib
import dataclasses
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unet import FREEU

# ScaleCrafter's configs (its configs/*.yaml), by backbone and factor (height x width where the sides
# differ): of 50 DDIM steps, how many run dilated and how many with noise-damped CFG. Elsewhere 30 / 0
SETTINGS = {("sd15", 2.0): (30, 0), ("sd15", 2.5): (35, 0), ("sd21", 2.0): (20, 0), ("sd21", 2.5): (35, 0),
            ("sd15", 4.0): (35, 35), ("sd15", (2.0, 4.0)): (35, 35), ("sd21", 4.0): (37, 37),
            ("sd21", (2.0, 4.0)): (37, 0)}
LADDER_FROM = 4  # the side ratio from which `auto` gives each block its own factor (2048 px at 512)
# SD2.1 at 2048 x 2048: ScaleCrafter's own factors (not the ladder), by the layers' name prefix
SD21_2048 = {"down_blocks.2.resnets.": 3, "down_blocks.2.downsamplers.": 4, "down_blocks.3.": 4,
             "mid_block.": 4, "up_blocks.0.": 4, "up_blocks.1.": 4, "up_blocks.2.": 3, "up_blocks.3.": 2}


def convolutions(unet):
    """The names of the convolutions ScaleCrafter may re-dilate: ResNets' conv1 / conv2 and the
    samplers' (50 in SD1.5 and SD2.1); none in a network without up blocks (PixArt's transformer)."""
    if not hasattr(unet, "up_blocks"):
        return []
    return [name for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and name.rsplit(".", 1)[-1] in ("conv1", "conv2", "conv")
            and (".resnets." in name or ".downsamplers." in name or ".upsamplers." in name)]


def redilation_layers(unet):
    """The `convolutions` ScaleCrafter re-dilates below 2048 px: all but the highest-resolution blocks'
    (module docstring)."""
    last_up = f"up_blocks.{len(getattr(unet, 'up_blocks', [])) - 1}."
    return [n for n in convolutions(unet) if not n.startswith(("down_blocks.0.", last_up))]


def ladder(unet, top):
    """{layer: factor} giving the `redilation_layers` of each U-Net level their own factor: `top` to
    the deepest level and the mid block, one less per level above it, at least 2 (the up blocks
    mirror the down blocks). For SD1.5 at 4: 2 / 3 / 4, ScaleCrafter's 2048 px setting exactly."""
    depth = len(unet.down_blocks) - 1

    def level(name):
        block, index = name.split(".")[:2]
        return depth if block == "mid_block" else int(index) if block == "down_blocks" \
            else depth - int(index)
    return {n: max(2.0, top - depth + level(n)) for n in redilation_layers(unet)}


def by_prefix(unet, factors):
    """{layer: factor} for the `convolutions` whose names start with a key of `factors`."""
    return {n: float(f) for n in convolutions(unet) for p, f in factors.items() if n.startswith(p)}


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
def redilation(unet, factors):
    """Within the block, the convolutions of `unet` run re-dilated: `factors` is {layer: factor}, or
    one factor for all the `redilation_layers`."""
    if not isinstance(factors, dict):
        factors = {n: factors for n in redilation_layers(unet)}
    convs = {unet.get_submodule(n): f for n, f in factors.items()}
    for conv, factor in convs.items():
        conv.forward = functools.partial(redilated_conv, conv, factor=factor)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


@dataclasses.dataclass
class Plan:
    """Where and when to re-dilate: {layer: factor} for the first `steps` steps of a DDIM run (all:
    the one-step student), shrinking over them when `progressive`; noise-damped CFG takes its
    unconditional base from a pass with `damped` for the first `damped_steps`."""
    layers: dict
    steps: int = 1
    progressive: bool = False
    damped: dict = dataclasses.field(default_factory=dict)
    damped_steps: int = 0

    def at(self, i, damped=False):
        """{layer: factor} at DDIM step i (0: the first, t = 999)."""
        layers, tau = (self.damped, self.damped_steps) if damped else (self.layers, self.steps)
        if i >= tau:
            return {}
        if not self.progressive:
            return layers
        return {n: max(math.ceil(f * (tau - i) / tau), 2) for n, f in layers.items()}


class Redilated(nn.Module):
    """`net` (called as net(x, t, ...)) with the convolutions of `unet` (default: `net` itself; a
    ControlNet's U-Net) re-dilated as `plan` says at each of the `timesteps` (first to last; [999]:
    the one-step student); the noise-damped pass where `damped`."""

    def __init__(self, net, plan: Plan, timesteps, unet=None, damped=False):
        super().__init__()
        self.net, self.plan, self.unet, self.damped = net, plan, unet or net, damped
        self.step = {int(t): i for i, t in enumerate(timesteps)}

    def forward(self, x, t, *args, **kwargs):
        with redilation(self.unet, self.plan.at(self.step[int(torch.as_tensor(t).max())], self.damped)):
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


def window(n, tau):
    """DDIM steps of n in ScaleCrafter's window of tau of 50: the same share, at least 1 if tau > 0."""
    return max(1, math.ceil(n * tau / 50)) if tau else 0


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
    """(Plan or None, one line saying what was chosen) for `--redilate option` (auto, off or a factor
    >= 1) on `unet` sampling images of `size` (H, W) px (trained at `native`) with the DDIM
    `timesteps` (one step: [999]). `auto` is ScaleCrafter's setting where it has one: one factor
    for all below 4x; at 2048 px from 512 each block its own (`ladder`; SD2.1 2048 x 2048:
    `SD21_2048`), progressive, with noise-damped CFG. Where it has none (other sizes, the toys) and
    for a given factor: one factor for all (on the toy at 4x it beats the ladder: docs/highres.md)."""
    factor = auto_factor(size, native) if option == "auto" else None if option == "off" \
        else float(option)
    layers, shown = redilation_layers(unet), f"{size[0]}x{size[1]} px, trained at {native}"
    if not layers or not factor or factor == 1:
        why = ("no convolutions to dilate" if not layers else "--redilate off" if option == "off"
               else "not above the training resolution" if option == "auto" else "factor 1")
        return None, f"re-dilation: off ({shown}: {why})"
    top = max(factor) if isinstance(factor, tuple) else factor
    key = tuple(sorted(factor)) if isinstance(factor, tuple) else factor  # 2048 x 1024 either way
    tau, damped_tau = SETTINGS.get((backbone, key), (30, 0))
    steps = len(timesteps)
    if option == "auto" and top >= LADDER_FROM and (backbone, key) in SETTINGS:
        layers = by_prefix(unet, SD21_2048) if (backbone, key) == ("sd21", 4.0) else ladder(unet, top)
        chosen = Plan(layers, window(steps, tau), True, {n: f for n, f in layers.items() if f > 2},
                      window(steps, damped_tau) if steps > 1 else 0)
        named = "/".join(f"{f:g}" for f in sorted(set(layers.values()))) + " by block, progressive"
    else:
        chosen = Plan({n: factor for n in layers}, window(steps, tau))
        named = " x ".join(f"{f:g}" for f in factor) + " (height x width)" \
            if isinstance(factor, tuple) else f"{factor:g}"
    when = f", DDIM steps at t >= {timesteps[chosen.steps - 1]}" if steps > 1 else ""
    if chosen.damped_steps:
        when += f", noise-damped CFG at t >= {timesteps[chosen.damped_steps - 1]}"
    return chosen, (f"re-dilation: factor {named} on {len(chosen.layers)} convolutions ({shown}{when}); "
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
