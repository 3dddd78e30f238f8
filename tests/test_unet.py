import json

import pytest
import torch
from safetensors.torch import save_file

from loading import LoadError, load_weights, read_safetensors
from unet import UNet
from tests.conftest import ONLY_CROSS, SD21_STYLE, SDXL_STYLE, relative_error, small_unet_config, unet_reference


ONLY_CROSS_MID = dict(only_cross_attention=True, cross_attention_dim=48)


def sdxl_inputs(batch, seed):
    """A batch for SDXL_STYLE: latents, timesteps, text (L=7), pooled text (24) and the six time ids
    (original size, crop top-left, target size)."""
    torch.manual_seed(seed)
    time_ids = torch.tensor([[1024., 1024., 0., 0., 1024., 1024.],
                             [768., 1344., 64., 32., 896., 1152.]])[:batch]
    return (torch.randn(batch, 4, 16, 16), torch.tensor([3, 977])[:batch], torch.randn(batch, 7, 40),
            torch.randn(batch, 24), time_ids)


def through_safetensors(cfg, tmp_path):
    """diffusers' U-Net of `cfg` with random weights, and ours loaded strictly from its safetensors file."""
    ref = unet_reference(cfg)
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    with torch.device("meta"):
        ours = UNet.from_config(cfg)
    load_weights(ours, read_safetensors(path))
    return ref, ours.eval()


@pytest.mark.parametrize("overrides", [{}, SD21_STYLE, ONLY_CROSS, ONLY_CROSS_MID],
                         ids=["sd15_style", "sd21_style", "only_cross_first_level", "only_cross_everywhere"])
def test_parity_with_diffusers_through_safetensors(overrides, tmp_path):
    cfg = small_unet_config(**overrides)
    ref, ours = through_safetensors(cfg, tmp_path)
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


def test_sdxl_style_parity_with_diffusers_through_safetensors(tmp_path):
    """SDXL's U-Net, small: diffusers' random weights through a safetensors file, loaded strictly
    with their names unchanged; text_embeds and time_ids as diffusers' added_cond_kwargs."""
    cfg = small_unet_config(**SDXL_STYLE)
    ref, ours = through_safetensors(cfg, tmp_path)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 3
    assert ours.down_blocks[0].attentions is None and ours.up_blocks[2].attentions is None
    x, t, context, pooled, time_ids = sdxl_inputs(2, seed=1)
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = ours(x, t, context, text_embeds=pooled, time_ids=time_ids)
        other_ids = ours(x, t, context, text_embeds=pooled, time_ids=time_ids.flip(0))
    assert expected.abs().max() > 0.1
    assert relative_error(got, expected) < 1e-5
    assert relative_error(other_ids, expected) > 1e-3  # the time ids matter


def test_sdxl_conditioning_is_required_and_sd_refuses_it():
    x, t, context, pooled, time_ids = sdxl_inputs(1, seed=2)
    with pytest.raises(ValueError, match="needs text_embeds and time_ids"):
        UNet.from_config(small_unet_config(**SDXL_STYLE))(x, t, context, text_embeds=pooled)
    with pytest.raises(ValueError, match="takes no text_embeds or time_ids"):
        UNet.from_config(small_unet_config())(x, t, context[..., :32], text_embeds=pooled, time_ids=time_ids)


def test_sdxl_config_file_is_what_diffusers_reads():
    """configs/sdxl/unet/config.json (stabilityai/stable-diffusion-xl-base-1.0): every key an
    argument of diffusers' UNet2DConditionModel, SDXL's values."""
    import inspect
    from diffusers import UNet2DConditionModel
    with open("configs/sdxl/unet/config.json") as f:
        cfg = json.load(f)
    accepted = inspect.signature(UNet2DConditionModel.__init__).parameters
    assert [k for k in cfg if not k.startswith("_") and k not in accepted] == []
    assert (cfg["transformer_layers_per_block"], cfg["attention_head_dim"], cfg["block_out_channels"]) == \
        ([1, 2, 10], [5, 10, 20], [320, 640, 1280])
    assert (cfg["addition_embed_type"], cfg["addition_time_embed_dim"], cfg["projection_class_embeddings_input_dim"],
            cfg["cross_attention_dim"], cfg["use_linear_projection"]) == ("text_time", 256, 1280 + 6 * 256, 2048, True)


@pytest.mark.parametrize("backbone", ["sd15", "sd21", "sdxl"])
def test_full_config_on_meta_matches_diffusers(backbone):
    """The real configs on the meta device: the same parameter names and shapes as diffusers', the
    published counts, and diffusers' state dict loads strictly (names unchanged)."""
    from diffusers import UNet2DConditionModel
    with open(f"configs/{backbone}/unet/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours, ref = UNet.from_config(cfg), UNet2DConditionModel.from_config(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    count = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl": 2_567_463_684}[backbone]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
    load_weights(ours, ref.state_dict())  # strict: a missing, unexpected or misshapen key raises


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
                                        ("down_block_types", ["SimpleCrossAttnDownBlock2D"] * 3),
                                        ("addition_embed_type", "text_image")])
def test_unsupported_config_is_a_clear_error(key, value):
    with pytest.raises(ValueError, match=f"unsupported UNet config: {key}"):
        UNet.from_config(small_unet_config(**{key: value}))
