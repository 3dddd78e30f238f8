"""LoRaD, the paper's adapter (WaDi Sec. 3.2): a low-rank rotation of the weight directions of a
frozen nn.Linear; the baselines of the adapter ablation (paper Table 2: LoRA, DoRA, DoRA with frozen
norms, full fine-tuning; LoRA and DoRA also on convolutions) and of the orthogonal-map ablation
(paper Table R4: a learned orthogonal matrix in torch's three parametrisations) behind the same
calls; the one table of which layers get an adapter (`LAYERS`: the paper's parameter counts);
adding, counting and merging.

LoRaD. Split a weight W (out x in) row-wise into norms and directions, W = m * V, m_i = ||W_i||.
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
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import orthogonal

from loading import LoadError


def rotate_pairs(W, theta):
    """Rotate the column pairs (2j, 2j+1) of each row i of W (out, in) by theta[i, j]
    (out, in/2)."""
    a, b = W.unflatten(1, (-1, 2)).unbind(-1)  # each (out, in/2)
    cos, sin = theta.cos(), theta.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(1)  # (out, in)


class Adapter(nn.Module):
    """A frozen `base` layer (shared with other networks, never modified) run with the parameters
    `merged_params()` computes from the adapter's own, in the adapter's dtype (fp32 whatever the
    base dtype: a small rotation of a bf16 weight computed in bf16 would round away). The base is
    an nn.Linear or nn.Conv2d (the weight adapters work on its (out, in*kh*kw) matrix) or, for full
    fine-tuning, any layer."""

    def __init__(self, base: nn.Module):
        super().__init__()
        if isinstance(base, nn.Conv2d) and base.padding_mode != "zeros":
            raise ValueError(f"adapters support zero-padded convolutions only, "
                             f"got padding_mode={base.padding_mode}")
        inner = {id(p) for m in base.modules() if isinstance(m, Adapter)
                 for p in m.adapter_parameters().values()}
        for p in base.parameters():  # not those of adapters inside it (`full` wraps a block last)
            if id(p) not in inner:
                p.requires_grad_(False)
        self.base = base

    def adapter_parameters(self) -> dict:
        """{name: tensor} of the adapter's own parameters: all but its base's."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base.")}

    def merged_params(self) -> dict:
        """{name: tensor} of the base parameters the adapter replaces (the rest: the base's)."""
        return {"weight": self.merged_weight().view(self.base.weight.shape)}

    def forward(self, x, *args, **kwargs):  # more inputs: a block under `full` (PixArt's)
        with torch.autocast(x.device.type, enabled=False):  # the adapter in fp32, even in autocast
            new = self.merged_params()
        params = {name: new.get(name, p).to(x.dtype)
                  for name, p in self.base.named_parameters(recurse=False)}
        b = self.base
        if isinstance(b, nn.Linear):
            return F.linear(x, params["weight"], params.get("bias"))
        if isinstance(b, nn.Conv2d):
            return F.conv2d(x, params["weight"], params.get("bias"), b.stride, b.padding,
                            b.dilation, b.groups)
        return torch.func.functional_call(b, params, (x, *args), kwargs)

    def merged(self) -> nn.Module:
        """A plain layer like the base holding the merged parameters (in the base dtype); the
        parameters the adapter does not replace are the base's own tensors."""
        out = shared_copy(self.base)
        for name, value in self.merged_params().items():
            dtype = getattr(self.base, name).dtype
            setattr(out, name, nn.Parameter(value.detach().to(dtype), requires_grad=False))
        return out


class LoRaDLinear(Adapter):
    """LoRaD: W' = m * R(theta_a @ theta_b) V, with r * (out + in/2) trainable parameters."""

    def __init__(self, base: nn.Linear, rank: int):
        if base.in_features % 2:
            raise ValueError(f"LoRaD rotates pairs of input columns and needs an even input width, "
                             f"got in_features={base.in_features}")
        super().__init__(base)
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.theta_a = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        self.theta_b = nn.Parameter(nn.init.xavier_uniform_(
            torch.empty(rank, base.in_features // 2, **kw)))

    def merged_weight(self):
        return rotate_pairs(self.base.weight.to(self.theta_a.dtype), self.theta_a @ self.theta_b)


class LoRALinear(Adapter):
    """LoRA (Hu et al. 2022): W' = W + lora_b @ lora_a (alpha = rank, so the scale is 1), on an
    nn.Linear or on the (out, in*kh*kw) matrix of an nn.Conv2d (for a 1x1 convolution, such as
    SD1.5's proj_in, the same as PEFT's conv LoRA): r * (in*kh*kw + out) trainable parameters."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__(base)
        n_out, n_in = base.weight.flatten(1).shape
        kw = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_a = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(rank, n_in, **kw),
                                                            a=math.sqrt(5)))
        self.lora_b = nn.Parameter(torch.zeros(n_out, rank, **kw))

    def merged_weight(self):  # (out, in*kh*kw)
        return self.base.weight.flatten(1).to(self.lora_a.dtype) + self.lora_b @ self.lora_a


class DoRALinear(LoRALinear):
    """DoRA (Liu et al. 2024): W' = magnitude * (W + lora_b @ lora_a) / ||W + lora_b @ lora_a||,
    row-wise, with `magnitude` initialised to the row norms of W: one more trainable parameter per
    output row."""

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
    """Full fine-tuning of one layer: trainable fp32 copies of its own parameters (same names, so
    the adapter tensors carry the network's keys); the rank is ignored."""

    def __init__(self, base: nn.Module, rank: int = 0):
        super().__init__(base)
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, nn.Parameter(p.detach().float().clone()))

    def merged_params(self):
        return dict(self.named_parameters(recurse=False))


class OrthogonalLinear(Adapter):
    """The orthogonal-map baseline (paper Table R4): W' = W R^T, R a learned orthogonal matrix
    (in x in), block-diagonal with `blocks` blocks of size b = in / blocks, registered as `rotation`
    (blocks, b, b) and kept orthogonal by torch's parametrisation
    (torch.nn.utils.parametrizations.orthogonal) through `orthogonal_map`: matrix_exp, cayley or
    householder. R turns the input side, so every row of W keeps its norm, as with LoRaD; but where
    LoRaD turns each row in planes of its own, one dense rotation turns all rows of a layer alike.
    R starts as the identity. The stored tensor (what count_trainable and the optimizer see) is
    blocks * b^2; each map reads only the strict lower triangle of a block (`count_effective`), and
    householder the signs of the diagonal (-1, no gradient: weight decay would break R; vsd.ADAMW
    has none)."""

    def __init__(self, base: nn.Linear, blocks: int, orthogonal_map: str):
        if base.in_features % blocks:
            raise ValueError(f"{blocks} diagonal blocks do not divide "
                             f"in_features={base.in_features}")
        super().__init__(base)
        b = base.in_features // blocks
        eye = torch.zeros(blocks, b, b, device=base.weight.device, dtype=torch.float32)
        eye.diagonal(dim1=-2, dim2=-1).fill_(1.0)  # (torch.eye on the meta device imports dynamo)
        self.rotation = nn.Parameter(eye)
        # no dynamic trivialisation: its `base` would stay I (torch re-bases only when assigned to),
        # a (blocks, b, b) buffer and a matmul for nothing; without it, registering on I gives R = I
        orthogonal(self, "rotation", orthogonal_map, use_trivialization=False)
        # householder's stored tensor comes out of LAPACK column-major; the fused AdamW (vsd.ADAMW)
        # reads memory flat and would pair it with row-major moments restored from a checkpoint
        stored = self.parametrizations.rotation
        stored.original = nn.Parameter(stored.original.detach().contiguous())

    def merged_weight(self):
        R = self.rotation  # (blocks, b, b), orthogonal
        W = self.base.weight.to(R.dtype).unflatten(1, (R.shape[0], -1))  # (out, blocks, b)
        return torch.einsum("onj,nij->oni", W, R).flatten(1)  # row block n: W_n R_n^T


# the orthogonal-map baselines of paper Table R4, by torch's three maps
ORTHOGONAL_MAPS = {"orth-matrix-exp": "matrix_exp", "orth-cayley": "cayley",
                   "orth-householder": "householder"}
ADAPTERS = {"lorad": LoRaDLinear, "lora": LoRALinear, "dora": DoRALinear,
            "dora-frozen-norm": DoRAFrozenNormLinear, "full": FullModule,
            **{kind: functools.partial(OrthogonalLinear, orthogonal_map=orthogonal_map)
               for kind, orthogonal_map in ORTHOGONAL_MAPS.items()}}


# -------------------------------------------------------------------------------------------------
# Which layers get an adapter: one rule per (network family, role) on a layer's module path. A
# network names its family (`UNet.family`, `PixArt.family`); beside each rule, the trainable counts
# at the paper's ranks (diffusers' layout: SD1.5's proj_in / proj_out are 1x1 convs, not linears).

def in_unet_blocks(name):
    return name.startswith(("down_blocks.", "mid_block.", "up_blocks."))


# the LoRA / DoRA students of paper Table 2 adapt PEFT's usual target list in the U-Net blocks
PEFT_TARGETS = tuple("." + s for s in ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                       "ff.net.0.proj", "ff.net.2", "time_emb_proj"))
LAYERS = {
    # every nn.Linear in the U-Net blocks; rank 256: SD1.5 83,795,968 (paper 83.80M), SD2.1
    # 94,429,184 (94.43M); SD1.5 rank 64 / 128 / 512: 20,948,992 / 41,897,984 / 167,591,936
    ("unet", "student"): in_unet_blocks,
    # the same without proj_in, proj_out, time_emb_proj; SD1.5 rank 32: 9,378,816 (paper 9.38M)
    ("unet", "fake"): lambda name: in_unet_blocks(name) and not any(
        s in name for s in ("proj_in", "proj_out", "time_emb_proj")),
    # Table 2's LoRA / DoRA students: PEFT_TARGETS, nn.Linear and nn.Conv2d; SD1.5 rank 256: LoRA
    # and DoRA with frozen norms 120,897,536 (paper 120.9M), DoRA 121,154,816 (121.2M)
    ("unet", "table2-student"): lambda name: in_unet_blocks(name) and name.endswith(PEFT_TARGETS),
    # every nn.Linear but the adaLN-single timestep path; rank 128: 81,219,584 (paper 81.22M)
    ("dit", "student"): lambda name: not name.startswith("adaln_single."),
    # every nn.Linear of the transformer blocks; rank 32: 20,127,744
    ("dit", "fake"): lambda name: name.startswith("transformer_blocks."),
}
ROLES = ("student", "fake")


def selected_layers(model: nn.Module, role: str, kind: str = "lorad") -> list:
    """(name, module) of the layers of `model` that get an adapter of `kind` in `role` (student or
    fake): LoRaD and the orthogonal maps the nn.Linear layers of LAYERS[(model.family, role)]; a
    LoRA / DoRA student the nn.Linear and nn.Conv2d layers of its Table 2 rule where the family has
    one; a `full` student every layer holding parameters (the whole denoiser: Table 2's FT, 859.52M
    on SD1.5); a fake score network its LoRaD rule whatever the kind. Deepest first, so that a layer
    is wrapped (and merged) before any layer holding it."""
    if role not in ROLES:
        raise ValueError(f"unknown adapter role {role!r} (known: {', '.join(ROLES)})")
    table2 = LAYERS.get((model.family, "table2-student"))
    modules = [(n, m) for n, m in model.named_modules() if n]
    if kind == "full" and role == "student":
        selected = [(n, m) for n, m in modules
                    if next(m.parameters(recurse=False), None) is not None]
    elif kind in ("lora", "dora", "dora-frozen-norm") and role == "student" and table2:
        selected = [(n, m) for n, m in modules
                    if isinstance(m, (nn.Linear, nn.Conv2d)) and table2(n)]
    else:
        rule = LAYERS[(model.family, role)]
        selected = [(n, m) for n, m in modules if isinstance(m, nn.Linear) and rule(n)]
    return sorted(selected, key=lambda item: -item[0].count("."))


def shared_copy(net):
    """A new module tree over the same parameter and buffer tensors (nothing is copied): the student
    and the fake score network are adapters on the teacher's one frozen set of weights."""
    memo = {id(t): t for t in [*net.parameters(), *net.buffers()]}
    return copy.deepcopy(net, memo)


def add_adapters(model: nn.Module, role: str, size: int, kind: str = "lorad") -> nn.Module:
    """Freeze `model` and replace every layer that `selected_layers` picks for `role` by an adapter
    of `kind` wrapping it; `size` is the rank of a low-rank adapter, the number of diagonal blocks
    of an orthogonal one (`full` ignores it). Returns the model (changed in place)."""
    model.requires_grad_(False)
    for name, layer in selected_layers(model, role, kind):
        try:
            adapter = ADAPTERS[kind](layer, size)
        except ValueError as e:
            raise ValueError(f"layer {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, adapter)
    return model


def count_trainable(model: nn.Module) -> int:
    """The trainable parameters as stored: what the optimizer holds (and saves) a state for."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_effective(model: nn.Module) -> int:
    """count_trainable, but an orthogonal adapter's blocks count the b (b - 1) / 2 entries of their
    strict lower triangle, the only ones its map differentiates (the others get no gradient)."""
    blocks = [m.parametrizations.rotation.original.shape for m in model.modules()
              if isinstance(m, OrthogonalLinear)]
    return count_trainable(model) - sum(n * b * b - n * b * (b - 1) // 2 for n, b, _ in blocks)


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter by a plain layer holding its merged parameters (in place); the state
    dict then has the original network's keys again."""
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, Adapter)]
    for name, m in sorted(adapters, key=lambda item: -item[0].count(".")):  # inner adapters first
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, m.merged())
    return model


def adapter_state_dict(model: nn.Module) -> dict:
    """The adapter tensors by `<module path>.<name>` (e.g. `...attn1.to_q.theta_a`: the official
    release's naming; an orthogonal adapter's `...parametrizations.rotation.original`): each
    adapter's parameters but its base's."""
    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, Adapter)
            for p_name, p in m.adapter_parameters().items()}


def load_adapters(model: nn.Module, state: dict, what="adapter tensors") -> nn.Module:
    """Copy adapter tensors (by `adapter_state_dict` key) into the model's adapters; keys and shapes
    must match (a LoadError names `what` and the keys that differ)."""
    params = adapter_state_dict(model)
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    wrong = sorted(k for k in params.keys() & state.keys() if params[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise LoadError(f"{what} do not match the model: {len(missing)} missing "
                        f"{sorted(missing)[:3]}, {len(unexpected)} unexpected "
                        f"{sorted(unexpected)[:3]}, {len(wrong)} with wrong shapes {wrong[:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])
    return model
