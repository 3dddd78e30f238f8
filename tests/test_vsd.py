"""The distillation step and loop (vsd.py) and `wadi.py train / export` on a tiny SD repository."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import cli
import loading
import vsd
import wadi
from lorad import ORTHOGONAL_MAPS, OrthogonalLinear, adapter_state_dict, load_adapters, merge_adapters, shared_copy
from pipeline import load_pipeline
from tests.conftest import TRAIN, relative_error, train_cli
from vsd import VSDConfig, build_networks, draw, fake_loss, generator_loss

def networks(repo):
    pipe = load_pipeline("sd15", repo)
    torch.manual_seed(0)
    student, fake = build_networks(pipe.denoiser, 4, 2)
    with torch.no_grad():  # non-trivial adapters, so that fake != teacher and g != 0
        for p in [*adapter_state_dict(student).values(), *adapter_state_dict(fake).values()]:
            p.normal_(0, 0.3)
    return pipe, student, fake


def test_three_networks_share_one_copy_of_the_weights(repo):
    pipe, student, fake = networks(repo)
    teacher = pipe.denoiser
    for key in ("conv_in.weight", "mid_block.resnets.0.conv1.weight"):
        ptr = teacher.state_dict()[key].data_ptr()
        assert student.state_dict()[key].data_ptr() == ptr == fake.state_dict()[key].data_ptr()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert student.get_submodule(q).base.weight is teacher.get_submodule(q).weight is fake.get_submodule(q).base.weight
    shared = sum(p.numel() for p in teacher.parameters())
    every = {p.data_ptr(): p.numel() for net in (teacher, student, fake) for p in net.parameters()}
    assert sum(every.values()) == shared + sum(p.numel() for net in (student, fake) for p in net.parameters()
                                               if p.requires_grad)


def test_step_matches_hand_written_reference(repo):
    pipe, student, fake = networks(repo)
    teacher, ac = pipe.denoiser, pipe.schedule.alphas_cumprod
    text, null = pipe.encode_prompts(["a red cat", "the sea"]), pipe.encode_prompts([""]).expand(2)
    c, c0 = text.embeds, null.embeds
    cfg = VSDConfig()
    d = draw(torch.Generator().manual_seed(1), 2, (4, 8, 8), cfg)
    d["drop"] = torch.tensor([True, False])
    loss_g, x0_sample = generator_loss(student, teacher, fake, pipe.schedule, text, null, d, cfg)
    loss_fake = fake_loss(fake, pipe.schedule, x0_sample, text, null, d)
    grads_g = torch.autograd.grad(loss_g, [p for p in student.parameters() if p.requires_grad])
    grads_f = torch.autograd.grad(loss_fake, [p for p in fake.parameters() if p.requires_grad])

    # the same step, written out from the paper (Sec. 3.3)
    z, t, eps = d["z"], d["t"], d["eps"]
    x0 = (z - (1 - 0.0047) ** 0.5 * student(z, 999, c)) / 0.0047 ** 0.5
    a = ac[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0.detach() + (1 - a).sqrt() * eps

    def cfg_pred(net):
        return net(xt, t, c0) + 1.5 * (net(xt, t, c) - net(xt, t, c0))

    with torch.no_grad():
        g = (1 - a) * (cfg_pred(teacher) - cfg_pred(fake))
    assert g.abs().max() > 1e-3
    assert torch.allclose(loss_g, 0.5 * (g ** 2).mean(), rtol=1e-5)
    # the VSD gradient: d loss_G / d theta = mean(g * d x0 / d theta)
    ref_g = torch.autograd.grad((g * x0).sum() / g.numel(), [p for p in student.parameters() if p.requires_grad])
    for mine, ref in zip(grads_g, ref_g):
        assert torch.allclose(mine, ref, atol=1e-7, rtol=1e-4)

    a2 = ac[d["t_fake"]].view(-1, 1, 1, 1)
    xt2 = a2.sqrt() * x0.detach() + (1 - a2).sqrt() * d["eps_fake"]
    c_drop = torch.stack([c0[0], c[1]])  # the first prompt dropped to ""
    loss_ref = ((a2.sqrt() * fake(xt2, d["t_fake"], c_drop) - a2.sqrt() * d["eps_fake"]) ** 2).mean()
    assert torch.allclose(loss_fake, loss_ref, rtol=1e-5)
    ref_f = torch.autograd.grad(loss_ref, [p for p in fake.parameters() if p.requires_grad])
    for mine, ref in zip(grads_f, ref_f):
        assert torch.allclose(mine, ref, atol=1e-7, rtol=1e-4)


def test_the_empty_prompt_is_drawn_per_sample_or_per_batch():
    """The fake score loss drops the prompt to "" with probability 0.1 per sample; with official_prompts per
    batch, as the official loop's one `random.random() < 0.1` a step. Nothing else drawn changes."""
    def drops(official):
        method = VSDConfig(official_prompts=official)
        steps = [draw(torch.Generator().manual_seed(s), 4, (1, 2, 2), method) for s in range(2000)]
        return steps[0], torch.stack([d["drop"] for d in steps]).float()  # (2000, 4)
    (ours, per_sample), (official, per_batch) = drops(False), drops(True)
    assert all(torch.equal(ours[k], official[k]) for k in ("z", "t", "eps", "t_fake", "eps_fake"))
    assert 0.09 < per_sample.mean() < 0.11 and (per_sample.min(1).values != per_sample.max(1).values).sum() > 400
    assert 0.085 < per_batch.mean() < 0.115 and torch.equal(per_batch.min(1).values, per_batch.max(1).values)


def test_official_prompts_mask_the_training_prompts_only(repo, tmp_path, monkeypatch):
    """--official-prompts encodes the training prompts as transformers' CLIPTextModel with the tokenizer's
    attention mask (the official dataset code) and "" without one (its encode_prompt); by default neither is
    masked. On random weights the mask changes every padding position of the training prompts."""
    from transformers import CLIPTextModel
    ref = CLIPTextModel.from_pretrained(os.path.join(repo, "text_encoder")).eval()
    tokenizer = load_pipeline("sd15", repo, vae=False).tokenizer
    seen, real_loss, real_batch = [], vsd.generator_loss, vsd.micro_batch

    def recording_loss(student, teacher, fake, schedule, c, c_null, draws, method):
        seen[-1] += [c.embeds.detach().clone(), c_null.embeds[:1].detach().clone(), c.mask]
        return real_loss(student, teacher, fake, schedule, c, c_null, draws, method)

    def recording_batch(*args):
        batch, seed = real_batch(*args)
        seen.append([batch])
        return batch, seed

    monkeypatch.setattr(vsd, "generator_loss", recording_loss)
    monkeypatch.setattr(vsd, "micro_batch", recording_batch)
    runs = {}
    for official in (False, True):
        out = tmp_path / str(official)
        assert train_cli(repo, out, "--max-steps", "1", *(["--official-prompts"] if official else [])) == 0
        assert json.load(open(out / "run.json"))["official_prompts"] is official
        runs[official] = seen.pop()
    (batch, c, c_null, mask), (batch_official, c_official, c_null_official, mask_official) = runs.values()
    assert batch == batch_official and mask is mask_official is None  # the U-Net gets no mask either way
    ids, attention = tokenizer(batch, return_mask=True)
    with torch.no_grad():
        masked = ref(ids, attention_mask=attention).last_hidden_state
        unmasked, empty = ref(ids).last_hidden_state, ref(tokenizer([""])).last_hidden_state
    assert relative_error(c_official, masked) < 1e-5 and relative_error(c, unmasked) < 1e-5
    assert relative_error(c_null_official, empty) < 1e-5 and relative_error(c_null, empty) < 1e-5
    padding = attention == 0
    assert padding.sum() > 0 and (c_official - c).abs().amax(-1)[padding].min() > 1e-3
    assert relative_error(c_official[~padding], c[~padding]) < 1e-5


def test_training_steps_change_adapters_not_base(repo, tmp_path):
    base = load_file(os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors"))
    assert train_cli(repo, tmp_path / "run", "--max-steps", "3", "--checkpoint-every", "2") == 0
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == ["checkpoint-0000002.safetensors", "checkpoint-0000003.safetensors", "losses.png", "run.json", "samples",
                     "student.safetensors", "train.log"]
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert len(log) == 3 and all("loss_G" in line and "images/s" in line for line in log)
    losses = [float(line.split()[3]) for line in log] + [float(line.split()[5]) for line in log]
    assert all(map(torch.isfinite, torch.tensor(losses)))
    assert os.listdir(tmp_path / "run" / "samples") == ["step-0000003.png"]
    ckpt = load_file(str(tmp_path / "run" / "checkpoint-0000003.safetensors"))
    theta_a = [v for k, v in ckpt.items() if k.startswith("student.") and k.endswith("theta_a")]
    assert theta_a and max(v.abs().max().item() for v in theta_a) > 0  # moved away from zero
    student = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert student.keys() == base.keys()  # merged: plain diffusers keys
    assert any(not torch.equal(student[k], base[k]) for k in base if "attn1.to_q" in k)
    assert all(torch.equal(student[k], base[k]) for k in base if "conv" in k or "norm" in k)  # untouched
    assert load_file(os.path.join(repo, "unet", "diffusion_pytorch_model.safetensors")).keys() == base.keys()


def test_resume_continues_exactly(repo, tmp_path):
    assert train_cli(repo, tmp_path / "straight", "--max-steps", "4", "--checkpoint-every", "2") == 0
    assert train_cli(repo, tmp_path / "split", "--max-steps", "2", "--checkpoint-every", "2") == 0
    assert train_cli(repo, tmp_path / "split", "--max-steps", "4", "--checkpoint-every", "2",
                     "--resume", "latest") == 0
    a = load_file(str(tmp_path / "straight" / "checkpoint-0000004.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint-0000004.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("opt_fake.") for k in a)
    for k in a:
        if not k.startswith("rng."):
            assert torch.equal(a[k], b[k]), k
    # both optimizers are the fused AdamW (vsd.ADAMW), also after a resume restored their param groups
    from loading import file_metadata
    for run in ("straight", "split"):
        groups = json.loads(file_metadata(str(tmp_path / run / "checkpoint-0000004.safetensors"))["param_groups"])
        assert [g[0]["fused"] for g in groups.values()] == [True, True], run


def test_ema_of_the_student_is_tracked_and_exported(repo, tmp_path):
    assert train_cli(repo, tmp_path / "run", "--max-steps", "2", "--checkpoint-every", "1", "--ema", "0.75") == 0
    ckpts = [load_file(str(tmp_path / "run" / f"checkpoint-000000{i}.safetensors")) for i in (1, 2)]
    pipe = load_pipeline("sd15", repo)
    torch.manual_seed(0)  # train's seed: the same initial adapters
    student, _ = build_networks(pipe.denoiser, 4, 2)
    ema = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()}
    for ckpt in ckpts:  # e_s = 0.75 e_(s-1) + 0.25 theta_s, from the live adapters theta_s of each step
        for k in ema:
            ema[k] = 0.75 * ema[k] + 0.25 * ckpt[f"student.{k}"]
            torch.testing.assert_close(ckpt[f"ema.{k}"], ema[k])
    assert any(not torch.allclose(ema[k], ckpts[1][f"student.{k}"]) for k in ema)  # the average lags
    merged = merge_adapters(shared_copy(load_adapters(student, ema))).state_dict()
    exported = load_file(str(tmp_path / "run" / "student.safetensors"))
    assert exported.keys() == merged.keys()
    for k in merged:
        torch.testing.assert_close(exported[k], merged[k])


def test_crash_mid_save_keeps_previous_checkpoint(repo, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "1", "--checkpoint-every", "1") == 0
    good = load_file(str(out / "checkpoint-0000001.safetensors"))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(loading, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "1", "--resume", "latest")
    monkeypatch.undo()
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint-")) == \
        ["checkpoint-0000001.safetensors", "checkpoint-0000002.safetensors.tmp"]
    assert all(torch.equal(v, good[k]) for k, v in load_file(str(out / "checkpoint-0000001.safetensors")).items())
    assert train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "1", "--resume", "latest") == 0


def test_non_finite_loss_stops_with_message(repo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = vsd.generator_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss_g, x0 = real(*args, **kwargs)
        calls.append(1)
        return (loss_g * float("nan"), x0) if len(calls) == 3 else (loss_g, x0)

    monkeypatch.setattr(vsd, "generator_loss", poisoned)
    assert train_cli(repo, out, "--max-steps", "5", "--checkpoint-every", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: non-finite loss at step 3") and "checkpoint-0000002.safetensors" in err
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == \
        ["checkpoint-0000001.safetensors", "checkpoint-0000002.safetensors"]
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "checkpoint-0000002.safetensors")).values()
               if v.is_floating_point())


def test_bad_train_inputs(repo, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert wadi.main([*TRAIN, "--model", repo, "--prompts", str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert train_cli(repo, tmp_path / "r", "--resume", str(tmp_path / "nope.safetensors")) == 2
    assert f"--resume: no checkpoint file {tmp_path / 'nope.safetensors'}" in capsys.readouterr().err
    assert train_cli(repo, tmp_path / "r2", "--resume", "latest") == 2
    assert "no checkpoint-*.safetensors" in capsys.readouterr().err


def test_export_loads_in_diffusers_and_matches_adapted_student(repo, tmp_path):
    from diffusers import UNet2DConditionModel
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "2", "--lr", "1e-2") == 0
    exported = str(tmp_path / "student.safetensors")
    assert wadi.main(["export", "--run", str(out), "--out", exported]) == 0

    ref = UNet2DConditionModel.from_pretrained(os.path.join(repo, "unet"))
    missing, unexpected = ref.load_state_dict(load_file(exported), strict=True)
    pipe = load_pipeline("sd15", repo)
    student, fake = build_networks(pipe.denoiser, 4, 2)
    checkpoint.load_checkpoint(str(out / "checkpoint-0000002.safetensors"), student, fake, {}, None)
    x, c = torch.randn(2, 4, 8, 8), pipe.encode_prompts(["a red cat", "the sea"]).embeds
    with torch.no_grad():
        expected, got = student(x, 999, c), ref(x, 999, c).sample
        teacher = pipe.denoiser(x, 999, c)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5
    assert (teacher - expected).abs().max() > 1e-4  # the student is not the teacher
    from loading import file_metadata
    meta = file_metadata(exported)
    assert meta["a_T"] == "0.0047" and meta["backbone"] == "sd15" and meta["base_model"] == repo


@pytest.mark.parametrize("backbone,expected", [("sd15", ["83.80M", "9.38M"]), ("sd21", ["94.43M"])])
def test_dry_run_prints_paper_counts(backbone, expected, capsys):
    assert wadi.main(["train", "--backbone", backbone, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(f"trainable {e}" in out for e in expected) and "GiB" in out


@pytest.mark.parametrize("adapter,expected", [("lora", "120.90M"), ("dora", "121.15M"), ("dora-frozen-norm", "120.90M"),
                                              ("full", "859.52M"), ("lorad", "83.80M"), ("orth-cayley", "84.97M")])
def test_dry_run_prints_the_table2_counts(adapter, expected, capsys):
    assert wadi.main(["train", "--backbone", "sd15", "--dry-run", "--adapter", adapter]) == 0
    student = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("student"))
    assert f"trainable {expected} (" in student  # then the exact count and its share of the teacher


@pytest.mark.parametrize("kind", ["lora", "dora", "dora-frozen-norm", "full", *ORTHOGONAL_MAPS])
def test_checkpoint_ema_and_export_for_every_adapter(repo, tmp_path, kind):
    """One optimizer step, a checkpoint, a fresh pair of networks restored from it (adapters, EMA, optimizer
    moments), and the exported merged student equal to the adapted one."""
    pipe = load_pipeline("sd15", repo)
    x, c = torch.randn(2, 4, 8, 8), pipe.encode_prompts(["a red cat", "the sea"]).embeds

    def networks():
        student, fake = build_networks(pipe.denoiser, 4, 2, kind, blocks=(2, 4))
        opts = {name: torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, **vsd.ADAMW)
                for name, net in (("student", student), ("fake", fake))}
        return student, fake, opts

    torch.manual_seed(0)
    student, fake, opts = networks()
    (student(x, 999, c).square().mean() + fake(x, 500, c).square().mean()).backward()
    for opt in opts.values():
        opt.step()
    ema = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()}
    with torch.no_grad():
        for v in ema.values():
            v.mul_(0.5)
    path = str(tmp_path / "checkpoint-0000001.safetensors")
    checkpoint.save_checkpoint(path, 1, student, fake, opts, ema, {})
    student2, fake2, opts2 = networks()
    ema2 = {k: torch.zeros_like(v) for k, v in ema.items()}
    assert checkpoint.load_checkpoint(path, student2, fake2, opts2, ema2) == 1
    for a, b in ((student, student2), (fake, fake2)):
        sa, sb = adapter_state_dict(a), adapter_state_dict(b)
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(torch.equal(ema[k], ema2[k]) for k in ema)
    for name in opts:
        s1, s2 = opts[name].state_dict()["state"], opts2[name].state_dict()["state"]
        assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    teacher_out = pipe.denoiser(x, 999, c)
    assert (student2(x, 999, c) - teacher_out).abs().max() > 1e-4  # the step moved the student
    checkpoint.export_student(student2, str(tmp_path / "student.safetensors"), {})
    merged = load_file(str(tmp_path / "student.safetensors"))
    assert merged.keys() == pipe.denoiser.state_dict().keys()
    from pipeline import load_unet_file
    with open(os.path.join(repo, "unet", "config.json")) as f:
        exported = load_unet_file(str(tmp_path / "student.safetensors"), json.load(f))
    with torch.no_grad():
        expected, got = student2(x, 999, c), exported(x, 999, c)
    assert (got - expected).abs().max() / expected.abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "dora", "dora-frozen-norm", "full"])
def test_resume_with_ema_continues_exactly_for_every_adapter(repo, tmp_path, kind):
    assert_resume_exact(repo, tmp_path, ["--checkpoint-every", "1", "--ema", "0.5", "--adapter", kind])


def assert_resume_exact(repo, tmp_path, common):
    """Two VSD steps straight and one plus one resumed give the same checkpoint bit for bit (adapters,
    EMA, AdamW moments) and the same exported student; returns the checkpoint."""
    assert train_cli(repo, tmp_path / "straight", "--max-steps", "2", *common) == 0
    assert train_cli(repo, tmp_path / "split", "--max-steps", "1", *common) == 0
    assert train_cli(repo, tmp_path / "split", "--max-steps", "2", *common, "--resume", "latest") == 0
    a = load_file(str(tmp_path / "straight" / "checkpoint-0000002.safetensors"))
    b = load_file(str(tmp_path / "split" / "checkpoint-0000002.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("ema.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    s1, s2 = (load_file(str(tmp_path / run / "student.safetensors")) for run in ("straight", "split"))
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # the files too, byte for byte (metadata written sorted), so that a hash check works
    assert (tmp_path / "straight" / "student.safetensors").read_bytes() == \
        (tmp_path / "split" / "student.safetensors").read_bytes()
    return a


def test_dry_run_table_of_every_adapter(capsys):
    """The dry run's table: every adapter kind on the backbone, the orthogonal ones at the default blocks, stored and
    effective (the strict lower triangles)."""
    expected = {"sd15": ["lorad                83.80M / 9.38M", "full                859.52M / 242.33M",
                         "orth-householder     84.97M / 9.50M   (effective 42.39M / 4.67M)", "blocks 4 / 32"],
                "sd21": ["orth-cayley          94.84M / 9.95M   (effective 47.31M / 4.89M)"],
                "pixart": ["lorad                81.22M / 20.13M", "blocks 16 / 48",
                           "orth-matrix-exp      59.28M / 19.35M   (effective 29.42M / 9.47M)"]}
    for backbone, lines in expected.items():
        assert wadi.main(["train", "--backbone", backbone, "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert all(line in out for line in lines), out
    assert wadi.main(["train", "--backbone", "sd15", "--dry-run", "--orth-blocks", "8", "--orth-blocks-fake", "64"]) == 0
    assert "orth-cayley          42.49M / 4.75M" in capsys.readouterr().out


@pytest.mark.parametrize("kind", list(ORTHOGONAL_MAPS))
def test_orthogonal_adapters_resume_exactly_and_stay_orthogonal(repo, tmp_path, kind):
    """Two VSD steps straight and one plus one resumed give the same checkpoint bit for bit (adapters, EMA, AdamW
    moments); after them every R is orthogonal to 1e-6 and W' keeps the row norms of W."""
    a = assert_resume_exact(repo, tmp_path, ["--checkpoint-every", "1", "--ema", "0.5", "--adapter", kind,
                                             "--orth-blocks", "2", "--orth-blocks-fake", "4", "--lr", "1e-2"])
    assert any(k.endswith("parametrizations.rotation.original") for k in a)
    _, _, _, student, fake = cli.load_run(str(tmp_path / "straight"))
    for net in (student, fake):
        adapters = [m for m in net.modules() if isinstance(m, OrthogonalLinear)]
        assert adapters
        moved = 0.0
        for m in adapters:
            # the trained parameters through torch's map in float64: orthogonal to 1e-12; the fp32 R the network
            # uses: to 1e-5 (fp32 rounding on blocks of 128: matrix_exp is off by up to 2.2e-6, cayley less)
            R64 = m.parametrizations.rotation[0](m.parametrizations.rotation.original.detach().double())
            R = m.rotation.detach().double()
            eye = torch.eye(R.shape[-1], dtype=torch.float64)
            assert (R64 @ R64.mT - eye).abs().max() < 1e-12 and (R @ R.mT - eye).abs().max() < 1e-5
            W, W2 = m.base.weight.detach().double(), m.merged_weight().detach().double()
            assert torch.allclose(W2.norm(dim=1), W.norm(dim=1), rtol=1e-6, atol=0)
            moved = max(moved, (R - eye).abs().max().item())
        assert moved > 1e-3  # the two steps did turn R


def test_bf16_mixed_precision_step(repo, tmp_path):
    assert train_cli(repo, tmp_path / "run", "--max-steps", "1", "--mixed-precision", "bf16") == 0
    ckpt = load_file(str(tmp_path / "run" / "checkpoint-0000001.safetensors"))
    assert all(v.dtype == torch.float32 for k, v in ckpt.items() if k.startswith(("student.", "fake.")))


def test_two_process_ddp_with_gloo(repo, tmp_path):
    out = str(tmp_path / "ddp")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "tests/ddp_worker.py", repo, out], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (load_file(os.path.join(out, f"adapters-rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP kept the ranks in step
    assert any(r0[k].abs().max() > 0 for k in r0 if k.endswith("theta_a"))
    ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1)]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # each rank drew its own noise and prompts
    assert os.path.isfile(os.path.join(out, "student.safetensors"))
    # the prompt file is read once, by rank 0, and every rank trains on the same list
    assert [r["reads"] for r in ranks] == [1, 0]
    assert ranks[0]["prompts"] == ranks[1]["prompts"] == open(os.path.join(repo, "prompts.txt")).read().split("\n")[:5]
    # rank 0's error reaches every rank, none waits for a list that never comes
    missing = os.path.join(repo, "no-such-prompts.txt")
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[1]["error"].startswith(f"cannot read the prompt file {missing}: [Errno 2]")


def test_interrupt_saves_the_step_and_resume_is_exact(repo, tmp_path, monkeypatch, capsys):
    """Ctrl-C during step 2 finishes that step, saves it atomically and exits 130 with one line naming the
    checkpoint; --resume latest then gives exactly the adapters of an uninterrupted run."""
    assert train_cli(repo, tmp_path / "straight", "--max-steps", "4", "--checkpoint-every", "100") == 0
    real, calls = vsd.generator_loss, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # as the terminal sends it, in the middle of step 2
        return real(*args, **kwargs)

    monkeypatch.setattr(vsd, "generator_loss", interrupted)
    out = tmp_path / "split"
    capsys.readouterr()
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    assert train_cli(repo, out, "--max-steps", "4", "--checkpoint-every", "100") == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"interrupted: interrupted at step 2 of 4: saved {out / 'checkpoint-0000002.safetensors'}; "
                    f"continue with the same command and --resume latest"), line
    assert sorted(f for f in os.listdir(out) if f.startswith("checkpoint")) == ["checkpoint-0000002.safetensors"]
    assert not (out / "student.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is given back
    monkeypatch.undo()
    assert train_cli(repo, out, "--max-steps", "4", "--checkpoint-every", "100", "--resume", "latest") == 0
    a = load_file(str(tmp_path / "straight" / "checkpoint-0000004.safetensors"))
    b = load_file(str(out / "checkpoint-0000004.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng."))
    sa, sb = (load_file(str(d / "student.safetensors")) for d in (tmp_path / "straight", out))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_second_interrupt_stops_at_once():
    with checkpoint.interruptible() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop["requested"]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_export_gives_the_runs_own_student(repo, tmp_path, capsys):
    """A run with EMA exports its EMA student, and so does `export --run` (--raw merges the raw adapters)."""
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "4", "--checkpoint-every", "4", "--ema", "0.5", "--lr", "1e-2") == 0
    trained = load_file(str(out / "student.safetensors"))
    assert wadi.main(["export", "--run", str(out), "--out", str(tmp_path / "ema.safetensors")]) == 0
    exported = load_file(str(tmp_path / "ema.safetensors"))
    assert all(torch.equal(trained[k], exported[k]) for k in trained)
    assert wadi.main(["export", "--run", str(out), "--raw", "--out", str(tmp_path / "raw.safetensors")]) == 0
    raw = load_file(str(tmp_path / "raw.safetensors"))
    assert max((raw[k] - trained[k]).abs().max().item() for k in trained) > 1e-4


def test_ema_can_be_switched_on_or_off_at_a_resume(repo, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "2") == 0
    capsys.readouterr()
    assert train_cli(repo, out, "--max-steps", "3", "--checkpoint-every", "1", "--ema", "0.5",
                     "--resume", "latest") == 0
    assert "has no EMA: the student's EMA starts from its adapters at step 2" in capsys.readouterr().out
    two, three = (load_file(str(out / f"checkpoint-000000{i}.safetensors")) for i in (2, 3))
    for k in (k for k in three if k.startswith("ema.")):  # e_3 = 0.5 theta_2 + 0.5 theta_3
        torch.testing.assert_close(three[k], 0.5 * two["student." + k[4:]] + 0.5 * three["student." + k[4:]])
    assert train_cli(repo, out, "--max-steps", "4", "--checkpoint-every", "1", "--resume", "latest") == 0
    assert "which this run (EMA off) does not use" in capsys.readouterr().out
    assert not any(k.startswith("ema.") for k in load_file(str(out / "checkpoint-0000004.safetensors")))


def test_run_files_logs_and_messages(repo, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "2", "--resume", "latest") == 2  # no checkpoint to resume from
    assert not out.exists() or "run.json" not in os.listdir(out)  # a failed --resume leaves nothing behind
    old = os.umask(0o022)
    try:
        assert train_cli(repo, out, "--max-steps", "1") == 0
    finally:
        os.umask(old)
    for name in ("checkpoint-0000001.safetensors", "student.safetensors", "run.json", "train.log"):
        assert oct(os.stat(out / name).st_mode & 0o777) == "0o644", name
    line = (out / "train.log").read_text().splitlines()[0]
    assert line.startswith("step 1 loss_G ") and " time 20" in line  # each line carries its date and time
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text((out / "run.json").read_text())
    assert wadi.main(["export", "--run", str(empty), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --run: no checkpoint-*.safetensors in {empty}")
    assert wadi.main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "is not a train run directory (it has no run.json)" in capsys.readouterr().err
    assert wadi.main(["export", "--run", str(out), "--out", str(tmp_path) + "/"]) == 2
    assert "--out" in capsys.readouterr().err


def test_validation_grids_show_the_ema_student(repo, tmp_path, monkeypatch):
    """With EMA on, samples/step-N.png is drawn by the EMA student (what the run exports), not the raw one:
    the adapters the student holds while `validate` draws are the checkpoint's EMA."""
    seen, real = [], checkpoint.validate

    def recording(pipe, student, *args):
        seen.append({k: v.detach().clone() for k, v in adapter_state_dict(student).items()})
        return real(pipe, student, *args)

    monkeypatch.setattr(checkpoint, "validate", recording)
    out = tmp_path / "run"
    assert train_cli(repo, out, "--max-steps", "2", "--checkpoint-every", "2", "--validate-every", "2",
                     "--ema", "0.5", "--lr", "1e-2") == 0
    ckpt = load_file(str(out / "checkpoint-0000002.safetensors"))
    assert len(seen) == 1 and (out / "samples" / "step-0000002.png").exists()
    assert all(torch.equal(v, ckpt["ema." + k]) for k, v in seen[0].items())
    assert any(not torch.equal(ckpt["ema." + k], ckpt["student." + k]) for k in seen[0])  # EMA != raw here
