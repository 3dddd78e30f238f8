"""CLIP (Radford et al. 2021), written from scratch: the text transformer that conditions Stable
Diffusion, the byte-level BPE tokenizer that feeds it, and OpenCLIP's image and text towers for the
CLIP score of the evaluation.

- `CLIPTextModel`: token + position embeddings, a stack of pre-norm transformer layers with causal
  self-attention, a final LayerNorm; `forward(input_ids)` returns the last hidden state (B, L, D).
  It reads a transformers `text_encoder/config.json` (SD1.5: ViT-L/14 text, quick_gelu; SD2.1:
  OpenCLIP-H text, gelu, 23 layers) and its state dict has the keys of the text-encoder files on the
  Hugging Face Hub (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...);
  `convert_text_state_dict` brings other transformers layouts to it.
- `CLIPTokenizer`: byte-level BPE with CLIP's pre-tokenizer, reading a `tokenizer/` directory
  (`vocab.json`, `merges.txt`, the special-token files); ids equal those of transformers 5's
  `CLIPTokenizer` with `padding="max_length", truncation=True`, as diffusers calls it.
- `OpenCLIP`: both towers of an open_clip ViT CLIP (default ViT-g-14, LAION-2B), built from an
  open_clip model config, with the key layout of transformers' `CLIPModel`; `load_open_clip` reads
  open_clip's own weight files (`convert_open_clip_state_dict`), `open_clip_tokenize` gives
  open_clip's token ids and `preprocess_image` its image transform.

The encoder layers are generic (width, activation, causal or not): one implementation serves the text
model and both OpenCLIP towers.
"""
import json
import math
import os
import unicodedata
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from layers import attention
from loading import LoadError, MissingFile, fetch, key_listing, load_weights, read_json, read_tensors


def quick_gelu(x):
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


@dataclass
class CLIPTextConfig:
    """The fields of a transformers `CLIPTextConfig` that shape the network (defaults as there)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, cfg):
        """From a transformers `config.json` dict; unknown keys are ignored, unsupported values raise."""
        if cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"not a CLIP text-encoder config: model_type is {cfg['model_type']!r}, "
                             "expected 'clip_text_model'")
        config = cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} in CLIP text config "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        return config


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, causal=False):  # x: (B, L, D)
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=causal)
        return self.out_proj(out)


class CLIPMLP(nn.Module):
    """fc1, activation, fc2."""

    def __init__(self, dim, hidden, act):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim, heads, mlp_hidden, act, eps):
        super().__init__()
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, mlp_hidden, act)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, causal=False):  # x: (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of `depth` encoder layers (key `layers.{i}`)."""

    def __init__(self, depth, dim, heads, mlp_hidden, act, eps):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(dim, heads, mlp_hidden, act, eps) for _ in range(depth)])

    def forward(self, x, causal=False):
        for layer in self.layers:
            x = layer(x, causal=causal)
        return x


class CLIPTextEmbeddings(nn.Module):
    """Learned token and absolute position embeddings, summed."""

    def __init__(self, vocab_size, max_positions, dim):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_positions, dim)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder, final LayerNorm."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                   c.intermediate_size, c.hidden_act, c.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids):  # (B, L) -> (B, L, D)
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids), causal=True))


class CLIPTextModel(nn.Module):
    """The CLIP text encoder as Stable Diffusion uses it: token ids in, last hidden state out."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    @classmethod
    def from_config(cls, cfg):
        """From a transformers `text_encoder/config.json` dict."""
        return cls(CLIPTextConfig.from_dict(cfg))

    def forward(self, input_ids):  # (B, L) token ids, L <= max_position_embeddings
        return self.text_model(input_ids)  # (B, L, D)


def convert_text_state_dict(state):
    """A transformers CLIP text-encoder state dict in our key layout. Files saved by transformers 5
    lack the `text_model.` prefix (it strips it when loading); files saved before transformers 4.31
    carry the buffer `text_model.embeddings.position_ids`, which is just arange(77) and is dropped."""
    state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters: the printable
    Latin-1 bytes map to themselves, the others to chr(256 + n), so no token holds a space or a
    control character. The order is that of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in printable)})
    return table


# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of anything else; whitespace
# only separates. (The reference also lists `<|startoftext|>` and `<|endoftext|>` here, but its
# byte-level step splits such a piece again into `<|`, the word, `|>`, which this pattern does in one
# go; the special tokens proper are split out before, see `CLIPTokenizer.encode`.)
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")


def _special_token(value):
    """A special token as written in `special_tokens_map.json` / `tokenizer_config.json`."""
    return value["content"] if isinstance(value, dict) else value


def _splitter(tokens):
    """A pattern whose `split` puts each of `tokens` in a piece of its own, at the odd positions
    (leftmost-longest match; a pattern that never matches when there are no tokens)."""
    alternatives = "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives or '(?!)'})")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, from a Hugging Face `tokenizer/` directory.

    `tokenizer(prompts)` -> LongTensor (B, model_max_length): BOS, the prompt's tokens (cut to fit),
    EOS, then the pad token (SD1.5 pads with `<|endoftext|>`, SD2.1 with `!`).

    Text handling is that of transformers 5 (its `tokenizers` pipeline): the special tokens (BOS,
    EOS, UNK, PAD) are cut out of the text first, each becoming its own id (so with SD2.1's special
    `!`, every "!" in a prompt is the bare `!` token, never part of a punctuation run); the rest goes
    through NFC normalization, per-character lower-casing, the pre-tokenizer above, and BPE merges by
    rank on the UTF-8 bytes, with `</w>` marking the end of each word. There is no ftfy and no HTML
    unescaping (transformers 4's Python tokenizer used ftfy when installed; open_clip always does).
    """

    def __init__(self, path):
        with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
            lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
        self.ranks = {tuple(line.split()): rank for rank, line in enumerate(lines)}
        settings = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "model_max_length": 77}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second one wins
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    settings.update({k: v for k, v in json.load(f).items() if k in settings})
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        specials = [_special_token(settings[k]) for k in keys]
        self.bos_id, self.eos_id, _, self.pad_id = (self.vocab[t] for t in specials)
        self.max_length = settings["model_max_length"]
        # A special token declared `"normalized": true` is matched in the normalized text, otherwise
        # in the raw text; a plain string is not normalized, and a later declaration of the same
        # token overrides an earlier one (as transformers adds them: bos, eos, unk, pad).
        normalized = {t: isinstance(settings[k], dict) and settings[k].get("normalized", False)
                      for t, k in zip(specials, keys)}
        self.raw_specials = _splitter([t for t in normalized if not normalized[t]])
        self.normalized_specials = _splitter([t for t in normalized if normalized[t]])
        self.byte_encoder = bytes_to_unicode()
        self.bpe = lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word):
        """Ids of one pre-token (already mapped to byte characters): merge the lowest-ranked
        adjacent pair, all of its occurrences, until no pair has a rank."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.vocab[p] for p in parts)

    def encode(self, text):
        """The token ids of one prompt, without BOS/EOS, truncation or padding. Special tokens are
        cut out first (the odd pieces of each split), from the raw or from the normalized text."""
        ids = []
        for i, raw in enumerate(self.raw_specials.split(text)):
            if i % 2:
                ids.append(self.vocab[raw])
                continue
            normal = "".join(c.lower() for c in unicodedata.normalize("NFC", raw))  # "Σ" -> "σ" even word-final
            for j, piece in enumerate(self.normalized_specials.split(normal)):
                if j % 2:
                    ids.append(self.vocab[piece])
                    continue
                for word in PRETOKENIZE.findall(piece):
                    ids.extend(self.bpe("".join(self.byte_encoder[b] for b in word.encode("utf-8"))))
        return ids

    def __call__(self, prompts):
        """A list of prompts -> LongTensor (B, model_max_length)."""
        rows = []
        for prompt in prompts:
            ids = [self.bos_id, *self.encode(prompt)[:self.max_length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, max_length)


# -----------------------------------------------------------------------------------------------
# OpenCLIP: image and text towers (the CLIP score of the evaluation)

OPEN_CLIP_REPO = "laion/CLIP-ViT-g-14-laion2B-s12B-b42K"  # open_clip's ViT-g-14, pretrained="laion2b_s12b_b42k"

# open_clip's model_configs/ViT-g-14.json
VIT_G_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 40, "width": 1408, "head_width": 88, "mlp_ratio": 4.3637,
                   "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}

# open_clip settings that select another architecture than the plain ViT CLIP, and their plain values
PLAIN_SETTINGS = {
    "custom_text": (False,), "init_logit_bias": (None,), "nonscalar_logit_scale": (False,),
    "timm_model_name": (None,), "hf_model_name": (None,), "ls_init_value": (None,), "attentional_pool": (False,),
    "no_ln_pre": (False,), "pos_embed_type": ("learnable",), "final_ln_after_pool": (False,),
    "pool_type": ("tok", "argmax"), "embed_cls": (False,), "no_causal_mask": (False,), "proj_type": ("linear",),
    "proj_bias": (False,), "act_kwargs": (None,), "norm_kwargs": (None,), "block_type": (None, "default"),
    "qk_norm": (False,), "scaled_cosine_attn": (False,), "scale_heads": (False,), "scale_attn_inner": (False,),
    "scale_attn": (False,), "scale_fc": (False,),
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


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
        if not isinstance(vision.get("layers", 12), int) or not isinstance(vision.get("image_size", 224), int):
            raise ValueError("unsupported open_clip vision_cfg: `layers` and `image_size` must be integers "
                             "(ResNet towers and non-square images are not implemented)")
        act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
        width, head_width = vision.get("width", 768), vision.get("head_width", 64)
        text_width, heads = text.get("width", 512), text.get("heads", 8)
        if width % head_width or text_width % heads:
            raise ValueError(f"open_clip config: vision width {width} / head_width {head_width} or text width "
                             f"{text_width} / heads {heads} is not a whole number of heads")
        return cls(
            embed_dim=cfg["embed_dim"],
            vision=CLIPVisionConfig(
                hidden_size=width, intermediate_size=int(width * vision.get("mlp_ratio", 4.0)),
                num_hidden_layers=vision.get("layers", 12), num_attention_heads=width // head_width,
                image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 16), hidden_act=act),
            text=CLIPTextConfig(
                vocab_size=text.get("vocab_size", 49408), hidden_size=text_width,
                intermediate_size=int(text_width * text.get("mlp_ratio", 4.0)),
                num_hidden_layers=text.get("layers", 12), num_attention_heads=heads,
                max_position_embeddings=text.get("context_length", 77), hidden_act=act))


class CLIPVisionEmbeddings(nn.Module):
    """Patches by a strided convolution, a learned class token in front, learned position embeddings."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 1 + N, D), N = (S / patch)^2
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(len(x), 1, -1)  # (B, 1, D)
        return torch.cat([cls, x], 1) + self.position_embedding.weight.to(x.dtype)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, LayerNorm, bidirectional encoder; the class token through the final LayerNorm."""

    def __init__(self, c: CLIPVisionConfig):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # (sic) transformers' key
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size,
                                   c.hidden_act, c.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels):  # (B, 3, S, S) -> (B, D)
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))  # (B, 1 + N, D)
        return self.post_layernorm(x[:, 0])


class OpenCLIP(nn.Module):
    """An open_clip ViT CLIP: vision and text towers, each followed by a linear map (no bias) into the
    joint embedding; both towers are built from this file's encoder layers. State-dict keys are those
    of transformers' `CLIPModel` (`vision_model.*`, `text_model.*`, `visual_projection.weight`,
    `text_projection.weight`, `logit_scale`); `convert_open_clip_state_dict` maps open_clip's to them."""

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
        eot = hidden[torch.arange(len(hidden), device=hidden.device), input_ids.argmax(-1)]  # (B, W)
        return self.text_projection(eot)  # the end-of-text token has the largest id


# our key -> open_clip's key, applied in turn (the q/k/v split and the transposes: see open_clip_source)
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
    """An open_clip `CLIP` state dict in `model`'s (OpenCLIP's) key layout: renamed, the fused in_proj
    cut into q, k, v (views, no copy), the two projections transposed. A LoadError lists the
    open_clip keys that are missing from `state` or that it has in excess; shapes are checked when
    loading."""
    sources = {key: open_clip_source(key) for key in model.state_dict()}
    wanted = {name for name, _ in sources.values()}
    problems = [f"{len(keys)} {kind} keys: {key_listing(keys)}"
                for kind, keys in (("missing", wanted - state.keys()), ("unexpected", state.keys() - wanted)) if keys]
    if problems:
        raise LoadError(f"{what} is not an open_clip {type(model).__name__} of this config: " + "; ".join(problems))
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
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")


def read_open_clip_weights(path):
    """(state dict, file) from a weight file (.safetensors, or a torch pickle), or from a local
    directory or Hub repo holding one of OPEN_CLIP_FILES."""
    file = path
    if not os.path.isfile(path):
        for name in OPEN_CLIP_FILES:
            try:
                file = fetch(path, name)
                break
            except MissingFile:
                continue
        else:
            raise LoadError(f"no open_clip weights in {path} (looked for {', '.join(OPEN_CLIP_FILES)})")
    return read_tensors(file), file


def read_open_clip_config(path):
    """The `model_cfg` of the `open_clip_config.json` in a local directory or Hub repo, or VIT_G_14
    when there is no such file."""
    try:
        file = fetch(path, "open_clip_config.json")
    except MissingFile:
        return VIT_G_14
    cfg = read_json(file)
    if "model_cfg" not in cfg:
        raise LoadError(f"{file} has no model_cfg")
    return cfg["model_cfg"]


def load_open_clip(path=OPEN_CLIP_REPO, config=None, device="cpu", dtype=torch.float32):
    """OpenCLIP with open_clip's weights from `path`: a weight file, a local directory or a Hub repo
    (default: ViT-g-14 trained on LAION-2B, open_clip's `laion2b_s12b_b42k`). `config` is an open_clip
    model config dict; by default the `model_cfg` of the repo's `open_clip_config.json`, or VIT_G_14
    when there is none (a bare file). Frozen, in eval mode, on `device`, in `dtype` (fp32 for the
    CLIP score)."""
    path = os.fspath(path)
    if config is None:
        config = VIT_G_14 if os.path.isfile(path) else read_open_clip_config(path)
    with torch.device("meta"):
        model = OpenCLIP.from_config(config)
    state, file = read_open_clip_weights(path)
    load_weights(model, convert_open_clip_state_dict(state, model, what=file), what=file, dtype=dtype)
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
    - special tokens: we cut "<|startoftext|>" and "<|endoftext|>" in a prompt out as their ids, open_clip
      tokenizes them as text; it treats "<start_of_text>" and "<end_of_text>" as its special tokens.
    """
    if tokenizer.pad_id != tokenizer.eos_id:
        raise ValueError("this tokenizer has a special pad token of its own (SD2.1's '!'), which open_clip's does "
                         "not; load one from vocab.json and merges.txt alone (load_open_clip_tokenizer)")
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
    The image is converted to RGB first; open_clip converts last, which gives the same pixels for RGB
    and grayscale images but not for palette or RGBA ones (PIL resizes those differently)."""
    img = img.convert("RGB")
    w, h = img.size
    long = int(size * max(w, h) / min(w, h))
    img = img.resize((size, long) if w <= h else (long, size), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = round((w - size) / 2), round((h - size) / 2)
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, size, size)
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]
