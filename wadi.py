"""WaDi's command line.

    python wadi.py train --backbone sd15 --prompts journeydb.jsonl --out runs/sd15   (VSD, paper Sec. 3.3)
    python wadi.py train --backbone sd15 --dry-run                  (counts and memory, no download)
    python wadi.py export --run runs/sd15 --out wadi-sd15.safetensors
    python wadi.py sample --unet STUDENT.safetensors --prompt "a cat" --out cat.png
    python wadi.py sample --backbone sd15 --steps 25 --guidance 7.5 --prompt "a cat" --out teacher.png
    python wadi.py train --backbone pixart --prompts journeydb.jsonl --out runs/pixart   (PixArt-alpha, 256 px)
    python wadi.py pretrain --backbone toy --out runs/pretrain-toy
    python wadi.py sample --backbone sd15 --unet STUDENT.safetensors --controlnet lllyasviel/sd-controlnet-canny \
        --control-image edges.png --prompt "a bird" --out bird.png
    python wadi.py analyze --student runs/sd15 --out analysis/sd15     (paper Fig. 2: norm vs direction)

`train` distills the backbone's teacher into a one-step student (under torchrun: DDP over all
processes); `export` writes a run's merged student as one denoiser file in diffusers keys; `sample` draws
one-step images from a student (x0 = (z - sqrt(1 - a_T) eps(z, 999)) / sqrt(a_T)) or DDIM images with
classifier-free guidance from the teacher; `pretrain` trains the toy backbone from scratch; `analyze`
compares a student's weights with its teacher's (analysis.py). Every
failure the user can fix (a bad option value, missing or unreachable weights, a corrupt checkpoint, a bad
prompt file, a non-finite loss) is one line on stderr and exit code 2; Ctrl-C during `train` saves the
step and exits with 130.
"""
import dataclasses
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import analysis
import cli
import pretrain
import toy
from loading import LoadError, fetch_file, read_json, read_tensors
from lorad import ADAPTERS, count_trainable, load_adapters
from pipeline import BACKBONES, CACHE_DIR, CACHED, DENOISERS, DTYPES, TEXT_ENCODERS, check_steps, image_grid, \
    load_control, load_pipeline, pick_backbone, pick_dtype, read_prompts, student_a_T, student_backbone, \
    text_encoder_kind
from vae import AutoencoderKL
from vsd import WEIGHT_DTYPES, TrainConfig, TrainingError, TrainingInterrupted, VSDConfig, build_networks, \
    distributed, export_student, find_checkpoint, load_checkpoint, own_adapters, train


class UsageError(Exception):
    """A bad combination of command-line options."""


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def save_images(images, out, grid=False):
    """uint8 images (N, H, W, 3): `out` ending in .png takes a single image (or the grid of several,
    with each image beside it as NAME-i.png); otherwise `out` is a directory of 00000.png, ..."""
    from PIL import Image
    if out.endswith(".png"):
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if len(images) == 1:
            Image.fromarray(images[0]).save(out)
            return
        for i, im in enumerate(images):
            Image.fromarray(im).save(f"{out[:-4]}-{i}.png")
        image_grid(images).save(out)
        return
    os.makedirs(out, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(out, f"{i:05d}.png"))
    if grid:
        image_grid(images).save(os.path.join(out, "grid.png"))


def cmd_sample(args):
    prompts = list(args.prompt or []) + (read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompts FILE")
    check_out_file(args.out, (".png",), "--out", directory_ok=True)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    unet = fetch_file(args.unet, "--unet") if args.unet else None
    if bool(args.controlnet) != bool(args.control_image):
        raise UsageError("--controlnet and --control-image go together")
    if args.control_image and len(args.control_image) not in (1, len(prompts)):
        raise UsageError(f"give one --control-image for all prompts or one per prompt ({len(prompts)} prompts, "
                         f"{len(args.control_image)} images)")
    backbone, model = student_backbone(args.backbone, args.model, unet, "--unet", args.resolution)
    check_steps(model, args.steps)
    pipe = load_pipeline(backbone, model, unet, dtype, device, resolution=args.resolution)
    resolution = check_resolution(pipe, args.resolution)
    pipe.prepare_prompts(prompts + ([""] if args.steps > 1 else []), args.cache_dir)
    a_T = student_a_T(unet)
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_per_prompt))]
    controlnet, control = None, None
    if args.controlnet:
        controlnet, control = load_control(pipe, args.controlnet, args.control_image, resolution)
        control = control.repeat_interleave(args.num_per_prompt, 0) if len(control) > 1 else control  # one per job
    images = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sample", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        image = control[start:start + args.batch_size] if control is not None and len(control) > 1 else control
        images.append(pipe.generate([p for p, _ in batch], [s for _, s in batch], args.steps, args.guidance, a_T,
                                    resolution, controlnet, image, args.control_scale))
    save_images(np.concatenate(images), args.out, args.grid)
    print(f"wrote {len(jobs)} image(s) to {args.out}")


def check_resolution(pipe, resolution):
    """The resolution to generate at (default: the backbone's), or a UsageError when the denoiser's input
    grid cannot take it (a multiple of the autoencoder's downsampling, times the patch size of a DiT)."""
    resolution = resolution or pipe.resolution
    factor = pipe.size_multiple()
    if resolution % factor:
        patch = " x the denoiser's patch size" if factor != pipe.downsampling() else ""
        raise UsageError(f"--resolution {resolution} is not a multiple of {factor} (the autoencoder's "
                         f"downsampling{patch})")
    return resolution


def check_out_file(path, suffixes, option, directory_ok=False):
    """A UsageError unless `path` can be written as a file ending in one of `suffixes` (or, with
    `directory_ok`, names a directory)."""
    if path.endswith(suffixes) and not os.path.isdir(path):
        return
    if directory_ok and not path.endswith(suffixes):
        return
    raise UsageError(f"{option} {path}: give a file name ending in {' or '.join(suffixes)}"
                     + (" (or a directory)" if directory_ok else ""))


def dry_run(args):
    """Build the three networks, the text encoder and the VAE on the meta device from the built-in
    configs; print parameter counts and a memory estimate (a CACHED text encoder, T5, is freed before
    training starts and is not counted)."""
    spec = pick_backbone(args.backbone, args.resolution, args.model)
    with torch.device("meta"):
        teacher = DENOISERS[spec.denoiser].from_config(read_json(os.path.join(spec.configs, spec.denoiser, "config.json")))
        student, fake = build_networks(teacher, args.rank, args.rank_fake, args.adapter)
        text_config = read_json(os.path.join(spec.configs, "text_encoder", "config.json"))
        text_kind = text_encoder_kind(text_config)
        text = TEXT_ENCODERS[text_kind][0].from_config(text_config)
        vae_config = os.path.join(spec.configs, "vae", "config.json")
        vae = AutoencoderKL.from_config(read_json(vae_config)) if os.path.isfile(vae_config) else None
    total = sum(p.numel() for p in teacher.parameters())
    nbytes = WEIGHT_DTYPES[args.mixed_precision].itemsize
    trainable = count_trainable(student) + count_trainable(fake)
    print(f"backbone {args.backbone}: adapter {args.adapter}, ranks {args.rank} / {args.rank_fake}")
    for name, net in (("teacher", teacher), ("student", student), ("fake score", fake)):
        print(f"  {name:<10} total {sum(p.numel() for p in net.parameters()) / 1e6:8.2f}M   "
              f"trainable {count_trainable(net) / 1e6:.2f}M")
    text_n, vae_n = sum(p.numel() for p in text.parameters()), sum(p.numel() for p in vae.parameters()) if vae else 0
    cached = text_kind in CACHED
    gib = 2 ** 30
    weights = (total + (0 if cached else text_n)) * nbytes + vae_n * 4
    states = trainable * 16 + (count_trainable(student) * 4 if args.ema else 0)  # fp32 param, grad, 2 AdamW
    print(f"  text encoder {text_n / 1e6:.2f}M" + (f" ({text_n * nbytes / gib:.2f} GiB: encodes the prompts once "
                                                   f"into the cache, freed before training, not counted below)"
                                                   if cached else "") + f", VAE {vae_n / 1e6:.2f}M")
    print(f"memory per GPU: frozen weights {weights / gib:.2f} GiB (one denoiser copy shared by the three "
          f"networks), adapters + grads + AdamW {states / gib:.2f} GiB, total {(weights + states) / gib:.2f} GiB "
          f"before activations (batch {args.batch_size} at {args.resolution or spec.resolution}px; "
          f"--grad-checkpointing trades compute for most of them)")


# `train` defaults: the paper's settings (as in the official scripts), and for the toy what distills its teacher on 2 CPU
# cores within minutes (tuned on the shipped teacher; see README)
TRAIN_DEFAULTS = {
    "paper": dict(batch_size=16, max_steps=0, lr=1e-4, lr_fake=1e-2, rank=256, rank_fake=32, guidance=1.5, ema=0.0,
                  checkpoint_every=500, validate_every=500),
    "pixart": dict(rank=128),
    "toy": dict(batch_size=4, max_steps=1200, lr=1e-3, lr_fake=1e-2, rank=16, rank_fake=8, guidance=3.0, ema=0.99,
                checkpoint_every=300, validate_every=300),
}
# the toy DiT: the toy's settings for twice the steps (docs/toy-dit.md: at 1,200 its FD target was just missed)
TRAIN_DEFAULTS["toy-dit"] = {**TRAIN_DEFAULTS["toy"], "max_steps": 2400, "checkpoint_every": 600, "validate_every": 600}


def apply_train_defaults(args):
    for key, value in {**TRAIN_DEFAULTS["paper"], **TRAIN_DEFAULTS.get(args.backbone, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join("runs", args.backbone)


def report_toy(pipe, student, model, out, n, cache_dir=None):
    """The toy's result: FD and prompt accuracy of teacher (25-step DDIM + CFG), teacher (1 step) and
    student (1 step) on the same n prompts and seeds, as a table, metrics.json and comparison.png. The
    teacher's figures come from the repo's teacher_metrics.json when measured under the same protocol."""
    classifier = toy.load_classifier(os.path.join(model, "classifier"))
    protocol = {**toy.PROTOCOL, "n": n}
    cached, _ = toy.cached_teacher_metrics(model, protocol, toy.teacher_fingerprint(pipe))
    results, rows = toy.evaluate_toy(pipe, student.eval(), classifier, cached=cached, cache_dir=cache_dir, **protocol)
    image_grid(((rows.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), cols=8).save(
        os.path.join(out, "comparison.png"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(toy.metrics_table(results))
    print(f"rows of {os.path.join(out, 'comparison.png')}: " + " | ".join(results))


def cmd_train(args):
    apply_train_defaults(args)
    if args.dry_run:
        return dry_run(args)
    if args.prompts:
        prompts = read_prompts(args.prompts)
    elif args.backbone in toy.BACKBONES:
        prompts = [toy.prompt(a) for a in toy.all_attributes()]
    else:
        raise UsageError("give --prompts FILE (text, JSON list, or the JourneyDB .jsonl annotations)")
    if args.resume:
        find_checkpoint(args.out, args.resume)  # before anything is written to --out
    rank, world, local_rank = distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = WEIGHT_DTYPES[args.mixed_precision]
    model = args.model or pick_backbone(args.backbone, args.resolution).repo
    pipe = load_pipeline(args.backbone, model, dtype=dtype, device=device, vae=rank == 0, resolution=args.resolution)
    tc = TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     max_steps=args.max_steps, epochs=args.epochs, resolution=check_resolution(pipe, args.resolution),
                     lr=args.lr, lr_fake=args.lr_fake, rank=args.rank, rank_fake=args.rank_fake, adapter=args.adapter,
                     mixed_precision=args.mixed_precision, grad_checkpointing=args.grad_checkpointing,
                     ema=args.ema, seed=args.seed, checkpoint_every=args.checkpoint_every,
                     validate_every=args.validate_every, keep_checkpoints=args.keep_checkpoints, resume=args.resume,
                     cache_dir=args.cache_dir)
    if args.backbone in toy.BACKBONES:
        tc.validation_prompts = tuple(toy.prompt(a) for a in toy.balanced_attributes(8))
    meta = {"backbone": args.backbone, "base_model": model, "adapter": args.adapter}
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**meta, **dataclasses.asdict(tc), "guidance": args.guidance}, f, indent=2)
    student, _ = train(pipe, prompts, tc, VSDConfig(guidance=args.guidance), device, meta)
    if args.backbone in toy.BACKBONES and rank == 0:
        report_toy(pipe, student, model, args.out, args.eval_samples, args.cache_dir)


def cmd_pretrain(args):
    if args.controlnet:
        out, defaults = args.out or os.path.join("runs", "pretrain-toy-controlnet"), dict(steps=400, batch_size=16)
        existing = os.path.join(out, "config.json")
        if args.backbone != "toy":
            raise UsageError(f"--controlnet is for --backbone toy (the U-Net teacher), not {args.backbone}")
    else:
        out = args.out or os.path.join("runs", f"pretrain-{args.backbone}")
        defaults = dict(steps=pretrain.DIT_STEPS if args.backbone == "toy-dit" else 1500, batch_size=32)
        existing = os.path.join(out, BACKBONES[args.backbone].denoiser, "config.json")
    if os.path.isfile(existing) and not args.overwrite:
        raise UsageError(f"--out {out} already holds a model ({os.path.relpath(existing, out)}); pass --overwrite to "
                         f"replace it (the shipped assets/{args.backbone} too), or give another --out")
    options = {**defaults, **{k: getattr(args, k) for k in ("steps", "batch_size") if getattr(args, k) is not None},
               "lr": args.lr, "seed": args.seed}
    if args.controlnet:
        pretrain.pretrain_toy_controlnet(out, args.model or BACKBONES["toy"].repo, **options)
    elif args.backbone == "toy-dit":
        pretrain.pretrain_toy_dit(out, cache_dir=args.cache_dir, **options)
    else:
        pretrain.pretrain_toy(out, **options)


def load_run(run_dir, checkpoint="latest", ema=False):
    """A `train` run directory: its options (run.json), the checkpoint file (`checkpoint`: a path or latest),
    the pipeline (no VAE) and the student and fake score networks holding that checkpoint's adapters; with
    `ema`, the student holds the checkpoint's EMA adapters when it has them (what `train` exports)."""
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        raise LoadError(f"--run {run_dir} is not a train run directory (it has no run.json)")
    run = read_json(os.path.join(run_dir, "run.json"))
    checkpoint = find_checkpoint(run_dir, checkpoint, option="--run" if checkpoint == "latest" else "--checkpoint")
    pipe = load_pipeline(run["backbone"], run["base_model"], vae=False)
    student, fake = build_networks(pipe.unet, run["rank"], run["rank_fake"], run["adapter"])
    load_checkpoint(checkpoint, student, fake, {}, None, log=lambda _: None)
    averaged = own_adapters(read_tensors(checkpoint), "ema")
    if ema and averaged:
        load_adapters(student, averaged)
    return run, checkpoint, pipe, student, fake


def cmd_export(args):
    check_out_file(args.out, (".safetensors",), "--out")
    run, checkpoint, pipe, student, _ = load_run(args.run, args.checkpoint or "latest", ema=not args.raw)
    weights = "raw adapters" if args.raw or not run.get("ema") else "EMA adapters"
    meta = {"backbone": run["backbone"], "base_model": run["base_model"], "adapter": run["adapter"],
            "a_T": VSDConfig().a_T, "prediction_type": pipe.schedule.prediction_type,
            "checkpoint": os.path.basename(checkpoint)}
    export_student(student, args.out, meta)
    print(f"wrote {args.out} (merged one-step denoiser from {checkpoint}, {weights})")


def cmd_analyze(args):
    analysis.analyze_command(args.student, args.out, args.teacher, args.json, args.swap, args.swap_out,
                             args.backbone, args.model, args.adapter)


def add_common(p, backbone_help="the model family (default: sd15)", default="sd15"):
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=sorted(BACKBONES), default=default, help=backbone_help)
    g.add_argument("--model", help="base model: a Hugging Face repo id or a local directory in the same layout "
                                   "(default: the backbone's repo, README \"Backbones\")")
    g.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on a GPU, fp32 on the CPU)")
    g.add_argument("--cache-dir", default=CACHE_DIR, help="pixart: where the T5 prompt embeddings are cached")
    return g


def build_parser():
    parser = cli.Parser(prog="wadi.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)

    p = sub.add_parser("sample", help="one-step (student) or DDIM (teacher) text-to-image sampling",
                       description="One-step images from a distilled student, or DDIM + CFG images from the teacher.")
    add_common(p, "the model family (default: the one recorded in --unet's metadata, else sd15)", None)
    g = p.add_argument_group("what to draw")
    g.add_argument("--unet", "--transformer", dest="unet",
                   help="one-step student: a full U-Net (or PixArt transformer) in diffusers keys, safetensors or a "
                        "PyTorch state dict (our export, the official gudaochangsheng/WaDi/"
                        "rotated_unet-sdv1-5.safetensors, DMD2's pytorch_model.bin): a local path or "
                        "owner/repo/file on the Hub (default: the base model's own denoiser, the teacher)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="prompt file: text (one per line), JSON list, or JourneyDB .jsonl")
    g.add_argument("--num-per-prompt", type=cli.POSITIVE, default=1, help="images per prompt")
    g.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="image i uses seed + i, whatever the batch")
    g.add_argument("--out", required=True, help="FILE.png, or a directory (00000.png, ...)")
    g.add_argument("--grid", action="store_true", help="also write grid.png (directory output)")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=cli.POSITIVE, default=1,
                   help="1: one-step generation; 2 up to the schedule's 1000: DDIM with CFG")
    g.add_argument("--guidance", type=cli.SCALE, default=7.5, help="CFG scale for DDIM")
    g.add_argument("--resolution", type=cli.POSITIVE, help="pixels (default: the backbone's native resolution; "
                                                          "pixart: 256, 512 or 1024 picks that model)")
    g.add_argument("--batch-size", type=cli.POSITIVE, default=4, help="images per forward pass")
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet", help="a ControlNet in diffusers' layout: Hub repo (lllyasviel/sd-controlnet-canny), "
                                        "local directory, or one safetensors file (config.json beside it, else the "
                                        "U-Net's); the student and the DDIM teacher both take it")
    g.add_argument("--control-image", action="append", help="--controlnet's condition image (repeatable: one for all "
                                                            "prompts, or one per prompt)")
    g.add_argument("--control-scale", type=cli.SCALE, default=1.0, help="scale of the ControlNet's residuals")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="VSD distillation into a one-step student (paper defaults)",
                       description="Variational score distillation with LoRaD adapters (paper Sec. 3). "
                                   "Options marked 'backbone default' take the paper's value for sd15 / sd21 and "
                                   "the tuned toy value for toy (README \"The toy backbone\").")
    add_common(p)
    g = p.add_argument_group("data and run")
    g.add_argument("--prompts", help="training prompts: text (one per line), JSON list, or JourneyDB .jsonl "
                                     "(required except for the toy, which uses its 128 prompts)")
    g.add_argument("--out", help="run directory: log, checkpoints, samples, student (default: runs/BACKBONE)")
    g.add_argument("--resume", help="a checkpoint file, or `latest` in --out: continue exactly where it stopped")
    g.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="adapter initialisation, noise and data order")
    g.add_argument("--dry-run", action="store_true",
                   help="build the networks on the meta device from the built-in configs: counts and memory")
    g = p.add_argument_group("method")
    g.add_argument("--adapter", choices=sorted(ADAPTERS), default="lorad",
                   help="the paper's LoRaD, or a baseline of its Table 2")
    g.add_argument("--rank", type=cli.POSITIVE, help="student adapter rank (backbone default: 256, pixart 128 / toy 16)")
    g.add_argument("--rank-fake", type=cli.POSITIVE, help="fake score adapter rank (backbone default: 32 / toy 8)")
    g.add_argument("--guidance", type=cli.SCALE, help="CFG scale of teacher and fake score "
                                                      "(backbone default: 1.5 / toy 3)")
    g.add_argument("--ema", type=cli.number(0, 1, high_open=True), nargs="?", const=0.999,
                   help="EMA decay of the student adapter, 0.999 when given bare, 0 off "
                        "(backbone default: off / toy 0.99)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.POSITIVE, help="prompts per process and micro-step "
                                                          "(backbone default: 16 / toy 4)")
    g.add_argument("--grad-accum", type=cli.POSITIVE, default=1, help="micro-steps per optimizer step")
    g.add_argument("--max-steps", type=cli.NON_NEGATIVE, help="optimizer steps; 0: run --epochs "
                                                             "(backbone default: 0 / toy 1200, toy-dit 2400)")
    g.add_argument("--epochs", type=cli.number(0, low_open=True), default=2.0,
                   help="passes over the prompts when --max-steps is 0")
    g.add_argument("--lr", type=cli.RATE, help="student learning rate (backbone default: 1e-4 / toy 1e-3)")
    g.add_argument("--lr-fake", type=cli.RATE, help="fake score learning rate (backbone default: 1e-2)")
    g.add_argument("--resolution", type=cli.POSITIVE, help="pixels (default: the backbone's native resolution; "
                                                          "pixart: 256, 512 or 1024 picks that model)")
    g.add_argument("--mixed-precision", choices=list(WEIGHT_DTYPES), default="no",
                   help="frozen weights and activations in half precision; adapters stay fp32")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory, about a quarter more time")
    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpoint-every", type=cli.POSITIVE, help="steps between checkpoints "
                                                                "(backbone default: 500 / toy 300, toy-dit 600)")
    g.add_argument("--validate-every", type=cli.POSITIVE, help="steps between sample grids "
                                                              "(backbone default: 500 / toy 300, toy-dit 600)")
    g.add_argument("--eval-samples", type=cli.integer(2), default=toy.REPORT_SAMPLES,
                   help=f"toy: samples per generator in the final table (evaluate.py --toy: {toy.PROTOCOL['n']}; "
                        f"the shipped teacher's figures are cached for {toy.REPORT_SAMPLES}, default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=cli.NON_NEGATIVE, default=TrainConfig.keep_checkpoints,
                   help="how many of the latest checkpoints to keep (0: all)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="train a toy teacher from scratch, or with --controlnet a ControlNet for "
                                        "the toy teacher",
                       description="Train a toy backbone (teacher, text encoder, tokenizer; toy: also the classifier) "
                                   "and measure the teacher; writes a model directory in the SD layout (toy: U-Net, "
                                   "CLIP) or PixArt's (toy-dit: DiT, T5). With --controlnet, train a ControlNet for "
                                   "the frozen toy teacher instead (diffusers' layout).")
    p.add_argument("--backbone", choices=list(toy.BACKBONES), default="toy", help="which toy (default: %(default)s)")
    p.add_argument("--controlnet", action="store_true", help="train a ControlNet (condition: the object's mask) for "
                                                             "the frozen teacher of --model")
    p.add_argument("--model", help="--controlnet: the toy repo whose teacher it steers (default: assets/toy)")
    p.add_argument("--out", help="the directory to write (default: runs/pretrain-BACKBONE, with --controlnet "
                                 "runs/pretrain-toy-controlnet; the shipped ones are assets/toy, assets/toy-dit and "
                                 "assets/toy/controlnet)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="toy-dit: where the T5 prompt embeddings are cached")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (e.g. assets/toy)")
    p.add_argument("--steps", type=cli.POSITIVE,
                   help=f"training steps (default: toy 1500, toy-dit {pretrain.DIT_STEPS}, --controlnet 400)")
    p.add_argument("--batch-size", type=cli.POSITIVE, help="images per step (default: 32, --controlnet 16)")
    p.add_argument("--lr", type=cli.RATE, default=1e-3, help="learning rate (AdamW)")
    p.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="data, initialisation and classifier seed")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="a run's merged one-step student as one diffusers-key denoiser file",
                       description="Merge a train run's adapters into one denoiser file (diffusers keys): the run's "
                                   "own student, i.e. its EMA when the run kept one.")
    p.add_argument("--run", required=True, help="the run directory of `train`")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the latest in --run)")
    p.add_argument("--raw", action="store_true", help="merge the raw student adapters even when the run kept an EMA")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("analyze", help="paper Fig. 2: a student's weights against its teacher's, norm vs direction",
                       description="Per output row of every weight: the norm change and the direction change of the "
                                   "student against its teacher, their SVD energy, the paper's Fig. 2 (a) and (b); "
                                   "optionally the norm or direction swap of Fig. 2 (c).")
    p.add_argument("--student", required=True, help="a denoiser file (safetensors, or a .bin/.pth state dict), "
                                                    "owner/repo/file on the Hub, or a `train` run directory")
    p.add_argument("--teacher", help="the same kinds (default: the backbone's base denoiser, unet/ or transformer/ "
                                     "of --model)")
    p.add_argument("--out", required=True, help="directory for analysis.json, fig2a.png, fig2b.png")
    p.add_argument("--json", help="write the JSON here (default: OUT/analysis.json)")
    p.add_argument("--swap", choices=analysis.SWAPS, help="also write the student with the teacher's norms "
                                                          "(its own directions) or the teacher's directions")
    p.add_argument("--swap-out", help="FILE.safetensors for --swap")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="the model family (default: the student's own, "
                                                                 "else sd15)")
    p.add_argument("--model", help="base model repo or directory (default: the student's own, else the backbone's)")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), help="which layers the student adapted, for the "
                                                               "adapted-layer summary (default: its own, else lorad)")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (LoadError, UsageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside the training loop, which saves its step and returns 130 itself
        print("interrupted", file=sys.stderr)
        sys.exit(130)
