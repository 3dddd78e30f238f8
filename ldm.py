"""The original Stable Diffusion ("LDM", CompVis) single-file checkpoint layout, both ways.

One `.safetensors` holds the whole model under three prefixes: `model.diffusion_model.` (U-Net),
`first_stage_model.` (VAE), `cond_stage_model.` (text encoder). The CompVis / Stability releases
and most community fine-tunes come so; AUTOMATIC1111 and ComfyUI (`CheckpointLoaderSimple`) load it,
diffusers with `from_single_file`. Our networks have diffusers' U-Net / VAE keys and transformers'
CLIPTextModel keys; the functions here rename between the two (tables: `_unet_rows`, `_vae_rows`).

- U-Net (L = layers_per_block): conv_in = input_blocks.0.0, time_embedding.linear_1/2 =
  time_embed.0/2, conv_norm_out / conv_out = out.0 / out.2. Down level i, resnet j =
  input_blocks.(1 + (L+1)i + j).0, its attention .1; the level's downsampler takes the next slot,
  input_blocks.((L+1)(i+1)).0.op. Mid: resnets.0, attentions.0, resnets.1 = middle_block.0, .1, .2.
  Up level i, resnet j <= L = output_blocks.((L+1)i + j).0, attention .1; the upsampler follows in
  the level's last block: .2.conv after an attention, else .1.conv. In a resnet norm1, conv1,
  time_emb_proj, norm2, conv2, conv_shortcut = in_layers.0, in_layers.2, emb_layers.1,
  out_layers.0, out_layers.3, skip_connection; inside an attention nothing changes.
- VAE (n levels): encoder.down_blocks.i.resnets.j / downsamplers.0 = encoder.down.i.block.j /
  downsample; decoder.up_blocks.i = decoder.up.(n-1-i) (LDM numbers it from the lowest resolution);
  mid_block.resnets.0/1 = mid.block_1/2; mid_block.attentions.0.{group_norm, to_q, to_k, to_v,
  to_out.0} = mid.attn_1.{norm, q, k, v, proj_out}, 1x1 convolutions there, weights (C, C, 1, 1)
  for our (C, C); conv_norm_out = norm_out; conv_shortcut = nin_shortcut.
- Text, SD1.5: transformers' keys under `cond_stage_model.transformer.`, plus the position_ids
  buffer the released files carry. SD2.1: OpenCLIP under `cond_stage_model.model.`: token_embedding,
  positional_embedding, transformer.resblocks.k.{ln_1, attn.in_proj_* (q, k, v concatenated),
  attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_final, text_projection, logit_scale. SD2 conditions
  on OpenCLIP-H's penultimate layer: its transformers encoder has 23 layers, the checkpoint 24
  (diffusers skips `resblocks.23`). Writing, we add the 24th block as zeros (a pre-norm residual
  block with zero LayerNorm scales and biases adds nothing: the 24-layer output equals ours),
  text_projection = identity and logit_scale = ln 100 (SD uses neither); reading, we drop them.
- SDXL (sgm's layout): the U-Net's add_embedding.linear_1/2 = label_emb.0.0/0.2; text_encoder/
  (CLIP ViT-L) as SD1.5's under `conditioner.embedders.0.transformer.`, text_encoder_2/ (OpenCLIP
  bigG, every block: SDXL reads its penultimate state itself) as SD2.1's under
  `conditioner.embedders.1.model.`, its text_projection the transpose of transformers'
  `text_projection.weight` (OpenCLIP computes x @ P), logit_scale ln 100 (unused).
Tensors pass unchanged (not copied) but for the VAE attention reshape and the in_proj concat /
split.
A state dict that does not fit is a one-line `loading.LoadError` naming the keys.
"""
import math
import re

import torch

from clip import CLIPTextModel, CLIPTextModelWithProjection, convert_text_state_dict
from loading import LoadError, key_listing
from unet import UNet, UNetConfig
from vae import AutoencoderKL, rename_legacy_keys

UNET, VAE = "model.diffusion_model.", "first_stage_model."
# the text encoders' prefixes; "sdxl" is SDXL's text_encoder/, "sdxl_2" its text_encoder_2/
TEXT = {"sd15": "cond_stage_model.transformer.", "sd21": "cond_stage_model.model.",
        "sdxl": "conditioner.embedders.0.transformer.", "sdxl_2": "conditioner.embedders.1.model."}
CLIP_LAYOUT = ("sd15", "sdxl")  # transformers' keys under the prefix; the others OpenCLIP's

# leaf renames inside one module, ours -> LDM (a table row with None keeps the rest as it is)
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.",
               "time_emb_proj.": "emb_layers.1.", "norm2.": "out_layers.0.",
               "conv2.": "out_layers.3.", "conv_shortcut.": "skip_connection."}
VAE_RESNET = {"norm1.": "norm1.", "conv1.": "conv1.", "norm2.": "norm2.", "conv2.": "conv2.",
              "conv_shortcut.": "nin_shortcut."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.",
                 "to_out.0.": "proj_out."}
OPENCLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "mlp.fc1.": "mlp.c_fc.",
                  "mlp.fc2.": "mlp.c_proj.", "self_attn.out_proj.": "attn.out_proj.",
                  "self_attn.q_proj.": "attn.q_proj.", "self_attn.k_proj.": "attn.k_proj.",
                  "self_attn.v_proj.": "attn.v_proj."}  # q, k, v then fused into attn.in_proj_*
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")  # dropped when reading


def _unet_rows(config):
    c = UNetConfig.from_dict(config)
    n, L = len(c.block_out_channels), c.layers_per_block
    rows = [("conv_in.", "input_blocks.0.0.", None),
            ("time_embedding.linear_1.", "time_embed.0.", None),
            ("time_embedding.linear_2.", "time_embed.2.", None), ("conv_norm_out.", "out.0.", None),
            ("conv_out.", "out.2.", None), ("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET),
            ("add_embedding.linear_1.", "label_emb.0.0.", None),
            ("add_embedding.linear_2.", "label_emb.0.2.", None),
            ("mid_block.attentions.0.", "middle_block.1.", None),
            ("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)]
    for i in range(n):
        down_attn = c.down_block_types[i].startswith("CrossAttn")
        up_attn = c.up_block_types[i].startswith("CrossAttn")
        for j in range(L):
            b = 1 + (L + 1) * i + j
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{b}.0.", UNET_RESNET))
            if down_attn:
                rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{b}.1.", None))
        for j in range(L + 1):
            b = (L + 1) * i + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{b}.0.", UNET_RESNET))
            if up_attn:
                rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{b}.1.", None))
        if i < n - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv.",
                         f"input_blocks.{(L + 1) * (i + 1)}.0.op.", None))
            rows.append((f"up_blocks.{i}.upsamplers.0.conv.",
                         f"output_blocks.{(L + 1) * i + L}.{2 if up_attn else 1}.conv.", None))
    return rows


def _vae_rows(levels, blocks):
    rows = [("quant_conv.", "quant_conv.", None), ("post_quant_conv.", "post_quant_conv.", None)]
    for part in ("encoder", "decoder"):
        rows += [(f"{part}.conv_in.", f"{part}.conv_in.", None),
                 (f"{part}.conv_out.", f"{part}.conv_out.", None),
                 (f"{part}.conv_norm_out.", f"{part}.norm_out.", None),
                 (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                 (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                 (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        down, up = f"encoder.down_blocks.{i}.", f"decoder.up_blocks.{i}."
        ldm_down, ldm_up = f"encoder.down.{i}.", f"decoder.up.{levels - 1 - i}."
        rows += [(down + "downsamplers.0.conv.", ldm_down + "downsample.conv.", None),
                 (up + "upsamplers.0.conv.", ldm_up + "upsample.conv.", None)]
        for j in range(blocks):
            rows += [(down + f"resnets.{j}.", ldm_down + f"block.{j}.", VAE_RESNET),
                     (up + f"resnets.{j}.", ldm_up + f"block.{j}.", VAE_RESNET)]
    return rows


def _openclip_rows(layers):
    rows = [("text_model.embeddings.token_embedding.weight", "token_embedding.weight", None),
            ("text_model.embeddings.position_embedding.weight", "positional_embedding", None),
            ("text_model.final_layer_norm.", "ln_final.", None)]
    return rows + [(f"text_model.encoder.layers.{k}.", f"transformer.resblocks.{k}.",
                    OPENCLIP_LAYER) for k in range(layers)]


def _rename(state, rows, what, reverse=False):
    """`state` with every key renamed by the longest matching prefix of `rows`; a LoadError names
    the keys that no row (or no leaf rename) covers."""
    table = {}
    for ours, theirs, leaf in rows:
        if reverse:
            ours, theirs, leaf = theirs, ours, leaf and {b: a for a, b in leaf.items()}
        table[ours] = (theirs, leaf)
    out, unknown = {}, []
    for key, value in state.items():
        new = None
        for head in [key] + [key[:p + 1] for p in range(len(key) - 2, -1, -1) if key[p] == "."]:
            if head in table:
                prefix, leaf = table[head]
                rest = key[len(head):]
                if leaf is None:
                    new = prefix + rest
                else:
                    new = next((prefix + b + rest[len(a):] for a, b in leaf.items()
                                if rest.startswith(a)), None)
                break
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise LoadError(f"{what}: {len(unknown)} unexpected keys: {key_listing(unknown)}")
    return out


def _check(keys, expected, what):
    """A one-line LoadError unless `keys` and `expected` are the same set."""
    missing, extra = set(expected) - set(keys), set(keys) - set(expected)
    problems = [f"{len(s)} {name} keys: {key_listing(s)}" for s, name in
                ((missing, "missing"), (extra, "unexpected")) if s]
    if problems:
        raise LoadError(f"{what} does not fit: " + "; ".join(problems))


def _keys(cls, config):
    """The state-dict keys of our network `cls` at `config`, built on the meta device."""
    with torch.device("meta"):
        return set(cls.from_config(config).state_dict())


def _part(state, prefix):
    """The entries of a single-file dict under `prefix`, without it; a dict with no such key is
    taken to be the component alone (a stand-alone LDM VAE file has no prefix)."""
    if not any(k.startswith(prefix) for k in state):
        return dict(state)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _top(keys, pattern):
    """1 + the largest index that `pattern` (one group) finds in `keys`, 0 if none."""
    found = [int(m.group(1)) for k in keys for m in [re.search(pattern, k)] if m]
    return 1 + max(found) if found else 0


def unet_to_ldm(state, config, prefix=UNET):
    """Our (diffusers') U-Net state dict at `config` (a unet/config.json dict) -> LDM keys."""
    _check(state, _keys(UNet, config), "U-Net state dict")
    return {prefix + k: v for k, v in _rename(state, _unet_rows(config), "U-Net").items()}


def unet_from_ldm(state, config, prefix=UNET):
    """The U-Net of an LDM single-file dict (the `model.diffusion_model.` part) -> our keys."""
    rows = _unet_rows(config)
    state = _part(state, prefix)
    _check(state, _rename(dict.fromkeys(_keys(UNet, config)), rows, "U-Net"), "LDM U-Net")
    return _rename(state, rows, "LDM U-Net", reverse=True)


def _is_attention_weight(key):
    return ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight",
                                                    "proj_out.weight"))


def vae_to_ldm(state, config=None, prefix=VAE):
    """Our (diffusers') VAE state dict, legacy attention names accepted -> LDM keys, the mid-block
    attention weights as 1x1 convolutions. With a vae/config.json dict, the keys are checked
    against it."""
    state = rename_legacy_keys(state)
    if config is not None:
        _check(state, _keys(AutoencoderKL, config), "VAE state dict")
    rows = _vae_rows(_top(state, r"^decoder\.up_blocks\.(\d+)\."),
                     _top(state, r"\.resnets\.(\d+)\."))
    return {prefix + k: v.reshape(*v.shape, 1, 1) if _is_attention_weight(k) and v.dim() == 2 else v
            for k, v in _rename(state, rows, "VAE").items()}


def vae_from_ldm(state, config=None, prefix=VAE):
    """The VAE of an LDM single-file dict (the `first_stage_model.` part, or an unprefixed VAE
    file) -> our keys, attention weights as (C, C)."""
    state = _part(state, prefix)
    rows = _vae_rows(_top(state, r"^decoder\.up\.(\d+)\."), _top(state, r"\.block\.(\d+)\."))
    if config is not None:
        _check(state, _rename(dict.fromkeys(_keys(AutoencoderKL, config)), rows, "VAE"), "LDM VAE")
    state = {k: v.flatten(1) if _is_attention_weight(k) and v.dim() > 2 else v
             for k, v in state.items()}
    return _rename(state, rows, "LDM VAE", reverse=True)


def _backbone(backbone):
    if backbone not in TEXT:
        raise ValueError(f"backbone must be one of {sorted(TEXT)}, got {backbone!r}")
    return TEXT[backbone]


def _text_class(backbone):
    return CLIPTextModelWithProjection if backbone == "sdxl_2" else CLIPTextModel


def text_to_ldm(state, backbone, config=None):
    """Our (transformers') CLIP text-encoder state dict -> the LDM layout of `backbone` ("sd15",
    "sdxl": CLIP under its prefix, TEXT; "sd21": OpenCLIP under cond_stage_model.model., one zero
    block, text_projection and logit_scale added; "sdxl_2": OpenCLIP, its projection transposed,
    logit_scale added). With a config dict, keys are checked."""
    prefix, state = _backbone(backbone), convert_text_state_dict(state)
    if config is not None:
        _check(state, _keys(_text_class(backbone), config), "text-encoder state dict")
    positions = state.get("text_model.embeddings.position_embedding.weight")
    if positions is None:
        raise LoadError("not a CLIP text-encoder state dict: "
                        "no embeddings.position_embedding.weight")
    if backbone in CLIP_LAYOUT:
        out = {prefix + k: v for k, v in state.items()}
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions.shape[0])[None]
        return out
    layers = _top(state, r"^text_model\.encoder\.layers\.(\d+)\.")
    projection = state.pop("text_projection.weight", None)
    if (projection is None) != (backbone == "sd21"):
        raise LoadError("SDXL's text_encoder_2 needs its text_projection.weight; SD2.1's has none")
    out = _rename(state, _openclip_rows(layers), "CLIP")
    for key in [k for k in out if k.endswith(("attn.q_proj.weight", "attn.q_proj.bias"))]:
        base, kind = key.rsplit(".q_proj.", 1)
        parts = [out.pop(f"{base}.{p}_proj.{kind}", None) for p in "qkv"]
        if any(p is None for p in parts):
            raise LoadError(f"CLIP: {base}: q_proj, k_proj and v_proj {kind} must all be given")
        out[f"{base}.in_proj_{kind}"] = torch.cat(parts)
    like = {"dtype": positions.dtype, "device": positions.device}
    if projection is None:  # SD2.1
        last = f"transformer.resblocks.{layers - 1}."
        out.update({k.replace(last, f"transformer.resblocks.{layers}."): torch.zeros_like(v)
                    for k, v in list(out.items()) if k.startswith(last)})
    out["text_projection"] = (torch.eye(positions.shape[1], **like) if projection is None
                              else projection.T.contiguous())
    out["logit_scale"] = torch.tensor(math.log(100.0), **like)
    return {prefix + k: v for k, v in out.items()}


def text_from_ldm(state, backbone, config=None):
    """The text encoder of an LDM single-file dict -> our keys. SD2.1: the encoder keeps the first
    `config["num_hidden_layers"]` OpenCLIP blocks, or all but the last without a config; the
    position_ids buffer, text_projection, logit_scale and attn_mask are dropped. SDXL's
    text_encoder_2 ("sdxl_2") keeps every block and its projection."""
    state = _part(state, _backbone(backbone))
    if backbone in CLIP_LAYOUT:
        state.pop("text_model.embeddings.position_ids", None)
        out = _rename(state, [("text_model.", "text_model.", None)], "LDM CLIP", reverse=True)
    else:
        blocks = _top(state, r"^transformer\.resblocks\.(\d+)\.")
        layers = config["num_hidden_layers"] if config is not None else blocks - (backbone == "sd21")
        projection = state.get("text_projection") if backbone == "sdxl_2" else None
        drop = [k for k in state if k in OPENCLIP_UNUSED
                or _top([k], r"^transformer\.resblocks\.(\d+)\.") > layers]
        state = {k: v for k, v in state.items() if k not in drop}
        for key in [k for k in state if k.endswith((".attn.in_proj_weight", ".attn.in_proj_bias"))]:
            base, kind = key.rsplit(".in_proj_", 1)
            for p, part in zip("qkv", state.pop(key).chunk(3)):
                state[f"{base}.{p}_proj.{kind}"] = part.clone()  # own storage: saveable
        out = _rename(state, _openclip_rows(layers), "LDM OpenCLIP", reverse=True)
        if projection is not None:
            out["text_projection.weight"] = projection.T.contiguous()
    if config is not None:
        _check(out, _keys(_text_class(backbone), config), "LDM text encoder")
    return out


def to_single_file(unet_state, unet_config, vae_state, text_state, backbone, text_state_2=None):
    """One dict in the LDM single-file layout (U-Net, VAE, text encoder, all prefixed); SDXL's
    second text encoder `text_state_2` too."""
    second = text_to_ldm(text_state_2, "sdxl_2") if backbone == "sdxl" else {}
    return {**unet_to_ldm(unet_state, unet_config), **vae_to_ldm(vae_state),
            **text_to_ldm(text_state, backbone), **second}
