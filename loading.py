"""Checkpoint loading in one place: files from a Hugging Face repo or a local directory in the same
layout (`unet/`, `vae/`, `text_encoder/`, ...), safetensors only, key and shape checks that say exactly
what differs, and weights assigned into modules built on the meta device, cast tensor by tensor, so a
second copy of a network is never held.
"""
import json
import os

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError)
from safetensors import SafetensorError, safe_open


class LoadError(Exception):
    """A weight or config file that cannot be used; the message is one line meant for the user."""


class MissingFile(LoadError):
    """The repo or directory is there but has no such file."""


def key_listing(keys, most=5):
    keys = sorted(keys)
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def check_state_dict(model, state, what="checkpoint"):
    """Raise LoadError unless `state` has exactly the keys and shapes of `model.state_dict()`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in sorted(expected.keys() & state.keys())
             if tuple(state[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {key_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {key_listing(unexpected)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches: {'; '.join(wrong[:3])}")
    if problems:
        raise LoadError(f"{what} does not match {type(model).__name__}: " + "; ".join(problems))


def load_weights(model, state, what="checkpoint", dtype=None):
    """Check, then load `state` into `model` by assignment (works for modules on the meta device);
    floating tensors are cast to `dtype` when given. Returns the model."""
    check_state_dict(model, state, what)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def read_safetensors(path, dtype=None):
    """The tensors of one safetensors file (floating ones cast to `dtype` one at a time), or a
    LoadError naming the file."""
    if not os.path.isfile(path):
        raise LoadError(f"weight file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()} if dtype is None else {
                k: t.to(dtype) if t.is_floating_point() else t for k in f.keys() for t in [f.get_tensor(k)]}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"cannot read {path} (corrupt or truncated safetensors file?): {e}") from None
    return tensors


def read_tensors(path):
    """A state dict from a .safetensors file, or from a torch pickle (.pth, .pt, .bin) of the
    official releases read with torch's weights-only loader, which rebuilds tensors and nothing else."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if not os.path.isfile(path):
        raise LoadError(f"weight file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a bad pickle surfaces as UnpicklingError, RuntimeError, EOFError, ...
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path} is not a state dict of tensors")
    return state


def fetch(model, path):
    """The local path of `path` inside `model`: a directory in the Hugging Face repo layout, or a Hub
    repo id (downloaded once into the Hugging Face cache; HF_HUB_OFFLINE=1 uses the cache only)."""
    if os.path.isdir(model):
        full = os.path.join(model, path)
        if not os.path.isfile(full):
            raise MissingFile(f"{full} not found (a local --model directory needs the Hugging Face repo layout)")
        return full
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LoadError(f"model directory {model} not found")
    try:
        return hf_hub_download(model, path)
    except LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise LoadError(f"cannot fetch {path} from the Hugging Face repo {model}: not in the local cache and the "
                        f"Hub is unreachable{offline}; download the repo elsewhere and pass its directory "
                        f"with --model DIR") from None
    except RepositoryNotFoundError:
        raise LoadError(f"Hugging Face repo {model} not found (a gated or private repo needs `hf auth login`)") from None
    except EntryNotFoundError:
        raise MissingFile(f"the Hugging Face repo {model} has no file {path}") from None
    except HfHubHTTPError as e:
        raise LoadError(f"cannot fetch {path} from the Hugging Face repo {model}: {e}") from None


def fetch_file(spec):
    """A single file: a local path, or `owner/repo/path/in/repo` on the Hugging Face Hub (e.g. the
    official `gudaochangsheng/WaDi/rotated_unet-sdv1-5.safetensors`)."""
    if os.path.isfile(spec) or spec.count("/") < 2 or spec.startswith((".", "/", "~")):
        if not os.path.isfile(spec):
            raise LoadError(f"file not found: {spec}")
        return spec
    owner, repo, path = spec.split("/", 2)
    return fetch(f"{owner}/{repo}", path)


def read_weights(model, component, dtype=None, variant=None):
    """The state dict of one component (`unet`, `vae`, `text_encoder`, ...; "" for a repo that is one model at
    its root, as a ControlNet's) of a repo, from safetensors only (never pickles): diffusers' or transformers'
    file name, optionally the `variant` (e.g. fp16) first, single-file or sharded with an index."""
    stems = ("diffusion_pytorch_model", "model")
    names = [f"{s}.{variant}.safetensors" for s in stems if variant] + [f"{s}.safetensors" for s in stems]
    names += [n + ".index.json" for n in names]
    folder = f"{component}/" if component else ""
    for name in names:
        try:
            path = fetch(model, folder + name)
        except MissingFile:
            continue
        if not name.endswith(".json"):
            return read_safetensors(path, dtype)
        shards = sorted(set(read_json(path)["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors(fetch(model, folder + shard),
                                                                          dtype).items()}
    raise LoadError(f"no safetensors weights for {component or 'the model'} in {model} (looked for "
                    f"{', '.join(folder + n for n in names[:2])}, ...)")


def load_component(cls, model, component, dtype=None, device="cpu", rename=None):
    """Build `cls.from_config(<component>/config.json)` on the meta device and load its weights
    (optionally passed through `rename` first); frozen, in eval mode, on `device`."""
    cfg = read_json(fetch(model, f"{component}/config.json"))
    with torch.device("meta"):
        net = cls.from_config(cfg)
    state = read_weights(model, component, dtype)
    load_weights(net, rename(state) if rename else state, what=f"{model}/{component}")
    return net.to(device).eval().requires_grad_(False)


def read_json(path):
    """A JSON file, or a LoadError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"cannot parse {path}: {e}") from None
