import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loading import LoadError, read_tensors, save_tensors
from lorad import (ADAPTERS, Adapter, DoRAFrozenNormLinear, DoRALinear, FullModule, LoRALinear, LoRaDLinear,
                   add_adapters, adapter_state_dict, count_trainable, load_adapters, merge_adapters, rotate_pairs,
                   selected_layers)
from dit import PixArt
from unet import UNet
from tests.conftest import small_unet_config


def lorad(out_f=6, in_f=8, rank=3, dtype=torch.float64, scale=1.0, seed=0):
    """A LoRaD layer with random non-zero angles of about `scale` radians."""
    torch.manual_seed(seed)
    layer = LoRaDLinear(nn.Linear(in_f, out_f).to(dtype), rank).to(dtype)
    with torch.no_grad():
        layer.theta_a.normal_(0, scale)
    return layer


def test_gradcheck_float64():
    layer = lorad()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)

    def f(theta_a, theta_b, x):
        return torch.func.functional_call(layer, {"theta_a": theta_a, "theta_b": theta_b}, (x,))

    inputs = (layer.theta_a.detach().clone().requires_grad_(), layer.theta_b.detach().clone().requires_grad_(), x)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_identity_at_init_exactly():
    torch.manual_seed(0)
    base = nn.Linear(16, 10)
    x = torch.randn(4, 16)
    for kind in ADAPTERS:
        layer = ADAPTERS[kind](base, 4)
        assert torch.allclose(layer.merged().weight, base.weight, atol=1e-6, rtol=0), kind
        assert torch.allclose(layer(x), base(x), atol=1e-6, rtol=0), kind
    layer = LoRaDLinear(base, 4)
    assert (layer.theta_a == 0).all() and layer.theta_b.abs().sum() > 0  # zeros / Xavier-uniform
    bound = math.sqrt(6 / (4 + 8))  # Xavier-uniform on (r, in/2)
    assert layer.theta_b.abs().max() <= bound
    assert torch.equal(layer.merged_weight(), base.weight)
    assert torch.equal(layer(x), base(x))


def test_implied_rotations_are_orthogonal_with_det_one():
    layer = lorad(out_f=7, in_f=10, scale=5.0)
    theta = (layer.theta_a @ layer.theta_b).detach()
    # each pair's rotation R_ij: its columns are the images of the unit pairs (1, 0) and (0, 1)
    e1 = torch.tensor([1.0, 0.0], dtype=torch.float64).repeat(7, 5)
    e2 = torch.tensor([0.0, 1.0], dtype=torch.float64).repeat(7, 5)
    c1, c2 = (rotate_pairs(e, theta).unflatten(1, (-1, 2)) for e in (e1, e2))  # (out, in/2, 2)
    R = torch.stack([c1, c2], dim=-1)  # (out, in/2, 2, 2)
    eye = torch.eye(2, dtype=torch.float64).expand_as(R)
    assert torch.allclose(R.transpose(-1, -2) @ R, eye, atol=1e-12)
    assert torch.allclose(torch.linalg.det(R), torch.ones(7, 5, dtype=torch.float64), atol=1e-12)
    assert theta.abs().max() > math.pi  # large angles were exercised


def test_row_norms_preserved_for_large_angles():
    layer = lorad(out_f=32, in_f=64, rank=8, scale=10.0)
    W, W2 = layer.base.weight, layer.merged_weight()
    assert torch.allclose(W2.norm(dim=1), W.norm(dim=1), rtol=1e-12)
    assert (W2 - W).abs().max() > 0.1  # the directions did turn


def test_matches_paper_norm_direction_form():
    layer = lorad(scale=2.0)
    W = layer.base.weight
    m = W.norm(dim=1, keepdim=True)
    V = W / m
    theta = layer.theta_a @ layer.theta_b
    V_rot = torch.empty_like(V)
    V_rot[:, 0::2] = V[:, 0::2] * theta.cos() - V[:, 1::2] * theta.sin()
    V_rot[:, 1::2] = V[:, 0::2] * theta.sin() + V[:, 1::2] * theta.cos()
    assert torch.allclose(layer.merged_weight(), m * V_rot, atol=1e-14)


def test_sign_convention_hand_example():
    base = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    layer = LoRaDLinear(base, 1)
    with torch.no_grad():
        layer.theta_a.fill_(1.0)
        layer.theta_b.copy_(torch.tensor([[math.pi / 2, math.pi]]))
    # pair (1, 2) by +90 degrees: (1 cos - 2 sin, 1 sin + 2 cos) = (-2, 1); pair (3, 4) by 180: (-3, -4)
    assert torch.allclose(layer.merged_weight(), torch.tensor([[-2.0, 1.0, -3.0, -4.0]]), atol=1e-6)


def test_bias_untouched_and_fp32_adapter_on_bf16_base():
    base = nn.Linear(8, 4).to(torch.bfloat16)
    layer = LoRaDLinear(base, 2)
    assert layer.theta_a.dtype == layer.theta_b.dtype == torch.float32
    with torch.no_grad():
        layer.theta_a.normal_(0, 1e-3)  # a small rotation survives: computed in fp32, then cast
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    assert layer.theta_a.grad.dtype == torch.float32 and layer.theta_a.grad.abs().sum() > 0
    assert base.weight.grad is None and base.bias.grad is None and not base.weight.requires_grad
    assert (layer.merged_weight() - base.weight.float()).abs().max() > 0
    assert layer.merged().bias is base.bias


def test_odd_width_error_names_layer():
    model = nn.Module()
    model.family = "unet"  # a U-Net's layer names
    model.down_blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 5), nn.Linear(5, 2))])
    with pytest.raises(ValueError, match=r"down_blocks\.0\.2.*in_features=5"):
        add_adapters(model, "student", 2)


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_merged_model_equals_adapted_model(kind):
    torch.manual_seed(0)
    unet = UNet.from_config(small_unet_config()).eval()  # SD1.5's layout: proj_in / proj_out are 1x1 convolutions
    add_adapters(unet, "student", 4, kind)
    convs = [m for m in unet.modules() if isinstance(m, Adapter) and isinstance(m.base, nn.Conv2d)]
    assert (len(convs) > 0) == (kind != "lorad")  # the baselines adapt the convolutions too
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    x, c = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        adapted = unet(x, 500, c)
        merged = merge_adapters(unet)(x, 500, c)
    assert count_trainable(unet) == 0
    assert not any(k for k in unet.state_dict() if ".base." in k)  # the original keys again
    assert (adapted - merged).abs().max() / adapted.abs().max() < 1e-5


def test_lora_and_dora_formulas():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora, dora = LoRALinear(base, 2), DoRALinear(base, 2)
    for layer in (lora, dora):
        with torch.no_grad():
            layer.lora_b.normal_()
    W = base.weight + lora.lora_b @ lora.lora_a
    assert torch.allclose(lora.merged_weight(), W, atol=1e-6)
    V = base.weight + dora.lora_b @ dora.lora_a
    assert torch.allclose(dora.merged_weight().norm(dim=1), base.weight.norm(dim=1), atol=1e-5)  # magnitude kept
    assert torch.allclose(dora.merged_weight(), base.weight.norm(dim=1, keepdim=True) * V / V.norm(dim=1, keepdim=True),
                          atol=1e-6)


# The paper's counts. The PixArt student: every nn.Linear but adaLN-single's (which holds the 1024-MS micro-condition
# embedders too); its fake score: the blocks' nn.Linears.
COUNTS = [("sd15/unet", "student", 64, 20_948_992), ("sd15/unet", "student", 128, 41_897_984),
          ("sd15/unet", "student", 256, 83_795_968), ("sd15/unet", "student", 512, 167_591_936),
          ("sd15/unet", "fake", 16, 4_689_408), ("sd15/unet", "fake", 32, 9_378_816),
          ("sd15/unet", "fake", 64, 18_757_632), ("sd21/unet", "student", 256, 94_429_184),
          ("pixart-256/transformer", "student", 128, 81_219_584),
          ("pixart-512/transformer", "student", 128, 81_219_584),
          ("pixart-1024/transformer", "student", 128, 81_219_584),
          ("pixart-256/transformer", "fake", 32, 20_127_744),
          ("pixart-1024/transformer", "fake", 32, 20_127_744)]


@pytest.mark.parametrize("config,target,rank,expected", COUNTS)
def test_trainable_counts_match_paper(config, target, rank, expected):
    with open(f"configs/{config}/config.json") as f:
        cfg = json.load(f)
    network = PixArt if config.startswith("pixart") else UNet
    with torch.device("meta"):
        model = add_adapters(network.from_config(cfg), target, rank)
    assert count_trainable(model) == expected
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("target,layers", [("student", 283), ("fake", 280)])
def test_dit_rules(target, layers):
    with open("configs/pixart-1024/transformer/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        model = add_adapters(PixArt.from_config(cfg), target, 4)
    names = {k.rsplit(".", 1)[0] for k in adapter_state_dict(model)}
    assert len(names) == layers and not any(n.startswith("adaln_single.") for n in names)
    assert ("proj_out" in names) == ("caption_projection.linear_1" in names) == (target == "student")
    assert "transformer_blocks.27.attn2.to_k" in names and "transformer_blocks.0.ff.net.2" in names


# paper Table 2 (SD1.5, rank 256): LoRA 120.9M, DoRA 121.2M, DoRA (frozen norm) 120.9M, FT 860M (all 859,520,964
# parameters of the U-Net: the whole denoiser is trained)
TABLE2_COUNTS = [("lora", 120_897_536), ("dora", 121_154_816), ("dora-frozen-norm", 120_897_536),
                 ("full", 859_520_964), ("lorad", 83_795_968)]


@pytest.mark.parametrize("kind,expected", TABLE2_COUNTS)
def test_table2_counts(kind, expected):
    with open("configs/sd15/unet/config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        unet = UNet.from_config(cfg)
        total = sum(p.numel() for p in unet.parameters())
        lorad_layers = {n for n, _ in selected_layers(unet, "student", "lorad")}
        layers = dict(selected_layers(unet, "student", kind))
        add_adapters(unet, "student", 256, kind)
    assert count_trainable(unet) == expected
    if kind == "full":
        assert expected == total
    elif kind != "lorad":  # the LoRaD layers (every nn.Linear in the blocks) and the 32 1x1 proj_in / proj_out convs
        convs = {n for n, m in layers.items() if isinstance(m, nn.Conv2d)}
        assert layers.keys() - convs == lorad_layers and len(lorad_layers) == 182
        assert len(convs) == 32 and all(n.endswith(("proj_in", "proj_out")) for n in convs)
        assert all(m.kernel_size == (1, 1) for n, m in layers.items() if n in convs)


def test_dora_frozen_norm_trains_directions_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 1)
    layer = DoRAFrozenNormLinear(conv, 2)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_a", "lora_b"}
    assert "magnitude" not in adapter_state_dict(nn.Sequential(layer)).keys() | set(layer.state_dict())
    with torch.no_grad():
        layer.lora_b.normal_()
    W, W2 = conv.weight.flatten(1), layer.merged_weight()
    torch.testing.assert_close(W2.norm(dim=1), W.norm(dim=1))  # the norms stay ||W_i||
    assert (W2 / W2.norm(dim=1, keepdim=True) - W / W.norm(dim=1, keepdim=True)).abs().max() > 0.1  # directions turn
    x = torch.randn(2, 6, 3, 3)
    layer(x).square().sum().backward()
    assert layer.lora_a.grad.abs().sum() > 0 and layer.lora_b.grad.abs().sum() > 0


def test_lora_on_a_1x1_convolution_is_lora_on_the_linear_map_per_pixel():
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(8, 6, 1), nn.Linear(8, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    for kind in ("lora", "dora"):
        a, b = ADAPTERS[kind](conv, 3), ADAPTERS[kind](linear, 3)
        assert count_trainable(a) == count_trainable(b) == 3 * (8 + 6) + (6 if kind == "dora" else 0)
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()):
                if p.requires_grad:
                    q.copy_(p.normal_())
        x = torch.randn(2, 8, 4, 5)
        per_pixel = b(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, 6, 4, 5)
        torch.testing.assert_close(a(x), per_pixel, rtol=1e-5, atol=1e-5)


def test_full_trains_every_parameter_under_the_network_keys():
    torch.manual_seed(0)
    unet = UNet.from_config(small_unet_config())
    keys = set(unet.state_dict())
    add_adapters(unet, "student", 0, "full")
    assert set(adapter_state_dict(unet)) == keys  # the adapter tensors carry the network's own keys
    assert all(isinstance(m, FullModule) for n, m in unet.named_modules() if n.endswith("norm1"))
    out = unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 3, 32))
    out.square().mean().backward()
    grads = {k: p.grad for k, p in adapter_state_dict(unet).items()}
    assert all(g is not None and g.abs().sum() > 0 for k, g in grads.items() if "norm" in k or "conv_in" in k)
    assert all(not p.requires_grad for n, p in unet.named_parameters() if ".base." in n)


def test_fake_rule_skips_projections_and_time():
    with torch.device("meta"):
        unet = add_adapters(UNet.from_config(small_unet_config(use_linear_projection=True)), "fake", 2)
    names = {k.rsplit(".", 1)[0] for k in adapter_state_dict(unet)}
    assert names and not any(s in n for n in names for s in ("proj_in", "proj_out", "time_emb_proj"))
    assert any("attn2.to_k" in n for n in names) and any("ff.net.2" in n for n in names)
    assert not any(n.startswith("time_embedding") for n in names)


def read_adapter_file(path):
    """Adapter tensors from a safetensors file or the official release's `kduv.pth` state dict (saved
    from a DDP module: keys may carry `module.`)."""
    return {k.removeprefix("module."): v for k, v in read_tensors(path).items()}


def test_adapter_files_roundtrip_and_official_pth(tmp_path):
    torch.manual_seed(0)
    unet = add_adapters(UNet.from_config(small_unet_config()), "student", 4)
    with torch.no_grad():
        for p in adapter_state_dict(unet).values():
            p.normal_()
    state = {k: v.detach().clone() for k, v in adapter_state_dict(unet).items()}
    assert any(k.endswith("attn1.to_q.theta_a") for k in state)
    save_tensors(adapter_state_dict(unet), str(tmp_path / "a.safetensors"), {"rank": 4})
    torch.save(state, tmp_path / "kduv.pth")  # the official release's format and naming

    for path in ("a.safetensors", "kduv.pth"):
        other = add_adapters(UNet.from_config(small_unet_config()), "student", 4)
        load_adapters(other, read_adapter_file(str(tmp_path / path)))
        assert all(torch.equal(v, state[k]) for k, v in adapter_state_dict(other).items())

    other = add_adapters(UNet.from_config(small_unet_config()), "student", 8)
    with pytest.raises(LoadError, match="wrong shapes"):
        load_adapters(other, read_adapter_file(str(tmp_path / "a.safetensors")))
    fake = add_adapters(UNet.from_config(small_unet_config()), "fake", 4)
    with pytest.raises(LoadError, match="unexpected.*time_emb_proj"):
        load_adapters(fake, state)


def test_rotation_stays_fp32_under_autocast():
    torch.manual_seed(0)
    layer = LoRaDLinear(nn.Linear(64, 32), 8)
    with torch.no_grad():
        layer.theta_a.normal_(0, 0.5)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        in_bf16 = F.linear(x, rotate_pairs(layer.base.weight, layer.theta_a @ layer.theta_b), layer.base.bias)
    expected = F.linear(x.bfloat16(), layer.merged_weight().bfloat16(), layer.base.bias.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert not torch.equal(in_bf16, expected)  # angles from a bf16 matmul would differ
