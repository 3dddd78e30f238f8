"""vae.py against diffusers' AutoencoderKL: same keys and parameter counts at the real SD configs,
same numbers at a small config with random weights, clear errors on bad configs and checkpoints."""
import json

import pytest
import torch
import torch.nn as nn
from diffusers import AutoencoderKL as RefAutoencoderKL
from safetensors.torch import save_file

from loading import LoadError, load_weights, read_safetensors
from vae import AutoencoderKL, rename_legacy_keys

SMALL = {"block_out_channels": [32, 64, 64], "layers_per_block": 2, "norm_num_groups": 8,
         "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 3,
         "up_block_types": ["UpDecoderBlock2D"] * 3, "scaling_factor": 0.5, "shift_factor": 0.1,
         "sample_size": 32}
VARIANT = {**SMALL, "mid_block_add_attention": False, "use_quant_conv": False, "use_post_quant_conv": False,
           "shift_factor": None}


def sd_config(name):
    with open(f"configs/{name}/vae/config.json") as f:
        return json.load(f)


def random_reference(cfg, seed=0):
    """diffusers' model with random weights, norm affine parameters included."""
    torch.manual_seed(seed)
    ref = RefAutoencoderKL.from_config(cfg).eval()
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return ref


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("cfg", [SMALL, VARIANT], ids=["default", "no-attn-no-quant"])
def test_parity_with_diffusers(cfg, tmp_path):
    ref = random_reference(cfg)
    path = tmp_path / "vae.safetensors"
    save_file(ref.state_dict(), str(path))
    with torch.device("meta"):
        ours = AutoencoderKL.from_config(cfg)
    load_weights(ours, read_safetensors(str(path)), "vae").eval()
    scale, shift = cfg["scaling_factor"], cfg["shift_factor"] or 0.0

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(x).latent_dist
        ref_z = (posterior.mean - shift) * scale
        z = ours.encode(x)
        ref_sample = (posterior.sample(generator=torch.Generator().manual_seed(2)) - shift) * scale
        sample = ours.encode(x, generator=torch.Generator().manual_seed(2))
        ref_img = ref.decode(z / scale + shift).sample
        img = ours.decode(z)

    assert z.shape == (2, 4, 8, 8) and img.shape == (2, 3, 32, 32)
    assert rel_err(z, ref_z) < 1e-5
    assert rel_err(sample, ref_sample) < 1e-5
    assert rel_err(sample, z) > 1e-3  # the sample really is noisier than the mean
    assert rel_err(img, ref_img) < 1e-5


def test_attention_is_not_a_no_op():
    """The parity test can fail: perturbing the mid-block attention changes the output."""
    ref = random_reference(SMALL)
    ours = AutoencoderKL.from_config(SMALL).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = ours.decode(z)
        ours.decoder.mid_block.attentions[0].to_v.bias.add_(1.0)
        after = ours.decode(z)
    assert rel_err(after, before) > 1e-3


@pytest.mark.parametrize("name", ["sd15", "sd21"])
def test_full_config_matches_diffusers_on_meta(name):
    cfg = sd_config(name)
    with torch.device("meta"):
        ref = RefAutoencoderKL.from_config(cfg)
        ours = AutoencoderKL.from_config(cfg)
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == ref_shapes
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 83_653_863
    assert ours.config.scaling_factor == 0.18215 and ours.config.shift_factor == 0.0
    assert len(ours.encoder.down_blocks) == 4 and len(ours.decoder.up_blocks[0].resnets) == 3


def test_full_config_shapes():
    """At the SD config a 64x64 image becomes an 8x8 latent, and back."""
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(sd_config("sd15"))
        z = vae.encode(torch.empty(1, 3, 64, 64))
        img = vae.decode(z)
    assert z.shape == (1, 4, 8, 8) and img.shape == (1, 3, 64, 64)


def test_legacy_attention_keys_load():
    ref = random_reference(SMALL)
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in ref.state_dict().items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    ours = AutoencoderKL.from_config(SMALL)
    with pytest.raises(LoadError, match="missing keys"):
        load_weights(ours, legacy, "vae")
    load_weights(ours, rename_legacy_keys(legacy), "vae")
    assert torch.equal(ours.encoder.mid_block.attentions[0].to_out[0].weight,
                       ref.encoder.mid_block.attentions[0].to_out[0].weight)


def test_missing_key_is_named():
    state = random_reference(SMALL).state_dict()
    del state["decoder.up_blocks.1.upsamplers.0.conv.weight"]
    key = r"decoder\.up_blocks\.1\.upsamplers\.0\.conv\.weight"
    with pytest.raises(LoadError, match="1 missing keys: " + key):
        load_weights(AutoencoderKL.from_config(SMALL), state, "vae")


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"]},
     "down_block_types"),
    ({"up_block_types": ["UpDecoderBlock2D"] * 2}, "up_block_types"),
    ({"act_fn": "gelu"}, "act_fn 'gelu'"),
    ({"norm_num_groups": 24}, "divisible by norm_num_groups 24"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
])
def test_bad_config(change, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL.from_config({**SMALL, **change})
