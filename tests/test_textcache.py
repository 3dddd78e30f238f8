"""textcache.py's keys: they change with ENCODER_VERSION, the version of the code that computes the
embeddings, so a prompt cache written by an older encoder is never read."""
import hashlib
import json

import torch

import textcache


def test_caches_of_the_old_float16_t5_are_not_read(tmp_path):
    """Before ENCODER_VERSION 2 a float16 T5 ran its `wo` in float16 and wrote ruined embeddings,
    keyed by [fingerprints, dtype, max_length] and the prompts: no key today is such a key."""
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    files, prompts = [str(weights)], ["a cat", ""]
    old = hashlib.sha256(json.dumps([[textcache.file_fingerprint(files[0])], "torch.float16",
                                     120]).encode())
    for prompt in prompts:
        old.update(json.dumps(prompt).encode() + b"\n")
    new = textcache.cache_key(files, prompts, torch.float16, 120)
    assert textcache.cache_path("cache", new) != textcache.cache_path("cache", old.hexdigest())
    assert new == textcache.cache_key(files, prompts, torch.float16, 120)  # stable
