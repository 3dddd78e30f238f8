"""Relation inversion (ReVersion, Huang et al., SIGGRAPH Asia 2024) and plain textual inversion
(Gal et al., ICLR 2023) on the teacher, for the one-step student (the paper's "ReVersion with WaDi";
docs/reversion.md).

A new token (`<R>`) is added to the CLIP text encoder with its input-embedding row initialised from a
word ("and"), and that row alone is learned from a few exemplar images sharing a relation; every
other weight, every other row included, stays as it was:

    L = L_denoise + w L_steer
- L_denoise: the teacher's own denoising loss (its eps or v target) on the exemplars, under prompts
  drawn from their templates with the token in place of "{}", at timesteps drawn from the
  relation-focal importance distribution p(t) ∝ 1 - alpha cos(pi t / T) (alpha 0.5: p(999) / p(0)
  = 3, the high-noise steps that lay out a scene; `importance_weights`);
- L_steer: the relation-steering contrastive loss (InfoNCE, temperature 0.07, w 0.01; `steer_loss`):
  the normalised token row is pulled towards --positives words drawn per example from the
  prepositions and pushed from the prompts' other words (not stop words, not prepositions).

The denoising loss needs the denoiser at every t, which the one-step student (t = 999 only) is not:
the token is learned on the teacher and used unchanged by the student, whose text encoder is the
teacher's (`wadi.py sample --embedding`). ReVersion's code has both the steering loss and the
importance sampling off unless passed (its README's command passes them); here both are on by
default, and `--steer-weight 0 --uniform-t` is plain textual inversion. The word lists are ours (the
common English prepositions and function words), not ReVersion's files.
"""
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import cli
import embeddings
import toy
import trainlog
from checkpoint import (TrainingInterrupted, checkpoint_path, find_checkpoint, interruptible,
                        load_optimizer, optimizer_tensors, prune_checkpoints)
from cli import UsageError
from diffusion import predict
from loading import LoadError, file_metadata, read_tensors, save_tensors, write_json
from metrics import read_image_folder
from pipeline import BACKBONES, DTYPES, encode_text, load_pipeline

PREPOSITIONS = tuple("""about above across after against along amid among around at atop before behind
below beneath beside besides between beyond by down during from in inside into near next of off on
onto opposite out outside over past round through throughout to toward towards under underneath
until up upon with within without""".split())
STOP_WORDS = frozenset("""a an the and or but nor so yet is are was were be been being am do does did
has have had it its it's this that these those there here he she they them his her their we you i
me my our your who whom which what when where why how all any both each few more most other some
such no not only own same than too very can will just should now as if then while""".split())
RUN_FILES = ("invert.json", "invert.log", "learned_embeds.safetensors", "tensorboard")  # besides checkpoints
INIT = {"toy": "the"}  # the toy vocabulary has no "and" (its words: toy.WORDS); elsewhere "and"


def importance_weights(steps=1000, alpha=0.5):
    """ReVersion's relation-focal importance sampling: p(t) ∝ 1 - alpha cos(pi t / T), t < T."""
    f = 1 - alpha * torch.cos(math.pi * torch.arange(steps, dtype=torch.float64) / steps)
    return f / f.sum()  # (T,)


def steer_loss(anchor, positives, negatives, temperature=0.07):
    """Multi-positive InfoNCE of the token row `anchor` (D,) against `positives` (P, D) and
    `negatives` (N, D), by cosine similarity: logsumexp over all - logsumexp over the positives."""
    others = F.normalize(torch.cat([positives, negatives]), dim=-1)  # (P + N, D)
    logits = others @ F.normalize(anchor, dim=-1) / temperature  # (P + N,)
    return logits.logsumexp(0) - logits[:len(positives)].logsumexp(0)


class LearnedRow(nn.Module):
    """An embedding table whose last row (the new token) is a parameter, the others a frozen copy."""

    def __init__(self, table: nn.Embedding):
        super().__init__()
        self.register_buffer("frozen", table.weight.detach()[:-1])  # (V - 1, D)
        self.row = nn.Parameter(table.weight.detach()[-1].float().clone())  # (D,)

    def forward(self, ids):  # (B, L) -> (B, L, D)
        return F.embedding(ids, torch.cat([self.frozen, self.row[None].to(self.frozen.dtype)]))


def read_exemplars(directory, resolution, template=None):
    """(images (N, 3, S, S) in [-1, 1], templates: for each image its list of prompts with "{}") from
    a folder of images and ReVersion's `text.json` ({file name: [templates]}), or one `template` for
    all. Centre-cropped and resized (Lanczos) to `resolution`."""
    images, names = read_image_folder(directory, resolution, "--exemplars", at_least=2,
                                      hint="the relation needs several; ReVersion: 4 to 10")
    texts = os.path.join(directory, "text.json")
    if template is None and not os.path.isfile(texts):
        raise LoadError(f"--exemplars {directory} has no text.json ({{image: [templates with {{}}]}}, "
                        f"ReVersion's layout); or give --template \"a photo of {{}}\"")
    table = json.load(open(texts)) if template is None else {n: [template] for n in names}
    missing = [n for n in names if not table.get(n) or any("{}" not in t for t in table[n])]
    if missing:
        raise LoadError(f"{texts}: no templates with {{}} for {', '.join(missing[:3])}")
    return images, [table[n] for n in names]


def check_token(tokenizer, token, init):
    """The id of the word `init`, after checking that it is one token and `token` a new one."""
    init_ids = tokenizer.encode(init)
    if len(init_ids) != 1:
        raise UsageError(f"--init {init!r} is {len(init_ids)} tokens; give a word that is one")
    if token in tokenizer.vocab:
        raise UsageError(f"--token {token!r} is already in the tokenizer's vocabulary; choose a new one")
    return init_ids[0]


def word_ids(tokenizer, words):
    """The token ids of `words` (each may be several tokens)."""
    return [i for w in words for i in tokenizer.encode(w)]


def invert(pipe, images, templates, out, token="<R>", init="and", steps=3000, batch_size=8, lr=2e-3,
           steer_weight=0.01, positives=4, positive_words=PREPOSITIONS, temperature=0.07, alpha=0.5,
           seed=2023, checkpoint_every=500, keep_checkpoints=2, resume=None, log=print, log_to="file"):
    """Learn `token` on `pipe`'s teacher from `images` (N, 3, S, S) and their `templates` (module
    docstring); alpha 0 is uniform t. Writes `out`/learned_embeds.safetensors (diffusers' layout),
    invert.log (with log_to "tensorboard" also event files, trainlog.open_writer) and checkpoints;
    returns the learned row (D,)."""
    encoder, tokenizer, param = pipe.text_encoder, pipe.tokenizer, next(pipe.denoiser.parameters())
    table = encoder.text_model.embeddings.token_embedding
    embeddings.add_embeddings(tokenizer, encoder, {token: table.weight[check_token(
        tokenizer, token, init)].detach().float()[None]})
    token_id = tokenizer.encode(token)[0]
    table = encoder.text_model.embeddings.token_embedding
    learned = LearnedRow(table)
    encoder.text_model.embeddings.token_embedding = learned
    with torch.no_grad():
        x0 = images.to(param.device, param.dtype)
        x0 = pipe.vae.encode(x0) if pipe.vae is not None else x0  # (N, C, h, w), the posterior mean
    opt = torch.optim.AdamW([learned.row], lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if resume:
        tensors, start = read_tensors(resume), int(file_metadata(resume)["step"])
        with torch.no_grad():
            learned.row.copy_(tensors["row"])
        load_optimizer(opt, tensors, "opt")
        gen.set_state(tensors["rng"])
        log(f"resumed {resume} at step {start}")
    trainlog.keep_log(os.path.join(out, "invert.log"), start)
    weights = importance_weights(len(pipe.schedule.alphas_cumprod), alpha).float()
    skip = set(word_ids(tokenizer, STOP_WORDS)) | set(word_ids(tokenizer, positive_words)) | {
        tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, token_id}
    rows = learned.frozen.float()  # (V - 1, D), the other rows: the steering loss's words, fixed
    bar = tqdm(range(start, steps), desc="invert", initial=start, total=steps, dynamic_ncols=True)
    with interruptible() as stop, open(os.path.join(out, "invert.log"), "a") as logfile, \
            trainlog.open_writer(out, log_to, start) as writer:
        for step in bar:
            pick = torch.randint(len(images), (batch_size,), generator=gen)
            prompts = [templates[i][torch.randint(len(templates[i]), (), generator=gen)].format(token)
                       for i in pick.tolist()]
            t = torch.multinomial(weights, batch_size, replacement=True, generator=gen)
            eps = torch.randn((batch_size, *x0.shape[1:]), generator=gen).to(x0)
            xt = pipe.schedule.add_noise(x0[pick], eps, t)
            pred = predict(pipe.denoiser, xt, t.to(param.device), encode_text(encoder, tokenizer, prompts))
            denoise = F.mse_loss(pred.float(), pipe.schedule.target(x0[pick], eps, t).float())
            loss, steer = denoise, torch.zeros(())
            if steer_weight:
                words = [positive_words[i] for _ in prompts
                         for i in torch.randperm(len(positive_words), generator=gen)[:positives].tolist()]
                negative = [i for p in prompts for i in tokenizer.encode(p) if i not in skip]
                steer = steer_loss(learned.row, rows[word_ids(tokenizer, words)], rows[negative], temperature)
                loss = loss + steer_weight * steer
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logfile.write(f"{step + 1} {loss.item():.6f} {denoise.item():.6f} {steer.item():.6f}\n")
            trainlog.log_scalars(writer, step + 1, {"loss/total": loss.item(), "loss/denoise": denoise.item(),
                                                    "loss/steer": steer.item()})
            bar.set_postfix(loss=f"{denoise.item():.4f}", steer=f"{steer.item():.3f}")
            last = step + 1 == steps
            if last or stop["requested"] or (step + 1) % checkpoint_every == 0:
                path = checkpoint_path(out, step + 1)
                save_tensors({"row": learned.row, "rng": gen.get_state(), **optimizer_tensors(opt, "opt")[0]},
                             path, {"step": step + 1})
                prune_checkpoints(out, keep_checkpoints)
            if stop["requested"] and not last:
                raise TrainingInterrupted(f"stopped after step {step + 1}; continue with --resume latest")
    with torch.no_grad():
        table.weight[-1] = learned.row.to(table.weight.dtype)
    encoder.text_model.embeddings.token_embedding = table
    embeddings.save_embeddings(os.path.join(out, "learned_embeds.safetensors"), {token: learned.row.detach()})
    log(f"wrote {out}/learned_embeds.safetensors ({token}, norm {learned.row.norm():.3f})")
    return learned.row.detach()


def add_parser(sub):
    """Register the `invert` command on wadi.py's subcommands `sub`."""
    p = sub.add_parser("invert", help="learn a relation token (ReVersion) or a textual-inversion token on the "
                                      "teacher, for the one-step student (sample --embedding)",
                       description=__doc__.split("\n\n")[0])
    one_clip = [b for b in sorted(BACKBONES) if "pixart" not in b and b not in ("toy-dit", "sdxl")]
    p.add_argument("--backbone", choices=one_clip,
                   default="sd15", help="the model family (CLIP text encoders only; default: %(default)s)")
    p.add_argument("--model", help="base model repo or directory (default: the backbone's)")
    p.add_argument("--exemplars", required=True, help="a folder of images with ReVersion's text.json ({image: "
                                                      "[templates with {}]}), or give --template")
    p.add_argument("--template", help="one prompt template for every image, e.g. \"a photo of {}\" (textual "
                                      "inversion)")
    p.add_argument("--out", required=True, help="run directory: learned_embeds.safetensors, invert.log, checkpoints")
    p.add_argument("--resolution", type=cli.POSITIVE, help="pixels the exemplars are resized to (default: the "
                                                          "backbone's native resolution)")
    p.add_argument("--token", default="<R>", help="the new token (default: %(default)s)")
    p.add_argument("--init", help="the word whose embedding row starts the token's (default: and; toy: the)")
    p.add_argument("--steps", type=cli.POSITIVE, default=3000, help="optimisation steps (default: %(default)s)")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=8, help="exemplar images per step (default: 8)")
    p.add_argument("--lr", type=cli.RATE, default=2e-3, help="AdamW learning rate (ReVersion's effective 2e-3)")
    p.add_argument("--steer-weight", type=cli.number(0), default=0.01, help="weight of the relation-steering "
                   "loss (0: off, plain textual inversion; default: %(default)s)")
    p.add_argument("--positives", type=cli.POSITIVE, default=4, help="positive words per example (default: 4)")
    p.add_argument("--positive-words", help="comma-separated positive words (default: English prepositions; "
                                            "toy: its position words)")
    p.add_argument("--temperature", type=cli.number(0, low_open=True), default=0.07, help="InfoNCE temperature")
    p.add_argument("--alpha", type=cli.number(0, 1), default=0.5, help="importance sampling p(t) ∝ 1 - alpha "
                                                                      "cos(pi t / T) (default: %(default)s)")
    p.add_argument("--uniform-t", action="store_true", help="t uniform (alpha 0), as plain textual inversion")
    p.add_argument("--seed", type=cli.NON_NEGATIVE, default=2023, help="data and noise seed (ReVersion's 2023)")
    p.add_argument("--checkpoint-every", type=cli.POSITIVE, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=cli.NON_NEGATIVE, default=2, help="latest checkpoints kept (0: all)")
    p.add_argument("--resume", help="a checkpoint file, or latest in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--log", dest="log_to", choices=trainlog.LOGS, default="file", help="file: invert.log; "
                   "tensorboard: also TensorBoard event files in --out/tensorboard (pip install -r "
                   "requirements-tensorboard.txt; default: file)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the frozen networks' dtype (the "
                                                                          "token row is learned in fp32)")
    p.set_defaults(func=command)


def command(args):
    """`wadi.py invert`."""
    trainlog.check_log(args.log_to)  # a missing tensorboard package: before anything is loaded or written
    found = cli.check_run_out(args.out, args.resume, args.overwrite, RUN_FILES)
    resume = find_checkpoint(args.out, args.resume) if args.resume else None
    device = cli.pick_device(args.device)
    resolution = cli.check_resolution(args.backbone, args.model, args.resolution)
    pipe = load_pipeline(args.backbone, args.model, dtype=DTYPES[args.dtype], device=device)
    images, templates = read_exemplars(args.exemplars, resolution or pipe.resolution, args.template)
    init = args.init or INIT.get(args.backbone, "and")
    check_token(pipe.tokenizer, args.token, init)
    cli.remove_run(args.out, found)
    os.makedirs(args.out, exist_ok=True)
    words = args.positive_words.split(",") if args.positive_words else \
        toy.POSITIONS if args.backbone in toy.BACKBONES else PREPOSITIONS
    options = dict(token=args.token, init=init, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, steer_weight=args.steer_weight,
                   positives=args.positives, positive_words=tuple(words), temperature=args.temperature,
                   alpha=0.0 if args.uniform_t else args.alpha, seed=args.seed)
    write_json(os.path.join(args.out, "invert.json"), {"backbone": args.backbone, "model": args.model,
                                                       "exemplars": args.exemplars, **options})
    start = time.perf_counter()
    invert(pipe, images, templates, args.out, checkpoint_every=args.checkpoint_every,
           keep_checkpoints=args.keep_checkpoints, resume=resume, log_to=args.log_to, **options)
    print(f"learned {args.token} in {time.perf_counter() - start:.0f} s; sample with it: python wadi.py sample "
          f"--embedding {args.out}/learned_embeds.safetensors --prompt \"... {args.token} ...\"")
