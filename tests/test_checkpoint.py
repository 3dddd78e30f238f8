"""What a run writes and reads back (checkpoint.py) when the disk fills up or a resume changes the
options, on the tiny SD repository: one line and exit 2, the last checkpoint whole, resume exact;
each option either taking effect at a resume (one line) or refused before anything is written."""
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import trainlog
import loading
import wadi
from checkpoint import RESUME_MAY_CHANGE, WHERE, check_resume
from loading import LoadError, file_metadata
from vsd import TrainConfig, VSDConfig, run_options
from tests.conftest import ROOT, TRAIN, train_cli


def full_disk_on(monkeypatch, matches):
    """Make every safetensors write whose path contains `matches` fail as on a full disk, after a
    few bytes (which safetensors' temporary file then holds)."""
    real = loading.save_file

    def save_file(tensors, path, metadata=None):
        if matches in path:
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(loading, "save_file", save_file)


def last_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_full_disk_at_a_checkpoint_is_one_line_and_resume_is_exact(repo, tmp_path, monkeypatch,
                                                                  capsys):
    assert train_cli(repo, tmp_path / "straight", "--max-steps", "3", "--checkpoint-every", "1") == 0
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "1", "--checkpoint-every", "1") == 0
    full_disk_on(monkeypatch, "checkpoint-0000002")
    capsys.readouterr()
    assert train_cli(repo, out, "--max-steps", "3", "--checkpoint-every", "1", "--resume", "latest") == 2
    line = last_line(capsys)
    assert line.startswith(f"error: stopped: no space left on the disk of "
                           f"{out / 'checkpoint-0000002.safetensors'}: it needs "), line
    assert line.endswith(f"free; the last good checkpoint is {out / 'checkpoint-0000001.safetensors'}, "
                         f"whole; free some space and continue with --resume latest"), line
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == \
        ["checkpoint-0000001.safetensors"]  # the partial file is gone, the last one whole
    monkeypatch.undo()
    assert train_cli(repo, out, "--max-steps", "3", "--checkpoint-every", "1", "--resume", "latest") == 0
    a, b = (load_file(str(d / "checkpoint-0000003.safetensors")) for d in (tmp_path / "straight", out))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))


def test_full_disk_at_the_log_and_at_the_export(repo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real_open = open

    def full_log(path, *args, **kwargs):
        if str(path).endswith("train.log"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(trainlog, "open", full_log, raising=False)
    assert train_cli(repo, out, "--max-steps", "2") == 2
    assert last_line(capsys) == (f"error: stopped: no space left on the disk of {out / 'train.log'}: "
                                 f"{loading.size_text(loading.shutil.disk_usage(out).free)} free; no "
                                 f"checkpoint was written yet, whole")
    monkeypatch.undo()
    full_disk_on(monkeypatch, "student.safetensors")
    assert train_cli(repo, tmp_path / "run2", "--max-steps", "1") == 2
    line = last_line(capsys)
    assert f"the run's last checkpoint {tmp_path / 'run2' / 'checkpoint-0000001.safetensors'} is whole" \
        in line and line.endswith(f"`wadi.py export --run {tmp_path / 'run2'}`"), line
    monkeypatch.undo()
    assert wadi.main(["export", "--run", str(tmp_path / "run2"), "--out", str(tmp_path / "s.safetensors")]) == 0


def test_full_disk_under_torchrun_stops_every_rank_in_one_line(repo, tmp_path):
    """Two processes: rank 0's disk fills at its second checkpoint; both stop at the next step with
    exit 2 and one line each (rank 0's names the last good checkpoint), no traceback of ours."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    args = [*TRAIN, "--model", repo, "--prompts", os.path.join(repo, "prompts.txt"), "--out", str(out),
            "--batch-size", "1", "--max-steps", "4", "--checkpoint-every", "1"]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "tests/full_disk_worker.py", *args],
                            capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode != 0
    # each process's line is written at once; rank 0's progress bar may precede it on the console line
    errors = sorted(re.findall(r"error: [^\r\n]*", result.stderr))
    # torchrun's launcher then prints its own failure report of the two exits; no project frame
    ours = re.search('File "{}'.format(re.escape(ROOT + os.sep)), result.stderr)  # a frame of ours
    assert len(errors) == 2 and not ours, result.stderr[-3000:]
    assert errors[0] == "error: stopped at step 2: rank 0 could not write (full disk)"
    assert errors[1].startswith(f"error: stopped: no space left on the disk of "
                                f"{out / 'checkpoint-0000002.safetensors'}: it needs ")
    assert errors[1].endswith(f"the last good checkpoint is {out / 'checkpoint-0000001.safetensors'}, "
                              f"whole; free some space and continue with --resume latest")
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == \
        ["checkpoint-0000001.safetensors"]


# --------------------------------------------------------------------------------------------
# Resuming with changed options

REFUSED = {"backbone", "base_model", "adapter", "rank", "rank_fake", "seed", "resolution", "a_T",
           "prompts_sha256", "official_prompts", "orth_blocks", "orth_blocks_fake"}


def test_every_option_is_either_free_at_a_resume_or_refused():
    options = run_options({"backbone": "sd15", "base_model": "m", "adapter": "lorad"}, TrainConfig(),
                          VSDConfig(), "0" * 64, 1)
    free = set(RESUME_MAY_CHANGE) | set(WHERE)
    assert free | REFUSED == set(options) and not free & REFUSED


def changed_value(key, value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)) and key != "a_T":
        return value * 2 + 1
    if key == "a_T":
        return 0.01
    if isinstance(value, (tuple, list)):
        return ("another prompt",)
    return f"other-{value}"


@pytest.fixture(scope="module")
def written(repo, tmp_path_factory):
    """A run of one step and the options it was written with (run.json)."""
    out = tmp_path_factory.mktemp("run")
    assert train_cli(repo, out, "--max-steps", "1") == 0
    return str(out / "checkpoint-0000001.safetensors"), json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("key", sorted(REFUSED | set(RESUME_MAY_CHANGE)))
def test_check_resume_for_every_option(written, key):
    path, options = written
    changed = {**options, key: changed_value(key, options[key])}
    lines = []
    if key in REFUSED:
        with pytest.raises(LoadError, match=f"a resume cannot change {key} "):
            check_resume(path, changed, lines.append)
    else:
        check_resume(path, changed, lines.append)
        assert lines == [f"resume: {key} {options[key]!r} -> {changed[key]!r}, from step 1 on"] or \
            key == "validation_prompts" and len(lines) == 1
    check_resume(path, options, lines.append)  # the same options: nothing to say
    assert len(lines) <= 1


def test_a_new_learning_rate_takes_effect(repo, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "1", "--lr", "1e-3") == 0
    capsys.readouterr()
    assert train_cli(repo, out, "--max-steps", "2", "--lr", "2e-3", "--lr-fake", "5e-3",
                     "--batch-size", "3", "--resume", "latest") == 0
    printed = capsys.readouterr().out
    assert "resume: lr 0.001 -> 0.002, from step 1 on" in printed
    assert "resume: lr_fake 0.01 -> 0.005, from step 1 on" in printed
    groups = json.loads(file_metadata(str(out / "checkpoint-0000002.safetensors"))["param_groups"])
    assert groups["student"][0]["lr"] == 2e-3 and groups["fake"][0]["lr"] == 5e-3
    run = json.loads((out / "run.json").read_text())
    assert run["lr"] == 2e-3 and run["batch_size"] == 3
    meta = checkpoint.checkpoint_meta(str(out / "checkpoint-0000002.safetensors"))
    assert meta["images_seen"] == 2 + 3  # step 1 at batch 2, step 2 at batch 3


@pytest.mark.parametrize("extra, message", [
    (["--rank", "8"], "rank 4 -> 8"), (["--rank-fake", "4"], "rank_fake 2 -> 4"),
    (["--adapter", "lora"], "adapter 'lorad' -> 'lora'"), (["--seed", "1"], "seed 0 -> 1"),
    (["--resolution", "32"], "resolution 16 -> 32")])
def test_a_refused_change_writes_nothing(repo, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "1") == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out) if os.path.isfile(out / f)}
    capsys.readouterr()
    assert train_cli(repo, out, "--max-steps", "2", "--resume", "latest", *extra) == 2
    line = last_line(capsys)
    assert line.startswith("error: --resume ") and f"a resume cannot change {message}" in line, line
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if os.path.isfile(out / f)} == before
    assert wadi.main(["export", "--run", str(out), "--out", str(tmp_path / "s.safetensors")]) == 0


def test_another_base_model_or_prompt_list_is_refused(repo, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "1") == 0
    other = tmp_path / "other"
    shutil.copytree(repo, other)
    (other / "prompts.txt").write_text("a red cat\n")
    argv = [*TRAIN, "--out", str(out), "--max-steps", "2", "--resume", "latest"]
    assert wadi.main([*argv, "--model", str(other), "--prompts", os.path.join(repo, "prompts.txt")]) == 2
    assert f"base_model {repo!r} -> {str(other)!r}" in last_line(capsys)
    assert wadi.main([*argv, "--model", repo, "--prompts", str(other / "prompts.txt")]) == 2
    assert "a resume cannot change prompts_sha256 " in last_line(capsys)


def test_configs_hold_every_resume_option():
    names = {f.name for cls in (TrainConfig, VSDConfig) for f in dataclasses.fields(cls)}
    assert set(RESUME_MAY_CHANGE) - {"processes"} <= names and set(WHERE) <= names
