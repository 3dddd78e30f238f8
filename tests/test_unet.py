import json

import pytest
import torch
from safetensors.torch import save_file

from loading import LoadError, load_weights, read_safetensors
from unet import UNet
from tests.random_weights import randomize


def small_config(**overrides):
    """A small SD1.5-shaped U-Net config (diffusers keys): three levels, cross-attention on two."""
    cfg = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 64],
           "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
           "layers_per_block": 2, "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8,
           "in_channels": 4, "out_channels": 4, "sample_size": 16, "flip_sin_to_cos": True, "freq_shift": 0}
    return {**cfg, **overrides}


SD21_STYLE = dict(attention_head_dim=[1, 2, 4], use_linear_projection=True, upcast_attention=True,
                  cross_attention_dim=48)
# the toy teacher's kind of layout: text-only attention (no self-attention) at the full-resolution level
ONLY_CROSS = dict(only_cross_attention=[True, False, False], use_linear_projection=True)
ONLY_CROSS_MID = dict(only_cross_attention=True, cross_attention_dim=48)


def reference(cfg, seed=0):
    """diffusers' U-Net with random weights (norm affines included, so every parameter matters)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel.from_config(cfg).eval()
    return randomize(ref, 0.05)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("overrides", [{}, SD21_STYLE, ONLY_CROSS, ONLY_CROSS_MID],
                         ids=["sd15_style", "sd21_style", "only_cross_first_level", "only_cross_everywhere"])
def test_parity_with_diffusers_through_safetensors(overrides, tmp_path):
    cfg = small_config(**overrides)
    ref = reference(cfg)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    with torch.device("meta"):
        ours = UNet.from_config(cfg)
    load_weights(ours, read_safetensors(path))
    ours.eval()
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 977])
    context = torch.randn(2, 7, cfg["cross_attention_dim"])
    with torch.no_grad():
        expected = ref(x, t, context).sample
        got = ours(x, t, context)
    assert expected.abs().max() > 0.1
    assert relative_error(got, expected) < 1e-5


@pytest.mark.parametrize("overrides", [{}, ONLY_CROSS], ids=["sd15_style", "only_cross_first_level"])
def test_padded_text_mask_matches_diffusers(overrides):
    """encoder_attention_mask as diffusers applies it: a -10000 bias on the padded tokens in every attn2
    (an only-cross attn1 attends to all tokens there too)."""
    cfg = small_config(**overrides)
    ref = reference(cfg)
    ours = load_weights(UNet.from_config(cfg), ref.state_dict()).eval()
    torch.manual_seed(2)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([3, 977]), torch.randn(2, 7, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = ref(x, t, context, encoder_attention_mask=mask).sample
        got = ours(x, t, context, mask)
        unmasked = ref(x, t, context).sample
    assert relative_error(got, expected) < 1e-5
    assert relative_error(unmasked, expected) > 1e-3  # the mask matters


def test_odd_resolution_and_scalar_timestep():
    cfg = small_config()
    ref = reference(cfg)
    ours = load_weights(UNet.from_config(cfg), ref.state_dict()).eval()
    x, context = torch.randn(1, 4, 12, 20), torch.randn(1, 3, 32)
    with torch.no_grad():
        assert relative_error(ours(x, 250, context), ref(x, 250, context).sample) < 1e-5


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_full_config_on_meta_matches_diffusers(backbone):
    from diffusers import UNet2DConditionModel
    with open(f"configs/{backbone}/unet/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours, ref = UNet.from_config(cfg), UNet2DConditionModel.from_config(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == {"sd15": 859_520_964, "sd21": 865_910_724}[backbone]


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    unet = UNet.from_config(small_config(**SD21_STYLE))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 48)
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        unet(x, 10, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_missing_key_is_named():
    unet = UNet.from_config(small_config())
    state = dict(unet.state_dict())
    del state["mid_block.attentions.0.proj_out.weight"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(LoadError, match=r"1 missing keys: mid_block\.attentions\.0\.proj_out\.weight.*"
                                        r"1 unexpected keys: extra\.weight"):
        load_weights(unet, state)


@pytest.mark.parametrize("key,value", [("class_embed_type", "timestep"), ("act_fn", "gelu"),
                                        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3)])
def test_unsupported_config_is_a_clear_error(key, value):
    with pytest.raises(ValueError, match=f"unsupported UNet config: {key}"):
        UNet.from_config(small_config(**{key: value}))
