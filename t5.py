"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU feed-forward, no parameter sharing with
a decoder) and its SentencePiece tokenizer: PixArt-alpha's text conditioning (PixArt Sec. 2.3, the
T5 XXL encoder, 120 tokens with a padding mask), written from scratch.

- `T5Encoder`: token embedding (no sqrt(d) scaling), pre-RMSNorm blocks of self-attention (no
  1/sqrt(d) score scaling; one learned relative position bias, computed by block 0 and shared by all
  blocks) and a gated-GELU MLP, a final RMSNorm; `forward(input_ids, attention_mask)` returns the
  last hidden state (B, L, D). It reads a transformers T5 `text_encoder/config.json` (`T5Config`,
  after the network); its state dict has exactly the keys of transformers' `T5EncoderModel`
  (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q`, ...; `encoder.embed_tokens` is
  `shared` itself, as there), and `convert_state_dict` fills in whichever of the two tied names a
  file leaves out. In float16 its `wo` projections stay float32, as transformers keeps them
  (`T5PreTrainedModel._keep_in_fp32_modules`): T5 v1.1 XXL's feed-forward writes activations beyond
  float16's range (65504) into a few channels of the residual stream, which a T5 merely cast to
  float16 clamps, ruining the embeddings. The residual stream is then float32 from block 0's
  feed-forward on, as in transformers; each sublayer still runs in float16.
- `T5Tokenizer`: the repo's `tokenizer/spiece.model` through the `sentencepiece` package, plus the
  100 `<extra_id_N>` sentinels, eos appended, no bos; ids and masks equal transformers'
  `T5Tokenizer` with padding="max_length", max_length=120, truncation=True. Captions are neither
  cleaned nor lower-cased (the official WaDi code).
Sources: transformers' `T5EncoderModel` and `T5Tokenizer` (models/t5/), PixArt-alpha's
`diffusion/model/t5.py`.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import KeepsFp32Modules, attention
from loading import LoadError

# PixArt's caption length in every code path (PixArt-alpha builds its `T5Embedder` with
# model_max_length=120; diffusers' PixArtAlphaPipeline has max_sequence_length=120)
MAX_LENGTH = 120
# transformers' T5Tokenizer sentinels <extra_id_0> (id 32099) ... <extra_id_99> (32000)
EXTRA_IDS = 100


class T5LayerNorm(nn.Module):
    """RMSNorm: x / rms(x) * weight, no mean, no bias; the statistics in fp32 whatever the input
    dtype, the result in the weight's dtype when that is half precision (as transformers)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # fp32
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative_position, num_buckets, max_distance):
    """Bidirectional T5 buckets of key - query offsets: half the buckets per direction (key after
    the query: + num_buckets/2); offsets below num_buckets/4 get one bucket each, larger ones
    logarithmic bins up to max_distance, beyond which all share the last bucket."""
    num_buckets //= 2
    buckets = (relative_position > 0).long() * num_buckets
    distance = relative_position.abs()
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5Attention(nn.Module):
    """Multi-head self-attention with bias-free q, k, v, o and unscaled scores q @ k^T + position
    bias (the initialisation absorbs 1/sqrt(d_kv)). Block 0 also owns the relative position bias
    table."""

    def __init__(self, c: T5Config, has_relative_attention_bias=False):
        super().__init__()
        inner = c.num_heads * c.d_kv
        self.heads = c.num_heads
        self.buckets = c.relative_attention_num_buckets
        self.max_distance = c.relative_attention_max_distance
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.buckets, self.heads)

    def compute_bias(self, length):  # -> (1, heads, L, L)
        position = torch.arange(length, device=self.relative_attention_bias.weight.device)
        bucket = relative_position_bucket(position[None, :] - position[:, None], self.buckets,
                                          self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        # x: (B, L, D), bias: (B or 1, heads, L, L) position bias + padding mask
        return self.o(attention(self.q(x), self.k(x), self.v(x), self.heads, mask=bias, scale=1.0))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c: T5Config, has_relative_attention_bias):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """The gated-GELU MLP of T5 v1.1: wo(gelu_tanh(wi_0 x) * wi_1 x), no biases; the input of `wo`
    is cast to wo's dtype (float32 in a float16 encoder: `T5Encoder.keep_in_fp32_modules`), as
    transformers' `T5DenseGatedActDense` does, so the output is float32 then. `wo` runs in its own
    dtype under autocast too (where transformers' would overflow in float16)."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, L, d_ff)
        with torch.autocast(x.device.type, enabled=False):
            return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, c: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x):  # float16 x + float32 MLP output: float32, as in transformers
        return x + self.DenseReluDense(self.layer_norm(x))


def clamp_fp16(x):
    """T5 activations outgrow float16; transformers clamps them to its finite range after each
    layer (a float32 residual stream, as behind a float32 `wo`, is left alone)."""
    if x.dtype != torch.float16:
        return x
    limit = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), limit - 1000, limit)
    return x.clamp(-limit, limit)


class T5Block(nn.Module):
    """Pre-norm residual self-attention, then pre-norm residual MLP (key `layer.0`, `layer.1`)."""

    def __init__(self, c: T5Config, has_relative_attention_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_attention_bias),
                                    T5LayerFF(c)])

    def forward(self, x, bias):
        x = clamp_fp16(self.layer[0](x, bias))
        return clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    """The encoder stack: `block.N` and `final_layer_norm` (`embed_tokens` is the model's
    `shared`)."""

    def __init__(self, c: T5Config, embed_tokens):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(c, has_relative_attention_bias=i == 0)
                                    for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, input_ids, attention_mask=None):  # (B, L) -> (B, L, D)
        x = self.embed_tokens(input_ids)
        attn = self.block[0].layer[0].SelfAttention
        bias = attn.compute_bias(input_ids.shape[1])  # (1, heads, L, L)
        if attention_mask is not None:
            # 1 = token, 0 = padding: padded keys get the lowest finite score
            keep = attention_mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, L)
            bias = bias.to(x.dtype) + (1 - keep) * torch.finfo(x.dtype).min  # (B, heads, L, L)
        for block in self.block:
            x = block(x, bias)  # one position bias (and mask) for every block
        return self.final_layer_norm(x)


class T5Encoder(KeepsFp32Modules):
    """transformers' `T5EncoderModel`: token ids (and their padding mask) -> the last hidden
    state. Made float16 (loaded so, or by `.half()` / `.to`), its `wo` weights stay float32
    (`layers.KeepsFp32Modules`), as transformers loads T5 in float16; in bfloat16 they are
    bfloat16, as there (transformers 5.23)."""
    keep_in_fp32_modules = ("wo",)  # transformers' T5PreTrainedModel._keep_in_fp32_modules

    def __init__(self, config: T5Config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)

    @classmethod
    def from_config(cls, cfg):
        """From a transformers `text_encoder/config.json` dict (T5 v1.1 layout)."""
        return cls(T5Config.from_dict(cfg))

    def forward(self, input_ids, attention_mask=None):
        """input_ids: (B, L) token ids; attention_mask: (B, L), 1 for tokens, 0 for padding (None:
        all tokens). Returns (B, L, d_model), the final-RMSNorm output (padded positions
        included)."""
        return self.encoder(input_ids, attention_mask)


@dataclass
class T5Config:
    """The fields of a transformers `T5Config` that shape the encoder (defaults as there)."""
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_dict(cls, cfg):
        """From a transformers `config.json` dict; unknown keys are ignored, unsupported values
        raise."""
        if cfg.get("model_type", "t5") != "t5":
            raise ValueError(f"unsupported T5 config: model_type={cfg['model_type']!r} "
                             f"(supported: 't5')")
        ff = cfg.get("feed_forward_proj", "relu")
        if ff != "gated-gelu":  # transformers maps it to gelu_new (tanh GELU), gated
            raise ValueError(f"unsupported T5 config: feed_forward_proj={ff!r} "
                             f"(supported: 'gated-gelu', T5 v1.1)")
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})


def convert_state_dict(state):
    """A transformers T5 encoder state dict with both tied names: `encoder.embed_tokens.weight` IS
    `shared.weight`, and files hold either or both (safetensors files written by transformers keep
    only `shared.weight`). The `rename` for `loading.load_component(T5Encoder, repo,
    "text_encoder", ...)`."""
    state = dict(state)
    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    if shared is not None:
        state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared
    return state


class T5Tokenizer:
    """T5's SentencePiece tokenizer, from a Hugging Face `tokenizer/` directory holding
    `spiece.model`.

    `tokenizer(prompts)` -> (ids, mask), both LongTensor (B, max_length): each prompt's pieces, cut
    to max_length - 1, then eos (1), then padding (0); the mask is 1 on the pieces and the eos (the
    empty prompt is just eos: one valid token). `truncated(prompts)` says which prompts were cut.

    Text handling is transformers' (5.x `T5Tokenizer`, and 4.x's sentencepiece-based one): the
    special tokens `<pad>`, `</s>`, `<unk>` and `<extra_id_0>` ... `<extra_id_99>` are cut out of
    the text first, each becoming its own id; every other piece of text is encoded by SentencePiece
    on its own (NFKC normalisation, whitespace runs collapsed, a leading "▁" added). No cleaning, no
    lower-casing.
    """

    def __init__(self, path, max_length=MAX_LENGTH):
        file = os.path.join(path, "spiece.model")
        if not os.path.isfile(file):
            raise LoadError(f"T5 tokenizer model not found: {file}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=file)
        except (OSError, RuntimeError) as e:
            raise LoadError(f"cannot read the SentencePiece model {file}: {e}") from None
        self.max_length = max_length
        n = self.sp.get_piece_size()
        self.specials = {t: self.sp.piece_to_id(t) for t in ("<pad>", "</s>", "<unk>")}
        self.specials.update({f"<extra_id_{i}>": n + EXTRA_IDS - 1 - i for i in range(EXTRA_IDS)})
        self.pad_id, self.eos_id = self.specials["<pad>"], self.specials["</s>"]
        alternatives = "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        self.split_specials = re.compile(f"({alternatives})")

    def __len__(self):
        return self.sp.get_piece_size() + EXTRA_IDS  # 32,100 (the encoder's table has 32,128 rows)

    def encode(self, text):
        """The token ids of one prompt, without eos, truncation or padding. Special tokens are the
        odd pieces of the split."""
        ids = []
        for i, piece in enumerate(self.split_specials.split(text)):
            ids.extend([self.specials[piece]] if i % 2 else self.sp.encode(piece))
        return ids

    def truncated(self, prompts):
        """Indices of the prompts longer than max_length tokens with eos, which `__call__` cuts."""
        return [i for i, prompt in enumerate(prompts)
                if len(self.encode(prompt)) >= self.max_length]

    def __call__(self, prompts):
        """A list of prompts -> (ids, mask), each LongTensor (B, max_length)."""
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            row = self.encode(prompt)[:self.max_length - 1] + [self.eos_id]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return ids, mask  # (B, max_length) each
