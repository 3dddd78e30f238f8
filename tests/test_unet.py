import json

import pytest
import torch
from safetensors.torch import save_file

from loading import LoadError, load_weights, read_safetensors
from unet import UNet
from tests.conftest import ONLY_CROSS, SD21_STYLE, relative_error, small_unet_config, unet_reference


ONLY_CROSS_MID = dict(only_cross_attention=True, cross_attention_dim=48)


@pytest.mark.parametrize("overrides", [{}, SD21_STYLE, ONLY_CROSS, ONLY_CROSS_MID],
                         ids=["sd15_style", "sd21_style", "only_cross_first_level", "only_cross_everywhere"])
def test_parity_with_diffusers_through_safetensors(overrides, tmp_path):
    cfg = small_unet_config(**overrides)
    ref = unet_reference(cfg)
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
    cfg = small_unet_config(**overrides)
    ref = unet_reference(cfg)
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
    cfg = small_unet_config()
    ref = unet_reference(cfg)
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
    unet = UNet.from_config(small_unet_config(**SD21_STYLE))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 48)
    grads = []
    for ckpt in (False, True):
        unet.zero_grad()
        unet.gradient_checkpointing = ckpt
        unet(x, 10, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_missing_key_is_named():
    unet = UNet.from_config(small_unet_config())
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
        UNet.from_config(small_unet_config(**{key: value}))
