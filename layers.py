"""Building blocks shared by every network in the project: one attention, one feed-forward, one
ResNet block, one timestep embedding, one gradient-checkpointing runner, one rule for modules kept
in float32 under float16. The U-Net (unet.py), the VAE (vae.py), the DiT (dit.py) and the text
encoders (clip.py, t5.py) all compose these, so each idea is written once.

Parameter names follow diffusers (`to_q`, `to_out.0`, `ff.net.0.proj`, `norm1`, `conv_shortcut`,
...) so that state dicts load with strict=True.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def attention(q, k, v, heads, mask=None, causal=False, scale=None, upcast=False):
    """Multi-head scaled dot-product attention through torch's SDPA kernel.
    q: (B, Lq, heads*d), k and v: (B, Lk, heads*d); mask broadcasts to (B, heads, Lq, Lk), either
    boolean (True = attend) or additive. Returns (B, Lq, heads*d)."""
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))  # (B, h, L, d)
    if mask is not None and not mask.dtype == torch.bool:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2).flatten(2).to(dtype)  # (B, Lq, heads*d)


def mask_bias(mask, dtype):
    """A text padding mask (B, L), 1 (or True) on tokens and 0 on padding, as the additive attention
    bias (B, 1, 1, L) that diffusers makes of an `encoder_attention_mask`: 0 on tokens, -10000 on
    padding (whose softmax weight is then exactly 0 in any float format)."""
    return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]


class Attention(nn.Module):
    """diffusers' `Attention` layout: to_q, to_k, to_v and to_out.0. Self-attention when no context
    is given, cross-attention onto `context` (dim `context_dim`) otherwise."""

    def __init__(self, dim, heads, head_dim, context_dim=None, bias=False, out_bias=True,
                 upcast=False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=out_bias)])

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask=mask,
                        upcast=self.upcast)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): proj to 2*inner, value * gelu(gate)."""

    def __init__(self, dim, inner, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.approximate = approximate

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate, approximate=self.approximate)


class GELU(nn.Module):
    """Linear followed by GELU (the `gelu-approximate` feed-forward of PixArt)."""

    def __init__(self, dim, inner, approximate="none"):
        super().__init__()
        self.proj = nn.Linear(dim, inner)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """diffusers' `FeedForward`: net.0 (activation with its input projection), net.1 (dropout slot,
    no parameters), net.2 (output projection)."""

    def __init__(self, dim, mult=4, activation="geglu"):
        super().__init__()
        inner = dim * mult
        act = {"geglu": GEGLU(dim, inner), "gelu": GELU(dim, inner),
               "gelu-approximate": GELU(dim, inner, approximate="tanh")}[activation]
        self.net = nn.ModuleList([act, nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the (optional) timestep embedding added in between and a 1x1
    `conv_shortcut` when the width changes (Ho et al. 2020, as laid out by diffusers)."""

    def __init__(self, in_ch, out_ch, temb_ch=None, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb=None):  # x: (B, C_in, H, W), temb: (B, T)
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # (B, C_out, H, W)


class Downsample2D(nn.Module):
    """3x3 convolution with stride 2 (key `conv`); `padding=0` pads (0, 1, 0, 1) first, as the SD
    VAE does."""

    def __init__(self, ch, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (x2, or to `size`), then a 3x3 convolution (key `conv`)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):  # (B, C, H, W) -> (B, C, 2H, 2W)
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


def timestep_embedding(t, dim, flip_sin_to_cos=True, shift=1.0, max_period=10000,
                       dtype=torch.float32):
    """Sinusoidal embedding of (possibly fractional) timesteps t: (B,) -> (B, dim), as in DDPM and
    diffusers' `get_timestep_embedding` (frequencies exp(-log(max_period) * i / (half - shift))),
    computed in `dtype`. With flip_sin_to_cos=False, shift=0 and float64 it is also one axis of the
    2-D sin-cos position embedding of ViT / DiT (dit.py)."""
    half = dim // 2
    i = torch.arange(half, dtype=dtype, device=t.device)
    freqs = torch.exp(-math.log(max_period) * i / (half - shift))
    args = t.to(dtype)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1, SiLU, linear_2 (diffusers'
    `TimestepEmbedding`)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def checkpointed(net, module, *args):
    """`module(*args)` inside the network `net`, through activation checkpointing (non-reentrant
    `torch.utils.checkpoint`: the activations are recomputed in the backward pass instead of kept)
    when `net.gradient_checkpointing` is set, `net` is training and autograd is recording."""
    if net.gradient_checkpointing and net.training and torch.is_grad_enabled():
        return checkpoint(module, *args, use_reentrant=False)
    return module(*args)


def kept_in_fp32(network, key, dtype):
    """Whether the tensor `key` (a state-dict name) of `network` (a class or an instance) stays
    float32 when the network is made `dtype`: dtype is float16 and a module on the key's path is
    named in the network's `keep_in_fp32_modules`. As transformers' `_keep_in_fp32_modules`, which
    transformers 5 honours for float16 only (`PreTrainedModel._get_dtype_plan`): bfloat16 has
    float32's range, and such modules are made bfloat16 like the rest."""
    names = getattr(network, "keep_in_fp32_modules", ())
    return dtype == torch.float16 and any(name in names for name in key.split(".")[:-1])


class KeepsFp32Modules(nn.Module):
    """A network whose modules named in `keep_in_fp32_modules` stay float32 when it is made float16
    (`kept_in_fp32`): `.half()`, `.to(torch.float16)` and `.to(device, torch.float16)` move their
    tensors (and gradients) to the device but keep them float32, with their float32 values (never
    rounded through float16); loading.py reads their weights as float32 likewise. Casting a
    submodule on its own does not consult the rule."""
    keep_in_fp32_modules = ()

    def _apply(self, fn, recurse=True):
        kept = [t for name, t in [*self.named_parameters(), *self.named_buffers()]
                if kept_in_fp32(self, name, torch.float16)]
        ids = {id(t) for t in kept} | {id(t.grad) for t in kept if t.grad is not None}

        def cast(t):  # fn, except that a kept tensor is never made float16
            out = fn(t)
            if id(t) in ids and out.dtype == torch.float16:
                return t.to(out.device, torch.float32)
            return out

        return super()._apply(cast, recurse)
