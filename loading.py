"""Checkpoint loading in one place: files from a Hugging Face repo or a local directory in the
same layout (`unet/`, `vae/`, `text_encoder/`, ...), safetensors only, key and shape checks that say
exactly what differs, and weights assigned into modules built on the meta device, cast tensor by
tensor (modules a network keeps in float32 excepted, `cast_weight`), so a second copy of a network
is never held.
"""
import contextlib
import errno
import functools
import json
import os
import shutil
import socket
from urllib.parse import urlparse

import torch
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError)
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from layers import kept_in_fp32

# what read_tensors accepts, for messages
WEIGHT_FORMATS = ("safetensors, or a PyTorch state dict (.bin, .pt, .pth) read with the "
                  "weights-only loader")


class LoadError(Exception):
    """A weight or config file that cannot be used; the message is one line meant for the user."""


class MissingFile(LoadError):
    """The repo or directory is there but has no such file."""


FULL_DISK = (errno.ENOSPC, errno.EDQUOT)  # the OSErrors of a full disk (or a full quota)


class DiskFull(LoadError):
    """A file could not be written for want of disk space; the message says where, how much the file
    needs (when known) and how much is free. Whatever was being written was removed."""

    def __init__(self, path, need=None):
        folder = os.path.dirname(os.path.abspath(path))
        while not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        free = shutil.disk_usage(folder).free
        needs = f"it needs {size_text(need)}, " if need else ""
        super().__init__(f"no space left on the disk of {path}: {needs}{size_text(free)} free")


@contextlib.contextmanager
def disk_space(path, need=None):
    """Inside the block, an OSError of a full disk while writing `path` becomes a DiskFull."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise DiskFull(path, need) from None


def size_text(n):
    """`n` bytes for a message, in powers of 1000."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def key_listing(keys, most=5):
    keys = sorted(keys)
    more = f" (+{len(keys) - most} more)" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def check_state_dict(model, state, what="checkpoint"):
    """Raise LoadError unless `state` has exactly the keys and shapes of `model.state_dict()`."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    shared = sorted(expected.keys() & state.keys())
    wrong = [f"{k} {tuple(state[k].shape)} != {expected[k]}" for k in shared
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


def cast_weight(tensor, dtype, network=None, key=""):
    """`tensor`, the state-dict entry `key` of `network`, as the network holds it in `dtype`:
    floating tensors in `dtype`, or in float32 where the network keeps them so
    (`layers.kept_in_fp32`: T5's `wo` in float16); other tensors, and any when dtype is None, as
    they are."""
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(torch.float32 if kept_in_fp32(network, key, dtype) else dtype)


def load_weights(model, state, what="checkpoint", dtype=None):
    """Check, then load `state` into `model` by assignment (works for modules on the meta device);
    floating tensors are cast to `dtype` when given (`cast_weight`). Returns the model."""
    check_state_dict(model, state, what)
    state = {k: cast_weight(v, dtype, model, k) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def read_safetensors(path, dtype=None, network=None):
    """The tensors of one safetensors file, floating ones cast one at a time to `dtype` as
    `network` (the class they are for, if any) holds them (`cast_weight`), or a LoadError naming the
    file."""
    if not os.path.isfile(path):
        raise LoadError(f"weight file not found: {path}")
    with open_safetensors(path) as f:
        return {k: cast_weight(f.get_tensor(k), dtype, network, k) for k in f.keys()}


@contextlib.contextmanager
def open_safetensors(path):
    """safetensors' safe_open, with a corrupt or truncated file as a LoadError naming it."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"cannot read {path} (corrupt or truncated safetensors file?): "
                        f"{e}") from None


def save_tensors(tensors, path, metadata=None):
    """Write a state dict as a safetensors file: contiguous CPU copies, string `metadata` (sorted by
    key: the same tensors and metadata give the same bytes, `sort_metadata`), written
    to a temporary file and renamed (a crash leaves the old file or the new one, never half of one),
    with the permissions of the user's umask like any other output (safetensors itself creates files
    0600). A full disk is a DiskFull, with the partial file removed."""
    tmp = f"{path}.tmp"
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        with disk_space(path, sum(t.numel() * t.element_size() for t in tensors.values())):
            save_file(tensors, tmp, metadata={k: str(v) for k, v in metadata.items()} if metadata
                      else None)
            sort_metadata(tmp)
    except DiskFull:
        if os.path.exists(tmp):  # what could be written of it only takes space
            os.remove(tmp)
        raise
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def sort_metadata(path):
    """Rewrite a safetensors header with its metadata sorted by key, in place. safetensors writes the
    metadata in the order of a hash map, which differs from process to process, so two files of the
    same tensors and metadata would differ in their bytes (and their hashes). The header keeps its
    length: the same entries in another order, padded with spaces as safetensors pads it."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(text) <= size, "a sorted safetensors header came out longer"
        f.seek(8)
        f.write(text.ljust(size))


def weight_format(path):
    """"safetensors", "pickle" (a torch.save file: a zip archive or a legacy pickle) or None, from
    the first bytes of the file rather than its name."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 0:
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    return None


def read_tensors(path, key=None, mmap=False):
    """A state dict from a safetensors file, or from a torch pickle (.pth, .pt, .bin: the official
    releases, DMD2's students) read with torch's weights-only loader, which rebuilds tensors and
    nothing else. The format is told by the file's content; anything else is a LoadError naming the
    formats. With `key`, a pickled dict that has this entry (a training checkpoint such as
    open_clip's and the HPS v2 releases': {"state_dict": ..., "epoch": ...}) gives the state dict in
    that entry. With `mmap`, a pickle's tensors stay in the file, memory-mapped, until used (torch's
    zip format, the default since torch 1.6; older files are read whole)."""
    if not os.path.isfile(path):
        raise LoadError(f"weight file not found: {path}")
    kind = weight_format(path)
    if kind == "safetensors":
        return read_safetensors(path)
    if kind is None:
        raise LoadError(f"cannot read {path}: neither {WEIGHT_FORMATS} (corrupt or truncated?)")
    try:
        if mmap:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap can only be used" not in str(e):
                    raise
                mmap = False
        if not mmap:
            # a file object: torch must not guess the format from the name
            with open(path, "rb") as f:
                state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a bad pickle surfaces as UnpicklingError, RuntimeError, EOFError, ...
        message = " ".join(str(e).split())
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {message}") from None
    if key is not None and isinstance(state, dict) and key in state:
        state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"{path} is not a state dict of tensors")
    return state


def file_metadata(path):
    """The string metadata of a safetensors file ({} for a pickle, which has none)."""
    if weight_format(path) != "safetensors":
        return {}
    with open_safetensors(path) as f:
        return f.metadata() or {}


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout=3.0):
    """Whether the Hugging Face endpoint answers a TCP connection within `timeout` seconds (asked
    once per process). huggingface_hub retries an unreachable Hub for about half a minute with a
    line per try; when this is False, downloads use the local cache only and fail at once."""
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch(model, path, hint="pass its directory with --model DIR"):
    """The local path of `path` inside `model`: a directory in the Hugging Face repo layout, or a
    Hub repo id (downloaded once into the Hugging Face cache; HF_HUB_OFFLINE=1, or a Hub that does
    not answer, uses the cache only). `hint` ends the message when the Hub cannot be reached: how
    the user passes a local copy instead."""
    if os.path.isdir(model):
        full = os.path.join(model, path)
        if not os.path.isfile(full):
            raise MissingFile(f"{full} not found (a local model directory needs the Hugging Face "
                              f"repo layout)")
        return full
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise LoadError(f"model directory {model} not found")
    offline = constants.HF_HUB_OFFLINE or not hub_reachable()
    try:
        return hf_hub_download(model, path, local_files_only=offline)
    except LocalEntryNotFoundError:
        why = ("HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE
               else f"{constants.ENDPOINT} is unreachable")
        raise LoadError(f"cannot fetch {path} from the Hugging Face repo {model}: not in the local "
                        f"cache and {why}; download it elsewhere and {hint}") from None
    except RepositoryNotFoundError:
        raise LoadError(f"Hugging Face repo {model} not found (a gated or private repo needs "
                        f"`hf auth login`)") from None
    except EntryNotFoundError:
        raise MissingFile(f"the Hugging Face repo {model} has no file {path}") from None
    except HfHubHTTPError as e:
        raise LoadError(f"cannot fetch {path} from the Hugging Face repo {model}: {e}") from None


def fetch_first(model, names, what="weights"):
    """The local path of the first of `names` that `model` (a directory or Hub repo) holds; a
    LoadError naming them all when it holds none."""
    for name in names:
        try:
            return fetch(model, name)
        except MissingFile:
            continue
    raise LoadError(f"no {what} in {model} (looked for {', '.join(names)})")


def fetch_file(spec, option):
    """A single file named by the command-line `option` (e.g. "--unet"): a local path, a `wadi.py
    train` run directory (its merged student.safetensors), or `owner/repo/path/in/repo` on the
    Hugging Face Hub (e.g. the official `gudaochangsheng/WaDi/rotated_unet-sdv1-5.safetensors`)."""
    if os.path.isdir(spec):
        student = os.path.join(spec, "student.safetensors")
        if os.path.isfile(student):
            return student
        if os.path.isfile(os.path.join(spec, "run.json")):
            raise LoadError(f"{option} {spec}: the run is unfinished (no student.safetensors yet); "
                            f"`wadi.py export --run {spec} --out FILE` merges its last checkpoint")
        raise LoadError(f"{option} {spec} is a directory, not a weight file (nor a train run: it "
                        f"has no student.safetensors)")
    if os.path.isfile(spec) or spec.count("/") < 2 or spec.startswith((".", "/", "~")):
        if not os.path.isfile(spec):
            raise LoadError(f"{option}: file not found: {spec}")
        return spec
    owner, repo, path = spec.split("/", 2)
    try:
        return fetch(f"{owner}/{repo}", path, hint=f"pass the local file to {option}")
    except LoadError as e:
        raise type(e)(f"{option}: {e}") from None


def weight_files(model, component, variant=None):
    """The local paths of one component's (`unet`, `vae`, `text_encoder`, ...; "" for a repo that is
    one model at its root, as a ControlNet's) safetensors weights in a repo (never pickles):
    diffusers' or transformers' file name, optionally the `variant` (e.g. fp16) first, one file or
    the shards an index names."""
    stems = ("diffusion_pytorch_model", "model")
    names = [f"{s}.{variant}.safetensors" for s in stems if variant]
    names += [f"{s}.safetensors" for s in stems]
    names += [n + ".index.json" for n in names]
    folder = f"{component}/" if component else ""
    for name in names:
        try:
            path = fetch(model, folder + name)
        except MissingFile:
            continue
        if not name.endswith(".json"):
            return [path]
        index = read_json(path)
        if not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
            raise LoadError(f"{path} is a sharded-weights index without a weight_map "
                            f"(key -> shard file)")
        return [fetch(model, folder + shard) for shard in sorted(set(index["weight_map"].values()))]
    raise LoadError(f"no safetensors weights for {component or 'the model'} in {model} (looked for "
                    f"{', '.join(folder + n for n in names[:2])}, ...)")


def read_weights(model, component, dtype=None, variant=None, network=None):
    """The state dict of one component of a repo (`weight_files`), floating tensors cast to `dtype`
    as `network` (the class they are for, if any) holds them (`cast_weight`)."""
    return {k: v for path in weight_files(model, component, variant)
            for k, v in read_safetensors(path, dtype, network).items()}


def load_component(cls, model, component, dtype=None, device="cpu", rename=None):
    """Build `cls.from_config(<component>/config.json)` on the meta device and load its weights
    (optionally passed through `rename` first), in `dtype` but for the modules the network keeps in
    float32 (`cast_weight`); frozen, in eval mode, on `device`."""
    path = fetch(model, f"{component}/config.json")
    with torch.device("meta"):
        net = build(cls, read_json(path), path)
    state = read_weights(model, component, dtype, network=cls)
    load_weights(net, rename(state) if rename else state, what=f"{model}/{component}")
    return net.to(device).eval().requires_grad_(False)


def build(cls, cfg, what):
    """`cls.from_config(cfg)`, with a config value the class does not implement as a LoadError
    naming the config (`what`) instead of a ValueError."""
    try:
        return cls.from_config(cfg)
    except ValueError as e:
        raise LoadError(f"{what}: {e}") from None


def read_json(path):
    """A JSON file, or a LoadError naming it."""
    try:
        # as editors save it: a byte-order mark is no error
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        raise LoadError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot parse {path}: {e}") from None


def write_json(path, obj):
    """Write `obj` as indented JSON (its folder made first), under a temporary name and then renamed,
    so the file is whole or absent."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(f"{path}.tmp", path)
