"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of the U-Net's encoder half that reads a conditioning image (edges, a
pose, a mask) and adds one residual to every skip connection and to the mid block of the frozen
U-Net, through zero-initialised 1x1 convolutions. WaDi plugs existing SD1.5 ControlNets into its
one-step student (paper Fig. 5; docs/controlnet.md): the student runs at t = 999 only, so the
ControlNet sees t = 999 too. SDXL's ControlNets also take its pooled text and time ids
(docs/sdxl.md).

`ControlNet` is built from unet.py's `UNetEncoder` (the same conv_in, time embedding, down and mid
blocks as the U-Net, so `lllyasviel/sd-controlnet-*` files load with strict=True in diffusers'
`ControlNetModel` keys) plus `controlnet_cond_embedding`, `controlnet_down_blocks` and
`controlnet_mid_block`. `ControlledUNet` is the `net(x, t, context)` that diffusion.py's samplers
call: ControlNet, then U-Net with its residuals, the control image repeated over the batch (CFG's
unconditional half included) as in diffusers' ControlNet pipeline. The config parsing
(`ControlNetConfig`) follows the networks, the loading of weights and control images comes last.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import mask_bias
from loading import (LoadError, fetch, fetch_file, load_weights, read_json, read_tensors,
                     read_weights)
from unet import UNetConfig, UNetEncoder, skip_channels

SD_EMBEDDING = (16, 32, 96, 256)  # diffusers' default conditioning embedding (SD's 8x latents)


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (B, C_cond, H, W) in [0, 1] -> features (B, C0, H / downscale,
    W / downscale): a 3x3 conv, then per further width a 3x3 conv and a stride-2 3x3 conv, SiLU
    after each; a zero-initialised `conv_out` (diffusers' `ControlNetConditioningEmbedding`)."""

    def __init__(self, out_channels, cond_channels, widths):
        super().__init__()
        self.conv_in = nn.Conv2d(cond_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, x):
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        return self.conv_out(x)


class ControlNet(UNetEncoder):
    """`forward(sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0)`
    -> (down_block_res_samples, mid_block_res_sample): the residuals that `UNet.forward` takes as
    `down_block_additional_residuals` / `mid_block_additional_residual`."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__(cfg)
        ch = cfg.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        self.controlnet_down_blocks = nn.ModuleList(
            [nn.Conv2d(c, c, 1) for c in skip_channels(cfg)])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    @classmethod
    def from_config(cls, cfg: dict):
        return cls(ControlNetConfig.from_dict(cfg))

    @classmethod
    def from_unet(cls, unet, conditioning_channels=3,
                  conditioning_embedding_out_channels=SD_EMBEDDING):
        """A new ControlNet for `unet` (diffusers' `ControlNetModel.from_unet`): its encoder half
        copied, the zero convolutions and the conditioning embedding's last conv zero, so that it
        starts as a no-op."""
        cfg = ControlNetConfig.for_unet(unet.config, conditioning_channels,
                                        conditioning_embedding_out_channels)
        net = cls(cfg).to(next(unet.parameters()).device)
        shared = ("conv_in", "time_embedding", "down_blocks", "mid_block")
        for name in shared + ("add_embedding",) * hasattr(unet, "add_embedding"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict())
        for zero in (net.controlnet_cond_embedding.conv_out, *net.controlnet_down_blocks,
                     net.controlnet_mid_block):
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        return net

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond,
                conditioning_scale=1.0, encoder_attention_mask=None, *, text_embeds=None,
                time_ids=None):
        # sample: (B, C, h, w), controlnet_cond: (B, C_cond, h * downscale, w * downscale) in
        # [0, 1], encoder_attention_mask: (B, L) or None, SDXL's text_embeds and time_ids: as the
        # U-Net's (an SDXL ControlNet embeds them as SDXL's U-Net does)
        emb = self.embed_time(sample, timestep, text_embeds, time_ids)
        h = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # (B, C0, h, w)
        bias = (None if encoder_attention_mask is None
                else mask_bias(encoder_attention_mask, sample.dtype))
        h, skips = self.encode(h, emb, encoder_hidden_states, bias)
        down = [conv(s) * conditioning_scale for conv, s in zip(self.controlnet_down_blocks, skips)]
        return down, self.controlnet_mid_block(h) * conditioning_scale


class ControlledUNet(nn.Module):
    """`net(sample, timestep, encoder_hidden_states, encoder_attention_mask=None, **sdxl)` for
    diffusion.predict: the ControlNet on the control image, then the U-Net with its residuals, both
    given SDXL's `text_embeds` and `time_ids` when the text has them.
    `image` (N, C_cond, H, W) in [0, 1] is repeated to the batch: one image for every sample, or one
    per sample, repeated once more for CFG's batch of [unconditional; conditional] (diffusers'
    StableDiffusionControlNetPipeline: both halves see the image)."""

    def __init__(self, unet, controlnet, image, scale=1.0):
        super().__init__()
        self.unet, self.controlnet, self.scale = unet, controlnet, scale
        self.image = image

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None, **sdxl):
        image = self.image.to(sample.device, sample.dtype)
        if sample.shape[0] % image.shape[0]:
            raise ValueError(f"{image.shape[0]} control images for a batch of {sample.shape[0]}")
        image = image.repeat(sample.shape[0] // image.shape[0], 1, 1, 1)  # (B, C_cond, H, W)
        down, mid = self.controlnet(sample, timestep, encoder_hidden_states, image, self.scale,
                                    encoder_attention_mask, **sdxl)
        return self.unet(sample, timestep, encoder_hidden_states, encoder_attention_mask,
                         down_block_additional_residuals=down, mid_block_additional_residual=mid,
                         **sdxl)


# ControlNet config keys whose value must be the one given here (what the lllyasviel SD1.5
# ControlNets use)
FIXED = {"controlnet_conditioning_channel_order": "rgb", "global_pool_conditions": False,
         "encoder_hid_dim_type": None}


@dataclass
class ControlNetConfig(UNetConfig):
    conditioning_channels: int = 3  # channels of the control image
    # the embedding's widths; each level after the first halves H and W
    conditioning_embedding_out_channels: tuple = SD_EMBEDDING

    @classmethod
    def from_dict(cls, cfg):
        """From a diffusers `ControlNetModel` config.json dict."""
        base = UNetConfig.from_dict(cfg, "ControlNet")
        for key, supported in FIXED.items():
            if cfg.get(key, supported) != supported:
                raise ValueError(f"unsupported ControlNet config: {key}={cfg[key]!r} "
                                 f"(supported: {supported!r})")
        widths = cfg.get("conditioning_embedding_out_channels", SD_EMBEDDING)
        return cls(**vars(base), conditioning_channels=cfg.get("conditioning_channels", 3),
                   conditioning_embedding_out_channels=tuple(widths))

    @classmethod
    def for_unet(cls, unet_config, conditioning_channels=3,
                 conditioning_embedding_out_channels=SD_EMBEDDING):
        """The config of a ControlNet copied from a U-Net with config `unet_config` (a
        UNetConfig)."""
        return cls(**{**vars(unet_config), "up_block_types": ()},
                   conditioning_channels=conditioning_channels,
                   conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))

    @property
    def downscale(self):
        """How much smaller than the control image the denoiser's input is (8 for SD's latents, 1
        in pixel space)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def check_fits(controlnet, unet, downscale, what="the ControlNet"):
    """Raise LoadError unless `controlnet`'s residuals fit `unet` (same skip widths, text width and
    input channels) and its conditioning embedding shrinks the control image by `downscale` (the
    VAE's factor)."""
    a, b = controlnet.config, unet.config
    pairs = {"cross_attention_dim": (a.cross_attention_dim, b.cross_attention_dim),
             "addition_time_embed_dim (SDXL's)": (a.addition_time_embed_dim, b.addition_time_embed_dim),
             "in_channels": (a.in_channels, b.in_channels),
             "block_out_channels / layers_per_block (skip widths)":
                 (skip_channels(a), skip_channels(b)),
             "downscale of the conditioning embedding": (a.downscale, downscale)}
    wrong = [f"{key} {ours} != {theirs}" for key, (ours, theirs) in pairs.items() if ours != theirs]
    if wrong:
        raise LoadError(f"{what} does not fit this U-Net ({'; '.join(wrong)}): a ControlNet for "
                        f"another backbone?")


def load_controlnet(spec, unet=None, downscale=1, dtype=torch.float32, device="cpu",
                    option="--controlnet"):
    """A ControlNet from `spec`: a directory or Hugging Face repo in diffusers' layout (config.json
    and diffusion_pytorch_model.safetensors at its root, e.g. lllyasviel/sd-controlnet-canny), or
    one safetensors file in diffusers keys (a local path or owner/repo/file on the Hub) with its
    config.json beside it. Given the `unet` it will steer, a file without config.json gets
    `ControlNet.from_unet`'s config, and the ControlNet must fit it (`check_fits` with `downscale`)
    before any weight is read. Frozen, in eval mode; a LoadError for anything the user can fix,
    naming the command-line `option`."""
    repo = os.path.isdir(spec) or (spec.count("/") == 1 and not spec.startswith((".", "/", "~")))
    path = None if repo else fetch_file(spec, option)
    config_file = (fetch(spec, "config.json") if repo
                   else os.path.join(os.path.dirname(path), "config.json"))
    if not os.path.isfile(config_file) and unet is None:
        raise LoadError(f"no config.json beside {spec}")
    try:
        with torch.device("meta"):
            net = ControlNet(ControlNetConfig.from_dict(read_json(config_file))
                             if os.path.isfile(config_file)
                             else ControlNetConfig.for_unet(unet.config))
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"cannot build a ControlNet from the config of {spec}: {e}") from None
    if unet is not None:
        check_fits(net, unet, downscale, f"the ControlNet {spec}")
    state = read_weights(spec, "", dtype) if repo else read_tensors(path)
    load_weights(net, state, what=f"ControlNet {spec}", dtype=dtype)
    return net.to(device).eval().requires_grad_(False)


def read_control_images(paths, resolution):
    """`prepare_control_image` of image files; a LoadError naming a file that is missing or not an
    image."""
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                images.append(im.copy())
        except FileNotFoundError:
            raise LoadError(f"control image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise LoadError(f"cannot read the control image {path}: {e}") from None
    return prepare_control_image(images, resolution)


def prepare_control_image(images, resolution):
    """Control images as diffusers' ControlNet pipeline prepares them (VaeImageProcessor with
    do_convert_rgb, no normalisation): PIL images resized to resolution x resolution (Lanczos),
    then RGB, (N, 3, H, W) in [0, 1]."""
    from PIL import Image
    arrays = [np.asarray(im.resize((resolution, resolution), Image.LANCZOS).convert("RGB"),
                         dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (N, 3, H, W)
