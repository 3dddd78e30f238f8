"""bench/ablation.py on a tiny run: the three tables from one 2-step toy run (LoRaD, seed 0), with answers known
in advance: LoRaD keeps every norm (NM 0), its norm swap is itself and its direction swap is the teacher."""
import importlib.util
import json
import math
import os

import pytest
import torch

import toyeval
from lorad import add_adapters, count_trainable
from pipeline import BACKBONES
from unet import UNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "bench", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def quick_reference(monkeypatch):
    """The data's reference statistics from 1,024 images instead of 10,240, computed once (test speed only)."""
    real, cache = toyeval.data_statistics, {}

    def reference(classifier, n=10240, seed=1):
        if "stats" not in cache:
            cache["stats"] = real(classifier, 1024, seed)
        return cache["stats"]

    monkeypatch.setattr(toyeval, "data_statistics", reference)


def test_tables_from_a_tiny_run(tmp_path, quick_reference, capsys):
    ablation = load_bench()
    common = ["--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--every", "1", "--n", "16", "--threads", "1"]
    ablation.main(["adapters", "--kinds", "lorad", *common])
    ablation.main(["swap", "--kinds", "lorad", *common])  # the same run: scoring only
    ablation.main(["ranks", "--rows", "C", *common])  # row C is the toy default: the same run again
    for table in ("adapters", "swap", "ranks"):
        assert {f"{table}.md", f"{table}.json", f"{table}-fd.png"} <= set(os.listdir(tmp_path))
    assert os.listdir(tmp_path / "runs") == ["lorad-r16-f8-s0"]

    run = tmp_path / "runs" / "lorad-r16-f8-s0"
    metrics = json.loads((run / "metrics.json").read_text())
    row = json.loads((tmp_path / "adapters.json").read_text())["rows"][0]
    assert row["adapter"] == "lorad" and row["seeds"] == 1
    with torch.device("meta"):
        unet = UNet.from_config(json.loads(open(os.path.join(BACKBONES["toy"].repo, "unet", "config.json")).read()))
    assert row["student_params"] == count_trainable(add_adapters(unet, "student", 16)) == 188_800
    curve = row["runs"][0]["curve"]["student"]
    assert [step for step, _, _ in curve] == [1, 2]
    # the last checkpoint scored with its EMA adapters is the exported student that `train` scored
    assert row["fd"][0] == curve[-1][1] == metrics["student_1"]["fd"] and math.isfinite(row["fd"][0])
    assert row["accuracy"][0] == metrics["student_1"]["accuracy"]
    assert row["nm"][0] < 1e-5 and row["dm"][0] > 0  # LoRaD turns directions and keeps norms
    assert "| lorad | 188,800 |" in (tmp_path / "adapters.md").read_text()

    swap = json.loads((tmp_path / "swap.json").read_text())["rows"][0]["variants"]
    assert swap["norm"]["fd"][0] == pytest.approx(swap["student"]["fd"][0], rel=1e-3)  # LoRaD's norms are the teacher's
    assert swap["direction"]["fd"][0] == pytest.approx(metrics["teacher_1"]["fd"], rel=1e-3)  # = the teacher
    assert swap["direction"]["fd"][0] != swap["student"]["fd"][0]
    ranks = (tmp_path / "ranks.md").read_text()
    assert "| C | 16 | 188,800 | 8 |" in ranks and "256 / 32" in ranks

    # a second call trains nothing and scores nothing again
    lines = (run / "train.log").read_text()
    capsys.readouterr()
    ablation.main(["adapters", "--kinds", "lorad", *common])
    assert "train " not in capsys.readouterr().out and (run / "train.log").read_text() == lines
    # --finished tabulates what is there and trains nothing else
    ablation.main(["adapters", "--kinds", "lorad", "full", "--finished", *common, "--seeds", "0", "1"])
    assert "train " not in capsys.readouterr().out and os.listdir(tmp_path / "runs") == ["lorad-r16-f8-s0"]
    table = (tmp_path / "adapters.md").read_text()
    assert "| 1 (not run: 1) |" in table and "| 0 (not run: 0, 1) |" in table


def test_an_interrupted_run_stops_the_sweep(tmp_path, quick_reference, monkeypatch):
    """Ctrl-C (or SIGTERM) inside a run: `train` saves its step and returns 130; the sweep stops there instead of
    counting the run as failed and starting the next one."""
    ablation = load_bench()
    calls = []
    monkeypatch.setattr(ablation.wadi, "main", lambda argv: calls.append(argv) or 130)
    with pytest.raises(KeyboardInterrupt):
        ablation.main(["adapters", "--kinds", "lorad", "full", "--out", str(tmp_path), "--seeds", "0", "1",
                       "--threads", "1"])
    assert len(calls) == 1
