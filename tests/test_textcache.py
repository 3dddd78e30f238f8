"""textcache.py's writing at scale, with a fake T5: a run killed (SIGKILL) or stopped by a full
disk resumes from its last kept chunk, encodes only the rest and gives a cache identical byte for
byte to an uninterrupted one; a full disk is one line with the numbers; leftovers that cannot be
reused are removed, a live writer's are not; under torchrun each rank resumes its own part."""
import errno
import fcntl
import filecmp
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import namedtuple

import pytest
import torch

import textcache
from diffusion import Text
from loading import LoadError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"prompt {i}" for i in range(20)]
DIM, MAX_LENGTH = 8, 12
ROW = DIM * 2  # bytes per token in bf16


class FakeT5:
    """`encode` for textcache.write: prompt i has i % 5 + 1 valid tokens, whose values (and the
    padding's, which must not be stored) come from i; `batches` records every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, batch):
        self.batches.append(list(batch))
        index = torch.tensor([int(p.split()[1]) for p in batch])
        values = torch.arange(MAX_LENGTH * DIM).view(1, MAX_LENGTH, DIM) / 64
        embeds = index.view(-1, 1, 1) + values
        mask = (torch.arange(MAX_LENGTH) < (index % 5 + 1).view(-1, 1)).long()
        return Text(embeds.to(torch.bfloat16), mask)


class Killed(Exception):
    """A job killed at this point."""


def write(path, encode, rank=0, world=1):
    textcache.write(str(path), PROMPTS, encode, DIM, torch.bfloat16, MAX_LENGTH, batch_size=2,
                    rank=rank, world=world, chunk=4)


def same_files(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def batches(start, stop, step=1):
    """The batches of 2 an uninterrupted write encodes for PROMPTS[start:stop:step]."""
    share = PROMPTS[start:stop:step]
    return [share[i:i + 2] for i in range(0, len(share), 2)]


@pytest.fixture
def whole(tmp_path):
    """An uninterrupted one-process cache."""
    write(tmp_path / "whole", FakeT5())
    return tmp_path / "whole"


def test_a_cache_holds_the_valid_tokens_exactly(whole):
    text = textcache.PromptCache(str(whole), PROMPTS).lookup(PROMPTS[::-1])
    want = FakeT5()(PROMPTS[::-1])
    assert torch.equal(text.mask, want.mask) and text.mask[12].sum() == 3  # prompt 7
    assert torch.equal(text.embeds[text.mask.bool()], want.embeds[want.mask.bool()])
    assert not text.embeds[~text.mask.bool()].any()
    assert os.path.getsize(whole / "part-0.bin") == sum(i % 5 + 1 for i in range(20)) * ROW == 960


def test_a_killed_run_resumes_after_its_last_kept_chunk(tmp_path, whole, capsys):
    path = tmp_path / "prompts" / "key"
    dies = (f"import os, signal, sys\nsys.path.insert(0, {ROOT!r})\n"
            f"from tests.test_textcache import FakeT5, write\n"
            f"class Dies(FakeT5):\n"
            f"    def __call__(self, batch):\n"
            f"        if len(self.batches) == 5:\n"
            f"            os.kill(os.getpid(), signal.SIGKILL)\n"
            f"        return super().__call__(batch)\n"
            f"write({str(path)!r}, Dies())\n")
    assert subprocess.run([sys.executable, "-c", dies], cwd=ROOT).returncode == -signal.SIGKILL
    work = f"{path}.work-1"
    assert not path.exists() and sorted(os.listdir(work)) == ["offsets-0.npy", "part-0.bin"]
    resumed = FakeT5()  # batches 1-4 were kept, by twos; the fifth was not
    write(path, resumed)
    assert resumed.batches == batches(8, 20)
    assert "prompt cache: part 0 resumes after 8 of 20 prompts\n" in capsys.readouterr().err
    assert same_files(whole, path) and sorted(os.listdir(path.parent)) == ["key"]


class FullDisk:
    """A file whose `full`-th write stores half its bytes, then fails as a full disk does."""

    def __init__(self, f, full):
        self.f, self.full, self.writes = f, full, 0

    def write(self, data):
        self.writes += 1
        if self.writes == self.full:
            self.f.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_is_one_line_with_the_numbers_and_the_rerun_completes(tmp_path, whole,
                                                                          monkeypatch, capsys):
    path = tmp_path / "prompts" / "key"
    real_open = open
    monkeypatch.setattr(textcache, "open", raising=False, value=lambda file, *a, **k: FullDisk(
        real_open(file, *a, **k), full=4) if file.endswith(".bin") else real_open(file, *a, **k))
    monkeypatch.setattr(textcache.shutil, "disk_usage",
                        lambda p: namedtuple("usage", "total used free")(10 ** 6, 10 ** 6, 1234))
    with pytest.raises(LoadError) as error:
        write(path, FakeT5())
    # kept: prompts 0-3, 10 tokens: 2.5 per prompt; left: 16 x (2.5 x 16 bytes + an 8-byte offset)
    assert str(error.value) == (
        f"disk full writing the prompt cache {path}.work-1: about 768 B more needed for the 16 "
        f"prompts left of part 0 (2.5 tokens of 16 bytes per prompt so far), 1.2 kB free; the 4 "
        f"prompts done are kept and a rerun resumes after them")
    monkeypatch.undo()
    resumed = FakeT5()
    write(path, resumed)
    assert resumed.batches == batches(4, 20)
    dropped = (5 + 1) * ROW + (2 + 3) * ROW // 2  # prompts 4, 5 and half of 6, 7: 136
    assert (f"prompt cache: part 0 resumes after 4 of 20 prompts, dropping {dropped} bytes of an "
            f"unfinished chunk\n") in capsys.readouterr().err
    assert same_files(whole, path)


def test_leftovers_that_cannot_be_reused_go_and_a_live_writer_is_left_alone(tmp_path, whole,
                                                                             capsys):
    prompts = tmp_path / "prompts"
    path = prompts / "key"
    for leftover in ("key.tmp-node3-977", "key.work-3", "other.work-3"):  # other: another key
        (prompts / leftover).mkdir(parents=True)
        (prompts / leftover / "part-0.bin").write_bytes(b"x" * 100)
    with open(f"{path}.lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("node7 pid 4242\n")
        holder.flush()
        with pytest.raises(LoadError) as error:
            write(path, FakeT5())
        assert str(error.value) == (
            f"the prompt cache {path} is being written by node7 pid 4242; rerun when that run has "
            f"finished (this one then reads the cache, or resumes what that one left)")
        assert sorted(os.listdir(prompts)) == ["key.lock", "key.tmp-node3-977", "key.work-3",
                                               "other.work-3"]
    encode = FakeT5()
    write(path, encode)
    assert len(encode.batches) == 10 and same_files(whole, path)
    assert ("prompt cache: removed 2 partial caches that cannot be reused: key.tmp-node3-977, "
            "key.work-3\n") in capsys.readouterr().err
    assert sorted(os.listdir(prompts)) == ["key", "other.work-3"]


def test_each_rank_resumes_its_own_part(tmp_path, whole, monkeypatch):
    """A two-process job, its ranks run one after the other: rank 1 is killed at its third batch,
    and rank 0, done with part 0, dies with the job at the barrier; the rerun encodes only rank 1's
    unkept prompts and equals an uninterrupted two-process job, and the one-process cache."""
    def killed():
        raise Killed
    monkeypatch.setattr(textcache.dist, "broadcast_object_list", lambda objects, src: None)
    monkeypatch.setattr(textcache.dist, "barrier", lambda: None)
    for rank in (1, 0):
        write(tmp_path / "two", FakeT5(), rank, world=2)

    class Dies(FakeT5):
        def __call__(self, batch):
            if len(self.batches) == 2:
                raise Killed
            return super().__call__(batch)
    path = tmp_path / "resumed"
    with pytest.raises(Killed):
        write(path, Dies(), rank=1, world=2)
    monkeypatch.setattr(textcache.dist, "barrier", killed)
    first = FakeT5()
    with pytest.raises(Killed):
        write(path, first, rank=0, world=2)
    assert first.batches == batches(0, 20, 2)
    monkeypatch.setattr(textcache.dist, "barrier", lambda: None)
    encoded = {rank: FakeT5() for rank in (1, 0)}
    for rank, encode in encoded.items():
        write(path, encode, rank, world=2)
    assert encoded[1].batches == batches(9, 20, 2) and encoded[0].batches == []
    assert same_files(tmp_path / "two", path)
    one, two = (textcache.PromptCache(str(p), PROMPTS).lookup(PROMPTS) for p in (whole, path))
    assert torch.equal(one.embeds, two.embeds) and torch.equal(one.mask, two.mask)


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
