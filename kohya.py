"""A LoRA extracted from a merged one-step student, in kohya-ss's layout: the file that ComfyUI,
AUTOMATIC1111 / Forge and diffusers' `load_lora_weights` read for SD1.5 / SD2.1.

The layout. One flat state dict; for each changed U-Net layer with diffusers module path P (e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) and name N = `lora_unet_` + P with
every '.' replaced by '_':
    N.lora_down.weight   (r, in)                 or (r, in, 1, 1) for a 1x1 convolution
    N.lora_up.weight     (out, r)                or (out, r, 1, 1)
    N.alpha              a 0-d tensor; the readers apply W + (alpha / r) up @ down
The readers turn N back into a module path (diffusers: `lora_conversion_utils._convert_unet_lora_key`
replaces every '_' by '.' and then restores the known names: to_q, transformer_blocks, proj_in, ...).

The split. A student changes some weights, W' = R(W) (LoRaD rotates pairs of input columns); the
LoRA holds dW = W' - W of each changed layer, truncated to rank r = min(rank, out, in) by its SVD
dW = U S V^T (Eckart-Young: the best rank-r approximation in the Frobenius norm). A rotation is not
low-rank, so the truncation loses ||S[r:]||: `extract_lora` returns the relative error of all
layers together. The split is balanced, up = U_r sqrt(S_r), down = sqrt(S_r) V_r^T (both factors
of one scale, so fp16 storage loses neither), with alpha = r: scale 1 in every reader. One alpha
serves the whole file (diffusers keeps a per-layer alpha of attention layers under a name peft
never matches): where the rank exceeds a layer's min(out, in), that layer's rank r_i is smaller,
and its factors carry sqrt(r_i / alpha) each, so that (alpha / r_i) up @ down is still its dW_r.
"""
import torch

from loading import LoadError, key_listing

SMALL = 1 << 20  # SVDs of matrices up to this many entries run in float64 (exact at full rank)


def lora_name(module: str, prefix: str = "lora_unet") -> str:
    """The kohya name of a diffusers module path."""
    return f"{prefix}_{module.replace('.', '_')}"


def _low_rank(dW: torch.Tensor, rank: int, alpha: int):
    """(up, down), float32: the balanced rank-r truncated SVD of dW (out, in), r = min(rank, out,
    in), each factor times sqrt(r / alpha) so that (alpha / r) up @ down is the truncation."""
    r = min(rank, *dW.shape)
    U, S, Vh = torch.linalg.svd(dW.double() if dW.numel() <= SMALL else dW.float(),
                                full_matrices=False)
    s = (S[:r] * (r / alpha)).sqrt()
    return (U[:, :r] * s).float().contiguous(), (s[:, None] * Vh[:r]).float().contiguous()


def extract_lora(base: dict, merged: dict, rank: int, prefix: str = "lora_unet") -> tuple[dict, float]:
    """The kohya LoRA taking the U-Net state dict `base` to `merged` (diffusers keys, the same key
    sets), at rank `rank`; and its relative error ||dW - up down||_F / ||dW||_F over all layers
    together (0.0, and an empty LoRA, where nothing differs). A changed Linear weight or 1x1
    convolution gets a LoRA pair; any other changed tensor raises LoadError."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if base.keys() != merged.keys():
        raise LoadError(f"the base and merged U-Nets have different keys: only in base: "
                        f"{key_listing(base.keys() - merged.keys()) or '-'}; only in merged: "
                        f"{key_listing(merged.keys() - base.keys()) or '-'}")
    changed = []
    for key in sorted(base):
        w, w2 = base[key], merged[key]
        if w.shape != w2.shape:
            raise LoadError(f"{key}: shape {tuple(w.shape)} in base but {tuple(w2.shape)} in merged")
        if torch.equal(w, w2) if w.dtype == w2.dtype else torch.equal(w.double(), w2.double()):
            continue
        if not key.endswith(".weight") or not (w.dim() == 2 or w.dim() == 4 and w.shape[2:] == (1, 1)):
            raise LoadError(f"{key} {tuple(w.shape)} differs between base and merged, and a LoRA "
                            f"holds only Linear and 1x1-convolution weight changes")
        changed.append(key)
    # one alpha for the whole file, the largest layer rank: diffusers' loader files the alphas of
    # attention layers under names that peft never matches, so a per-layer alpha would be lost
    alpha = max((min(rank, *base[k].shape[:2]) for k in changed), default=rank)
    lora, residual, total = {}, 0.0, 0.0
    for key in changed:
        w = base[key]
        dW = (merged[key].double() - w.double()).flatten(1)
        up, down = _low_rank(dW, rank, alpha)
        r = down.shape[0]
        residual += (dW - (alpha / r) * (up.double() @ down.double())).square().sum().item()
        total += dW.square().sum().item()
        name, kernel = lora_name(key[:-len(".weight")], prefix), w.shape[2:]  # () or (1, 1)
        lora[f"{name}.lora_down.weight"] = down.view(r, -1, *kernel)
        lora[f"{name}.lora_up.weight"] = up.view(-1, r, *kernel)
        lora[f"{name}.alpha"] = torch.tensor(float(alpha))
    return lora, (residual / total) ** 0.5 if total else 0.0


def apply_lora(base: dict, lora: dict, prefix: str = "lora_unet") -> dict:
    """`base` with W + (alpha / r) up @ down for each layer of the kohya LoRA `lora` (alpha = r where
    absent, as the readers do); computed in float64, stored in each weight's dtype. The other
    tensors are base's own."""
    modules = {lora_name(k[:-len(".weight")], prefix): k for k in base if k.endswith(".weight")}
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in lora if k.endswith(".lora_down.weight")}
    expected = {f"{n}.{s}" for n in names for s in ("lora_down.weight", "lora_up.weight")}
    stray = lora.keys() - expected - {f"{n}.alpha" for n in names}
    if stray or expected - lora.keys():
        raise LoadError(f"not a kohya U-Net LoRA: unexpected keys {key_listing(stray) or '-'}; "
                        f"missing {key_listing(expected - lora.keys()) or '-'}")
    unknown = names - modules.keys()
    if unknown:
        raise LoadError(f"the LoRA names layers that the base U-Net does not have: "
                        f"{key_listing(unknown)}")
    out = dict(base)
    for name in names:
        key = modules[name]
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        r = down.shape[0]
        alpha = lora[f"{name}.alpha"].item() if f"{name}.alpha" in lora else r
        w = base[key]
        dW = up.double().flatten(1) @ down.double().flatten(1)
        if dW.shape != w.flatten(1).shape:
            raise LoadError(f"{name}: the LoRA's up @ down is {tuple(dW.shape)}, the base weight "
                            f"{key} {tuple(w.shape)}")
        out[key] = (w.double() + (alpha / r) * dW.view(w.shape)).to(w.dtype)
    return out
