"""trainlog.py: the line a step writes, read back (old logs without gradient norms too, a resumed run's
repeated steps once), and the loss-curve figure of `wadi.py plot`."""
import pytest
import torch
from PIL import Image

import trainlog
from loading import LoadError


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
