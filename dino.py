"""DINO ViT-S/16 (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021), from scratch, for DreamBooth's subject-fidelity metric (Ruiz et al., CVPR 2023): the
DINO score is the cosine similarity of the DINO embeddings of a generated and a real image,
averaged over all (generated, real) pairs. The embedding is the class token of the last layer
after the final LayerNorm (DINO's own output; transformers' `last_hidden_state[:, 0]`, not its
`pooler_output`).

- `DINO`: 16 x 16 patch convolution, class token, learned position embeddings (224 px only), 12
  pre-norm layers, final LayerNorm. The layers are clip.py's: a ViT layer is the same block (x +
  attn(ln(x)), x + mlp(ln(x)), biased q/k/v/out, exact GELU) under other names, so `vit_key`
  renames rather than a second copy; embeddings and final LayerNorm keep the Hub's names.
- `preprocess`: what the Hub repo facebook/dino-vits16's preprocessor_config.json asks of
  transformers' ViTImageProcessor (PIL backend): 224 x 224 by PIL bilinear on uint8 pixels
  (aspect ratio not kept, no crop), / 255, ImageNet mean and std. (DINO's own evaluation resizes
  the short side to 256 bicubic and centre-crops 224; DreamBooth does not say which; we follow
  the Hub repo.) Float images in [0, 1] are rounded to uint8 first, as saving to PNG would.
- `load_dino` reads the Hub repo or a local copy; a pooler in the file is dropped (DINO never
  trained one; the Hub file, 86.7 MB = 21.67 M fp32 values, has none).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clip import ACTIVATIONS, CLIPEncoder
from loading import (LoadError, build, fetch, fetch_first, key_listing, load_weights, read_json,
                     read_tensors)

DINO_REPO = "facebook/dino-vits16"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Hub repo's config.json. Its layer_norm_eps is transformers' ViTConfig default, which the
# conversion kept; DINO itself used 1e-6 (against LayerNorm variances of order 1, no difference).
DINO_VITS16 = {"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12,
               "num_attention_heads": 6, "intermediate_size": 1536, "hidden_act": "gelu",
               "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16, "num_channels": 3}


@dataclass
class DINOConfig:
    """The fields of a transformers `ViTConfig` that shape the network (defaults as there)."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, cfg):
        """From a transformers ViT `config.json` dict; unsupported values raise ValueError."""
        if cfg.get("model_type", "vit") != "vit":
            raise ValueError(f"not a ViT config: model_type is {cfg['model_type']!r}")
        c = cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        if c.hidden_act not in ACTIVATIONS or not c.qkv_bias:
            raise ValueError(f"unsupported ViT config: hidden_act {c.hidden_act!r} (supported: "
                             f"{', '.join(ACTIVATIONS)}), qkv_bias {c.qkv_bias} (must be true)")
        if c.hidden_size % c.num_attention_heads or c.image_size % c.patch_size:
            raise ValueError("ViT config: hidden_size must be a multiple of num_attention_heads, "
                             "image_size of patch_size")
        return c


class DINO(nn.Module):
    """DINO's ViT: (B, 3, S, S) normalized pixels -> (B, D), the class token after the last LN."""

    def __init__(self, c: DINOConfig):
        super().__init__()
        self.config = c
        d, patches = c.hidden_size, (c.image_size // c.patch_size) ** 2
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.embeddings.position_embeddings = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.embeddings.patch_embeddings = nn.Module()
        patch = nn.Conv2d(c.num_channels, d, c.patch_size, stride=c.patch_size)
        self.embeddings.patch_embeddings.projection = patch
        self.encoder = CLIPEncoder(c.num_hidden_layers, d, c.num_attention_heads,
                                   c.intermediate_size, c.hidden_act, c.layer_norm_eps)
        self.layernorm = nn.LayerNorm(d, eps=c.layer_norm_eps)

    @classmethod
    def from_config(cls, cfg):
        """From a transformers ViT `config.json` dict (e.g. `DINO_VITS16`)."""
        return cls(DINOConfig.from_dict(cfg))

    def forward(self, pixels):  # (B, 3, S, S) -> (B, D)
        e = self.embeddings
        x = e.patch_embeddings.projection(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([e.cls_token.expand(len(x), -1, -1), x], 1) + e.position_embeddings
        return self.layernorm(self.encoder(x)[:, 0])


# our key -> the Hub's (transformers' ViT file layout), applied in turn
VIT_NAMES = [("encoder.layers.", "encoder.layer."),
             (".self_attn.q_proj.", ".attention.attention.query."),
             (".self_attn.k_proj.", ".attention.attention.key."),
             (".self_attn.v_proj.", ".attention.attention.value."),
             (".self_attn.out_proj.", ".attention.output.dense."),
             (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."),
             (".layer_norm1.", ".layernorm_before."), (".layer_norm2.", ".layernorm_after.")]


def vit_key(key):
    """Where our state-dict `key` is in a transformers ViT file."""
    for ours, theirs in VIT_NAMES:
        key = key.replace(ours, theirs)
    return key


def convert_vit_state_dict(state, model, what="ViT weights"):
    """A transformers ViTModel state dict in `model`'s keys; `pooler.dense.*` is dropped. Other
    missing or excess keys are a LoadError; shapes are checked when loading."""
    names = {vit_key(k): k for k in model.state_dict()}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.dense.")}
    missing, unexpected = names.keys() - state.keys(), state.keys() - names.keys()
    if missing or unexpected:
        raise LoadError(f"{what} is not a ViT of this config: {len(missing)} missing keys "
                        f"({key_listing(missing)}), {len(unexpected)} unexpected keys "
                        f"({key_listing(unexpected)})")
    return {names[k]: v for k, v in state.items()}


def load_dino(path=DINO_REPO, device="cpu"):
    """DINO from a Hub repo or local directory (config.json, and model.safetensors or else
    pytorch_model.bin, read with the weights-only loader); fp32, frozen, in eval mode."""
    path = os.fspath(path)
    config = fetch(path, "config.json")
    with torch.device("meta"):
        model = build(DINO, read_json(config), config)
    file = fetch_first(path, ("model.safetensors", "pytorch_model.bin"))  # the Hub repo has both
    state = convert_vit_state_dict(read_tensors(file), model, what=file)
    load_weights(model, state, what=file, dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def preprocess(images, size=224):
    """(N, 3, size, size) float32 model input from images: an (N, H, W, 3) array or tensor, or a
    list of (H, W, 3) arrays or PIL images; uint8, or float in [0, 1]. See the module docstring."""
    out = []
    for img in images:
        if not isinstance(img, Image.Image):
            img = np.asarray(img.cpu() if torch.is_tensor(img) else img)
            if img.dtype != np.uint8:
                img = (img.astype(np.float64) * 255).round().clip(0, 255).astype(np.uint8)
            img = Image.fromarray(img)
        img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        out.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1))
    mean, std = (torch.tensor(v)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (torch.stack(out) - mean) / std


@torch.no_grad()
def dino_embed(model, images, batch_size=64):
    """(N, D) DINO embeddings (not unit length) of images as `preprocess` takes them, on the
    model's device."""
    device = next(model.parameters()).device
    return torch.cat([model(preprocess(images[i:i + batch_size], model.config.image_size)
                            .to(device)) for i in range(0, len(images), batch_size)])


def mean_cosine(a, b):
    """The mean cosine similarity over all pairs of rows of a (N, D) and b (M, D)."""
    return (F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T).mean().item()


def dino_score(model, generated, real):
    """DreamBooth's DINO score: the mean cosine similarity of the DINO embeddings over all
    (generated, real) image pairs."""
    return mean_cosine(dino_embed(model, generated), dino_embed(model, real))
