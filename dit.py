"""PixArt-alpha (Chen et al. 2023, arXiv 2310.00426): the diffusion transformer that WaDi distills
as its third backbone (paper Table 1: PixArt-alpha 256 px).

A DiT (Peebles & Xie 2023) over 2x2 patches of the SD VAE latent, conditioned on T5 text embeddings
(t5.py) through cross-attention, and on the timestep through adaLN-single (PixArt Sec. 2.3): ONE MLP
turns the timestep into six modulation vectors (shift, scale, gate for attention and for the MLP)
shared by all blocks, each block adding its own learned `scale_shift_table`. The modules below
follow the paper's Fig. 4 / DiT's `models.py` in order: patch embedding with a fixed 2-D sin-cos
position embedding, adaLN-single, caption projection, N blocks (self-attention, cross-attention on
the text with its padding mask, MLP), final layer, unpatchify; the config parsing comes last.

Built from a diffusers `transformer/config.json` dict, either `PixArtTransformer2DModel` or the
older `Transformer2DModel` with norm_type "ada_norm_single" that diffusers <= 0.27 wrote (the Hub
files of PixArt-alpha, and the diffusers 0.25 that the official WaDi code pins). State-dict keys are
exactly diffusers' `PixArtTransformer2DModel` (the position embedding is computed, not stored), so
the Hub weights and WaDi's released `rotated_transformer.safetensors` load with strict=True. Numbers
and sources: diffusers' `PixArtTransformer2DModel` (and `Transformer2DModel` of diffusers 0.25) and
PixArt-alpha's `diffusion/model/nets/PixArt.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import (Attention, FeedForward, TimestepEmbedding, checkpointed, mask_bias,
                    timestep_embedding)

VAE_SCALE = 8  # PixArt's VAE (the SD VAE) maps H x W pixels to an (H/8) x (W/8) latent
TIME_DIM = 256  # width of the sinusoidal timestep (and size) embedding


def sincos_pos_embed_2d(dim, h, w, base_size, interpolation_scale, device=None):
    """The fixed 2-D sin-cos position embedding of ViT / DiT / PixArt: (h * w, dim), row-major over
    the (h, w) patch grid. Grid coordinates are arange(n) / (n / base_size) / interpolation_scale
    (float32, so a grid other than base_size x base_size is stretched to the same range, PixArt's
    multi-scale trick); the first dim/2 channels encode the column (w), the last dim/2 the row (h),
    each as [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)) in float64, then cast
    to float32, as diffusers' `get_2d_sincos_pos_embed` and PixArt's `get_2d_sincos_pos_embed`."""
    grid_h = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size)
    grid_w = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size)
    grid_h, grid_w = grid_h / interpolation_scale, grid_w / interpolation_scale
    rows, cols = torch.meshgrid(grid_h, grid_w, indexing="ij")  # each (h, w)
    axis = [timestep_embedding(g.flatten(), dim // 2, flip_sin_to_cos=False, shift=0,
                               dtype=torch.float64) for g in (cols, rows)]
    return torch.cat(axis, dim=1).float()  # (h * w, dim)


class PatchEmbed(nn.Module):
    """p x p patches of the latent -> tokens (a strided convolution, key `proj`), plus the position
    embedding. That embedding is a non-persistent buffer for the training grid (not in the
    checkpoint; built on the CPU even when the model is built on the meta device) and is recomputed
    for any other latent size."""

    def __init__(self, in_channels, dim, patch, sample_size, interpolation_scale):
        super().__init__()
        self.patch, self.base_size = patch, sample_size // patch
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)
        n = self.base_size
        pos = sincos_pos_embed_2d(dim, n, n, n, interpolation_scale, device="cpu")
        self.register_buffer("pos_embed", pos[None], persistent=False)

    def forward(self, latent):  # (B, C, H, W) -> (B, N, D), N = (H/p) * (W/p)
        h, w = latent.shape[-2] // self.patch, latent.shape[-1] // self.patch
        x = self.proj(latent).flatten(2).transpose(1, 2)  # (B, N, D)
        if (h, w) == (self.base_size, self.base_size):
            pos = self.pos_embed
        else:
            pos = sincos_pos_embed_2d(x.shape[-1], h, w, self.base_size, self.interpolation_scale,
                                      latent.device)[None]
        return (x + pos).to(x.dtype)


class CombinedTimestepSizeEmbeddings(nn.Module):
    """The timestep embedding (sinusoid -> MLP); for the 1024-MS model plus the embeddings of the
    image resolution (H, W in pixels) and aspect ratio (H / W), each a sinusoid -> MLP to dim/3,
    concatenated [e(H), e(W), e(H/W)] and added (PixArt Sec. 2.3 / PixArtMS)."""

    def __init__(self, dim, micro):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_DIM, dim)
        self.micro = micro
        if micro:
            self.resolution_embedder = TimestepEmbedding(TIME_DIM, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(TIME_DIM, dim // 3)

    def forward(self, t, resolution, aspect_ratio, dtype):  # t: (B,) -> (B, D)
        def sinusoid(v):
            emb = timestep_embedding(v.flatten(), TIME_DIM, flip_sin_to_cos=True, shift=0)
            return emb.to(dtype)

        emb = self.timestep_embedder(sinusoid(t))
        if self.micro:
            B = t.shape[0]
            res = self.resolution_embedder(sinusoid(resolution)).reshape(B, -1)  # (B, 2D/3)
            ar = self.aspect_ratio_embedder(sinusoid(aspect_ratio)).reshape(B, -1)  # (B, D/3)
            emb = emb + torch.cat([res, ar], dim=1)
        return emb


class AdaLayerNormSingle(nn.Module):
    """adaLN-single: the conditioning embedding (returned as is, for the final layer) and one linear
    map of its SiLU to the 6 x D modulation shared by every block."""

    def __init__(self, dim, micro):
        super().__init__()
        self.emb = CombinedTimestepSizeEmbeddings(dim, micro)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution, aspect_ratio, dtype):
        embedded = self.emb(t, resolution, aspect_ratio, dtype)  # (B, D)
        return self.linear(F.silu(embedded)), embedded  # (B, 6D), (B, D)


class CaptionProjection(nn.Module):
    """Text embeddings to the model width: linear_1, tanh-GELU, linear_2."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y):  # (B, L, C_text) -> (B, L, D)
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


class PixArtBlock(nn.Module):
    """One PixArt block (diffusers' BasicTransformerBlock, ada_norm_single path):
        x = x + gate_msa * attn1(norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + attn2(x, text, mask)                  (no norm, no modulation: PixArtMS.py)
        x = x + gate_mlp * ff(norm2(x) * (1 + scale_mlp) + shift_mlp)
    with (shift, scale, gate) x 2 = scale_shift_table + the shared adaLN-single output."""

    def __init__(self, dim, heads, head_dim, bias, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.attn1 = Attention(dim, heads, head_dim, bias=bias)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=dim, bias=bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ff = FeedForward(dim, activation="gelu-approximate")
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, text_bias, t):
        # x: (B, N, D), y: (B, L, D), text_bias: (B, 1, 1, L), t: (B, 6D)
        modulation = self.scale_shift_table[None] + t.reshape(t.shape[0], 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, y, mask=text_bias)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArt(nn.Module):
    """`forward(sample, timestep, encoder_hidden_states, encoder_attention_mask=None,
    resolution=None, aspect_ratio=None)` -> (B, out_channels, H, W): channels [:in_channels] are
    the noise prediction, the rest the learned variance (callers keep the first in_channels, as
    diffusers' pipeline)."""
    family = "dit"  # which layers get adapters: lorad.LAYERS[("dit", role)]

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        D, p = cfg.inner_dim, cfg.patch_size
        self.pos_embed = PatchEmbed(cfg.in_channels, D, p, cfg.sample_size, cfg.interpolation_scale)
        self.adaln_single = AdaLayerNormSingle(D, cfg.use_additional_conditions)
        self.caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.transformer_blocks = nn.ModuleList(
            [PixArtBlock(D, cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias,
                         cfg.norm_eps) for _ in range(cfg.num_layers)])
        # the final layer (its parameters sit at the top level in diffusers' layout)
        self.norm_out = nn.LayerNorm(D, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D ** 0.5)
        self.proj_out = nn.Linear(D, p * p * cfg.out_channels)

    @classmethod
    def from_config(cls, cfg: dict):
        return cls(PixArtConfig.from_dict(cfg))

    def micro_conditions(self, sample, dtype):
        """resolution (B, 2) = [H, W] in pixels and aspect_ratio (B, 1) = H / W of the image a
        latent `sample` (B, C, H/8, W/8) decodes to, as diffusers' PixArtAlphaPipeline passes
        them."""
        B, H, W = sample.shape[0], sample.shape[-2] * VAE_SCALE, sample.shape[-1] * VAE_SCALE
        resolution = torch.tensor([[H, W]], dtype=dtype, device=sample.device).expand(B, 2)
        aspect_ratio = torch.tensor([[H / W]], dtype=dtype, device=sample.device).expand(B, 1)
        return resolution, aspect_ratio

    def final_layer(self, x, embedded_t):
        # x: (B, N, D), embedded_t: (B, D) -> (B, N, p * p * C_out)
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        return self.proj_out(self.norm_out(x) * (1 + scale) + shift)  # shift, scale: (B, 1, D)

    def unpatchify(self, x, h, w):  # (B, h * w, p * p * C) -> (B, C, h * p, w * p)
        p, C = self.config.patch_size, self.config.out_channels
        x = x.reshape(-1, h, w, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, C, h * p, w * p)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None,
                resolution=None, aspect_ratio=None):
        """sample: (B, C_in, H, W) latent (H, W multiples of patch_size); timestep: scalar or (B,);
        encoder_hidden_states: (B, L, caption_channels); encoder_attention_mask: (B, L), 1 (or
        True) for tokens to attend to, 0 for padding, None for all; resolution (B, 2) [H, W] in
        pixels and aspect_ratio (B,) or (B, 1) H / W are used by the micro-conditioned 1024-MS model
        only and, when None, are those of the image this latent decodes to (VAE_SCALE). Returns
        (B, out_channels, H, W); a ValueError when H or W is not a multiple of patch_size."""
        B, p = sample.shape[0], self.config.patch_size
        if sample.shape[-2] % p or sample.shape[-1] % p:
            raise ValueError(f"PixArt: latent size {tuple(sample.shape[-2:])} is not a multiple of "
                             f"the patch size {p}")
        h, w = sample.shape[-2] // p, sample.shape[-1] // p
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
        if self.config.use_additional_conditions and (resolution is None or aspect_ratio is None):
            default_res, default_ar = self.micro_conditions(sample, encoder_hidden_states.dtype)
            resolution = default_res if resolution is None else resolution
            aspect_ratio = default_ar if aspect_ratio is None else aspect_ratio

        x = self.pos_embed(sample)  # (B, N, D)
        # the modulation shared by the blocks (B, 6D) and the conditioning embedding (B, D)
        t_mod, embedded_t = self.adaln_single(t, resolution, aspect_ratio, x.dtype)
        y = self.caption_projection(encoder_hidden_states)  # (B, L, D)
        text_bias = (None if encoder_attention_mask is None
                     else mask_bias(encoder_attention_mask, x.dtype))  # (B, 1, 1, L)
        for block in self.transformer_blocks:
            x = checkpointed(self, block, x, y, text_bias, t_mod)
        return self.unpatchify(self.final_layer(x, embedded_t), h, w)  # (B, C_out, H, W)


# config keys whose value must be the one given here: what every PixArt-alpha model uses, and all
# we implement
FIXED = {"norm_type": "ada_norm_single", "norm_elementwise_affine": False,
         "activation_fn": "gelu-approximate", "upcast_attention": False,
         "attention_type": "default", "num_vector_embeds": None, "only_cross_attention": False,
         "double_self_attention": False, "dropout": 0.0}
CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")


@dataclass
class PixArtConfig:
    in_channels: int
    out_channels: int         # 2 * in_channels: noise and the learned variance ("pred_sigma")
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_channels: int     # width of the text embeddings (T5 XXL: 4096)
    sample_size: int          # latent side at training size (32 / 64 / 128: 256 / 512 / 1024 px)
    patch_size: int
    attention_bias: bool
    norm_eps: float
    interpolation_scale: float    # position-embedding grid scale (PixArt's `lewei_scale`)
    use_additional_conditions: bool  # the 1024-MS model's resolution / aspect-ratio conditions

    @property
    def inner_dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, cfg):
        """From a diffusers config dict. Absent keys take PixArtTransformer2DModel's defaults
        (current diffusers loads both class names into that class); a `Transformer2DModel` config
        must say norm_type "ada_norm_single" (that class defaults to a plain layer norm, not
        PixArt).
        interpolation_scale and use_additional_conditions, when absent or null, follow the sample
        size as in every diffusers version: max(sample_size // 64, 1) and sample_size == 128
        (diffusers 0.25 had no such keys, and no PixArt-alpha config on the Hub sets them:
        configs/README.md)."""
        name = cfg.get("_class_name", CLASS_NAMES[0])
        if name not in CLASS_NAMES:
            raise ValueError(f"unsupported PixArt config: _class_name={name!r} "
                             f"(supported: {CLASS_NAMES})")
        if name == "Transformer2DModel" and "norm_type" not in cfg:
            raise ValueError("unsupported PixArt config: norm_type missing from a "
                             "Transformer2DModel config (PixArt's is 'ada_norm_single')")
        for key, supported in FIXED.items():
            if cfg.get(key, supported) != supported:
                raise ValueError(f"unsupported PixArt config: {key}={cfg[key]!r} "
                                 f"(supported: {supported!r})")
        heads, head_dim = cfg.get("num_attention_heads", 16), cfg.get("attention_head_dim", 72)
        sample_size, patch = cfg.get("sample_size", 128), cfg.get("patch_size", 2)
        for key, value in (("patch_size", patch), ("caption_channels", cfg.get("caption_channels")),
                           ("num_embeds_ada_norm", cfg.get("num_embeds_ada_norm", 1000))):
            if value is None:
                raise ValueError(f"unsupported PixArt config: {key}=None (PixArt needs a value)")
        if cfg.get("cross_attention_dim", heads * head_dim) != heads * head_dim:
            raise ValueError(f"unsupported PixArt config: cross_attention_dim="
                             f"{cfg['cross_attention_dim']!r} (the projected captions have the "
                             f"inner width {heads * head_dim})")
        if sample_size % patch:
            raise ValueError(f"unsupported PixArt config: sample_size={sample_size} is not a "
                             f"multiple of patch_size={patch}")
        interpolation_scale = cfg.get("interpolation_scale")
        if interpolation_scale is None:
            interpolation_scale = max(sample_size // 64, 1)
        micro = cfg.get("use_additional_conditions")
        micro = sample_size == 128 if micro is None else micro
        if micro and heads * head_dim % 3:
            raise ValueError(f"unsupported PixArt config: use_additional_conditions with an inner "
                             f"width {heads * head_dim} not divisible by 3 (the size embeddings "
                             f"are a third each)")
        in_channels = cfg.get("in_channels", 4)
        out_channels = cfg.get("out_channels", 8)
        return cls(in_channels=in_channels,
                   out_channels=in_channels if out_channels is None else out_channels,
                   num_layers=cfg.get("num_layers", 28), num_attention_heads=heads,
                   attention_head_dim=head_dim, caption_channels=cfg["caption_channels"],
                   sample_size=sample_size, patch_size=patch,
                   attention_bias=cfg.get("attention_bias", True),
                   norm_eps=cfg.get("norm_eps", 1e-6), interpolation_scale=interpolation_scale,
                   use_additional_conditions=micro)
