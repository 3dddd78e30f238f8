"""Prompt embeddings computed once and kept on disk. PixArt's T5 XXL encoder (4.76B parameters,
9.5 GB in bf16) must never be resident beside training (docs/pixart.md), so `train`, `sample` and
`evaluate.py` encode their prompt list once with it, free it, and read the embeddings from here; a
later run (and every epoch) with the same prompts, tokenizer and encoder does not build T5 at all.
The official code precomputes its T5 embeddings offline too, as PixArt-alpha's training does (its
`tools/extract_features.py`); this makes that step part of the command.

A cache is a directory `<cache dir>/prompts/<key>/`; the key (`cache_key`) is a sha256 of everything
the embeddings depend on: the encoder's config and weight files, the tokenizer file, the token
length, the dtype, the prompt list in order and ENCODER_VERSION, the version of the code that
computes them. Inside:
- `part-N.bin`: the embeddings of the valid tokens (the mask's ones, eos included) of prompts N,
  N + parts, N + 2 parts, ..., one (n_i, D) block after another, raw in the encoder's dtype (read
  memory-mapped);
- `offsets-N.npy`: int64 (count + 1,), where each of those blocks starts in the part, in tokens;
- `meta.json`: count, parts, dim, dtype, max_length.
Padding is not stored: `lookup` pads with zeros to max_length and masks them, and the denoiser's
masked cross-attention gives them a weight of exactly 0 (layers.mask_bias). Under torchrun rank N
writes part N; everything goes to a temporary directory renamed when whole, so a cache is complete
or absent. Disk: D x the dtype's bytes per valid token (T5 XXL in bf16 or fp16: 8 KiB, about 0.1 MB
for a 12-token COCO caption, 0.3 MB for a 40-token JourneyDB one).
"""
import hashlib
import json
import os
import shutil
import socket

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from diffusion import Text
from loading import read_json

SAMPLE_BYTES = 2 ** 20  # a weight file's fingerprint reads this much at its start and at its end
# in every key: raised when the same files give other embeddings, so that older caches are not read
# (2: T5 in float16 keeps its `wo` float32; the float16 caches of version 1 hold ruined embeddings)
ENCODER_VERSION = 2


def file_fingerprint(path):
    """A cheap content fingerprint of a (large) file: its size and the sha256 of its first and last
    MiB (a re-saved or fine-tuned weight file differs there; no 19 GB read)."""
    size = os.path.getsize(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(SAMPLE_BYTES))
        f.seek(max(size - SAMPLE_BYTES, 0))
        h.update(f.read(SAMPLE_BYTES))
    return f"{size}:{h.hexdigest()}"


def cache_key(files, prompts, dtype, max_length):
    """The cache key (hex): ENCODER_VERSION, `files` (the encoder's config and weights, the
    tokenizer model) by `file_fingerprint`, the dtype, the token length and the prompts in
    order."""
    fingerprints = [file_fingerprint(p) for p in files]
    h = hashlib.sha256(json.dumps([ENCODER_VERSION, fingerprints, str(dtype), max_length]).encode())
    for prompt in prompts:
        h.update(json.dumps(prompt).encode() + b"\n")
    return h.hexdigest()


def cache_path(cache_dir, key):
    return os.path.join(cache_dir, "prompts", key[:32])


def _sync(world):
    if world > 1:
        dist.barrier()


def exists(path, world=1):
    """Whether the cache at `path` is complete, as rank 0 sees it (every rank gets rank 0's
    answer)."""
    answer = [os.path.isfile(os.path.join(path, "meta.json"))]
    if world > 1:
        dist.broadcast_object_list(answer, src=0)
    return answer[0]


def write(path, prompts, encode, dim, dtype, max_length, batch_size=64, rank=0, world=1):
    """Encode `prompts` (`encode(list) -> Text`, (B, L, dim) in `dtype` with masks) into a cache at
    `path`: this process takes the prompts rank::world, in batches, with a progress bar on rank 0.
    Every rank calls it (it waits for all of them); a cache that another run completed meanwhile is
    kept."""
    # one temporary directory for the whole torchrun job
    tag = [f"{socket.gethostname()}-{os.getpid()}"]
    if world > 1:
        dist.broadcast_object_list(tag, src=0)
    tmp = f"{path}.tmp-{tag[0]}"
    os.makedirs(tmp, exist_ok=True)
    word = torch.int16 if dtype.itemsize == 2 else torch.int32  # raw bits: numpy has no bfloat16
    mine = prompts[rank::world]
    offsets = [0]
    with open(os.path.join(tmp, f"part-{rank}.bin"), "wb") as f:
        for start in tqdm(range(0, len(mine), batch_size), desc="encode prompts", unit="batch",
                          disable=rank != 0):
            text = encode(mine[start:start + batch_size])
            # (tokens, D), prompt after prompt
            valid = text.embeds[text.mask.bool()].to("cpu", dtype).contiguous()
            f.write(valid.view(word).numpy().tobytes())
            offsets.extend((offsets[-1] + text.mask.sum(1).cumsum(0)).tolist())
    np.save(os.path.join(tmp, f"offsets-{rank}.npy"), np.array(offsets, dtype=np.int64))
    _sync(world)
    if rank == 0:
        meta = {"count": len(prompts), "parts": world, "dim": dim,
                "dtype": str(dtype).removeprefix("torch."), "max_length": max_length}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, path)
        except OSError:  # another run finished the same cache first: keep that one
            shutil.rmtree(tmp)
    _sync(world)


class PromptCache:
    """A complete cache opened for reading: `lookup(prompts)` gives the embeddings of any prompts of
    the list it was built from."""

    def __init__(self, path, prompts):
        meta = read_json(os.path.join(path, "meta.json"))
        self.dtype = getattr(torch, meta["dtype"])
        self.dim, self.parts, self.max_length = meta["dim"], meta["parts"], meta["max_length"]
        self.rows = {p: i for i, p in enumerate(prompts)}
        word = np.int16 if self.dtype.itemsize == 2 else np.int32
        files = [os.path.join(path, f"part-{n}.bin") for n in range(self.parts)]
        # a rank with no prompts wrote an empty part
        self.tokens = [np.memmap(f, dtype=word, mode="r").reshape(-1, self.dim)
                       if os.path.getsize(f) else np.zeros((0, self.dim), word) for f in files]
        self.offsets = [np.load(os.path.join(path, f"offsets-{n}.npy")) for n in range(self.parts)]

    def __contains__(self, prompt):
        return prompt in self.rows

    def lookup(self, prompts):
        """Text: embeds (B, max_length, D) in the cache's dtype, zero after each prompt's tokens,
        and the mask (B, max_length), on the CPU. A KeyError for a prompt the cache does not
        hold."""
        embeds = torch.zeros(len(prompts), self.max_length, self.dim, dtype=self.dtype)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            i = self.rows[prompt]
            part, j = i % self.parts, i // self.parts
            start, end = self.offsets[part][j:j + 2]
            tokens = torch.from_numpy(np.array(self.tokens[part][start:end]))
            embeds[b, :end - start] = tokens.view(self.dtype)
            mask[b, :end - start] = 1
        return Text(embeds, mask)
