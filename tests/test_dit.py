"""dit.py against diffusers' PixArtTransformer2DModel (a test-only reference): random weights at small
configs in the 256 px and 1024-MS layouts (micro-conditions, padded text mask, non-square latents), the
older Transformer2DModel config files, gradient checkpointing, and the real configs' shapes and counts."""
import json

import pytest
import torch

from dit import PixArt, sincos_pos_embed_2d
from loading import load_weights, read_safetensors
from tests.conftest import CAPTION, randomize, relative_error, small_dit_config


# the 1024-MS layout: sample_size 128 turns on the micro-conditions and interpolation_scale 2
MS = dict(sample_size=128)


def old_style(cfg):
    """The same model as a diffusers <= 0.27 `Transformer2DModel` config (as the PixArt-alpha Hub files)."""
    old = {k: v for k, v in cfg.items() if k not in ("interpolation_scale", "use_additional_conditions")}
    return {**old, "_class_name": "Transformer2DModel", "_diffusers_version": "0.25.1", "attention_type": "default",
            "double_self_attention": False, "dropout": 0.0, "norm_num_groups": 32, "num_vector_embeds": None,
            "only_cross_attention": False, "upcast_attention": False, "use_linear_projection": False}


def reference(cfg, seed=0):
    """diffusers' PixArt with every parameter random, including the adaLN linear, the scale-shift
    tables and proj_out (zero-initialised in PixArt's training code)."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    ref = PixArtTransformer2DModel.from_config(cfg).eval()
    return randomize(ref, 0.2)


def ours_from(ref, cfg, tmp_path):
    """Our model built on the meta device from `cfg`, loaded from the reference's safetensors file."""
    ref.save_pretrained(tmp_path)
    with torch.device("meta"):
        ours = PixArt.from_config(cfg)
    return load_weights(ours, read_safetensors(str(tmp_path / "diffusion_pytorch_model.safetensors"))).eval()


def inputs(B=2, H=16, W=16, L=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 4, H, W, generator=g)
    text = torch.randn(B, L, CAPTION, generator=g)
    mask = torch.zeros(B, L, dtype=torch.long)
    for i in range(B):
        mask[i, :3 + 2 * i] = 1  # padded: 3, 5, ... valid tokens
    return x, torch.tensor([3, 977][:B]), text, mask


def micro_kwargs(B, H, W):
    """The micro-conditions as diffusers' pipeline builds them: [height, width] in pixels, height / width."""
    return {"resolution": torch.tensor([[8.0 * H, 8.0 * W]]).repeat(B, 1),
            "aspect_ratio": torch.tensor([[H / W]]).repeat(B, 1)}


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["square", "non_square"])
def test_parity_256_layout_with_padded_mask(size, tmp_path):
    cfg = small_dit_config()
    ref = reference(cfg)
    ours = ours_from(ref, cfg, tmp_path)
    assert not ours.config.use_additional_conditions and ours.config.interpolation_scale == 1
    x, t, text, mask = inputs(H=size[0], W=size[1])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask).sample
        got = ours(x, t, text, mask)
        unmasked = ours(x, t, text)
    assert got.shape == want.shape == (2, 8, *size)
    assert want.abs().max() > 0.1
    assert relative_error(got, want) < 1e-5
    assert relative_error(unmasked, want) > 1e-2  # the padded tokens would change the output


@pytest.mark.parametrize("size", [(16, 16), (12, 20)], ids=["square", "non_square"])
def test_parity_1024_ms_layout_with_micro_conditions(size, tmp_path):
    cfg = small_dit_config(**MS)
    ref = reference(cfg)
    ours = ours_from(ref, cfg, tmp_path)
    assert ours.config.use_additional_conditions and ours.config.interpolation_scale == 2
    x, t, text, mask = inputs(H=size[0], W=size[1])
    own = {"resolution": torch.tensor([[1024.0, 768.0], [512.0, 2048.0]]), "aspect_ratio": torch.tensor([[4 / 3], [0.25]])}
    with torch.no_grad():
        want_own = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask, added_cond_kwargs=own).sample
        got_own = ours(x, t, text, mask, **own)
        want_pipe = ref(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,
                        added_cond_kwargs=micro_kwargs(2, *size)).sample
        got_derived = ours(x, t, text, mask)  # resolution and aspect ratio from the latent size
    assert want_own.abs().max() > 0.1
    assert relative_error(got_own, want_own) < 1e-5
    assert relative_error(got_derived, want_pipe) < 1e-5
    assert relative_error(want_own, want_pipe) > 1e-2  # the micro-conditions matter


def test_old_transformer2dmodel_config_gives_the_same_model(tmp_path):
    for cfg in (small_dit_config(), small_dit_config(**MS)):
        ref = reference(cfg)
        new = ours_from(ref, cfg, tmp_path)
        with torch.device("meta"):
            old = PixArt.from_config(old_style(cfg))
        old = load_weights(old, new.state_dict()).eval()
        assert old.config == new.config
        x, t, text, mask = inputs()
        with torch.no_grad():
            assert torch.equal(old(x, t, text, mask), new(x, t, text, mask))


def test_scalar_timestep_and_bf16():
    torch.manual_seed(0)
    model = PixArt.from_config(small_dit_config()).eval()
    x, _, text, mask = inputs()
    with torch.no_grad():
        full = model(x, 500, text, mask)
        assert torch.equal(full, model(x, torch.tensor([500, 500]), text, mask))
        half = model.to(torch.bfloat16)(x.bfloat16(), 500, text.bfloat16(), mask)
    assert half.dtype == torch.bfloat16 and relative_error(half.float(), full) < 0.05


def test_position_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed
    for (h, w), base, scale in [((16, 16), 16, 1), ((24, 40), 32, 1), ((64, 64), 64, 2), ((6, 10), 8, 0.5)]:
        want = get_2d_sincos_pos_embed(1152, (h, w), base_size=base, interpolation_scale=scale).float()
        assert torch.equal(sincos_pos_embed_2d(1152, h, w, base, scale), want)


def test_pos_embed_is_a_computed_buffer():
    cfg = small_dit_config()
    with torch.device("meta"):
        model = PixArt.from_config(cfg)
    assert "pos_embed.pos_embed" not in model.state_dict()
    assert model.pos_embed.pos_embed.device.type == "cpu"  # real values even when built on meta
    assert torch.equal(model.pos_embed.pos_embed[0], sincos_pos_embed_2d(24, 8, 8, 8, 1))


def test_gradient_checkpointing_gives_same_output_and_gradients():
    torch.manual_seed(0)
    model = PixArt.from_config(small_dit_config(**MS)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    x, t, text, mask = inputs()
    outs, grads = [], []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        out = model(x, t, text, mask)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("resolution,count", [(256, 610_856_096), (512, 610_856_096), (1024, 611_349_152)])
def test_full_configs_on_meta_match_diffusers(resolution, count):
    from diffusers import PixArtTransformer2DModel
    with open(f"configs/pixart-{resolution}/transformer/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours, ref = PixArt.from_config(cfg), PixArtTransformer2DModel.from_config(cfg)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == count
    assert (ours.config.sample_size, ours.config.use_additional_conditions) == (resolution // 8, resolution == 1024)


def test_bad_latent_size_is_a_clear_error():
    model = PixArt.from_config(small_dit_config())
    x, t, text, mask = inputs()
    with pytest.raises(ValueError, match=r"latent size \(15, 16\) is not a multiple of the patch size 2"):
        model(x[..., :15, :], t, text, mask)


@pytest.mark.parametrize("key,value", [("norm_type", "ada_norm_zero"), ("activation_fn", "geglu"),
                                        ("caption_channels", None), ("cross_attention_dim", 32),
                                        ("_class_name", "DiTTransformer2DModel"), ("norm_elementwise_affine", True),
                                        ("sample_size", 15), ("use_additional_conditions", True)])
def test_unsupported_config_is_a_clear_error(key, value):
    with pytest.raises(ValueError, match=f"unsupported PixArt config: .*{key}"):
        PixArt.from_config(small_dit_config(**{"attention_head_dim": 8, "cross_attention_dim": 16, key: value}))
    with pytest.raises(ValueError, match="norm_type"):  # an old-style config must say it is PixArt
        PixArt.from_config({k: v for k, v in old_style(small_dit_config()).items() if k != "norm_type"})
