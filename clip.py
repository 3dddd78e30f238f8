"""CLIP (Radford et al. 2021), written from scratch: the text transformers that condition Stable
Diffusion (one) and SDXL (two). The BPE tokenizer that feeds them is bpe.py's `CLIPTokenizer`.

- `CLIPTextModel`: token + position embeddings, a stack of pre-norm transformer layers with causal
  self-attention, a final LayerNorm; `forward(input_ids, attention_mask=None)` returns the last
  hidden state (B, L, D). Stable Diffusion encodes without a mask, so the positions after the prompt
  attend to the pad tokens before them; the official WaDi training code passes the tokenizer's mask
  for its training prompts (docs/training.md). `hidden_states` gives every layer's output, as
  transformers' `output_hidden_states=True` does.
  It reads a transformers `text_encoder/config.json` (SD1.5: ViT-L/14 text, quick_gelu; SD2.1:
  OpenCLIP-H text, gelu, 23 layers) and its state dict has the keys of the text-encoder files on the
  Hugging Face Hub (`text_model.encoder.layers.0.self_attn.q_proj.weight`, ...);
  `convert_text_state_dict` brings other transformers layouts to it.
- `CLIPTextModelWithProjection`: the same plus `text_projection` (transformers' class of that name,
  SDXL's `text_encoder_2`, OpenCLIP-bigG text); `text_embeds` is its pooled, projected output.
- `sdxl_text`: SDXL's prompt conditioning from its two encoders, as diffusers'
  `StableDiffusionXLPipeline.encode_prompt` computes it; `sdxl_null_text` its unconditional one.

The encoder layers are generic (width, activation, causal or not): one implementation serves the
text models here and both OpenCLIP towers of the evaluation (openclip.py). The config parsing
(`CLIPTextConfig`) follows the network.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from layers import attention


def quick_gelu(x):
    """The sigmoid approximation of GELU that OpenAI's CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPAttention(nn.Module):
    """Multi-head self-attention with biased q/k/v/out projections."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.q_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None, causal=False):  # x: (B, L, D); mask: see layers.attention
        out = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, mask, causal)
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

    def forward(self, x, mask=None, causal=False):  # x: (B, L, D)
        x = x + self.self_attn(self.layer_norm1(x), mask, causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """A stack of `depth` encoder layers (key `layers.{i}`)."""

    def __init__(self, depth, dim, heads, mlp_hidden, act, eps):
        super().__init__()
        self.layers = nn.ModuleList(
            [CLIPEncoderLayer(dim, heads, mlp_hidden, act, eps) for _ in range(depth)])

    def forward(self, x, mask=None, causal=False):
        for layer in self.layers:
            x = layer(x, mask, causal)
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
    """Embeddings, causal encoder, final LayerNorm. With an `attention_mask` (B, L), 1 on tokens and 0
    on padding, as transformers' `CLIPTextModel` takes it, each position attends to the tokens up to
    itself only, never to padding; the outputs at the tokens are the same as without it (they see no
    padding anyway), those at the padding positions are not."""

    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(c.vocab_size, c.max_position_embeddings, c.hidden_size)
        self.encoder = CLIPEncoder(c.num_hidden_layers, c.hidden_size, c.num_attention_heads,
                                   c.intermediate_size, c.hidden_act, c.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.eos_token_id = c.eos_token_id

    def hidden_states(self, input_ids, attention_mask=None):
        """transformers' `hidden_states` (`output_hidden_states=True`): [the embeddings, layer 1's
        output, ..., the last layer's output], N + 1 tensors (B, L, D), none through the final
        LayerNorm. SDXL conditions on [-2], the penultimate layer's output (`sdxl_text`)."""
        mask = None
        if attention_mask is not None:
            L = input_ids.shape[1]
            causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L): query, key
        states = [self.embeddings(input_ids)]
        for layer in self.encoder.layers:
            states.append(layer(states[-1], mask, causal=mask is None))
        return states

    def forward(self, input_ids, attention_mask=None):  # (B, L) -> (B, L, D)
        return self.final_layer_norm(self.hidden_states(input_ids, attention_mask)[-1])

    def pool(self, input_ids, last_hidden_state):
        """transformers' `pooler_output` (B, D): `last_hidden_state` (forward's) at each row's EOS,
        found as transformers 5 finds it. With `eos_token_id` 2, the value of configs written before
        transformers PR #24773 (SD1.5's, SD2.1's, both of SDXL's), the first position of the row's
        largest id (CLIP's EOS is the last id of its vocabulary; a token added after it,
        embeddings.py, takes its place); else the first position of `eos_token_id`."""
        if self.eos_token_id == 2:
            eos = input_ids.argmax(-1)
        else:
            eos = (input_ids == self.eos_token_id).int().argmax(-1)
        return last_hidden_state[torch.arange(len(eos), device=eos.device), eos]


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

    def forward(self, input_ids, attention_mask=None):  # (B, L) ids, L <= max_position_embeddings
        return self.text_model(input_ids, attention_mask)  # (B, L, D)


class CLIPTextModelWithProjection(CLIPTextModel):
    """transformers' `CLIPTextModelWithProjection`, SDXL's `text_encoder_2`: CLIPTextModel plus
    `text_projection` (hidden_size -> projection_dim, no bias; key `text_projection.weight`).
    `forward` is CLIPTextModel's (the last hidden state); `text_embeds` is transformers'."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def text_embeds(self, input_ids, last_hidden_state=None):  # -> (B, projection_dim)
        """The pooled output (`CLIPTextTransformer.pool`) projected; pass `last_hidden_state` when
        it is at hand (forward's), else it is computed."""
        if last_hidden_state is None:
            last_hidden_state = self(input_ids)
        return self.text_projection(self.text_model.pool(input_ids, last_hidden_state))


def sdxl_text(encoder, encoder_2, ids, ids_2):
    """SDXL's text conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt` computes it
    (no clip_skip, no attention mask): each encoder's penultimate layer output (transformers'
    `hidden_states[-2]`, not through the final LayerNorm), concatenated on the feature axis, and the
    `text_embeds` of `encoder_2` (all its layers, the final LayerNorm, the EOS row, the projection).
    `encoder`: CLIPTextModel (CLIP ViT-L/14, D = 768) on `ids` from `tokenizer/` (pads with EOS);
    `encoder_2`: CLIPTextModelWithProjection (OpenCLIP ViT-bigG/14, D2 = 1280) on `ids_2` from
    `tokenizer_2/` (pads with "!"). -> (embeds (B, L, D + D2), pooled (B, projection_dim))."""
    states_2 = encoder_2.text_model.hidden_states(ids_2)
    last_2 = encoder_2.text_model.final_layer_norm(states_2[-1])
    embeds = torch.cat([encoder.text_model.hidden_states(ids)[-2], states_2[-2]], dim=-1)
    return embeds, encoder_2.text_embeds(ids_2, last_2)


def sdxl_null_text(embeds, pooled):
    """SDXL's unconditional text for classifier-free guidance when there is no negative prompt:
    zeros, the sequence and the pooled vector alike. The base model's pipeline config says
    `force_zeros_for_empty_prompt: true`, and diffusers' `encode_prompt` then gives
    `zeros_like(prompt_embeds)`, `zeros_like(pooled_prompt_embeds)` when `negative_prompt is None`;
    a negative prompt given as text, "" included, is encoded (`sdxl_text`), not zeroed."""
    return torch.zeros_like(embeds), torch.zeros_like(pooled)


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
    projection_dim: int = 512     # CLIPTextModelWithProjection's output width
    eos_token_id: int = 49407     # where the pooled output is read (CLIPTextTransformer.pool)

    @classmethod
    def from_dict(cls, cfg):
        """From a transformers `config.json` dict; unknown keys are ignored, unsupported values
        raise."""
        if cfg.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"not a CLIP text-encoder config: model_type is "
                             f"{cfg['model_type']!r}, expected 'clip_text_model'")
        config = cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        if config.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} in CLIP text config "
                             f"(supported: {', '.join(ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(f"CLIP text config: hidden_size {config.hidden_size} is not divisible "
                             f"by num_attention_heads {config.num_attention_heads}")
        return config


def convert_text_state_dict(state):
    """A transformers CLIP text-encoder state dict in our key layout. Files saved by transformers 5
    lack the `text_model.` prefix (it strips it when loading; `text_projection.weight`, of
    CLIPTextModelWithProjection, never has it); files saved before transformers 4.31 carry the
    buffer `text_model.embeddings.position_ids`, which is just arange(77) and is dropped."""
    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
             for k, v in state.items()}
    state.pop("text_model.embeddings.position_ids", None)
    return state
