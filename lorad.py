"""LoRaD, the paper's adapter (WaDi Sec. 3.2): a low-rank rotation of the weight directions of a frozen
nn.Linear; plus the LoRA, DoRA and full fine-tuning baselines of the ablation (paper Table 2) behind the
same calls, the rules that say which layers get an adapter (those that reproduce the paper's parameter
counts), and adapter files.

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
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from loading import LoadError, read_tensors, save_tensors


class AdaptedLinear(nn.Module):
    """A frozen `base` nn.Linear (shared with other networks, never modified) used with the weight
    `merged_weight()` computed from the adapter parameters, in the adapter's dtype (fp32 whatever the
    base dtype: a small rotation of a bf16 weight computed in bf16 would round away)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        base.requires_grad_(False)
        self.base = base

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):  # the rotation in fp32, also under autocast
            weight = self.merged_weight()
        bias = self.base.bias
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding the merged weight (in the base dtype) and the base bias."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device="meta")
        out.weight = nn.Parameter(self.merged_weight().detach().to(self.base.weight.dtype), requires_grad=False)
        out.bias = self.base.bias
        return out


def rotate_pairs(W, theta):
    """Rotate the column pairs (2j, 2j+1) of each row i of W (out, in) by theta[i, j] (out, in/2)."""
    a, b = W.unflatten(1, (-1, 2)).unbind(-1)  # each (out, in/2)
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(1)  # (out, in)


class LoRaDLinear(AdaptedLinear):
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


class LoRALinear(AdaptedLinear):
    """LoRA (Hu et al. 2022): W' = W + lora_b @ lora_a (alpha = rank, so the scale is 1)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, base.in_features, **kw), a=math.sqrt(5)))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **kw))

    def merged_weight(self):
        return self.base.weight.to(self.lora_a.dtype) + self.lora_b @ self.lora_a


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): W' = magnitude * (W + lora_b @ lora_a) / ||W + lora_b @ lora_a||, row-wise,
    with `magnitude` initialised to the row norms of W."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__(base, rank)
        self.magnitude = nn.Parameter(base.weight.detach().float().norm(dim=1))

    def merged_weight(self):
        V = super().merged_weight()
        return self.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)


class FullLinear(AdaptedLinear):
    """Full fine-tuning of the weight: a trainable fp32 copy (`weight`); the rank is ignored."""

    def __init__(self, base: nn.Linear, rank: int = 0):
        super().__init__(base)
        self.weight = nn.Parameter(base.weight.detach().float().clone())

    def merged_weight(self):
        return self.weight


ADAPTERS = {"lorad": LoRaDLinear, "lora": LoRALinear, "dora": DoRALinear, "full": FullLinear}


def _in_unet_blocks(name):
    return name.startswith(("down_blocks.", "mid_block.", "up_blocks."))


# which nn.Linear layers (by module path) get an adapter, per network role (the paper's counts, README)
TARGETS = {
    "unet_student": _in_unet_blocks,
    "unet_fake": lambda name: _in_unet_blocks(name) and not any(
        s in name for s in ("proj_in", "proj_out", "time_emb_proj")),
    "dit_student": lambda name: not name.startswith("adaln_single."),  # the paper's 81.22M (SPEC 1.2)
    "dit_fake": lambda name: name.startswith("transformer_blocks."),
}


def add_adapters(model: nn.Module, target: str, rank: int, kind: str = "lorad") -> nn.Module:
    """Freeze `model` and replace every nn.Linear that TARGETS[target] selects by an adapter of `kind`
    wrapping it. Returns the model (changed in place)."""
    model.requires_grad_(False)
    selected = [(name, m) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and TARGETS[target](name)]
    for name, linear in selected:
        try:
            adapter = ADAPTERS[kind](linear, rank)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, adapter)
    return model


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain nn.Linear holding its merged weight (in place); the state dict
    then has the original network's keys again."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, AdaptedLinear)]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors by `<module path>.<name>` (e.g. `...attn1.to_q.theta_a`, the official naming)."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, AdaptedLinear)
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
