"""Prompt embeddings computed once and kept on disk. PixArt's T5 XXL encoder (4.76B parameters,
9.5 GB in bf16) is too large to keep beside training, so `train`, `sample` and `evaluate.py` encode
their prompt list once with it, free it, and read the embeddings from here; a later run (and every
epoch) with the same prompts, tokenizer and encoder does not build T5 at all. PixArt-alpha
precomputes its T5 features offline too (`tools/extract_features.py` in
github.com/PixArt-alpha/PixArt-alpha: one .npz per caption, padded to 120 tokens, fp32); this makes
that step part of the command (docs/pixart.md).

A cache is a directory `<cache dir>/prompts/<key>/`; the key (`cache_key`) is a sha256 of
everything the embeddings depend on: the encoder's config and weight files, the tokenizer file, the
token length, the dtype, the prompt list in order and ENCODER_VERSION. Inside:
- `part-N.bin`: the embeddings of the valid tokens (the mask's ones, eos included) of prompts
  N, N + parts, N + 2 parts, ..., one (n_i, D) block after another, raw in the encoder's dtype
  (read memory-mapped);
- `offsets-N.npy`: int64 (count + 1,), where each of those blocks starts in the part, in tokens;
- `meta.json`: count, parts, dim, dtype, max_length.
Padding is not stored: `lookup` pads with zeros to max_length and masks them, and the denoiser's
masked cross-attention gives them a weight of exactly 0 (layers.mask_bias).

Writing is resumable. Under torchrun rank N encodes part N (parts = the world size, 1 without
torchrun) in the work directory `<key>.work-<parts>/` (the world size fixes the split, so it is in
the name), a chunk of about `chunk` prompts at a time: the chunk's tokens are appended to the part
and synced, then the offsets so far replace `offsets-N.npy` (written to a temporary name and
renamed). `offsets-N.npy` thus always describes a finished prefix of its part; a run killed,
crashed or stopped by a full disk leaves it, and a rerun cuts what follows it off the part and
encodes only the rest. When every part is done rank 0 writes `meta.json` and renames the work
directory to the cache: a cache is complete or absent. Rank 0 holds `<key>.lock` meanwhile (flock:
the kernel releases it when the process ends, killed or not); another run of the same key stops
with a one-line error naming the holder instead of writing into the same files. Holding it, rank 0
removes what cannot be reused, in one log line: other world sizes' work directories and the
`<key>.tmp-<host>-<pid>/` directories of earlier versions.

Disk: D x the dtype's bytes per valid token (T5 XXL in bf16: 8 KiB) and 8 bytes per prompt; the
30k COCO-2014 captions average 14.6 tokens, 0.12 MB (docs/pixart.md, bench/textcache_size.py).
"""
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from diffusion import Text
from loading import FULL_DISK, LoadError, read_json, size_text

# the version of the code that computes the embeddings, in every key: 2 since T5 in float16 keeps
# its `wo` in float32 (t5.py); float16 caches written before hold ruined embeddings, never read
ENCODER_VERSION = 2
SAMPLE_BYTES = 2 ** 20  # a weight file's fingerprint reads this much at its start and at its end
NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # e.g. Lustre mounted without -o flock


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


def write(path, prompts, encode, dim, dtype, max_length, batch_size=64, rank=0, world=1,
          chunk=4096):
    """Encode `prompts` (`encode(list) -> Text`, (B, L, dim) in `dtype` with masks) into a cache
    at `path`, resuming what a stopped run of the same key and world size left: this process
    takes the prompts rank::world, in batches, kept every `chunk` prompts (rounded to whole
    batches, so that a resumed run encodes the batches an uninterrupted one would), with a
    progress bar on rank 0. Every rank calls it (it waits for all of them); a cache that another
    run completed meanwhile is kept. A LoadError on rank 0 when another run writes the same cache
    (torchrun then stops the other ranks), and on a rank that meets a full disk."""
    work, row, mine = f"{path}.work-{world}", dim * dtype.itemsize, prompts[rank::world]
    lock = None
    try:
        if rank == 0:
            lock = _lock(path)
            complete = os.path.isfile(os.path.join(path, "meta.json"))
            _remove_leftovers(path, keep=None if complete else work)
        if not exists(path, world):  # rank 0's answer, after its clean-up
            os.makedirs(work, exist_ok=True)
            _write_part(work, mine, encode, dtype, row, batch_size, chunk, rank)
            _sync(world)
            if rank == 0:
                meta = {"count": len(prompts), "parts": world, "dim": dim,
                        "dtype": str(dtype).removeprefix("torch."), "max_length": max_length}
                with open(os.path.join(work, "meta.json"), "w") as f:
                    json.dump(meta, f)
                os.rename(work, path)
        if lock is not None:
            os.unlink(lock.name)  # the cache is complete: whoever takes a lock next finds it
    except OSError as e:
        if e.errno not in FULL_DISK:
            raise
        raise LoadError(_full_disk(work, len(mine), row, max_length, rank)) from None
    finally:
        if lock is not None:
            lock.close()
    _sync(world)


def _lock(path):
    """`<path>.lock`, open and flock-ed, holding this host and pid; a LoadError naming the holder
    when another process holds it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    f = open(f"{path}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise LoadError(f"the prompt cache {path} is being written by {holder}; rerun when that "
                        f"run has finished (this one then reads the cache, or resumes what that "
                        f"one left)") from None
    except OSError as e:
        if e.errno not in NO_FLOCK:
            raise
        print(f"warning: no file locks in {os.path.dirname(path)} ({e.strerror}): two runs must "
              f"not encode the same prompts at once", file=sys.stderr)
    f.truncate(0)
    f.write(f"{socket.gethostname()} pid {os.getpid()}\n")
    f.flush()
    return f


def _remove_leftovers(path, keep):
    """Remove this key's work and temporary directories other than `keep`, in one log line."""
    parent, base = os.path.split(path)
    gone = sorted(name for name in os.listdir(parent)
                  if name.startswith((f"{base}.work-", f"{base}.tmp-"))
                  and os.path.join(parent, name) != keep)
    for name in gone:
        shutil.rmtree(os.path.join(parent, name))
    if gone:
        print(f"prompt cache: removed {len(gone)} partial caches that cannot be reused: "
              f"{', '.join(gone)}", file=sys.stderr)


def _write_part(work, mine, encode, dtype, row, batch_size, chunk, rank):
    """Encode `mine` into `part-<rank>.bin` (`row` bytes per token) after the prompts that
    `offsets-<rank>.npy` keeps, cutting whatever follows them off the part first; keep them every
    `chunk` prompts and at the end."""
    part = os.path.join(work, f"part-{rank}.bin")
    offsets_file = os.path.join(work, f"offsets-{rank}.npy")
    word = torch.int16 if dtype.itemsize == 2 else torch.int32  # raw bits: numpy has no bfloat16
    offsets = np.load(offsets_file).tolist() if os.path.isfile(offsets_file) else [0]
    size = os.path.getsize(part) if os.path.isfile(part) else 0
    kept = offsets[-1] * row
    if size:
        dropped = f", dropping {size - kept} bytes of an unfinished chunk" if size > kept else ""
        print(f"prompt cache: part {rank} resumes after {len(offsets) - 1} of {len(mine)} "
              f"prompts{dropped}", file=sys.stderr)
    every, done = max(1, chunk // batch_size) * batch_size, len(offsets) - 1
    with open(part, "ab") as f:
        f.truncate(kept)
        for start in tqdm(range(done, len(mine), batch_size), desc="encode prompts", unit="batch",
                          disable=rank != 0):
            text = encode(mine[start:start + batch_size])
            valid = text.embeds[text.mask.bool()].to("cpu", dtype).contiguous()  # (tokens, D)
            f.write(valid.view(word).numpy().tobytes())
            offsets.extend((offsets[-1] + text.mask.sum(1).cumsum(0)).tolist())
            if len(offsets) - 1 - done >= every:
                done = _keep(f, offsets, offsets_file)
        _keep(f, offsets, offsets_file)


def _keep(f, offsets, offsets_file):
    """Keep what the part file `f` holds: its tokens to disk first, then `offsets` replace the
    offsets file at once. The number of prompts kept."""
    f.flush()
    os.fsync(f.fileno())
    with open(f"{offsets_file}.tmp", "wb") as g:
        np.save(g, np.array(offsets, dtype=np.int64))
    os.replace(f"{offsets_file}.tmp", offsets_file)
    return len(offsets) - 1


def _full_disk(work, count, row, max_length, rank):
    """The message for a full disk met while part `rank` (`count` prompts, `row` bytes per token)
    was being written: the space the rest needs at the tokens per prompt kept so far (at most
    max_length before any), and the free space."""
    file = os.path.join(work, f"offsets-{rank}.npy")
    offsets = np.load(file) if os.path.isfile(file) else np.zeros(1, np.int64)
    done = len(offsets) - 1
    tokens = offsets[-1] / done if done else max_length  # per prompt
    where = work
    while not os.path.isdir(where):  # a full disk may have stopped the directories too
        where = os.path.dirname(where)
    need, free = (count - done) * (tokens * row + 8), shutil.disk_usage(where).free
    return (f"disk full writing the prompt cache {work}: about {size_text(need)} more needed for the "
            f"{count - done:,} prompts left of part {rank} ({tokens:.1f} tokens of {row} bytes "
            f"per prompt {'so far' if done else 'at most'}), {size_text(free)} free; the {done:,} "
            f"prompts done are kept and a rerun resumes after them")


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
