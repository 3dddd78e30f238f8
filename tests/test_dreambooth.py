"""dreambooth.py: the prior-preservation loss against a hand-written reference (and split over
processes), the class-image cache (reused, and redrawn when what it depends on changes), LoRaD's angle
composition exact (a student plus DreamBooth's angles is the teacher rotated by their sum), exact
resume, and `wadi.py dreambooth` then `sample --adapter-add` end to end on the toy and on a tiny SD repo
with real subject images (tests/data/dreambooth), with one-line errors."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import dreambooth
import toy
import wadi
from loading import file_metadata, read_tensors, save_tensors, write_json
from lorad import LoRaDLinear, add_adapters, adapter_state_dict, merge_adapters, rotate_pairs, shared_copy
from pipeline import load_pipeline

CAT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "dreambooth", "cat")


def test_prior_preservation_loss_against_a_hand_written_reference():
    """MSE(instance) + lambda MSE(class) as diffusers writes it (chunk the batch in two); the sums of
    two processes' shares of the rows add up to the whole batch's loss."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    instance = torch.tensor([True] * 3 + [False] * 3)
    loss, inst, prior = dreambooth.prior_preservation_loss(pred, target, instance, 3, 3, 0.7)
    p_inst, p_class = pred.chunk(2)
    t_inst, t_class = target.chunk(2)
    expected = ((p_inst - t_inst) ** 2).mean() + 0.7 * ((p_class - t_class) ** 2).mean()
    assert abs(loss.item() - expected.item()) < 1e-6 and abs(inst.item() - ((p_inst - t_inst) ** 2).mean()) < 1e-6
    shares = [dreambooth.prior_preservation_loss(pred[r::2], target[r::2], instance[r::2], 3, 3, 0.7)[0]
              for r in range(2)]
    assert abs(sum(shares).item() - loss.item()) < 1e-6
    alone = dreambooth.prior_preservation_loss(pred[:3], target[:3], instance[:3], 3, 0)  # no class rows
    assert alone[2].item() == 0 and abs(alone[0].item() - ((p_inst - t_inst) ** 2).mean()) < 1e-6


def test_class_images_are_cached_and_redrawn_when_their_key_changes(tmp_path):
    pipe = load_pipeline("toy")
    args = (["a large red square at the top left", "a small blue square at the top right"], 3, 0, 2, 3.0, 32)
    first = dreambooth.class_images(pipe, *args, str(tmp_path), log=lambda *a: None)
    assert first.shape == (3, 3, 32, 32)
    folders = os.listdir(tmp_path / "dreambooth-class")
    assert len(folders) == 1 and len(os.listdir(tmp_path / "dreambooth-class" / folders[0])) == 4  # 3 + json
    drawn = pipe.generate

    def refuse(*a, **k):
        raise AssertionError("drawn again")
    pipe.generate = refuse
    again = dreambooth.class_images(pipe, *args, str(tmp_path), log=lambda *a: None)
    assert torch.equal(again, first)  # the PNGs hold the same 8-bit images
    pipe.generate = drawn
    for changed in ((args[0][:1], *args[1:]), (args[0], 4, *args[2:]), (*args[:2], 1, *args[3:])):
        dreambooth.class_images(pipe, *changed, str(tmp_path), log=lambda *a: None)
    assert len(os.listdir(tmp_path / "dreambooth-class")) == 4  # prompts, count, seed: each its own
    pipe.denoiser.conv_in.bias.data += 1  # another teacher
    dreambooth.class_images(pipe, *args, str(tmp_path), log=lambda *a: None)
    assert len(os.listdir(tmp_path / "dreambooth-class")) == 5


def test_angles_add_exactly(tmp_path):
    """rotate(rotate(W, a), b) == rotate(W, a + b) in float64; and `add_run` on a LoRaD student of
    the toy U-Net gives every adapted layer the teacher's weight rotated by the sum of the angles (to
    float32 rounding: an adapter computes in fp32)."""
    g = torch.Generator().manual_seed(0)
    W, a, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((5, 8), (5, 4), (5, 4)))
    assert torch.allclose(rotate_pairs(rotate_pairs(W, a), b), rotate_pairs(W, a + b), atol=1e-14, rtol=0)
    teacher = load_pipeline("toy").denoiser.double()

    def adapted(seed):
        net = add_adapters(shared_copy(teacher), "student", 3).double()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in adapter_state_dict(net).values():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        return net
    student, tuned = adapted(1), adapted(2)
    a_student, a_tuned = ({n: m.theta_a @ m.theta_b for n, m in net.named_modules() if isinstance(m, LoRaDLinear)}
                          for net in (student, tuned))
    save_tensors(adapter_state_dict(tuned), str(tmp_path / "adapter.safetensors"),
                 {"adapter": "lorad", "rank": 3, "role": "student"})
    write_json(str(tmp_path / "dreambooth.json"), {"backbone": "toy"})
    merged = merge_adapters(shared_copy(student))
    weights = {n: m.weight.clone() for n, m in merged.named_modules() if isinstance(m, nn.Linear)}
    personalised = dreambooth.add_run(merged, str(tmp_path), "toy")
    assert a_student.keys() == a_tuned.keys() and len(a_tuned) > 10
    for name in a_tuned:
        expected = rotate_pairs(teacher.get_submodule(name).weight, a_student[name] + a_tuned[name])
        got = personalised.get_submodule(name).weight
        assert torch.allclose(got, expected, atol=1e-6, rtol=0), name  # adapters compute in fp32
        assert not torch.allclose(got, weights[name])


def subject(directory, count=4):
    """`count` toy images of a subject: a large blue square, striped."""
    os.makedirs(directory, exist_ok=True)
    images = toy.render(torch.tensor([[1, 2, 1, 0]] * count), torch.Generator().manual_seed(0),
                        subject=torch.ones(count, dtype=torch.bool))
    for i, image in enumerate(((images + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(os.path.join(directory, f"{i}.png"))
    return directory


def command(tmp_path, out, *extra, backbone=("--backbone", "toy")):
    return ["dreambooth", *backbone, "--instance-dir", subject(str(tmp_path / "subject")),
            "--instance-prompt", "v large blue square at the top left", "--class-prompt",
            "a large blue square at the top left", "--class-prompt", "a small red square at the top right",
            "--num-class-images", "4", "--class-steps", "2", "--batch-size", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--threads", "1", *extra]  # one thread: bit-exact resumes


def test_dreambooth_then_sample_on_the_toy_and_exact_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert wadi.main(command(tmp_path, run, "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "0")) == 0
    assert "sample the teacher with it" in capsys.readouterr().out
    assert sorted(os.listdir(run)) == ["adapter.safetensors", "checkpoint-0000002.safetensors",
                                       "checkpoint-0000004.safetensors", "dreambooth.json", "dreambooth.log",
                                       "unet.safetensors"]
    assert file_metadata(str(run / "adapter.safetensors")) == {"adapter": "lorad", "rank": "4", "role": "student"}
    assert len(open(run / "dreambooth.log").readlines()) == 4
    # two steps, then resumed to four: the same adapter, bit for bit, and the same log
    half = tmp_path / "half"
    assert wadi.main(command(tmp_path, half, "--steps", "2")) == 0
    assert wadi.main(command(tmp_path, half, "--steps", "4", "--resume", "latest")) == 0
    for name in ("adapter.safetensors", "unet.safetensors"):
        a, b = read_tensors(str(run / name)), read_tensors(str(half / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(run / "dreambooth.log").read() == open(half / "dreambooth.log").read()
    # the fine-tuned teacher from its own file (the backbone from its metadata), and a "student" (here the
    # teacher's own weights in a file) with the run added: different images from the plain student
    sample = ["sample", "--prompt", "v small red square at the bottom right"]
    assert wadi.main([*sample, "--unet", str(run / "unet.safetensors"), "--steps", "3", "--out",
                      str(tmp_path / "t.png")]) == 0
    student = str(tmp_path / "student.safetensors")
    save_tensors(load_pipeline("toy").denoiser.state_dict(), student, {"backbone": "toy"})
    for extra, name in (([], "plain.png"), (["--adapter-add", str(run)], "added.png")):
        assert wadi.main([*sample, "--unet", student, *extra, "--out", str(tmp_path / name)]) == 0
    plain, added = (np.asarray(Image.open(tmp_path / f)).astype(int) for f in ("plain.png", "added.png"))
    assert plain.shape == (32, 32, 3) and np.abs(plain - added).max() > 0


def test_lora_and_full_runs(tmp_path, capsys):
    student = str(tmp_path / "student.safetensors")
    save_tensors(load_pipeline("toy").denoiser.state_dict(), student, {"backbone": "toy"})
    for adapter in ("lora", "full"):
        assert wadi.main(command(tmp_path, tmp_path / adapter, "--steps", "1", "--adapter", adapter)) == 0
    sample = ["sample", "--unet", student, "--prompt", "v large blue square at the top left"]
    assert wadi.main([*sample, "--adapter-add", str(tmp_path / "lora"), "--out", str(tmp_path / "l.png")]) == 0
    capsys.readouterr()
    assert wadi.main([*sample, "--adapter-add", str(tmp_path / "full"), "--out", str(tmp_path / "f.png")]) == 2
    assert "a full run has no angles or low-rank difference to add" in capsys.readouterr().err


def test_dreambooth_on_a_tiny_sd_repo_with_real_images(repo, tmp_path):
    out = tmp_path / "run"
    assert wadi.main(["dreambooth", "--model", repo, "--instance-dir", CAT, "--instance-prompt", "a photo of sks cat",
                      "--class-prompt", "a photo of a cat", "--num-class-images", "2", "--class-steps", "2",
                      "--resolution", "16", "--steps", "2", "--out", str(out), "--cache-dir", str(tmp_path)]) == 0
    adapter = read_tensors(str(out / "adapter.safetensors"))
    assert adapter and all(k.endswith(("theta_a", "theta_b")) for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if k.endswith("theta_a"))  # it learned
    assert wadi.main(["sample", "--model", repo, "--unet", str(out / "unet.safetensors"), "--adapter-add", str(out),
                      "--prompt", "a photo of sks cat", "--resolution", "16", "--out", str(tmp_path / "x.png")]) == 0


def test_one_line_errors(tmp_path, repo, capsys):
    def error(argv):
        assert wadi.main(argv) == 2
        return capsys.readouterr().err.strip()
    base = command(tmp_path, tmp_path / "run", "--steps", "1")
    at = base.index("--instance-dir") + 1
    os.makedirs(tmp_path / "empty")
    assert "holds 0 image(s)" in error([*base[:at], str(tmp_path / "empty"), *base[at + 1:]])
    one = tmp_path / "one"
    os.makedirs(one)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "a.png")
    assert "holds 1 image(s)" in error([*base[:at], str(one), *base[at + 1:]])
    open(one / "b.png", "w").write("not a png")
    assert "cannot read the image" in error([*base[:at], str(one), *base[at + 1:]])
    assert wadi.main(base) == 0
    assert "already holds a run" in error(base)
    sample = ["sample", "--model", repo, "--prompt", "a cat", "--resolution", "16", "--out", str(tmp_path / "x.png")]
    assert "was trained on toy, not sd15" in error([*sample, "--adapter-add", str(tmp_path / "run")])
    assert "no adapter.safetensors" in error([*sample, "--adapter-add", str(tmp_path)])
    with pytest.raises(SystemExit):
        wadi.main([*base[:-1], "--adapter", "nope"])


def test_two_processes_train_what_one_does(tmp_path):
    """torchrun with 2 processes (gloo): each takes half of every batch's rows and the gradients are
    summed, so the losses equal the one-process run's and so does the adapter, to float rounding
    (measured: 8e-7 at most, 2e-10 on average; AdamW divides by the gradient's size, so a rounding
    difference in a near-zero gradient can move an entry by up to lr = 1e-4 a step: bounded at 1e-5)."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert wadi.main(command(tmp_path, one, "--steps", "3")) == 0
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "wadi.py", *command(tmp_path, two, "--steps", "3")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (read_tensors(str(d / "adapter.safetensors")) for d in (one, two))
    assert a.keys() == b.keys()
    differences = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert differences.max() < 1e-5 and differences.mean() < 1e-8
    assert any(a[k].abs().max() > 1e-4 for k in a if k.endswith("theta_a"))
    logs = [np.loadtxt(d / "dreambooth.log") for d in (one, two)]  # step, loss, instance, prior; rank 0 alone logs
    assert logs[1].shape == (3, 4) and np.allclose(logs[0], logs[1], rtol=0, atol=1e-5)


def test_the_pixart_path_on_toy_dit(tmp_path):
    """The DiT with T5 (its cached prompt embeddings and padding masks): a run, then a one-step model with it."""
    run = tmp_path / "run"
    assert wadi.main(command(tmp_path, run, "--steps", "2", backbone=("--backbone", "toy-dit"))) == 0
    adapter = read_tensors(str(run / "adapter.safetensors"))
    assert adapter and not any(k.startswith("adaln_single.") for k in adapter)  # the DiT student's rule
    assert wadi.main(["sample", "--backbone", "toy-dit", "--adapter-add", str(run), "--prompt",
                      "v large blue square at the top left", "--out", str(tmp_path / "x.png")]) == 0


def test_sdxl(tmp_path):
    """SDXL's two text encoders, pooled text and time ids reach the denoiser in training and sampling."""
    from tests.repo import write_tiny_sdxl_repo
    repo = write_tiny_sdxl_repo(str(tmp_path / "sdxl"))
    out = tmp_path / "run"
    assert wadi.main(["dreambooth", "--backbone", "sdxl", "--model", repo, "--instance-dir", CAT, "--instance-prompt",
                      "a photo of sks cat", "--class-prompt", "a photo of a cat", "--num-class-images", "2",
                      "--class-steps", "2", "--resolution", "16", "--steps", "2", "--out", str(out), "--cache-dir",
                      str(tmp_path)]) == 0
    assert wadi.main(["sample", "--backbone", "sdxl", "--model", repo, "--adapter-add", str(out), "--prompt",
                      "a photo of sks cat", "--resolution", "16", "--out", str(tmp_path / "x.png")]) == 0


def test_captions_from_metadata_jsonl(tmp_path, capsys):
    """Each instance image takes its caption from the folder's metadata.jsonl (imagefolder's layout)."""
    folder = subject(str(tmp_path / "subject"), count=2)
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write('{"file_name": "0.png", "text": "v large blue square at the top left"}\n'
                '{"file_name": "1.png", "text": "v large blue square at the top right"}\n')
    assert dreambooth.instance_prompts(folder, ["0.png", "1.png"], "x") == [
        "v large blue square at the top left", "v large blue square at the top right"]
    assert dreambooth.instance_prompts(str(tmp_path), ["0.png"], "x") == ["x"]
    with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
        f.write("not json\n")
    with pytest.raises(dreambooth.LoadError, match="not imagefolder metadata"):
        dreambooth.instance_prompts(folder, ["0.png", "1.png"], "x")
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write('{"file_name": "0.png", "text": "v large blue square at the top left"}\n')
    with pytest.raises(dreambooth.LoadError, match="no caption for 1.png"):
        dreambooth.instance_prompts(folder, ["0.png", "1.png"], "x")
