"""bench/memory.py (paper Table A1): its peak-memory measurement reproduces allocations of known size, and a toy
run gives every kind's known trainable counts beside its memory, time and latency."""
import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2 ** 20


def load_bench():
    spec = importlib.util.spec_from_file_location("memory", os.path.join(ROOT, "bench", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_peak_growth_reproduces_allocations_of_known_size(device):
    """128 MiB tensors: one at a time peaks at one; three alive at once (a, b and a + b) at three. On the CPU within
    2% + 4 MiB (the resident set counts pages, and Python's own allocations); on CUDA exactly."""
    memory, device = load_bench(), torch.device(device)
    n = 32 * MIB  # float32 elements: 128 MiB

    def one_at_a_time():
        for _ in range(3):
            torch.ones(n, device=device).sum()

    def three_at_once():
        a, b = torch.ones(n, device=device), torch.ones(n, device=device)
        return (a + b).sum()

    for fn, expected in ((one_at_a_time, 4 * n), (three_at_once, 12 * n)):
        _, grown = memory.peak_growth(fn, device)
        tolerance = 0 if device.type == "cuda" else 0.02 * expected + 4 * MIB
        assert abs(grown - expected) <= tolerance, (fn.__name__, grown / MIB, expected / MIB)


def test_toy_rows_and_what_does_not_fit(tmp_path, monkeypatch, capsys):
    memory = load_bench()
    path = tmp_path / "rows.json"
    assert memory.main(["--backbone", "toy", "--kinds", "lorad", "orth-cayley", "--steps", "1", "--warmup", "0",
                        "--latency-repeats", "1", "--threads", "1", "--json", str(path)]) == 0
    rows = {r["adapter"]: r for r in json.loads(path.read_text())["rows"]}
    # the toy's student and fake score counts (README, vsd.BACKBONE_DEFAULTS: ranks 16 / 8, blocks 4 / 8)
    assert rows["lorad"]["trainable"] == [188_800, 78_272] and rows["orth-cayley"]["trainable"] == [163_904, 71_264]
    for r in rows.values():
        # a step holds at least the adapters' states; the toy's activations (batch 4) are tens of MiB, not GiB
        assert r["states"] < r["peak_over_frozen"] < 1024 * MIB
        assert r["ms"] > 0 and r["latency_ms"] > 0 and r["weights"] == 4 * 1_088_963
    out = capsys.readouterr().out
    assert "| lorad | 188,800 + 78,272 |" in out and "over the frozen weights" in out
    # a kind whose frozen weights and states would not fit in the memory available is not run: analytic figures only
    monkeypatch.setattr(memory, "mem_available", lambda: 2 ** 20)
    assert memory.main(["--backbone", "sd15", "--kinds", "full"]) == 0
    out = capsys.readouterr().out
    assert "| full | 859,520,964 + 242,333,760 | not run: weights + states" in out
    assert f"{16 * (859_520_964 + 242_333_760) / MIB:,.1f} MiB" in out
