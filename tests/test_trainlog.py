"""trainlog.py: the line a step writes, read back (old logs without gradient norms too, a resumed run's
repeated steps once), the loss-curve figure of `wadi.py plot`, and `--log tensorboard`: toy `train` and
`invert` runs' event files read back (skipped only where the optional package is missing and WADI_CI is not
1), a resume dropping the points after its step, and the missing package as a one-line error."""
import importlib.util
import os
import shutil
import sys

import pytest
import torch
from PIL import Image

import trainlog
import wadi
from loading import LoadError
from tests.test_invert import toy_exemplars


class Bar:  # tqdm's two calls that log_step makes
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass


def test_a_line_per_step_read_back(tmp_path):
    for step in (1, 2):
        trainlog.log_step(Bar(), tmp_path, step, torch.tensor([0.5 * step, 0.25, 0, 0]),
                          torch.tensor([1.5, 3.0 * step]), 7.25)
    log = trainlog.read_log(tmp_path)
    assert log == {"step": [1, 2], "loss_G": [0.5, 1.0], "loss_fake": [0.25, 0.25], "grad_G": [1.5, 1.5],
                   "grad_fake": [3.0, 6.0], "images/s": [7.25, 7.25]}
    assert " time 20" in (tmp_path / "train.log").read_text().splitlines()[0]


def test_old_logs_and_resumed_steps(tmp_path):
    """A log written before the gradient norms reads back without them; a step written twice (a run resumed
    from an earlier checkpoint) counts once, with its last line."""
    (tmp_path / "train.log").write_text(
        "step 1 loss_G 0 loss_fake 0.5 images/s 4.8 time 2026-12-05T03:19:20\n"
        "step 2 loss_G 0.1 loss_fake 0.4 images/s 7.0 time 2026-12-05T03:19:21\n"
        "step 2 loss_G 0.2 loss_fake 0.3 images/s 7.0 time 2026-12-05T03:20:00\n")
    log = trainlog.read_log(tmp_path)
    assert log == {"step": [1, 2], "loss_G": [0.0, 0.2], "loss_fake": [0.5, 0.3], "images/s": [4.8, 7.0]}


def test_unreadable_logs_are_one_line(tmp_path):
    with pytest.raises(LoadError, match="cannot read .*train.log.*a `wadi.py train` run"):
        trainlog.read_log(tmp_path)
    (tmp_path / "train.log").write_text("step one loss_G x\n")
    with pytest.raises(LoadError, match="line 1: not a train.log line"):
        trainlog.read_log(tmp_path)


def test_smooth_is_a_trailing_mean():
    assert trainlog.smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_overlays_runs(tmp_path):
    for name, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        for step in range(1, 21):
            trainlog.log_step(Bar(), tmp_path / name, step, torch.tensor([scale / step, 0.1, 0, 0]),
                              torch.tensor([1.0, scale]), 5.0)
    trainlog.plot_losses([tmp_path / "a", tmp_path / "b"], tmp_path / "losses.png")
    assert Image.open(tmp_path / "losses.png").size == (1000, 700)


# -------------------------------------------------------------------------------------------------
# --log tensorboard

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None and os.environ.get("WADI_CI") != "1",
    reason="the optional tensorboard package is missing (pip install -r requirements-tensorboard.txt)")
TRAIN_TAGS = ["grad_norm/G", "grad_norm/fake", "images_per_s", "loss/G", "loss/fake", "lr/G", "lr/fake"]


def read_events(run_dir):
    """{"scalars": {tag: [(step, value)]}, "images": {tag: [(step, width, height)]}} of run_dir/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    return {"scalars": {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]},
            "images": {t: [(e.step, e.width, e.height) for e in events.Images(t)] for t in tags["images"]}}


def train_toy(out, *extra):
    """3 steps of `wadi.py train` on the toy (batch 2, a checkpoint per step, the grid at step 3)."""
    return wadi.main(["train", "--backbone", "toy", "--out", str(out), "--max-steps", "3", "--batch-size", "2",
                      "--checkpoint-every", "1", "--keep-checkpoints", "0", "--eval-samples", "2",
                      "--log", "tensorboard", *extra])


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tensorboard") / "run"
    assert train_toy(out) == 0
    return out


@needs_tensorboard
def test_train_writes_the_scalars_and_the_grid(toy_run):
    """Every scalar tag once per step 1..3, the numbers of train.log (to its printed precision), the
    optimizers' learning rates (the toy's 1e-3 and 1e-2), and the step-3 grid as an image of its size."""
    events, log = read_events(toy_run), trainlog.read_log(toy_run)
    assert sorted(events["scalars"]) == TRAIN_TAGS
    assert all([s for s, _ in points] == [1, 2, 3] for points in events["scalars"].values())
    for tag, key in (("loss/G", "loss_G"), ("loss/fake", "loss_fake"), ("grad_norm/G", "grad_G"),
                     ("grad_norm/fake", "grad_fake"), ("images_per_s", "images/s")):
        assert [v for _, v in events["scalars"][tag]] == pytest.approx(log[key], rel=1e-5, abs=5e-4 * (
            key == "images/s")), tag
    assert [v for _, v in events["scalars"]["lr/G"]] == pytest.approx([1e-3] * 3)
    assert [v for _, v in events["scalars"]["lr/fake"]] == pytest.approx([1e-2] * 3)
    grid = Image.open(toy_run / "samples" / "step-0000003.png")
    assert events["images"] == {"samples": [(3, *grid.size)]}


@needs_tensorboard
def test_a_resume_drops_the_points_after_its_step(toy_run, tmp_path):
    """Resumed from step 2 of a run that went on to step 3 (as after a crash): one point per step, the grid of
    step 3 once."""
    out = tmp_path / "run"
    shutil.copytree(toy_run, out)
    assert train_toy(out, "--resume", str(out / "checkpoint-0000002.safetensors")) == 0
    events = read_events(out)
    assert all([s for s, _ in points] == [1, 2, 3] for points in events["scalars"].values())
    assert [s for s, _, _ in events["images"]["samples"]] == [3]


@needs_tensorboard
def test_invert_writes_its_three_losses(tmp_path):
    out = tmp_path / "run"
    assert wadi.main(["invert", "--backbone", "toy", "--exemplars", toy_exemplars(str(tmp_path / "ex")), "--out",
                      str(out), "--steps", "3", "--batch-size", "2", "--log", "tensorboard"]) == 0
    scalars = read_events(out)["scalars"]
    assert sorted(scalars) == ["loss/denoise", "loss/steer", "loss/total"]
    lines = [line.split() for line in open(out / "invert.log")]
    for column, tag in enumerate(("loss/total", "loss/denoise", "loss/steer"), 1):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3]
        assert [v for _, v in scalars[tag]] == pytest.approx([float(w[column]) for w in lines], abs=5e-6), tag


@pytest.mark.parametrize("command", ["train", "invert"])
def test_a_missing_tensorboard_is_one_line(command, monkeypatch, tmp_path, capsys):
    """Without the package (`import tensorboard` fails), --log tensorboard is one line naming the requirement
    file and exit code 2, before anything is written."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    for name in [m for m in sys.modules if m.startswith("torch.utils.tensorboard")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "run"
    argv = ["--exemplars", str(tmp_path), "--steps", "1"] if command == "invert" else []
    assert wadi.main([command, "--backbone", "toy", "--out", str(out), "--log", "tensorboard", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --log tensorboard needs the tensorboard package: "
                   "pip install -r requirements-tensorboard.txt"]
    assert not out.exists()
