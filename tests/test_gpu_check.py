"""bench/gpu_check.py, the first-GPU check, through its CPU dry path (tiny configs): every part runs and
reports real figures, the training part's resume is exact, the time budget skips what does not fit, and a
part past its limit is killed with its children."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")


def dry_run(tmp_path, *extra):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out), *extra], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result, json.loads(out.read_text()), (tmp_path / "check.md").read_text()


def check_vsd(part, config):
    r = part["result"]
    assert part["status"] == "ok" and r["config"] == config and r["dtype"] == "bf16" and r["grad_checkpointing"]
    ours, official = r["styles"]["ours"], r["styles"]["official"]
    assert ours["ms"] > 0 and ours["peak"] > 0 and official["weights"] > 2 * ours["weights"]  # three copies
    assert official["flops"] > ours["flops"] > 0  # the hooks compute each adapted layer twice
    assert abs(ours["loss_fake"] - official["loss_fake"]) < 1e-2 * official["loss_fake"]  # same step, in bf16


def test_dry_run_reports_every_part(tmp_path):
    """All parts but vsd_sd15 (the slow test below runs it too), about 40 s on two shared cores."""
    result, report, text = dry_run(tmp_path, "--only", "train", "vsd_pixart", "one_step", "controlnet")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    parts = report["parts"]
    assert list(parts) == ["train", "vsd_pixart", "one_step", "controlnet"] and report["dry_run"]
    train = parts["train"]["result"]
    assert train["losses_finite"] and len(train["losses"]) == 4 and train["losses"][1][1] > 0
    assert train["resume_exact"] and train["verdict"] == "exact" and train["resumed_twice_max_diff"] == 0
    assert train["resumed_losses"] == train["losses"][2:]  # steps 3 and 4 again, from the step-2 checkpoint
    check_vsd(parts["vsd_pixart"], "pixart-small")
    one_step = parts["one_step"]["result"]["configs"]
    assert set(one_step) == {"small", "pixart-small"}
    assert all(c["ours_s"] > 0 and c["reference_s"] > 0 and c["max_image_diff"] <= 2 for c in one_step.values())
    controlnet = parts["controlnet"]["result"]
    assert len(controlnet["seconds"]) == 2 and controlnet["ratio"] > 0
    assert report["seconds"] < 120 and all(p["seconds"] <= p["limit_s"] for p in parts.values())
    assert "| train | ok |" in text and "resume: exact" in text and "| one_step | ok |" in text


@pytest.mark.slow
def test_dry_run_of_the_whole_check(tmp_path):
    result, report, text = dry_run(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert list(report["parts"]) == ["train", "vsd_sd15", "vsd_pixart", "one_step", "controlnet"]
    check_vsd(report["parts"]["vsd_sd15"], "small")
    assert report["seconds"] < 120 and text.count("| ok |") == 5


def test_what_does_not_fit_the_budget_is_skipped(tmp_path):
    result, report, text = dry_run(tmp_path, "--budget", "5")
    assert result.returncode == 1
    assert [p["status"] for p in report["parts"].values()] == ["skipped (out of time)"] * 5
    assert text.count("| skipped (out of time) | 0 |") == 5


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    pid_file = tmp_path / "grandchild"
    child = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(p.pid)); p.wait()")
    start = time.perf_counter()
    status, seconds, _ = gpu_check.run_part([sys.executable, "-c", child], 3)
    assert status == "timeout (3 s)" and 3 <= seconds < 10 and time.perf_counter() - start < 10
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # gone, or a zombie until init reaps it
        if not alive(grandchild):
            break
        time.sleep(0.1)
    else:
        pytest.fail("the part's child process outlived the limit")


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
