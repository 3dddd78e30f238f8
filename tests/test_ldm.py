"""ldm.py, the original Stable Diffusion single-file layout: exact round trips, diffusers' own
converters (diffusers.loaders.single_file_utils) reading our files back to the same tensors, diffusers'
StableDiffusionPipeline.from_single_file loading a written file, the key counts of the real SD1.5 /
SD2.1 configs, and one-line errors."""
import json
import math
import os
import shutil

import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ldm
from clip import CLIPTextModel, convert_text_state_dict
from loading import LoadError
from tests.conftest import ONLY_CROSS, SD21_STYLE, randomize, small_unet_config, unet_reference
from tests.repo import TEXT_DIM, write_tiny_sd_repo
from unet import UNet
from vae import AutoencoderKL, rename_legacy_keys

SMALL_VAE = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
             "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "latent_channels": 4,
             "layers_per_block": 2}
# SD1.5's CLIP (quick_gelu, 12 layers) and SD2.1's OpenCLIP-H (gelu, 23 of its 24 layers), shrunk in width
SMALL_TEXT = {"sd15": {"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_act": "quick_gelu"},
              "sd21": {"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 23,
                       "num_attention_heads": 2, "max_position_embeddings": 16, "hidden_act": "gelu"}}


def same(a, b):
    """Same keys, and every tensor equal (dtype, shape and values)."""
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def real_configs(backbone):
    out = {}
    for part in ("unet", "vae", "text_encoder"):
        with open(f"configs/{backbone}/{part}/config.json") as f:
            out[part] = json.load(f)
    return out


def random_text_state(backbone, seed=0):
    torch.manual_seed(seed)
    model = randomize(CLIPTextModel.from_config(SMALL_TEXT[backbone]), 0.1)
    return {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}  # as transformers 5 saves


# ---------------------------------------------------------------------------------------------
# The real configs, on the meta device


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_real_config_keys(backbone):
    cfg = real_configs(backbone)
    with torch.device("meta"):
        unet = UNet.from_config(cfg["unet"]).state_dict()
        vae = AutoencoderKL.from_config(cfg["vae"]).state_dict()
        text = CLIPTextModel.from_config(cfg["text_encoder"]).state_dict()
    sf = ldm.to_single_file(unet, cfg["unet"], vae, text, backbone)
    counts = {p: sum(k.startswith(p) for k in sf)
              for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    # SD2.1: OpenCLIP-H's text tower without `visual`: 24 blocks x 12 + 6 (ldm's FrozenOpenCLIPEmbedder)
    assert list(counts.values()) == [686, 248, 197 if backbone == "sd15" else 294]
    assert len(sf) == sum(counts.values())
    shapes = {k: tuple(v.shape) for k, v in sf.items()}
    u, wide = "model.diffusion_model.", 768 if backbone == "sd15" else 1024
    assert shapes[u + "input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert shapes[u + "time_embed.2.weight"] == (1280, 1280)
    assert shapes[u + "out.2.weight"] == (4, 320, 3, 3)
    assert shapes[u + "input_blocks.3.0.op.weight"] == (320, 320, 3, 3)          # level 0's downsampler
    assert shapes[u + "input_blocks.4.0.skip_connection.weight"] == (640, 320, 1, 1)
    assert shapes[u + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"] == (320, wide)
    assert shapes[u + "middle_block.1.proj_in.weight"] == ((1280, 1280, 1, 1) if backbone == "sd15"
                                                          else (1280, 1280))
    assert shapes[u + "output_blocks.2.1.conv.weight"] == (1280, 1280, 3, 3)      # no attention at up 0
    assert shapes[u + "output_blocks.5.2.conv.weight"] == (1280, 1280, 3, 3)      # after the attention
    assert shapes[u + "output_blocks.11.0.skip_connection.weight"] == (320, 640, 1, 1)
    v = "first_stage_model."
    assert shapes[v + "decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert shapes[v + "encoder.mid.attn_1.proj_out.weight"] == (512, 512, 1, 1)
    assert shapes[v + "encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert shapes[v + "decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)  # up.0: the last
    assert shapes[v + "decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes[v + "quant_conv.weight"] == (8, 8, 1, 1) and v + "encoder.norm_out.weight" in sf
    if backbone == "sd15":
        t = "cond_stage_model.transformer.text_model."
        assert shapes[t + "embeddings.position_ids"] == (1, 77)
        assert shapes[t + "encoder.layers.11.self_attn.q_proj.weight"] == (768, 768)
    else:
        t = "cond_stage_model.model."
        assert shapes[t + "transformer.resblocks.23.attn.in_proj_weight"] == (3072, 1024)
        assert shapes[t + "positional_embedding"] == (77, 1024)
        assert shapes[t + "text_projection"] == (1024, 1024) and shapes[t + "logit_scale"] == ()
    # diffusers recognises the file, and its converters give back exactly our keys
    assert sfu.infer_diffusers_model_type(sf) == ("v1" if backbone == "sd15" else "v2")
    assert set(sfu.convert_ldm_unet_checkpoint(sf, cfg["unet"])) == set(unet)
    assert set(sfu.convert_ldm_vae_checkpoint(sf, cfg["vae"])) == set(vae)
    # and so do ours
    assert set(ldm.unet_from_ldm(sf, cfg["unet"])) == set(unet)
    assert set(ldm.vae_from_ldm(sf, cfg["vae"])) == set(vae)
    assert set(ldm.text_from_ldm(sf, backbone, cfg["text_encoder"])) == set(text)


# ---------------------------------------------------------------------------------------------
# Small random networks: exact round trips, diffusers' converters


@pytest.mark.parametrize("style", [{}, SD21_STYLE, ONLY_CROSS], ids=["sd15", "sd21", "only-cross"])
def test_unet_round_trip_and_diffusers_converter(style):
    cfg = small_unet_config(**style)
    state = unet_reference(cfg).state_dict()
    out = ldm.unet_to_ldm(state, cfg)
    assert all(k.startswith("model.diffusion_model.") for k in out) and len(out) == len(state)
    same(sfu.convert_ldm_unet_checkpoint(out, {**cfg, "layers_per_block": 2}), state)
    back = ldm.unet_from_ldm({**out, "first_stage_model.x": torch.zeros(1)}, cfg)  # other parts ignored
    same(back, state)
    assert all(back[k] is state[k] for k in state)  # renamed, never copied


@pytest.mark.parametrize("legacy", [False, True], ids=["to_q", "query"])
def test_vae_round_trip_and_diffusers_converter(legacy):
    from diffusers import AutoencoderKL as RefAutoencoderKL
    torch.manual_seed(0)
    state = randomize(RefAutoencoderKL(**SMALL_VAE), 0.1).state_dict()
    names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    given = {k.replace(a, b) if legacy and "mid_block" in k else k: v
             for k, v in state.items() for a, b in [next(((a, b) for a, b in names.items() if a in k),
                                                          ("", ""))]}
    assert legacy == (given.keys() != state.keys())
    out = ldm.vae_to_ldm(given, SMALL_VAE)
    assert out["first_stage_model.encoder.mid.attn_1.k.weight"].shape == (32, 32, 1, 1)
    assert torch.equal(out["first_stage_model.decoder.up.1.block.2.conv2.weight"],
                       state["decoder.up_blocks.0.resnets.2.conv2.weight"])  # the decoder counts up
    same(sfu.convert_ldm_vae_checkpoint(out, SMALL_VAE), state)
    same(ldm.vae_from_ldm(out, SMALL_VAE), state)
    alone = ldm.vae_to_ldm(state, prefix="")  # a stand-alone VAE file: no prefix
    same(ldm.vae_from_ldm(alone), state)


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_text_round_trip_and_diffusers_converter(backbone):
    state = random_text_state(backbone)
    ours = convert_text_state_dict(state)  # our keys: text_model.*
    out = ldm.text_to_ldm(state, backbone, SMALL_TEXT[backbone])
    if backbone == "sd15":
        assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in out)
        assert len(out) == len(state) + 1  # + position_ids
        converted = sfu.convert_ldm_clip_checkpoint(out)
        assert torch.equal(converted.pop("text_model.embeddings.position_ids"), torch.arange(16)[None])
    else:
        p = "cond_stage_model.model."
        assert len(out) == 24 * 12 + 6
        w = out[p + "transformer.resblocks.5.attn.in_proj_weight"]
        assert torch.equal(w, torch.cat([ours[f"text_model.encoder.layers.5.self_attn.{x}_proj.weight"]
                                         for x in "qkv"]))
        assert not any(v.any() for k, v in out.items() if ".resblocks.23." in k)
        assert torch.equal(out[p + "text_projection"], torch.eye(8))
        assert out[p + "logit_scale"].item() == pytest.approx(math.log(100))
        converted = sfu.convert_open_clip_checkpoint(None, out)  # ignores resblocks.23 as we drop it
    same(converted, ours)
    same(ldm.text_from_ldm(out, backbone), ours)
    same(ldm.text_from_ldm(out, backbone, SMALL_TEXT[backbone]), ours)


def test_sd21_added_block_is_the_identity():
    """With all 24 OpenCLIP blocks read back, the extra zero block changes no output bit."""
    state = random_text_state("sd21")
    out = ldm.text_to_ldm(state, "sd21")
    cfg23, cfg24 = SMALL_TEXT["sd21"], {**SMALL_TEXT["sd21"], "num_hidden_layers": 24}
    model23 = CLIPTextModel.from_config(cfg23)
    model23.load_state_dict(convert_text_state_dict(state))
    model24 = CLIPTextModel.from_config(cfg24)
    model24.load_state_dict(ldm.text_from_ldm(out, "sd21", cfg24))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model24(ids), model23(ids))


# ---------------------------------------------------------------------------------------------
# End to end: diffusers' from_single_file reads our file


def write_repo(root, backbone):
    """The tiny SD repo of tests/repo.py, a model_index.json for from_single_file's config=, SD2.1's
    23-layer gelu encoder for "sd21", and every weight redrawn at random (distinct tensors, so a
    swapped pair of norms would show)."""
    from transformers import CLIPTextConfig, CLIPTextModel as RefCLIPTextModel
    write_tiny_sd_repo(str(root))
    if backbone == "sd21":
        shutil.rmtree(root / "text_encoder")
        RefCLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=23, num_attention_heads=2, max_position_embeddings=16,
                                        hidden_act="gelu", bos_token_id=512, eos_token_id=513, pad_token_id=513)
                         ).save_pretrained(root / "text_encoder")
    with open(root / "model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f)
    torch.manual_seed(1)
    files = {}
    for part, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        path = os.path.join(root, part, name + ".safetensors")
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = {k: torch.randn_like(v) * 0.1 for k, v in load_file(path).items()}
        save_file(tensors, path, metadata=metadata)
        files[part] = tensors
    return files


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_diffusers_from_single_file(tmp_path, backbone):
    from diffusers import StableDiffusionPipeline
    root = tmp_path / "repo"
    files = write_repo(root, backbone)
    with open(root / "unet" / "config.json") as f:
        unet_config = json.load(f)
    single = ldm.to_single_file(files["unet"], unet_config, files["vae"], files["text_encoder"], backbone)
    path = str(tmp_path / "model.safetensors")
    save_file(single, path)
    pipe = StableDiffusionPipeline.from_single_file(path, config=str(root), local_files_only=True,
                                                    safety_checker=None)
    same(pipe.unet.state_dict(), files["unet"])
    same(pipe.vae.state_dict(), rename_legacy_keys(files["vae"]))
    same(pipe.text_encoder.state_dict(), files["text_encoder"])
    # and back: the file read by ours gives the repo's tensors
    same(ldm.unet_from_ldm(load_file(path), unet_config), files["unet"])
    same(ldm.vae_from_ldm(load_file(path)), rename_legacy_keys(files["vae"]))
    same(ldm.text_from_ldm(load_file(path), backbone), convert_text_state_dict(files["text_encoder"]))


# ---------------------------------------------------------------------------------------------
# Errors


def test_errors_name_the_keys():
    cfg = small_unet_config()
    state = unet_reference(cfg).state_dict()
    broken = {**state, "extra.weight": torch.zeros(1)}
    del broken["conv_in.bias"]
    with pytest.raises(LoadError, match=r"1 missing keys: conv_in\.bias; 1 unexpected keys: extra\.weight") as e:
        ldm.unet_to_ldm(broken, cfg)
    assert "\n" not in str(e.value)
    out = ldm.unet_to_ldm(state, cfg)
    del out["model.diffusion_model.middle_block.1.proj_out.bias"]
    with pytest.raises(LoadError, match=r"1 missing keys: middle_block\.1\.proj_out\.bias"):
        ldm.unet_from_ldm(out, cfg)
    with pytest.raises(LoadError, match=r"LDM U-Net does not fit: \d+ missing keys: input_blocks\.2\.0\.op\.bias"
                                        r".*; \d+ unexpected keys: input_blocks\.2\.0\.emb_layers"):
        ldm.unet_from_ldm(out, small_unet_config(layers_per_block=1))  # a config that does not fit
    with pytest.raises(LoadError, match=r"VAE: 1 unexpected keys: encoder\.mid_block\.attentions\.0\.bogus"):
        ldm.vae_to_ldm({"encoder.mid_block.attentions.0.bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="backbone"):
        ldm.text_to_ldm({}, "pixart")
