"""OpenCLIP's image and text towers (Radford et al. 2021; Cherti et al. 2023, "Reproducible scaling
laws for contrastive language-image learning"), written from scratch for the CLIP score of the
evaluation (metrics.clip_score): ViT-g-14 trained on LAION-2B by default; ViT-H-14 is the network of
the HPS v2 scorer (hps.py).

- `OpenCLIP`: both towers of an open_clip ViT CLIP, built from an open_clip model config, with the
  key layout of transformers' `CLIPModel`; its encoder layers are clip.py's (one implementation for
  the SD text encoder and both towers). The config parsing (`OpenCLIPConfig`, the ViT-g-14 and
  ViT-H-14 configs) follows the network.
- `load_open_clip` reads open_clip's own weight files (`convert_open_clip_state_dict`),
  `load_transformers_clip` a transformers CLIPModel's (OpenAI's ViT-L/14, DreamBooth's metrics),
  `open_clip_tokenize` gives open_clip's token ids from bpe.py's BPE tokenizer and
  `preprocess_image` its image transform.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from bpe import CLIPTokenizer
from clip import CLIPEncoder, CLIPTextConfig, CLIPTextTransformer
from loading import (LoadError, MissingFile, fetch, fetch_first, key_listing, load_weights, read_json,
                     read_tensors)

# open_clip's ViT-g-14, pretrained="laion2b_s12b_b42k"
OPEN_CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
OPENAI_CLIP_REPO = "openai/clip-vit-large-patch14"  # transformers' layout (load_transformers_clip)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPVisionEmbeddings(nn.Module):
    """Patches by a strided convolution, a learned class token in front, learned position
    embeddings."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size,
                                         bias=False)
        patches = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Embedding(patches + 1, c.hidden_size)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 1 + N, D), N = (S / patch)^2
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], 1) + self.position_embedding.weight.to(x.dtype)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, LayerNorm, bidirectional encoder; the class token through the final LayerNorm."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        # (sic) transformers' key
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                   c.intermediate_size, c.hidden_act, c.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, D)
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))  # (B, 1 + N, D)
        return self.post_layernorm(x[:, 0])


class OpenCLIP(nn.Module):
    """An open_clip ViT CLIP: vision and text towers, each followed by a linear map (no bias) into
    the joint embedding; both towers are built from clip.py's encoder layers. State-dict keys are
    those of transformers' `CLIPModel` (`vision_model.*`, `text_model.*`,
    `visual_projection.weight`, `text_projection.weight`, `logit_scale`);
    `convert_open_clip_state_dict` maps open_clip's to them."""

    def __init__(self, config: OpenCLIPConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config.text)
        self.vision_model = CLIPVisionTransformer(config.vision)
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @classmethod
    def from_config(cls, cfg):
        """From an open_clip model config dict (e.g. `VIT_G_14`)."""
        return cls(OpenCLIPConfig.from_dict(cfg))

    def encode_image(self, pixels):  # (B, 3, S, S) normalized pixels -> (B, E), not unit length
        return self.visual_projection(self.vision_model(pixels))

    def encode_text(self, input_ids):  # (B, L) open_clip token ids -> (B, E), not unit length
        hidden = self.text_model(input_ids)  # (B, L, W), causal
        rows = torch.arange(len(hidden), device=hidden.device)
        eot = hidden[rows, input_ids.argmax(-1)]  # (B, W)
        return self.text_projection(eot)  # the end-of-text token has the largest id


# open_clip's model_configs/ViT-g-14.json
VIT_G_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88,
                   "mlp_ratio": 4.3637, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                 "layers": 24},
}

# open_clip's model_configs/ViT-H-14.json (the same in the hpsv2 package's copy of open_clip): the
# HPS v2 scorer
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16,
                 "layers": 24},
}

# open_clip settings that select another architecture than the plain ViT CLIP, and their plain
# values
PLAIN_SETTINGS = {
    "custom_text": (False,), "init_logit_bias": (None,), "nonscalar_logit_scale": (False,),
    "timm_model_name": (None,), "hf_model_name": (None,), "ls_init_value": (None,),
    "attentional_pool": (False,), "no_ln_pre": (False,), "pos_embed_type": ("learnable",),
    "final_ln_after_pool": (False,), "pool_type": ("tok", "argmax"), "embed_cls": (False,),
    "no_causal_mask": (False,), "proj_type": ("linear",), "proj_bias": (False,),
    "act_kwargs": (None,), "norm_kwargs": (None,), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,),
    "scale_attn_inner": (False,), "scale_attn": (False,), "scale_fc": (False,),
}


@dataclass
class CLIPVisionConfig:
    """The fields of a transformers `CLIPVisionConfig` that shape the vision tower."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class OpenCLIPConfig:
    """Both towers' shapes and the joint embedding width."""
    embed_dim: int
    vision: CLIPVisionConfig
    text: CLIPTextConfig

    @classmethod
    def from_dict(cls, cfg):
        """From an open_clip model config (`model_configs/*.json`, or `model_cfg` in a Hub repo's
        `open_clip_config.json`), with open_clip's defaults for absent keys. The activation is GELU
        unless `quick_gelu` is set (open_clip also forces QuickGELU when it loads OpenAI's own
        weights; such a config needs `"quick_gelu": true` here). Other architectures raise."""
        vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
        for key, value in {**cfg, **vision, **text}.items():
            if key in PLAIN_SETTINGS and value not in PLAIN_SETTINGS[key]:
                raise ValueError(f"unsupported open_clip setting {key}={value!r} "
                                 "(only the plain ViT CLIP is implemented)")
        if not all(isinstance(vision.get(key, 0), int) for key in ("layers", "image_size")):
            raise ValueError("unsupported open_clip vision_cfg: `layers` and `image_size` must be "
                             "integers (ResNet towers and non-square images are not implemented)")
        act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
        width, head_width = vision.get("width", 768), vision.get("head_width", 64)
        text_width, heads = text.get("width", 512), text.get("heads", 8)
        if width % head_width or text_width % heads:
            raise ValueError(f"open_clip config: vision width {width} / head_width {head_width} or "
                             f"text width {text_width} / heads {heads} is not a whole number of "
                             f"heads")
        return cls(
            embed_dim=cfg["embed_dim"],
            vision=CLIPVisionConfig(
                hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
                num_hidden_layers=vision.get("layers", 12), num_attention_heads=width // head_width,
                image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 16),
                hidden_act=act),
            text=CLIPTextConfig(
                vocab_size=text.get("vocab_size", 49408), hidden_size=text_width,
                intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
                num_hidden_layers=text.get("layers", 12), num_attention_heads=heads,
                max_position_embeddings=text.get("context_length", 77), hidden_act=act))


# our key -> open_clip's key, applied in turn (the q/k/v split and the transposes: see
# open_clip_source)
OPEN_CLIP_NAMES = [
    ("text_model.embeddings.token_embedding.", "token_embedding."),
    ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ("text_model.encoder.layers.", "transformer.resblocks."),
    ("text_model.final_layer_norm.", "ln_final."),
    ("text_projection.weight", "text_projection"),
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.", "visual.conv1."),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.", "visual.ln_pre."),
    ("vision_model.encoder.layers.", "visual.transformer.resblocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.weight", "visual.proj"),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]


def open_clip_source(key):
    """Where our state-dict `key` is in an open_clip file: (open_clip key, part), part None for the
    tensor as it is, "T" for its transpose (open_clip keeps the projections as (in, out) matrices
    applied as x @ P), or 0, 1, 2 for the q, k or v third of the fused `attn.in_proj_weight`/`_bias`
    (torch's MultiheadAttention order)."""
    name = key
    for ours, theirs in OPEN_CLIP_NAMES:
        name = name.replace(ours, theirs)
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if f".self_attn.{proj}." in name:
            return name.replace(f".self_attn.{proj}.", ".attn.in_proj_"), i
    return name, "T" if key in ("text_projection.weight", "visual_projection.weight") else None


def convert_open_clip_state_dict(state, model, what="open_clip weights"):
    """An open_clip `CLIP` state dict in `model`'s (OpenCLIP's) key layout: renamed, the fused
    in_proj cut into q, k, v (views, no copy), the two projections transposed. A LoadError lists
    the open_clip keys that are missing from `state` or that it has in excess; shapes are checked
    when loading."""
    sources = {key: open_clip_source(key) for key in model.state_dict()}
    wanted = {name for name, _ in sources.values()}
    differences = (("missing", wanted - state.keys()), ("unexpected", state.keys() - wanted))
    problems = [f"{len(keys)} {kind} keys: {key_listing(keys)}"
                for kind, keys in differences if keys]
    if problems:
        raise LoadError(f"{what} is not an open_clip {type(model).__name__} of this config: "
                        + "; ".join(problems))
    converted = {}
    for key, (name, part) in sources.items():
        tensor = state[name]
        if part == "T":
            tensor = tensor.t().contiguous()
        elif part is not None:
            tensor = tensor.chunk(3)[part]
        converted[key] = tensor
    return converted


# weight files of an open_clip Hub repo, preferred first: open_clip's safetensors name, the name
# Hugging Face's conversion bot gives, then the pickle (read with weights_only=True)
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                   "open_clip_pytorch_model.bin")


def read_open_clip_weights(path):
    """(state dict, file) from a weight file (.safetensors, or a torch pickle), or from a local
    directory or Hub repo holding one of OPEN_CLIP_FILES. A pickled training checkpoint gives its
    "state_dict" entry, as open_clip's own loader does (the HPS v2 releases are such
    checkpoints)."""
    file = path if os.path.isfile(path) else fetch_first(path, OPEN_CLIP_FILES, "open_clip weights")
    return read_tensors(file, key="state_dict"), file


def read_open_clip_config(path, default=VIT_G_14):
    """The `model_cfg` of the `open_clip_config.json` in a local directory or Hub repo, or `default`
    when there is no such file."""
    try:
        file = fetch(path, "open_clip_config.json")
    except MissingFile:
        return default
    cfg = read_json(file)
    if "model_cfg" not in cfg:
        raise LoadError(f"{file} has no model_cfg")
    return cfg["model_cfg"]


def load_open_clip(path=OPEN_CLIP_REPO, config=None, device="cpu", dtype=torch.float32):
    """OpenCLIP with open_clip's weights from `path`: a weight file, a local directory or a Hub
    repo (default: ViT-g-14 trained on LAION-2B, open_clip's `laion2b_s12b_b42k`). `config` is an
    open_clip model config dict; by default the `model_cfg` of the repo's `open_clip_config.json`,
    or VIT_G_14 when there is none (a bare file). Frozen, in eval mode, on `device`, in `dtype`
    (fp32 for the CLIP score)."""
    path = os.fspath(path)
    if config is None:
        config = VIT_G_14 if os.path.isfile(path) else read_open_clip_config(path)
    with torch.device("meta"):
        model = OpenCLIP.from_config(config)
    state, file = read_open_clip_weights(path)
    state = convert_open_clip_state_dict(state, model, what=file)
    load_weights(model, state, what=file, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_transformers_clip(path=OPENAI_CLIP_REPO, device="cpu"):
    """OpenCLIP with the weights of a transformers `CLIPModel` repo or directory (config.json with
    text_config and vision_config; model.safetensors, else pytorch_model.bin): OpenAI's ViT-L/14 by
    default, the CLIP of DreamBooth's CLIP-I and CLIP-T as OFT's evaluation code computes them. The
    keys are ours already; the position_ids buffers of older files are dropped. fp32, frozen."""
    path = os.fspath(path)
    config_file = fetch(path, "config.json")
    cfg = read_json(config_file)
    vision = cfg.get("vision_config", {})
    try:
        config = OpenCLIPConfig(embed_dim=cfg.get("projection_dim", 512), vision=CLIPVisionConfig(
            **{f.name: vision[f.name] for f in fields(CLIPVisionConfig) if f.name in vision}),
            text=CLIPTextConfig.from_dict({"model_type": "clip_text_model", **cfg.get("text_config", {})}))
    except ValueError as e:
        raise LoadError(f"{config_file}: {e}") from None
    with torch.device("meta"):
        model = OpenCLIP(config)
    file = fetch_first(path, ("model.safetensors", "pytorch_model.bin"))
    state = {k: v for k, v in read_tensors(file).items() if not k.endswith("position_ids")}
    load_weights(model, state, what=file, dtype=torch.float32)
    return model.to(device).eval().requires_grad_(False)


def load_open_clip_tokenizer(path=OPEN_CLIP_REPO):
    """The CLIP BPE from `vocab.json` and `merges.txt` of a Hub repo or local directory (open_clip's
    ViT-g-14 repo ships both); use it through `open_clip_tokenize`."""
    vocab = fetch(path, "vocab.json")
    fetch(path, "merges.txt")
    return CLIPTokenizer(os.path.dirname(vocab))


def open_clip_tokenize(tokenizer, prompts, context_length=77):
    """open_clip's token ids for `prompts` from our CLIPTokenizer (the BPE vocabulary is the same):
    LongTensor (B, context_length) holding start-of-text, the tokens (cut to fit), end-of-text, then
    zeros. The end-of-text id is the largest, which is how OpenCLIP.encode_text finds it.

    Equal to open_clip's SimpleTokenizer on plain text (ASCII letters, digits, punctuation, spaces,
    accented Latin, CJK, emoji); it differs where open_clip cleans the text first and we do not:
    - ftfy.fix_text: curly quotes become straight ones ("it’s"), ligatures and full-width letters
      become plain letters ("ﬁ", "Ｆ"), control characters are removed;
    - html.unescape (twice): "&amp;" is "&";
    - whitespace: open_clip splits on Python's whitespace, which includes \\x1c-\\x1f and \\x85;
    - lower case: open_clip lower-cases the whole string, so a word-final capital sigma becomes "ς"
      (we lower-case character by character: "σ");
    - special tokens: we cut "<|startoftext|>" and "<|endoftext|>" in a prompt out as their ids,
      open_clip tokenizes them as text; it treats "<start_of_text>" and "<end_of_text>" as its
      special tokens.
    """
    if tokenizer.pad_id != tokenizer.eos_id:
        raise ValueError("this tokenizer has a special pad token of its own (SD2.1's '!'), which "
                         "open_clip's does not; load one from vocab.json and merges.txt alone "
                         "(load_open_clip_tokenizer)")
    ids = torch.zeros(len(prompts), context_length, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row = [tokenizer.bos_id, *tokenizer.encode(prompt)[:context_length - 2], tokenizer.eos_id]
        ids[i, :len(row)] = torch.tensor(row)
    return ids  # (B, context_length)


def preprocess_image(img, size=224):
    """open_clip's evaluation transform for its OpenAI/LAION ViT CLIPs, ViT-g-14 included: the
    shortest side to `size` by PIL bicubic (the other side rounded down, as torchvision's Resize),
    the centre `size` x `size` crop (offsets rounded half to even, as torchvision's CenterCrop),
    values in [0, 1] normalized with OpenAI's mean and std. Returns (3, size, size) float32.
    The image is converted to RGB first; open_clip converts last, which gives the same pixels for
    RGB and grayscale images but not for palette or RGBA ones (PIL resizes those differently)."""
    img = img.convert("RGB")
    w, h = img.size
    long = int(size * max(w, h) / min(w, h))
    img = img.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, S, S)
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
