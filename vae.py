"""The Stable Diffusion VAE (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"): a KL-regularised convolutional autoencoder. The encoder maps an image
(B, 3, H, W) in [-1, 1] to a diagonal Gaussian over latents (B, 4, H/f, W/f), with the downsampling
factor f = 2**(len(block_out_channels) - 1) = 8 for SD; the decoder maps latents back to images.

`encode` and `decode` speak the denoiser's latent scale: `encode` returns
`(z - shift_factor) * scaling_factor` and `decode` undoes it, as SD pipelines do around the VAE.
Module and parameter names follow diffusers' `AutoencoderKL`, so its state dicts load with
strict=True. The config parsing (`VAEConfig`) follows the network.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # every GroupNorm in the SD VAE


class SpatialAttention(Attention):
    """Single-head self-attention over the pixels of a feature map, with its own `group_norm` and a
    residual: the attention of the VAE's mid block."""

    def __init__(self, ch, groups):
        super().__init__(ch, heads=1, head_dim=ch, bias=True)
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (diffusers' `UNetMidBlock2D`, no time
    embedding)."""

    def __init__(self, ch, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(ch, ch, groups=groups, eps=EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialAttention(ch, groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`layers` ResNet blocks, then (except in the last block) a stride-2 convolution."""

    def __init__(self, in_ch, out_ch, layers, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(out_ch if i else in_ch, out_ch, groups=groups,
                                                    eps=EPS) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)] if downsample else [])

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H/2, W/2), or (B, C_out, H, W) last
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers` ResNet blocks, then (except in the last block) nearest x2 upsampling and a
    convolution."""

    def __init__(self, in_ch, out_ch, layers, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(out_ch if i else in_ch, out_ch, groups=groups,
                                                    eps=EPS) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)] if upsample else [])

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, 2H, 2W), or (B, C_out, H, W) last
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> posterior moments (B, 2 * latent_channels, H/f, W/f): mean,
    logvar."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups,
                               downsample=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)  # (B, ch[0], H, W)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)  # (B, ch[-1], H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2 * latent, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, out_channels, h*f, w*f); each up block has one
    ResNet more than the matching down block."""

    def __init__(self, cfg):
        super().__init__()
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        n = len(ch)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups,
                             upsample=i < n - 1) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(groups, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))  # (B, ch[0], h, w)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, h*f, w*f)


class AutoencoderKL(nn.Module):
    """The SD VAE: Encoder, 1x1 `quant_conv` on the moments, 1x1 `post_quant_conv` on the latent,
    Decoder."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        latent = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if cfg.use_post_quant_conv else None

    @classmethod
    def from_config(cls, cfg: dict):
        """Build from a diffusers `vae/config.json` dict (a ValueError on what is not
        implemented)."""
        return cls(VAEConfig.from_dict(cfg))

    def encode(self, x, generator=None):
        """Images x (B, 3, H, W) in [-1, 1] -> latents (B, C, H/8, W/8) on the denoiser's scale,
        `(z - shift_factor) * scaling_factor`. z is the posterior mean, or, when a torch.Generator
        is given, a sample mean + std * eps with eps ~ N(0, I) drawn on the generator's device."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        z, logvar = moments.chunk(2, dim=1)  # (B, C, H/8, W/8) each
        if generator is not None:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            eps = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype)
            z = z + std * eps.to(z.device)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, z):
        """Latents z (B, C, H/8, W/8) on the denoiser's scale (as `encode` returns them) -> images
        (B, 3, H, W), roughly in [-1, 1] (not clamped)."""
        z = z / self.config.scaling_factor + self.config.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


@dataclass
class VAEConfig:
    """The fields of a diffusers `vae/config.json` that shape the model (diffusers' defaults)."""
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, cfg):
        """Keep the known keys of a config.json dict, check that we implement what it asks for."""
        c = cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        c.block_out_channels = tuple(c.block_out_channels)
        c.down_block_types, c.up_block_types = tuple(c.down_block_types), tuple(c.up_block_types)
        c.shift_factor = c.shift_factor or 0.0
        n = len(c.block_out_channels)
        if set(c.down_block_types) != {"DownEncoderBlock2D"} or len(c.down_block_types) != n:
            raise ValueError(f"VAE config: down_block_types must be {n} x 'DownEncoderBlock2D' "
                             f"(one per block_out_channels), got {list(c.down_block_types)}")
        if set(c.up_block_types) != {"UpDecoderBlock2D"} or len(c.up_block_types) != n:
            raise ValueError(f"VAE config: up_block_types must be {n} x 'UpDecoderBlock2D' "
                             f"(one per block_out_channels), got {list(c.up_block_types)}")
        if c.act_fn != "silu":
            raise ValueError(f"VAE config: act_fn {c.act_fn!r} is not supported (only 'silu')")
        if any(ch % c.norm_num_groups for ch in c.block_out_channels):
            raise ValueError(f"VAE config: block_out_channels {list(c.block_out_channels)} must "
                             f"all be divisible by norm_num_groups {c.norm_num_groups}")
        if c.latents_mean is not None or c.latents_std is not None:
            raise ValueError("VAE config: per-channel latents_mean/latents_std are not supported "
                             "(only scaling_factor and shift_factor)")
        return c



def rename_legacy_keys(state):
    """Old diffusers VAE files (the SD1.5 and SD2.1 repos among them) name the mid-block attention
    `query`, `key`, `value`, `proj_attn`; return `state` with today's `to_q`, `to_k`, `to_v`,
    `to_out.0`."""
    legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.",
              ".proj_attn.": ".to_out.0."}
    out = {}
    for k, v in state.items():
        if ".mid_block.attentions." in k:
            for old, new in legacy.items():
                k = k.replace(old, new)
        out[k] = v
    return out
