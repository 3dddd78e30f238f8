"""The weight analysis (analysis.py, `wadi.py analyze`) on constructed teacher / student pairs with known answers."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import analysis
import wadi
from lorad import add_adapters, adapter_state_dict, merge_adapters
from pipeline import file_metadata
from unet import UNet
from tests.conftest import small_unet_config


def small_unet(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return UNet.from_config(small_unet_config()).to(dtype)


def weights(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def layer(report, name):
    return next(s for s in report["layers"] if s["name"] == name)


def test_lorad_student_keeps_norms_and_turns_directions_by_the_hand_computed_amount():
    unet = small_unet(dtype=torch.float32)
    teacher = weights(unet)
    add_adapters(unet, "student", 4, "lorad")
    with torch.no_grad():
        for p in adapter_state_dict(unet).values():
            p.normal_(0, 0.2)
    student = weights(merge_adapters(unet))
    adapted = analysis.adapted_weights(small_unet_config(), "lorad")
    report, _ = analysis.analyze(teacher, student, adapted, progress=False)

    linear = {k for k, v in teacher.items() if v.dim() == 2 and k.startswith(("down_blocks", "mid_block", "up_blocks"))}
    assert adapted == linear and len(adapted) > 20
    for key in adapted:
        s = layer(report, key)
        assert s["adapted"] and s["norm_change_mean"] < 1e-5 and s["norm_change_std"] < 1e-5  # percent
        cos = F.cosine_similarity(student[key].double(), teacher[key].double(), dim=1)
        by_hand = (100 * (1 - cos)).mean().item()
        assert by_hand > 1e-3
        assert s["direction_change_mean"] == pytest.approx(by_hand, rel=1e-6)
    for s in report["layers"]:
        if s["name"] not in adapted:  # convolutions and the time embedding: untouched
            assert s["norm_change_mean"] == s["direction_change_mean"] == 0 and s["svd_energy_30"] is None
    summary = report["summary"]
    assert summary["adapted"]["norm_mean"] < 1e-5 and summary["adapted"]["layers"] == len(adapted)
    means = [layer(report, k)["direction_change_mean"] for k in adapted]
    assert summary["adapted"]["direction_mean"] == pytest.approx(sum(means) / len(means), rel=1e-12)
    assert summary["layers"] == sum(v.dim() >= 2 for v in teacher.values())
    assert summary["direction_mean"] < summary["adapted"]["direction_mean"]  # diluted by the untouched layers


def test_rows_scaled_by_1_01_change_norms_by_one_percent_and_directions_not_at_all():
    teacher = {k: v for k, v in weights(small_unet()).items() if k.startswith(("conv_in", "down_blocks.0.", "mid"))}
    student = {k: v * 1.01 if v.dim() >= 2 else v for k, v in teacher.items()}
    report, _ = analysis.analyze(teacher, student, progress=False)
    for s in report["layers"]:
        assert s["norm_change_mean"] == pytest.approx(1.0, abs=1e-9) and s["norm_change_std"] < 1e-9
        assert s["direction_change_mean"] < 1e-12
    assert report["summary"]["norm_mean"] == pytest.approx(1.0, abs=1e-9)
    assert report["summary"]["norm_std"] < 1e-9 and report["summary"]["direction_mean"] < 1e-12
    assert report["summary"]["adapted"] is None  # no adapted layers named


def planar_rotation(n, angle, generator):
    """I + a rank-2 change: a rotation by `angle` in the plane of two random orthonormal vectors (n, n)."""
    q, _ = torch.linalg.qr(torch.randn(n, 2, generator=generator, dtype=torch.float64))
    e1, e2 = q.T
    cos, sin = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
    plane = torch.outer(e1, e1) + torch.outer(e2, e2)
    return torch.eye(n, dtype=torch.float64) + (cos - 1) * plane + sin * (torch.outer(e2, e1) - torch.outer(e1, e2))


def test_rank_two_direction_residual_keeps_all_energy_at_30_percent_rank():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 30, generator=g, dtype=torch.float64)
    R = planar_rotation(30, 0.3, g)
    scale = 1 + 0.1 * torch.rand(20, 1, generator=g, dtype=torch.float64)  # norms change too
    W2 = scale * (W @ R.T)  # each row rotated in the same plane: V' - V = V (R^T - I), rank 2
    V, V2 = W / W.norm(dim=1, keepdim=True), W2 / W2.norm(dim=1, keepdim=True)
    assert torch.linalg.matrix_rank(V2 - V, atol=1e-12).item() == 2
    report, _ = analysis.analyze({"w": W}, {"w": W2}, progress=False)
    s = report["layers"][0]
    assert s["svd_rank_30"] == 6 and s["svd_energy_30"] == pytest.approx(100, abs=1e-6)
    # a direction change of full rank keeps far less at 30% of the rank: the test can fail
    W3 = W + 0.1 * torch.randn(20, 30, generator=g, dtype=torch.float64)
    assert analysis.analyze({"w": W}, {"w": W3}, progress=False)[0]["layers"][0]["svd_energy_30"] < 70
    # the energy by definition: the top-K squared singular values of the residual
    sigma = torch.linalg.svdvals(W3 / W3.norm(dim=1, keepdim=True) - V)
    expected = 100 * (sigma[:6] ** 2).sum() / (sigma ** 2).sum()
    assert analysis.analyze({"w": W}, {"w": W3}, progress=False)[0]["layers"][0]["svd_energy_30"] == \
        pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_swaps_take_exactly_the_teachers_norms_or_directions(dtype):
    keep = ("conv_in.", "down_blocks.0.attentions.0.proj_in.", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.",
            "down_blocks.0.attentions.0.norm.", "time_embedding.")
    teacher = {k: v for k, v in weights(small_unet(0)).items() if k.startswith(keep)}  # convolutions, linears, 1-D
    student = {k: (v + 0.05 * torch.randn_like(v)) * (1 + 0.1 * torch.rand(v.shape[0], *[1] * (v.dim() - 1),
                                                                            dtype=v.dtype))
               for k, v in teacher.items()}
    student = {k: v.to(dtype) for k, v in student.items()}
    norms = {}
    for swap in analysis.SWAPS:
        _, swapped = analysis.analyze(teacher, student, swap=swap, progress=False)
        assert swapped.keys() == student.keys()
        for k, v in swapped.items():
            assert v.dtype == dtype and v.shape == student[k].shape
            if v.dim() < 2:
                assert torch.equal(v, student[k])  # biases and norm layers stay the student's
                continue
            rows, t, s = v.double().flatten(1), teacher[k].flatten(1), student[k].double().flatten(1)
            own, other = (t, s) if swap == "norm" else (s, t)  # whose norms, whose directions
            tol = 1e-12 if dtype == torch.float64 else 1e-3
            torch.testing.assert_close(rows.norm(dim=1), own.norm(dim=1), rtol=tol, atol=0)
            torch.testing.assert_close(F.normalize(rows, dim=1), F.normalize(other, dim=1), rtol=0, atol=tol)
        norms[swap] = swapped
    # each swap really changed the student (the teacher's norms or directions differ from its own)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert all((norms[s][key].double() - student[key].double()).abs().max() > 1e-3 for s in analysis.SWAPS)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A model directory (unet/ config and teacher weights) and a student as safetensors and as a .bin pickle."""
    root = tmp_path_factory.mktemp("analyze")
    model = root / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text(json.dumps(small_unet_config()))
    unet = small_unet(0, torch.float32)
    save_file(weights(unet), str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    add_adapters(unet, "student", 4, "lora")
    with torch.no_grad():
        for p in adapter_state_dict(unet).values():
            p.normal_(0, 0.05)
    student = weights(merge_adapters(unet))
    save_file(student, str(root / "student.safetensors"), metadata={"a_T": "0.0047", "adapter": "lora"})
    torch.save(student, root / "student.bin")
    return root, model


def test_analyze_command_end_to_end_bin_equals_safetensors(pair, capsys):
    root, model = pair
    outs = {}
    for name in ("student.safetensors", "student.bin"):
        out = root / f"out-{name}"
        assert wadi.main(["analyze", "--model", str(model), "--student", str(root / name), "--out", str(out),
                          "--adapter", "lora"]) == 0
        assert {"analysis.json", "fig2a.png", "fig2b.png"} <= set(os.listdir(out))
        outs[name] = json.loads((out / "analysis.json").read_text())
    printed = capsys.readouterr().out
    assert "all >=2-D weights" in printed and "adapted (lora)" in printed
    a, b = outs.values()
    assert a.pop("student") != b.pop("student") and a == b
    # LoRA on the Table-2 layers (the 1x1 proj_in / proj_out convolutions too) changes norms and directions
    proj = layer(a, "down_blocks.0.attentions.0.proj_in.weight")
    assert proj["shape"] == [32, 32, 1, 1] and proj["adapted"] and proj["direction_change_mean"] > 0
    assert a["summary"]["adapted"]["norm_mean"] > 1e-3 and a["adapter"] == "lora"
    assert a["teacher"] == f"{model}/unet"
    assert set(a["layers"][0]) >= {"name", "shape", "norm_change_mean", "norm_change_std", "direction_change_mean",
                                   "direction_change_std", "svd_energy_30"}
    assert set(a["summary"]) >= {"norm_mean", "direction_mean", "norm_std", "direction_std", "svd_energy_30_mean",
                                 "adapted"}


def test_analyze_swap_file_and_run_directory(pair, tmp_path):
    root, model = pair
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"backbone": "sd15", "base_model": str(model), "adapter": "lora"}))
    (run / "student.safetensors").write_bytes((root / "student.safetensors").read_bytes())
    swap_out = tmp_path / "direction.safetensors"
    assert wadi.main(["analyze", "--student", str(run), "--out", str(tmp_path / "out"), "--json",
                      str(tmp_path / "a.json"), "--swap", "direction", "--swap-out", str(swap_out)]) == 0
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["adapter"] == "lora" and report["summary"]["adapted"]["layers"] > 0  # from the run's run.json
    student, swapped = load_file(str(root / "student.safetensors")), load_file(str(swap_out))
    assert swapped.keys() == student.keys() and all(swapped[k].dtype == student[k].dtype for k in student)
    assert file_metadata(str(swap_out))["a_T"] == "0.0047" and "direction" in file_metadata(str(swap_out))["swap"]
    teacher = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    with torch.device("meta"):
        net = UNet.from_config(small_unet_config())
    net.load_state_dict(swapped, strict=True, assign=True)  # a loadable denoiser
    key = "down_blocks.0.attentions.0.proj_in.weight"
    torch.testing.assert_close(F.normalize(swapped[key].flatten(1), dim=1), F.normalize(teacher[key].flatten(1), dim=1))


def test_analyze_errors_are_one_line(pair, tmp_path, capsys):
    root, model = pair
    base = ["analyze", "--model", str(model), "--out", str(tmp_path / "out")]

    def error(*argv):
        assert wadi.main([*base, *argv]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ")
        return lines[0]

    assert "file not found" in error("--student", str(tmp_path / "nope.safetensors"))
    assert "--swap and --swap-out go together" in error("--student", str(root / "student.bin"), "--swap", "norm")
    assert "does not end in .safetensors" in error("--student", str(root / "student.bin"), "--swap", "norm",
                                                   "--swap-out", str(tmp_path / "x.bin"))
    partial = {k: v for k, v in load_file(str(root / "student.safetensors")).items() if "conv_out" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    assert "2 missing (conv_out.bias, conv_out.weight)" in error("--student", str(tmp_path / "partial.safetensors"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert "the run is unfinished (no student.safetensors yet)" in error("--student", str(tmp_path / "run"))
    (tmp_path / "bad.bin").write_bytes(b"not a pickle")
    assert "cannot read" in error("--student", str(tmp_path / "bad.bin"))
