"""invert.py: ReVersion's importance distribution and steering loss against hand-written references,
only the new token's row learned (every other weight bit-identical), exact resume, and `wadi.py invert`
then `sample --embedding` end to end on the toy and on a tiny SD repo, with one-line errors."""
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import invert
import wadi
from embeddings import read_embeddings
from pipeline import load_pipeline


def test_importance_weights():
    """p(t) ∝ 1 - 0.5 cos(pi t / 1000): sums to 1, p(999) / p(0) = 3 (to 2e-5), increasing."""
    p = invert.importance_weights()
    assert p.shape == (1000,) and abs(p.sum().item() - 1) < 1e-12
    assert abs(p[999].item() / p[0].item() - 3) < 2e-5 and bool((p[1:] > p[:-1]).all())
    assert torch.allclose(invert.importance_weights(alpha=0.0), torch.full((1000,), 1e-3, dtype=torch.float64))


def test_steer_loss_against_a_hand_written_reference():
    """-log(sum over positives of exp(cos / tau) / sum over all of exp(cos / tau)), its gradient in float64, and
    only the anchor's row of a table gets one."""
    g = torch.Generator().manual_seed(0)
    anchor, pos, neg = torch.randn(8, generator=g), torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g)

    def cos(a, b):
        return sum(x * y for x, y in zip(a.tolist(), b.tolist())) / (a.norm().item() * b.norm().item())
    exps = [math.exp(cos(anchor, x) / 0.07) for x in [*pos, *neg]]
    expected = -math.log(sum(exps[:3]) / sum(exps))
    assert abs(invert.steer_loss(anchor, pos, neg).item() - expected) < 1e-4
    args = (anchor.double().requires_grad_(), pos.double(), neg.double())
    assert torch.autograd.gradcheck(lambda a, p, n: invert.steer_loss(a, p, n, 0.5), args)
    table = torch.randn(10, 8, generator=g, requires_grad=True)
    invert.steer_loss(table[9], table[[1, 2]].detach(), table[[3, 4, 5]].detach()).backward()
    assert table.grad[9].abs().sum() > 0 and not table.grad[:9].any()


def toy_exemplars(directory, count=3):
    """`count` small toy-like images and ReVersion's text.json."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(os.path.join(directory, f"{i}.png"))
    with open(os.path.join(directory, "text.json"), "w") as f:
        json.dump({f"{i}.png": ["a small red circle at the {}", "a large blue square at the {}"]
                   for i in range(count)}, f)
    return directory


def test_only_the_token_row_is_learned_and_resume_is_exact(tmp_path):
    pipe = load_pipeline("toy")
    before = {k: v.clone() for net in (pipe.denoiser, pipe.text_encoder) for k, v in net.state_dict().items()}
    images, templates = invert.read_exemplars(toy_exemplars(str(tmp_path / "ex")), 32)
    assert images.shape == (3, 3, 32, 32) and -1 <= images.min() and images.max() <= 1
    os.makedirs(tmp_path / "a")
    row = invert.invert(pipe, images, templates, str(tmp_path / "a"), init="the", steps=4, batch_size=2,
                        checkpoint_every=2, log=lambda *a: None)
    after = {k: v for net in (pipe.denoiser, pipe.text_encoder) for k, v in net.state_dict().items()}
    table = "text_model.embeddings.token_embedding.weight"
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != table)
    assert torch.equal(after[table][:-1], before[table]) and torch.equal(after[table][-1], row)
    assert not torch.equal(row, before[table][514])  # moved from "the"
    os.makedirs(tmp_path / "denoise")  # the denoising loss alone moves it too
    alone = invert.invert(load_pipeline("toy"), images, templates, str(tmp_path / "denoise"), init="the", steps=1,
                          batch_size=2, steer_weight=0.0, log=lambda *a: None)
    assert not torch.equal(alone, before[table][514])
    assert torch.equal(read_embeddings(str(tmp_path / "a" / "learned_embeds.safetensors"))["<R>"][0], row)
    assert len(open(tmp_path / "a" / "invert.log").readlines()) == 4
    # stopped after step 2 and resumed: the same row, bit for bit
    for steps, resume in ((2, None), (4, str(tmp_path / "b" / "checkpoint-0000002.safetensors"))):
        os.makedirs(tmp_path / "b", exist_ok=True)
        resumed = invert.invert(load_pipeline("toy"), images, templates, str(tmp_path / "b"), init="the",
                                steps=steps, batch_size=2, checkpoint_every=2, resume=resume, log=lambda *a: None)
    assert torch.equal(resumed, row)
    assert open(tmp_path / "b" / "invert.log").read() == open(tmp_path / "a" / "invert.log").read()


def test_invert_then_sample_on_the_toy(tmp_path, capsys):
    ex, out = toy_exemplars(str(tmp_path / "ex")), str(tmp_path / "run")
    argv = ["invert", "--backbone", "toy", "--exemplars", ex, "--out", out, "--steps", "3", "--batch-size", "2"]
    assert wadi.main(argv) == 0
    assert "learned <R> in" in capsys.readouterr().out
    assert wadi.main(argv) == 2 and "already holds a run" in capsys.readouterr().err
    embedding = os.path.join(out, "learned_embeds.safetensors")
    sample = ["sample", "--backbone", "toy", "--prompt", "a small red circle at the <R>"]
    assert wadi.main([*sample, "--out", str(tmp_path / "r.png"), "--embedding", embedding]) == 0
    assert "not: <r>" not in capsys.readouterr().err  # the learned token is a known word
    assert wadi.main([*sample, "--out", str(tmp_path / "plain.png")]) == 0
    with_token, without = (np.asarray(Image.open(tmp_path / f)) for f in ("r.png", "plain.png"))
    assert with_token.shape == (32, 32, 3) and np.abs(with_token.astype(int) - without).max() > 0


def test_invert_then_sample_on_a_tiny_sd_repo(repo, tmp_path):
    ex, out = toy_exemplars(str(tmp_path / "ex")), str(tmp_path / "run")
    assert wadi.main(["invert", "--model", repo, "--exemplars", ex, "--out", out, "--steps", "2",
                      "--batch-size", "2", "--init", "a", "--token", "<painted-on>", "--resolution", "16"]) == 0
    learned = read_embeddings(os.path.join(out, "learned_embeds.safetensors"))
    assert list(learned) == ["<painted-on>"] and learned["<painted-on>"].shape == (1, 32)
    assert wadi.main(["sample", "--model", repo, "--embedding", os.path.join(out, "learned_embeds.safetensors"),
                      "--prompt", "cat <painted-on> wall", "--resolution", "16", "--out", str(tmp_path / "x.png")]) == 0


def test_one_line_errors(tmp_path, capsys):
    def error(*argv):
        assert wadi.main(["invert", "--backbone", "toy", "--out", str(tmp_path / "run"), *argv]) == 2
        return capsys.readouterr().err.strip()
    os.makedirs(tmp_path / "empty")
    assert "holds 0 image(s)" in error("--exemplars", str(tmp_path / "empty"))
    one = toy_exemplars(str(tmp_path / "one"), count=1)
    assert "holds 1 image(s)" in error("--exemplars", one)
    two = toy_exemplars(str(tmp_path / "two"), count=2)
    os.remove(os.path.join(two, "text.json"))
    assert "has no text.json" in error("--exemplars", two)
    open(os.path.join(two, "2.png"), "w").write("not a png")
    assert "cannot read the image" in error("--exemplars", two, "--template", "a photo of {}")
    ex = toy_exemplars(str(tmp_path / "ex"))
    assert "is 3 tokens" in error("--exemplars", ex, "--init", "and")
    assert "already in the tokenizer's vocabulary" in error("--exemplars", ex, "--token", "red</w>")
    with pytest.raises(SystemExit):
        wadi.main(["invert", "--backbone", "pixart", "--exemplars", ex, "--out", str(tmp_path / "run")])
    for message in capsys.readouterr().err.strip().splitlines()[-1:]:
        assert "invalid choice: 'pixart'" in message
