"""The Stable Diffusion U-Net (Rombach et al. 2022): the denoiser that WaDi distills and adapts.

Built from a diffusers `unet/config.json` dict (SD1.5, SD2.1 and SDXL are covered: per-block head
counts and transformer depths, linear or 1x1-conv projections, attention upcasting, any
cross-attention width, SDXL's pooled-text and size / crop conditioning) with `state_dict()`
keys identical to diffusers' `UNet2DConditionModel`, so official weight files, the released WaDi
one-step files included, load with strict=True. The blocks come from layers.py. `UNetEncoder` is the
half a ControlNet copies (conv_in, time embedding, down and mid blocks); `UNet` adds the up blocks
and takes a ControlNet's residuals (controlnet.py) under diffusers' names. The config parsing
(`UNetConfig`) follows the network.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (Attention, Downsample2D, FeedForward, ResnetBlock2D, TimestepEmbedding,
                    Upsample2D, checkpointed, mask_bias, timestep_embedding)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention onto the text, GEGLU feed-forward; pre-LayerNorm residuals.
    With `only_cross`, the first attention attends to the text as well (diffusers'
    only_cross_attention)."""

    def __init__(self, dim, heads, context_dim, upcast=False, only_cross=False):
        super().__init__()
        self.only_cross = only_cross
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads,
                               context_dim=context_dim if only_cross else None, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim // heads, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation="geglu")

    def forward(self, x, context, text_bias=None):
        # x: (B, HW, C), context: (B, L, D), text_bias: (B, 1, 1, L)
        # diffusers masks the text in attn2 only: with only_cross, attn1 attends to all L tokens
        x = x + self.attn1(self.norm1(x), context if self.only_cross else None)
        x = x + self.attn2(self.norm2(x), context, mask=text_bias)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """The spatial transformer: GroupNorm, project in (1x1 conv, or linear on SD2.1), transformer
    blocks over the H*W tokens, project out, residual."""

    def __init__(self, ch, heads, context_dim, layers, linear, groups, upcast, only_cross):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, context_dim, upcast, only_cross)
             for _ in range(layers)])
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context, text_bias=None):  # x: (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context, text_bias)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class UNetBlock(nn.Module):
    """One down or up level: `resnets` (each followed by an attention in the CrossAttn variants),
    then an optional `downsamplers` / `upsamplers`. Up blocks concatenate a skip tensor before each
    resnet."""

    def __init__(self, resnets, attentions, sampler, down):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        if sampler is not None:
            setattr(self, "downsamplers" if down else "upsamplers", nn.ModuleList([sampler]))


class UNetEncoder(nn.Module):
    """The half of the U-Net that a ControlNet copies (Zhang et al. 2023, Sec. 3.2): `conv_in`, the
    timestep embedding, the down blocks and the mid block. `UNet` adds the up blocks;
    `controlnet.ControlNet` adds the conditioning-image embedding and the zero convolutions. Both
    run the shared half with `embed_time` and `encode`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        if cfg.addition_time_embed_dim:  # SDXL ("text_time"): pooled text and size / crop numbers
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim,
                                                   4 * ch[0])

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            c_in, c_out, last = ch[max(i - 1, 0)], ch[i], i == n - 1
            resnets = [self._resnet(c_in if j == 0 else c_out, c_out)
                       for j in range(cfg.layers_per_block)]
            cross = kind.startswith("CrossAttn")
            attns = ([self._attention(c_out, i, cfg.only_cross_attention[i]) for _ in resnets]
                     if cross else None)
            sampler = None if last else Downsample2D(c_out, padding=cfg.downsample_padding)
            self.down_blocks.append(UNetBlock(resnets, attns, sampler, down=True))

        # diffusers' UNetMidBlock2DCrossAttn always self-attends (only_cross_attention does not
        # reach it)
        self.mid_block = UNetBlock([self._resnet(ch[-1], ch[-1]), self._resnet(ch[-1], ch[-1])],
                                   [self._attention(ch[-1], n - 1, False)], None, down=False)

    def _resnet(self, c_in, c_out):
        cfg = self.config
        return ResnetBlock2D(c_in, c_out, 4 * cfg.block_out_channels[0],
                             groups=cfg.norm_num_groups, eps=cfg.norm_eps)

    def _attention(self, c, level, only_cross):
        cfg = self.config
        return Transformer2DModel(c, cfg.heads[level], cfg.cross_attention_dim,
                                  cfg.transformer_layers[level], cfg.use_linear_projection,
                                  cfg.norm_num_groups, cfg.upcast_attention, only_cross)

    def embed_time(self, sample, timestep, text_embeds=None, time_ids=None):
        """The timestep embedding (B, 4 * C0) of `timestep` (scalar or (B,)) for a batch `sample`
        (B, C, H, W). SDXL adds `add_embedding` of its pooled text `text_embeds` (B, P) and of the
        sinusoidal embeddings of its `time_ids` (B, K): original size, crop corner, target size."""
        cfg = self.config
        needed = bool(cfg.addition_time_embed_dim)
        if (text_embeds is not None, time_ids is not None) != (needed, needed):
            raise ValueError("this U-Net (addition_embed_type 'text_time') needs text_embeds and "
                             "time_ids" if needed else "this U-Net takes no text_embeds or "
                             "time_ids (no addition_embed_type)")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype))  # (B, 4 * C0)
        if needed:
            ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift)  # (B * K, A)
            added = torch.cat([text_embeds, ids.reshape(text_embeds.shape[0], -1)], dim=-1)
            emb = emb + self.add_embedding(added.to(emb.dtype))  # added: (B, P + K * A)
        return emb

    def encode(self, h, emb, context, bias=None):
        """The down blocks and the mid block from conv_in's output h (B, C0, H, W), the text
        `context` (B, L, D) and its attention bias (B, 1, 1, L) or None: the mid block's output and
        the skip tensors, one per resnet and downsampler plus h itself (`skip_channels` wide)."""
        skips = [h]
        for block in self.down_blocks:
            for j, res in enumerate(block.resnets):
                h = checkpointed(self, res, h, emb)
                if block.attentions is not None:
                    h = checkpointed(self, block.attentions[j], h, context, bias)
                skips.append(h)
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)  # (B, C, H/2, W/2)
                skips.append(h)
        mid = self.mid_block
        h = checkpointed(self, mid.resnets[0], h, emb)
        h = checkpointed(self, mid.attentions[0], h, context, bias)
        h = checkpointed(self, mid.resnets[1], h, emb)
        return h, skips  # h: (B, C_last, H / 2^(n-1), W / 2^(n-1))


def skip_channels(cfg: UNetConfig):
    """The widths of `UNetEncoder.encode`'s skip tensors, in order: what a ControlNet's residuals
    must match."""
    ch = cfg.block_out_channels
    widths = [ch[0]]
    for i, c in enumerate(ch):
        widths += [c] * (cfg.layers_per_block + (i < len(ch) - 1))
    return tuple(widths)


class UNet(UNetEncoder):
    """`forward(sample, timestep, encoder_hidden_states, encoder_attention_mask=None)`: the noise
    (or v) prediction, (B, C, H, W); SDXL also takes `text_embeds` and `time_ids`."""
    family = "unet"  # which layers get adapters: lorad.LAYERS[("unet", role)]

    def __init__(self, cfg: UNetConfig):
        super().__init__(cfg)
        ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
        if len(cfg.up_block_types) != n:
            raise ValueError(f"unsupported UNet config: up_block_types={list(cfg.up_block_types)!r}"
                             f" (one per entry of block_out_channels, {n})")
        self.up_blocks = nn.ModuleList()
        rev = ch[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            c_out, c_prev, c_skip_in = rev[i], rev[max(i - 1, 0)], rev[min(i + 1, n - 1)]
            level = n - 1 - i  # the down level this up level mirrors: same heads and depth
            resnets = []
            for j in range(cfg.layers_per_block + 1):
                c_skip = c_skip_in if j == cfg.layers_per_block else c_out
                resnets.append(self._resnet((c_prev if j == 0 else c_out) + c_skip, c_out))
            cross = kind.startswith("CrossAttn")
            attns = ([self._attention(c_out, level, cfg.only_cross_attention[level])
                      for _ in resnets] if cross else None)
            sampler = None if i == n - 1 else Upsample2D(c_out)
            self.up_blocks.append(UNetBlock(resnets, attns, sampler, down=False))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.freeu = None  # FreeU's ((b, s), ...) of the first up blocks (`freeu`, FREEU), when on

    @classmethod
    def from_config(cls, cfg: dict):
        return cls(UNetConfig.from_dict(cfg))

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None, *,
                text_embeds=None, time_ids=None):
        """sample: (B, C, H, W), timestep: scalar or (B,), encoder_hidden_states: (B, L, D),
        encoder_attention_mask: (B, L) 1 on tokens, 0 on padding (None: all), applied to the
        cross-attention as diffusers does. A ControlNet's residuals (diffusers' names and
        semantics, both or neither): one per skip tensor, added to it, and one added to the mid
        block's output. SDXL's `text_embeds` (B, 1280) and `time_ids` (B, 6), required there and
        refused elsewhere: diffusers' `added_cond_kwargs` entries (`embed_time`)."""
        if (down_block_additional_residuals is None) != (mid_block_additional_residual is None):
            raise ValueError("give both down_block_additional_residuals and "
                             "mid_block_additional_residual, or neither")
        emb = self.embed_time(sample, timestep, text_embeds, time_ids)
        context = encoder_hidden_states
        bias = (None if encoder_attention_mask is None
                else mask_bias(encoder_attention_mask, sample.dtype))
        h, skips = self.encode(self.conv_in(sample), emb, context, bias)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
            h = h + mid_block_additional_residual

        for i, block in enumerate(self.up_blocks):
            for j, res in enumerate(block.resnets):
                skip = skips.pop()
                if self.freeu is not None and i < len(self.freeu):
                    h, skip = freeu(h, skip, *self.freeu[i])
                h = torch.cat([h, skip], dim=1)  # (B, C + C_skip, H, W)
                h = checkpointed(self, res, h, emb)
                if block.attentions is not None:
                    h = checkpointed(self, block.attentions[j], h, context, bias)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, size=skips[-1].shape[-2:])  # (B, C, 2H, 2W)

        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, C_out, H, W)


def freeu(h, skip, b, s):
    """FreeU (Si et al., CVPR 2024) before an up block's concatenation: the first half of the
    backbone features' channels scaled by b, the skip features' lowest frequencies (the centre
    2 x 2 of their shifted spectrum) by s, in float32."""
    half = h.shape[1] // 2
    h = torch.cat([h[:, :half] * b, h[:, half:]], dim=1)
    spectrum = torch.fft.fftshift(torch.fft.fft2(skip.float()), dim=(-2, -1))  # (B, C, H, W)
    rows, cols = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    spectrum[..., rows - 1:rows + 1, cols - 1:cols + 1] *= s
    filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1))).real
    return h, filtered.to(skip.dtype)


# FreeU's published settings, ((b1, s1), (b2, s2)) for the first two up blocks (the FreeU paper)
FREEU = {"sd15": ((1.2, 0.9), (1.4, 0.2)), "sd21": ((1.1, 0.9), (1.2, 0.2))}


DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
# config keys whose value must be the one given here: what SD1.5 / SD2.1 / SDXL use, and all this
# U-Net implements
FIXED = {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
         "num_class_embeds": None, "time_cond_proj_dim": None,
         "encoder_hid_dim": None, "dual_cross_attention": False,
         "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
         "time_embedding_type": "positional", "conv_in_kernel": 3, "conv_out_kernel": 3,
         "mid_block_scale_factor": 1, "attention_type": "default", "resnet_skip_time_act": False,
         "resnet_out_scale_factor": 1.0, "cross_attention_norm": None, "timestep_post_act": None,
         "time_embedding_act_fn": None, "time_embedding_dim": None,
         "class_embeddings_concat": False, "reverse_transformer_layers_per_block": None}
ADDITION_TYPES = (None, "text_time")  # addition_embed_type: none (SD1.5 / 2.1) or SDXL's


def _per_block(value, n):
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclass
class UNetConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple
    down_block_types: tuple
    up_block_types: tuple      # empty for a ControlNet (no up blocks)
    layers_per_block: int
    heads: tuple               # attention heads per down block (diffusers' `attention_head_dim`)
    transformer_layers: tuple  # transformer blocks per attention, per down block
    cross_attention_dim: int
    only_cross_attention: tuple  # per down block: attn1 attends to the text too (no self-attention)
    use_linear_projection: bool
    upcast_attention: bool
    norm_num_groups: int
    norm_eps: float
    flip_sin_to_cos: bool
    freq_shift: int
    downsample_padding: int
    sample_size: int
    # SDXL's "text_time" addition (0: none): the sinusoid width per time id, and add_embedding's
    # input width (pooled text width + number of time ids x that)
    addition_time_embed_dim: int = 0
    projection_class_embeddings_input_dim: int = 0

    @classmethod
    def from_dict(cls, cfg, what="UNet"):
        """From a diffusers config dict; `what` names the network in errors (a ControlNet's config
        has no up blocks: `up_block_types` is then empty)."""
        for key, supported in FIXED.items():
            value = cfg.get(key, supported)
            if isinstance(value, list) and len(set(value)) == 1:
                value = value[0]
            if value != supported:
                raise ValueError(f"unsupported {what} config: {key}={value!r} "
                                 f"(supported: {supported!r})")
        for key, allowed in (("down_block_types", DOWN_TYPES), ("up_block_types", UP_TYPES)):
            bad = [b for b in cfg.get(key, ()) if b not in allowed]
            if bad:
                raise ValueError(f"unsupported {what} config: {key} contains {bad} "
                                 f"(supported: {allowed})")
        addition = cfg.get("addition_embed_type")
        if addition not in ADDITION_TYPES:
            raise ValueError(f"unsupported {what} config: addition_embed_type={addition!r} "
                             f"(supported: {ADDITION_TYPES})")
        text_time = addition == "text_time"  # diffusers ignores the two widths otherwise
        n = len(cfg["block_out_channels"])
        # diffusers names the head *count* `attention_head_dim` in the SD configs;
        # num_attention_heads wins if set
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        cross = cfg.get("cross_attention_dim", 1280)
        if isinstance(cross, (list, tuple)):
            raise ValueError(f"unsupported {what} config: per-block cross_attention_dim={cross!r}")
        return cls(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                   block_out_channels=tuple(cfg["block_out_channels"]),
                   down_block_types=tuple(cfg["down_block_types"]),
                   up_block_types=tuple(cfg.get("up_block_types", ())),
                   layers_per_block=cfg.get("layers_per_block", 2), heads=_per_block(heads, n),
                   transformer_layers=_per_block(cfg.get("transformer_layers_per_block", 1), n),
                   cross_attention_dim=cross,
                   only_cross_attention=_per_block(cfg.get("only_cross_attention", False), n),
                   use_linear_projection=cfg.get("use_linear_projection", False),
                   upcast_attention=cfg.get("upcast_attention", False),
                   norm_num_groups=cfg.get("norm_num_groups", 32),
                   norm_eps=cfg.get("norm_eps", 1e-5),
                   flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
                   freq_shift=cfg.get("freq_shift", 0),
                   downsample_padding=cfg.get("downsample_padding", 1),
                   sample_size=cfg.get("sample_size", 64),
                   addition_time_embed_dim=cfg["addition_time_embed_dim"] if text_time else 0,
                   projection_class_embeddings_input_dim=(
                       cfg["projection_class_embeddings_input_dim"] if text_time else 0))
