"""kohya.py: a LoRA extracted from a LoRaD-merged student of a tiny SD U-Net, checked against the
merged weights, against the SVD's own truncation error (Eckart-Young), and read back by diffusers'
kohya reader."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from kohya import apply_lora, extract_lora, lora_name
from loading import LoadError
from lorad import add_adapters, merge_adapters, rotate_pairs
from tests.conftest import small_unet_config
from unet import UNet

FULL = 10 ** 6  # a rank above every layer's min(out, in)
PROJ_IN = "down_blocks.0.attentions.0.proj_in.weight"  # a 1x1 convolution in SD1.5's layout
TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(repo root, base U-Net state dict, merged student state dict): LoRaD rank 4 with random
    angles on every Linear of the U-Net blocks, merged, plus one rotated 1x1 convolution."""
    from tests.repo import write_tiny_sd_repo
    root = write_tiny_sd_repo(str(tmp_path_factory.mktemp("tiny-sd")))
    with open(os.path.join(root, "unet", "config.json")) as f:
        import json
        cfg = json.load(f)
    base = load_file(os.path.join(root, "unet", "diffusion_pytorch_model.safetensors"))
    torch.manual_seed(0)
    unet = UNet.from_config(cfg)
    unet.load_state_dict(base)
    add_adapters(unet, "student", 4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if name.endswith("theta_a"):
                p.normal_(0, 0.5)
    merged = {k: v.detach().clone() for k, v in merge_adapters(unet).state_dict().items()}
    w = base[PROJ_IN]
    merged[PROJ_IN] = rotate_pairs(w.flatten(1), torch.rand(w.shape[0], w.shape[1] // 2)).view(w.shape)
    return root, base, merged


def changed(base, merged):
    return sorted(k for k in base if not torch.equal(base[k], merged[k]))


def independent_error(base, merged, applied):
    res = sum((applied[k].double() - merged[k].double()).square().sum() for k in base)
    tot = sum((merged[k].double() - base[k].double()).square().sum() for k in base)
    return (res / tot).sqrt().item()


def test_fixture_changes_linear_weights_and_one_conv(tiny):
    _, base, merged = tiny
    keys = changed(base, merged)
    linear = [n for n, m in UNet.from_config(small_unet_config(cross_attention_dim=32)).named_modules()
              if isinstance(m, torch.nn.Linear) and n.startswith(("down_blocks", "mid_block", "up_blocks"))]
    assert base.keys() == merged.keys() and len(keys) == len(linear) + 1 == 127 + 1
    assert PROJ_IN in keys and TO_Q in keys and all(k.endswith(".weight") for k in keys)


def test_key_names_shapes_and_balanced_split(tiny):
    _, base, merged = tiny
    lora, _ = extract_lora(base, merged, 4)
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lora_name(TO_Q[:-len(".weight")]) == q
    assert lora[f"{q}.lora_down.weight"].shape == (4, 32) and lora[f"{q}.lora_up.weight"].shape == (32, 4)
    assert lora[f"{q}.alpha"].shape == () and lora[f"{q}.alpha"].item() == 4.0
    p = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert lora[f"{p}.lora_down.weight"].shape == (4, 32, 1, 1) and lora[f"{p}.lora_up.weight"].shape == (32, 4, 1, 1)
    names = {lora_name(k[:-len(".weight")]) for k in changed(base, merged)}
    assert set(lora) == {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in lora.values())
    for n in names:  # up = U sqrt(S), down = sqrt(S) V^T: column i of up and row i of down share a norm
        up, down = lora[f"{n}.lora_up.weight"].flatten(1), lora[f"{n}.lora_down.weight"].flatten(1)
        torch.testing.assert_close(up.norm(dim=0), down.norm(dim=1), rtol=1e-5, atol=0)
        assert (up.norm(dim=0).diff() <= 1e-6).all()  # singular values in decreasing order


def test_full_rank_reproduces_merged(tiny):
    _, base, merged = tiny
    lora, err = extract_lora(base, merged, FULL)
    applied = apply_lora(base, lora)
    assert err < 1e-5 and independent_error(base, merged, applied) < 1e-5
    ranks = {lora[k].shape[0] for k in lora if k.endswith("lora_down.weight")}
    assert ranks == {32, 64} and {lora[k].item() for k in lora if k.endswith(".alpha")} == {64.0}
    for k in base:
        if torch.equal(base[k], merged[k]):
            assert applied[k] is base[k]
        else:
            assert (applied[k] - merged[k]).abs().max() / merged[k].abs().max() < 1e-5


def test_error_is_the_svd_truncation_and_falls_with_rank(tiny):
    _, base, merged = tiny
    keys = changed(base, merged)
    svals = [torch.linalg.svdvals((merged[k].double() - base[k].double()).flatten(1)) for k in keys]
    errors = []
    for rank in (1, 4, 16, FULL):
        lora, err = extract_lora(base, merged, rank)
        assert abs(err - independent_error(base, merged, apply_lora(base, lora))) < 1e-6
        eckart_young = (sum(s[rank:].square().sum() for s in svals) / sum(s.square().sum() for s in svals)).sqrt()
        assert abs(err - eckart_young.item()) < 1e-6
        errors.append(err)
    assert errors[0] > errors[1] > errors[2] > 0.3 > 1e-5 > errors[3]  # 0.95, 0.83, 0.52, ~4e-8


def peft_scale(kw, module):
    """lora_alpha / r for `module` as peft resolves a LoraConfig's rank and alpha patterns."""
    def pick(pattern, default):
        key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
        return pattern[key] if key is not None else default
    return pick(kw["alpha_pattern"], kw["lora_alpha"]) / pick(kw["rank_pattern"], kw["r"])


@pytest.mark.parametrize("rank", [4, FULL])
def test_diffusers_kohya_reader(tiny, tmp_path, rank):
    """diffusers' own reading of the file (`StableDiffusionPipeline.lora_state_dict`: kohya key
    conversion and alphas), then what `load_lora_adapter` hands peft (key conversion, the
    LoraConfig's ranks and alphas), fused the way peft fuses, into diffusers' U-Net."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    root, base, merged = tiny
    lora, _ = extract_lora(base, merged, rank)
    path = str(tmp_path / "lora.safetensors")
    save_file(lora, path)
    state, alphas = StableDiffusionPipeline.lora_state_dict(path)
    assert all(k.startswith("unet.") for k in [*state, *alphas])
    state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()})
    ranks = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k}
    kw = get_peft_kwargs(ranks, {k[len("unet."):]: v for k, v in alphas.items()}, state, is_unet=True)
    assert sorted(m + ".weight" for m in kw["target_modules"]) == changed(base, merged)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet"), local_files_only=True)
    with torch.no_grad():
        for m in kw["target_modules"]:
            layer, a, b = unet.get_submodule(m), state[f"{m}.lora_A.weight"], state[f"{m}.lora_B.weight"]
            assert isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
            layer.weight += peft_scale(kw, m) * (b.flatten(1) @ a.flatten(1)).view(layer.weight.shape)
    fused, expected = unet.state_dict(), apply_lora(base, lora)
    for k in base:
        assert (fused[k] - expected[k]).abs().max() <= 1e-5 * expected[k].abs().max(), k
        if rank == FULL:
            assert (fused[k] - merged[k]).abs().max() <= 1e-5 * merged[k].abs().max(), k
    for k in base.keys() - set(changed(base, merged)):
        assert torch.equal(fused[k], base[k])


def test_diffusers_load_lora_weights_with_peft(tiny, tmp_path):
    """The whole consumer path, where peft is installed (diffusers needs it to load a LoRA)."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    root, base, merged = tiny
    lora, _ = extract_lora(base, merged, FULL)
    save_file(lora, str(tmp_path / "lora.safetensors"))
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    parts = {name: cls.from_pretrained(os.path.join(root, name)) for name, cls in (
        ("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
        ("tokenizer", CLIPTokenizer), ("scheduler", DDIMScheduler))}
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, expected = pipe.unet.state_dict(), apply_lora(base, lora)
    for k in base:
        assert (fused[k] - expected[k]).abs().max() <= 1e-5 * expected[k].abs().max(), k


def one_line_error(base, merged, match):
    with pytest.raises(LoadError, match=match) as e:
        extract_lora(base, merged, 4)
    assert "\n" not in str(e.value)


def test_errors_are_one_line(tiny):
    _, base, merged = tiny
    extra = {**merged, "extra.weight": torch.zeros(2, 2)}
    del extra[TO_Q]
    one_line_error(base, extra, rf"only in base: {re.escape(TO_Q)}; only in merged: extra\.weight")
    bias = TO_Q.replace("to_q.weight", "to_out.0.bias")
    one_line_error(base, {**merged, bias: merged[bias] + 1}, rf"{re.escape(bias)} \(32,\) differs.*LoRA")
    one_line_error(base, {**merged, "conv_in.weight": merged["conv_in.weight"] * 2},
                   r"conv_in\.weight \(32, 4, 3, 3\) differs.*LoRA")
    with pytest.raises(LoadError, match="does not have: lora_unet_nowhere"):
        apply_lora(base, {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 2),
                          "lora_unet_nowhere.lora_up.weight": torch.zeros(2, 1)})
    assert extract_lora(base, dict(base), 4) == ({}, 0.0)
