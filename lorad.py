"""LoRaD, the paper's adapter (WaDi Sec. 3.2): a low-rank rotation of the weight directions of a frozen
nn.Linear; plus the baselines of the adapter ablation (paper Table 2: LoRA, DoRA, DoRA with frozen
norms, full fine-tuning; LoRA and DoRA also on convolutions) behind the same calls, the rules that say
which layers get an adapter (those that reproduce the paper's parameter counts), and adapter files.

LoRaD. Split a weight W (out x in) row-wise into norms and directions, W = m * V with m_i = ||W_i||.
Angles theta = theta_a @ theta_b (out x in/2, rank r) rotate each pair of neighbouring input columns
(2j, 2j+1) of row i:
    [V'_i,2j  ]   [cos theta_ij  -sin theta_ij] [V_i,2j  ]
    [V'_i,2j+1] = [sin theta_ij   cos theta_ij] [V_i,2j+1],        W' = m * V'.
A rotation keeps every row's norm, so only the directions turn; and because it is linear,
m * R(V) = R(m * V) = R(W): we rotate W itself, which is the same W' with one division less (and is
defined for an all-zero row, where V is not). theta_a starts at zero, so the adapter starts as the
identity; a trained adapter merges into a plain weight W'.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loading import LoadError, read_tensors, save_tensors


def shared_copy(net):
    """A new module tree over the same parameter and buffer tensors (nothing is copied): the student
    and the fake score network are adapters on the teacher's one frozen set of weights."""
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo)


class Adapter(nn.Module):
    """A frozen `base` layer (shared with other networks, never modified) run with the parameters
    `merged_params()` computes from the adapter's own, in the adapter's dtype (fp32 whatever the base
    dtype: a small rotation of a bf16 weight computed in bf16 would round away). The base is an
    nn.Linear or nn.Conv2d (the weight adapters work on its (out, in*kh*kw) matrix) or, for full
    fine-tuning, any layer."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":
            raise ValueError(f"adapters support zero-padded convolutions only, got padding_mode={base.padding_mode}")
        base.requires_grad_(False)
        self.base = base

    def merged_params(self) -> dict:
        """{name: tensor} of the base parameters the adapter replaces (the others are the base's)."""
        return {"weight": self.merged_weight().view(self.base.weight.shape)}

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the adapter in fp32, also under autocast
            new = self.merged_params()
        params = {name: new.get(name, p).to(x.dtype) for name, p in self.base.named_parameters(recurse=False)}
        if isinstance(self.base, nn.Linear):
            return F.linear(x, params["weight"], params.get("bias"))
        if isinstance(self.base, nn.Conv2d):
            b = self.base
            return F.conv2d(x, params["weight"], params.get("bias"), b.stride, b.padding, b.dilation, b.groups)
        return torch.func.functional_call(self.base, params, (x,))

    def merged(self) -> nn.Module:
        """A plain layer like the base holding the merged parameters (in the base dtype); the
        parameters the adapter does not replace are the base's own tensors."""
        out = shared_copy(self.base)
        for name, value in self.merged_params().items():
            setattr(out, name, nn.Parameter(value.detach().to(getattr(self.base, name).dtype), requires_grad=False))
        return out


def rotate_pairs(W, theta):
    """Rotate the column pairs (2j, 2j+1) of each row i of W (out, in) by theta[i, j] (out, in/2)."""
    a, b = W.unflatten(1, (-1, 2)).unbind(-1)  # each (out, in/2)
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(1)  # (out, in)


class LoRaDLinear(Adapter):
    """LoRaD: W' = m * R(theta_a @ theta_b) V, with r * (out + in/2) trainable parameters."""

    def __init__(self, base: nn.Linear, rank: int):
        if base.in_features % 2:
            raise ValueError(f"LoRaD rotates pairs of input columns and needs an even input width, "
                             f"got in_features={base.in_features}")
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.theta_a = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        self.theta_b = nn.Parameter(nn.init.xavier_uniform_(torch.empty(rank, base.in_features // 2, **kw)))

    def merged_weight(self):
        return rotate_pairs(self.base.weight.to(self.theta_a.dtype), self.theta_a @ self.theta_b)


class LoRALinear(Adapter):
    """LoRA (Hu et al. 2022): W' = W + lora_b @ lora_a (alpha = rank, so the scale is 1), on an nn.Linear
    or on the (out, in*kh*kw) matrix of an nn.Conv2d (for a 1x1 convolution, such as SD1.5's proj_in,
    the same as PEFT's conv LoRA): r * (in*kh*kw + out) trainable parameters."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__(base)
        n_out, n_in = base.weight.flatten(1).shape
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, n_in, **kw), a=math.sqrt(5)))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, **kw))

    def merged_weight(self):
        return self.base.weight.flatten(1).to(self.lora_a.dtype) + self.lora_b @ self.lora_a  # (out, in*kh*kw)


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): W' = magnitude * (W + lora_b @ lora_a) / ||W + lora_b @ lora_a||, row-wise,
    with `magnitude` initialised to the row norms of W: one more trainable parameter per output row."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__(base, rank)
        self.magnitude = nn.Parameter(base.weight.detach().float().flatten(1).norm(dim=1))

    def merged_weight(self):
        V = super().merged_weight()
        return self.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)


class DoRAFrozenNormLinear(DoRALinear):
    """DoRA with frozen norms (paper Table 2, "DoRA (frozen norm)"): the magnitude stays at the row
    norms ||W_i|| of the base (a buffer, not trained), so only the directions change, as with LoRaD,
    but through an additive low-rank update: LoRA's trainable parameters."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__(base, rank)
        magnitude = self.magnitude.detach()
        del self.magnitude
        self.register_buffer("magnitude", magnitude, persistent=False)


class FullModule(Adapter):
    """Full fine-tuning of one layer: trainable fp32 copies of its own parameters (same names, so the
    adapter tensors carry the network's keys); the rank is ignored."""

    def __init__(self, base: nn.Module, rank: int = 0):
        super().__init__(base)
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(p.detach().float().clone()))

    def merged_params(self):
        return dict(self.named_parameters(recurse=False))


ADAPTERS = {"lorad": LoRaDLinear, "lora": LoRALinear, "dora": DoRALinear,
            "dora-frozen-norm": DoRAFrozenNormLinear, "full": FullModule}


def _in_unet_blocks(name):
    return name.startswith(("down_blocks.", "mid_block.", "up_blocks."))


# which nn.Linear layers (by module path) get LoRaD, per network role (the paper's counts, README); every fake
# score network uses its rule whatever the adapter kind
TARGETS = {
    "unet_student": _in_unet_blocks,
    "unet_fake": lambda name: _in_unet_blocks(name) and not any(
        s in name for s in ("proj_in", "proj_out", "time_emb_proj")),
    "dit_student": lambda name: not name.startswith("adaln_single."),  # the paper's 81.22M
    "dit_fake": lambda name: name.startswith("transformer_blocks."),
}
# the LoRA / DoRA students of the ablation (paper Table 2): PEFT's target list in the U-Net
# blocks, nn.Linear or nn.Conv2d (SD1.5's proj_in / proj_out are 1x1 convolutions); rank 256 on SD1.5
# gives 120,897,536 parameters (the paper's 120.9M), DoRA 121,154,816 (121.2M)
BASELINE_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "time_emb_proj")
BASELINE_TARGETS = {
    "unet_student": lambda name: _in_unet_blocks(name) and name.endswith(tuple("." + s for s in BASELINE_LAYERS)),
}


def selected_layers(model: nn.Module, target: str, kind: str = "lorad") -> list:
    """(name, module) of the layers of `model` that get an adapter of `kind` in the role `target`:
    LoRaD the nn.Linear layers of TARGETS[target]; the LoRA / DoRA students the nn.Linear and nn.Conv2d
    layers of BASELINE_TARGETS[target]; a `full` student every layer holding parameters (the whole
    denoiser: paper Table 2's FT, 859.52M on SD1.5); every fake score network its TARGETS rule.
    Deepest first, so that a layer is wrapped (and merged) before any layer holding it."""
    if kind == "full" and target.endswith("_student"):
        selected = [(n, m) for n, m in model.named_modules()
                    if n and next(m.parameters(recurse=False), None) is not None]
    elif kind != "lorad" and target in BASELINE_TARGETS:
        selected = [(n, m) for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d)) and BASELINE_TARGETS[target](n)]
    else:
        selected = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and TARGETS[target](n)]
    return sorted(selected, key=lambda item: -item[0].count("."))


def add_adapters(model: nn.Module, target: str, rank: int, kind: str = "lorad") -> nn.Module:
    """Freeze `model` and replace every layer that `selected_layers` picks by an adapter of `kind`
    wrapping it. Returns the model (changed in place)."""
    model.requires_grad_(False)
    for name, layer in selected_layers(model, target, kind):
        try:
            adapter = ADAPTERS[kind](layer, rank)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, adapter)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain layer holding its merged parameters (in place); the state dict
    then has the original network's keys again."""
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, Adapter)]
    for name, m in sorted(adapters, key=lambda item: -item[0].count(".")):  # inner adapters first
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors by `<module path>.<name>` (e.g. `...attn1.to_q.theta_a`, the official naming)."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, Adapter)
            for p_name, p in m.named_parameters(recurse=False)}


def save_adapters(model: nn.Module, path: str, metadata: dict = None):
    save_tensors(adapter_state_dict(model), path, metadata)


def read_adapter_file(path: str) -> dict:
    """Adapter tensors from our safetensors files, or from the official release's `kduv.pth` state dicts
    (read with torch's weights-only loader, which unpickles tensors and nothing else)."""
    state = read_tensors(path)
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_adapters(model: nn.Module, state_or_path) -> nn.Module:
    """Copy adapter tensors (a dict or a file) into the model's adapters; keys and shapes must match."""
    state = read_adapter_file(state_or_path) if isinstance(state_or_path, str) else state_or_path
    params = adapter_state_dict(model)
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    wrong = sorted(k for k in params.keys() & state.keys() if params[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise LoadError(f"adapter tensors do not match the model: {len(missing)} missing "
                        f"{sorted(missing)[:3]}, {len(unexpected)} unexpected {sorted(unexpected)[:3]}, "
                        f"{len(wrong)} with wrong shapes {wrong[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return model
