import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from loading import LoadError, read_tensors, save_tensors
from lorad import (ADAPTERS, ORTHOGONAL_MAPS, Adapter, DoRAFrozenNormLinear, DoRALinear, FullModule, LoRALinear,
                   LoRaDLinear, OrthogonalLinear, add_adapters, adapter_state_dict, count_effective, count_trainable,
                   load_adapters, merge_adapters, rotate_pairs, selected_layers)
from vsd import ADAMW
from dit import PixArt
from unet import UNet
from tests.conftest import small_dit_config, small_unet_config


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
    assert (len(convs) > 0) == (kind in ("lora", "dora", "dora-frozen-norm", "full"))  # Table 2's baselines: convs too
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


def test_full_on_a_dit_trains_the_blocks_too():
    """PixArt's transformer blocks hold a parameter of their own (scale_shift_table) beside their layers, so `full`
    wraps each block after its layers: wrapping the block must not freeze the layers' trainable copies."""
    torch.manual_seed(0)
    dit = PixArt.from_config(small_dit_config())
    total = sum(p.numel() for p in dit.parameters())
    add_adapters(dit, "student", 0, "full")
    blocks = [m for n, m in dit.named_modules() if n.startswith("transformer_blocks.") and n.count(".") == 1]
    assert blocks and all(isinstance(m, FullModule) for m in blocks)  # a block holding adapted layers
    # all but the network's own final scale_shift_table (2, width): `full` wraps layers, not the network itself
    assert count_trainable(dit) == sum(p.numel() for p in adapter_state_dict(dit).values()) == total - 2 * 24
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 3, small_dit_config()["caption_channels"])
    dit(x, 10, c).square().mean().backward()
    grads = {k: p.grad for k, p in adapter_state_dict(dit).items()}
    assert all(g is not None for k, g in grads.items() if k.startswith("transformer_blocks.0."))


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


# -------------------------------------------------------------------------------------------------
# The orthogonal maps of paper Table R4: W' = W R^T, R block-diagonal, orthogonal through torch's parametrisation

def orth(kind, in_f=48, out_f=20, blocks=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return ADAPTERS[kind](nn.Linear(in_f, out_f).to(dtype), blocks).to(dtype)


def train_steps(layer, steps=20, lr=0.02):
    """AdamW steps of the training loop's settings (vsd.ADAMW) on a loss that turns the weights."""
    opt = torch.optim.AdamW([p for p in layer.parameters() if p.requires_grad], lr=lr, **ADAMW)
    x, target = torch.randn(16, layer.base.in_features), torch.randn(16, layer.base.out_features)
    for _ in range(steps):
        F.mse_loss(layer(x), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", list(ORTHOGONAL_MAPS))
def test_orthogonal_identity_at_init_exactly(kind):
    layer = orth(kind)
    R = layer.rotation
    assert R.shape == (3, 16, 16) and torch.equal(R, torch.eye(16).expand(3, 16, 16))
    assert torch.equal(layer.merged_weight(), layer.base.weight)
    x = torch.randn(4, 48)
    assert torch.equal(layer(x), layer.base(x))
    X = layer.parametrizations.rotation.original
    assert X.dtype == torch.float32 and X.is_contiguous()  # fused AdamW pairs it with its moments in flat memory


@pytest.mark.parametrize("kind", list(ORTHOGONAL_MAPS))
def test_orthogonal_stays_orthogonal_and_keeps_row_norms_after_training(kind):
    layer = orth(kind)
    train_steps(layer)
    R = layer.rotation.detach()
    eye, R64 = torch.eye(16, dtype=torch.float64), R.double()  # the fp32 R's own error, not that of a fp32 product
    assert (R64 @ R64.mT - eye).abs().max() < 1e-6 and (R64.mT @ R64 - eye).abs().max() < 1e-6
    assert (R - torch.eye(16)).abs().max() > 0.05  # it did turn
    W, W2 = layer.base.weight, layer.merged_weight().detach()
    assert ((W2.norm(dim=1) - W.norm(dim=1)).abs() / W.norm(dim=1)).max() < 1e-6
    assert (W2 - W).abs().max() > 0.01
    # W' = W R^T with R = diag(R_1, R_2, R_3): block by block on the input columns
    full_R = torch.block_diag(*R)
    torch.testing.assert_close(W2, W @ full_R.T, rtol=0, atol=1e-6)
    # the entries no map reads got no update (householder: the -1 diagonal; weight decay would break R)
    X = layer.parametrizations.rotation.original.detach()
    assert torch.equal(X.triu(1), torch.zeros_like(X))
    assert torch.equal(X.diagonal(dim1=-2, dim2=-1), torch.full((3, 16), -1.0 if kind == "orth-householder" else 1.0))


@pytest.mark.parametrize("kind", list(ORTHOGONAL_MAPS))
def test_orthogonal_gradcheck_float64(kind):
    layer = orth(kind, in_f=12, out_f=5, blocks=3, dtype=torch.float64)
    X0 = layer.parametrizations.rotation.original.detach().clone()
    x = torch.randn(4, 12, dtype=torch.float64)

    def f(L, x):  # the entries the maps read: the strict lower triangle (householder reads the diagonal's sign too)
        X = X0 + L.tril(-1)
        return torch.func.functional_call(layer, {"parametrizations.rotation.original": X}, (x,))

    L = 0.3 * torch.randn_like(X0)  # away from the identity
    assert (f(L, x) - layer(x)).abs().max() > 0.05
    assert torch.autograd.gradcheck(f, (L.requires_grad_(), x.requires_grad_()), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", list(ORTHOGONAL_MAPS))
def test_orthogonal_merge_equals_adapted_forward_in_every_dtype(kind):
    layer = orth(kind)
    train_steps(layer, steps=5)
    x = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer.merged()(x), layer(x), rtol=0, atol=1e-6)
    # a bf16 base: R and W R^T in fp32, then one cast, in the adapted forward and in the merged layer alike
    bf16 = ADAPTERS[kind](nn.Linear(48, 20).bfloat16(), 3)
    load_adapters(bf16, adapter_state_dict(layer))
    assert bf16.parametrizations.rotation.original.dtype == torch.float32
    merged = bf16.merged()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16 and merged.bias is bf16.base.bias
    with torch.no_grad():
        assert torch.equal(bf16(x.bfloat16()), merged(x.bfloat16()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(bf16(x), merged(x))
    assert not torch.equal(merged.weight, bf16.base.weight)


def test_orthogonal_blocks_must_divide_the_input_width_and_the_error_names_the_layer():
    model = nn.Module()
    model.family = "unet"
    model.down_blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2))])
    with pytest.raises(ValueError, match=r"down_blocks\.0\.2: 4 diagonal blocks do not divide in_features=6"):
        add_adapters(model, "student", 4, "orth-cayley")


# SD1.5 / SD2.1 / PixArt at the default blocks (vsd.TrainConfig, BACKBONE_DEFAULTS): stored (what the optimizer holds)
# and effective (the strict lower triangles, b (b - 1) / 2 per block); LoRaD's beside: 83.80M / 9.38M, 94.43M, 81.22M / 20.13M
ORTH_COUNTS = [("sd15/unet", "student", 4, 84_974_592, 42_392_288), ("sd15/unet", "fake", 32, 9_495_424, 4_666_784),
               ("sd21/unet", "student", 4, 94_839_808, 47_308_320), ("sd21/unet", "fake", 32, 9_954_176, 4_892_064),
               ("pixart-256/transformer", "student", 16, 59_275_264, 29_424_768),
               ("pixart-256/transformer", "fake", 48, 19_353_600, 9_467_136)]


@pytest.mark.parametrize("config,role,blocks,stored,effective", ORTH_COUNTS)
def test_orthogonal_counts_on_the_full_configs(config, role, blocks, stored, effective):
    with open(f"configs/{config}/config.json") as f:
        cfg = json.load(f)
    network = PixArt if config.startswith("pixart") else UNet
    with torch.device("meta"):
        model = network.from_config(cfg)
        widths = [m.in_features for _, m in selected_layers(model, role)]
        add_adapters(model, role, blocks, "orth-householder")
    assert stored == sum(w * w // blocks for w in widths) and effective == sum(w * (w // blocks - 1) // 2 for w in widths)
    assert count_trainable(model) == stored and count_effective(model) == effective
    adapters = [m for m in model.modules() if isinstance(m, OrthogonalLinear)]
    assert len(adapters) == len(widths)
    assert not any(list(m.parametrizations.buffers()) for m in adapters)  # no trivialisation `base` (blocks, b, b)
    assert all(k.endswith(".parametrizations.rotation.original") for k in adapter_state_dict(model))


def test_orthogonal_block_defaults_come_closest_to_lorads_counts():
    """The default blocks per backbone are, among the divisors of every input width, the ones whose stored count
    comes closest to LoRaD's at the backbone's ranks (student and fake score)."""
    from vsd import run_config
    configs = {"sd15": ("sd15/unet", UNet), "sd21": ("sd21/unet", UNet), "pixart": ("pixart-256/transformer", PixArt),
               "toy": (None, UNet)}
    for backbone, (config, network) in configs.items():
        path = f"configs/{config}/config.json" if config else "assets/toy/unet/config.json"
        with open(path) as f:
            cfg = json.load(f)
        run, _ = run_config(backbone)
        for role, rank, blocks in (("student", run.rank, run.orth_blocks), ("fake", run.rank_fake, run.orth_blocks_fake)):
            with torch.device("meta"):
                target = count_trainable(add_adapters(network.from_config(cfg), role, rank))
                widths = [m.in_features for _, m in selected_layers(network.from_config(cfg), role)]
            gcd = math.gcd(*widths)
            stored = {n: sum(w * w // n for w in widths) for n in range(1, gcd + 1) if gcd % n == 0}
            assert blocks == min(stored, key=lambda n: abs(stored[n] - target)), (backbone, role, stored, target)
