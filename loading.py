"""Checkpoint loading in one place: safetensors files in, key and shape checks that say exactly what
differs, weights assigned into modules built on the meta device (so no second copy is ever held).
"""
import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file


class LoadError(Exception):
    """A weight or config file that cannot be used; the message is one line meant for the user."""


def _listing(keys, most=5):
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
        problems.append(f"{len(missing)} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
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


def read_safetensors(path, device="cpu"):
    """The tensors of one safetensors file, or a LoadError naming the file."""
    if not os.path.isfile(path):
        raise LoadError(f"weight file not found: {path}")
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise LoadError(f"cannot read {path} (corrupt or truncated safetensors file?): {e}") from None


def read_json(path):
    """A JSON file, or a LoadError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"cannot parse {path}: {e}") from None
