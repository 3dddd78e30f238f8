"""loading.py: weight files told by their content (safetensors or a weights-only pickle), one-line errors
that name the file and the option, sharded indexes, file permissions, and a Hub that does not answer."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import loading
from loading import LoadError, fetch_file, read_tensors, read_weights, save_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE = {"conv_in.weight": torch.arange(12.0).view(3, 4), "conv_in.bias": torch.ones(3, dtype=torch.float16)}


@pytest.mark.parametrize("name", ["student.bin", "student.pt", "student.pth", "no_extension", "mislabelled.safetensors"])
def test_pickled_state_dicts_read_like_safetensors(name, tmp_path):
    torch.save(STATE, tmp_path / name)
    save_file(STATE, tmp_path / "ref.safetensors")
    for path in (tmp_path / name, tmp_path / "ref.safetensors"):
        state = read_tensors(str(path))
        assert state.keys() == STATE.keys() and all(torch.equal(state[k], STATE[k]) for k in STATE)
        assert state["conv_in.bias"].dtype == torch.float16


def test_a_file_in_neither_format_says_which_formats_are_read(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"this is not a weight file at all")
    with pytest.raises(LoadError, match="neither safetensors, or a PyTorch state dict") as e:
        read_tensors(str(tmp_path / "x.bin"))
    assert str(tmp_path / "x.bin") in str(e.value) and "\n" not in str(e.value)


def test_a_pickle_with_code_is_refused(tmp_path):
    torch.save({"w": torch.ones(1), "f": os.getcwd}, tmp_path / "evil.bin")  # not just tensors
    with pytest.raises(LoadError, match="evil.bin"):
        read_tensors(str(tmp_path / "evil.bin"))


def test_a_sharded_index_without_weight_map_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(LoadError, match="without a weight_map"):
        read_weights(str(tmp_path), "unet")


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_tensors(STATE, str(tmp_path / "a.safetensors"), {"step": 3})
        assert oct(os.stat(tmp_path / "a.safetensors").st_mode & 0o777) == "0o644"  # safetensors alone: 0o600
        os.umask(0o077)
        save_tensors(STATE, str(tmp_path / "b.safetensors"))
        assert oct(os.stat(tmp_path / "b.safetensors").st_mode & 0o777) == "0o600"
    finally:
        os.umask(old)
    assert loading.file_metadata(str(tmp_path / "a.safetensors")) == {"step": "3"}
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_fetch_file_names_the_option(tmp_path):
    with pytest.raises(LoadError, match=r"^--unet: file not found: .*nothing\.safetensors$"):
        fetch_file(str(tmp_path / "nothing.safetensors"), "--unet")


def test_an_unreachable_hub_is_one_fast_line(tmp_path):
    """A Hub that does not answer (here: a closed local port) is found out at once, not after half a minute
    of retries, and the message says how to pass a local copy; for a single file, through the option."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_OFFLINE", None)
    for args, hint in [(["--model", "nobody/no-such-repo"], "--model DIR"),
                       (["--unet", "nobody/no-such-repo/student.safetensors"], "pass the local file to --unet")]:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "wadi.py", "sample", *args, "--prompt", "a", "--out", "x.png"],
                                cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
        elapsed = time.perf_counter() - start
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "unreachable" in lines[0] and hint in lines[0] and "nobody/no-such-repo" in lines[0], lines[0]
        assert elapsed < 20, elapsed  # the interpreter and torch start in a few seconds; retries took 26-40 s


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in a hash map's order, different from call to call; save_tensors sorts it, so a
    file's hash depends on what it holds only (a resumed run's student equals the uninterrupted one's)."""
    from loading import file_metadata, save_tensors
    tensors = {"b": torch.zeros(3), "a": torch.ones(2, 2, dtype=torch.float16)}
    meta = {f"key{i}": f"välue {i}" for i in range(12)}
    files = []
    for i in range(6):
        path = tmp_path / f"{i}.safetensors"
        save_tensors(tensors, str(path), dict(reversed(meta.items())) if i % 2 else meta)
        files.append(path.read_bytes())
    assert all(f == files[0] for f in files)
    assert file_metadata(str(tmp_path / "0.safetensors")) == meta
    assert list(json.loads(files[0][8:8 + int.from_bytes(files[0][:8], "little")])["__metadata__"]) == sorted(meta)
