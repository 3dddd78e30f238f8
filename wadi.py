"""WaDi's command line.

    python wadi.py train --backbone sd15 --prompts journeydb.jsonl --out runs/sd15      (VSD, SPEC 1.3)
    python wadi.py train --backbone sd15 --dry-run                  (counts and memory, no download)
    python wadi.py export --run runs/sd15 --out wadi-sd15.safetensors
    python wadi.py sample --backbone sd15 --unet STUDENT.safetensors --prompt "a cat" --out cat.png
    python wadi.py sample --backbone sd15 --steps 25 --guidance 7.5 --prompt "a cat" --out teacher.png
    python wadi.py sample --backbone sd15 --unet STUDENT.safetensors --controlnet lllyasviel/sd-controlnet-canny \
        --control-image edges.png --prompt "a bird" --out bird.png

`train` distills the backbone's teacher into a one-step student (under torchrun: DDP over all
processes); `export` writes a run's merged student as one U-Net file in diffusers keys; `sample` draws
one-step images from a student (the x0 formula of SPEC 1.3) or DDIM images with classifier-free
guidance from the teacher. Every failure the user can fix (missing or unreachable weights, a corrupt
checkpoint, a bad prompt file, a non-finite loss) is one line on stderr and exit code 2.
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import pretrain
import toy
from clip import CLIPTextModel
from loading import LoadError, fetch_file, read_json
from lorad import ADAPTERS, count_trainable
from pipeline import BACKBONES, DTYPES, image_grid, load_control, load_pipeline, pick_dtype, read_prompts, \
    student_a_T
from unet import UNet
from vae import AutoencoderKL
from vsd import WEIGHT_DTYPES, TrainConfig, TrainingError, VSDConfig, build_networks, distributed, export_student, \
    load_checkpoint, find_checkpoint, train


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
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    unet = fetch_file(args.unet) if args.unet else None
    if bool(args.controlnet) != bool(args.control_image):
        raise UsageError("--controlnet and --control-image go together")
    if args.control_image and len(args.control_image) not in (1, len(prompts)):
        raise UsageError(f"give one --control-image for all prompts or one per prompt ({len(prompts)} prompts, "
                         f"{len(args.control_image)} images)")
    pipe = load_pipeline(args.backbone, args.model, unet, dtype, device)
    a_T = student_a_T(unet)
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_per_prompt))]
    controlnet, control = None, None
    if args.controlnet:
        controlnet, control = load_control(pipe, args.controlnet, args.control_image, args.resolution)
        control = control.repeat_interleave(args.num_per_prompt, 0) if len(control) > 1 else control  # one per job
    images = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sample", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        image = control[start:start + args.batch_size] if control is not None and len(control) > 1 else control
        images.append(pipe.generate([p for p, _ in batch], [s for _, s in batch], args.steps, args.guidance, a_T,
                                    args.resolution, controlnet, image, args.control_scale))
    save_images(np.concatenate(images), args.out, args.grid)
    print(f"wrote {len(jobs)} image(s) to {args.out}")


def dry_run(args):
    """Build the three networks, the text encoder and the VAE on the meta device from the built-in
    configs; print parameter counts and a memory estimate."""
    configs = BACKBONES[args.backbone].configs
    with torch.device("meta"):
        teacher = UNet.from_config(read_json(os.path.join(configs, "unet", "config.json")))
        student, fake = build_networks(teacher, args.rank, args.rank_fake, args.adapter)
        text = CLIPTextModel.from_config(read_json(os.path.join(configs, "text_encoder", "config.json")))
        vae_config = os.path.join(configs, "vae", "config.json")
        vae = AutoencoderKL.from_config(read_json(vae_config)) if os.path.isfile(vae_config) else None
    total = sum(p.numel() for p in teacher.parameters())
    nbytes = WEIGHT_DTYPES[args.mixed_precision].itemsize
    trainable = count_trainable(student) + count_trainable(fake)
    print(f"backbone {args.backbone}: adapter {args.adapter}, ranks {args.rank} / {args.rank_fake}")
    for name, net in (("teacher", teacher), ("student", student), ("fake score", fake)):
        print(f"  {name:<10} total {sum(p.numel() for p in net.parameters()) / 1e6:8.2f}M   "
              f"trainable {count_trainable(net) / 1e6:.2f}M")
    text_n, vae_n = sum(p.numel() for p in text.parameters()), sum(p.numel() for p in vae.parameters()) if vae else 0
    gib = 2 ** 30
    weights = (total + text_n) * nbytes + vae_n * 4
    states = trainable * 16 + (count_trainable(student) * 4 if args.ema else 0)  # fp32 param, grad, 2 AdamW
    print(f"  text encoder {text_n / 1e6:.2f}M, VAE {vae_n / 1e6:.2f}M")
    print(f"memory per GPU: frozen weights {weights / gib:.2f} GiB (one U-Net copy shared by the three "
          f"networks), adapters + grads + AdamW {states / gib:.2f} GiB, total {(weights + states) / gib:.2f} GiB "
          f"before activations (batch {args.batch_size} at {args.resolution or BACKBONES[args.backbone].resolution}px; "
          f"--grad-checkpointing trades compute for most of them)")


# `train` defaults: the paper's settings (SPEC 1.3), and for the toy what distills its teacher on 2 CPU
# cores within minutes (tuned on the shipped teacher; see README)
TRAIN_DEFAULTS = {
    "paper": dict(batch_size=16, max_steps=0, lr=1e-4, lr_fake=1e-2, rank=256, rank_fake=32, guidance=1.5, ema=0.0,
                  checkpoint_every=500, validate_every=500),
    "toy": dict(batch_size=4, max_steps=1200, lr=1e-3, lr_fake=1e-2, rank=16, rank_fake=8, guidance=3.0, ema=0.99,
                checkpoint_every=300, validate_every=300),
}


def apply_train_defaults(args):
    for key, value in {**TRAIN_DEFAULTS["paper"], **TRAIN_DEFAULTS.get(args.backbone, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or os.path.join("runs", args.backbone)


def report_toy(pipe, student, model, out, n):
    """The toy's result: FD and prompt accuracy of teacher (25-step DDIM + CFG), teacher (1 step) and
    student (1 step) on the same n prompts and seeds, as a table, metrics.json and comparison.png. The
    teacher's figures come from the repo's teacher_metrics.json when measured under the same protocol."""
    classifier = toy.load_classifier(os.path.join(model, "classifier"))
    protocol = {**toy.PROTOCOL, "n": n}
    cached = toy.cached_teacher_metrics(model, protocol)
    results, rows = toy.evaluate_toy(pipe, student.eval(), classifier, cached=cached, **protocol)
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
    elif args.backbone == "toy":
        prompts = [toy.prompt(a) for a in toy.all_attributes()]
    else:
        raise UsageError("give --prompts FILE (text, JSON list, or the JourneyDB .jsonl annotations)")
    rank, world, local_rank = distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = WEIGHT_DTYPES[args.mixed_precision]
    model = args.model or BACKBONES[args.backbone].repo
    pipe = load_pipeline(args.backbone, model, dtype=dtype, device=device, vae=rank == 0)
    tc = TrainConfig(out=args.out, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     max_steps=args.max_steps, epochs=args.epochs,
                     resolution=args.resolution or BACKBONES[args.backbone].resolution, lr=args.lr,
                     lr_fake=args.lr_fake, rank=args.rank, rank_fake=args.rank_fake, adapter=args.adapter,
                     mixed_precision=args.mixed_precision, grad_checkpointing=args.grad_checkpointing,
                     ema=args.ema, seed=args.seed, checkpoint_every=args.checkpoint_every,
                     validate_every=args.validate_every, resume=args.resume)
    if args.backbone == "toy":
        tc.validation_prompts = tuple(toy.prompt(a) for a in toy.balanced_attributes(8))
    meta = {"backbone": args.backbone, "base_model": model}
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({**meta, **dataclasses.asdict(tc), "guidance": args.guidance}, f, indent=2)
    student, _ = train(pipe, prompts, tc, VSDConfig(guidance=args.guidance), device, meta)
    if args.backbone == "toy" and rank == 0:
        report_toy(pipe, student, model, args.out, args.eval_samples)


def cmd_pretrain(args):
    options = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed") if getattr(args, k) is not None}
    model = args.model or BACKBONES["toy"].repo
    if args.controlnet:
        pretrain.pretrain_toy_controlnet(args.out or os.path.join(model, "controlnet"), model, **options)
    else:
        pretrain.pretrain_toy(args.out or model, **options)


def load_run(run_dir, checkpoint="latest"):
    """A `train` run directory: its options (run.json), the checkpoint file (`checkpoint`: a path or latest),
    the pipeline (no VAE) and the student and fake score networks holding that checkpoint's adapters."""
    run = read_json(os.path.join(run_dir, "run.json"))
    checkpoint = find_checkpoint(run_dir, checkpoint)
    pipe = load_pipeline(run["backbone"], run["base_model"], vae=False)
    student, fake = build_networks(pipe.unet, run["rank"], run["rank_fake"], run["adapter"])
    load_checkpoint(checkpoint, student, fake, {}, None)
    return run, checkpoint, pipe, student, fake


def cmd_export(args):
    run, checkpoint, pipe, student, _ = load_run(args.run, args.checkpoint or "latest")
    meta = {"backbone": run["backbone"], "base_model": run["base_model"], "a_T": VSDConfig().a_T,
            "prediction_type": pipe.schedule.prediction_type, "checkpoint": os.path.basename(checkpoint)}
    export_student(student, args.out, meta)
    print(f"wrote {args.out} (merged one-step U-Net from {checkpoint})")


def add_common(p):
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="sd15")
    p.add_argument("--model", help="Hugging Face repo id or local directory in the same layout "
                                   "(default: the backbone's repo, see SPEC 1.4)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on GPU, fp32 on CPU)")


def build_parser():
    parser = argparse.ArgumentParser(prog="wadi.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="one-step (student) or DDIM (teacher) text-to-image sampling")
    add_common(p)
    p.add_argument("--unet", help="one-step student: a U-Net safetensors file in diffusers keys (our export, "
                                  "or the official gudaochangsheng/WaDi/rotated_unet-sdv1-5.safetensors: "
                                  "a local path or owner/repo/file on the Hub)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="prompt file: text (one per line), JSON list, or JourneyDB .jsonl")
    p.add_argument("--out", required=True, help="FILE.png, or a directory")
    p.add_argument("--steps", type=int, default=1, help="1: one-step generation; >1: DDIM with CFG")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale for DDIM")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--num-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, help="pixels (default: the backbone's native resolution)")
    p.add_argument("--grid", action="store_true", help="also write grid.png (directory output)")
    p.add_argument("--controlnet", help="a ControlNet in diffusers' layout: Hub repo (lllyasviel/sd-controlnet-canny), "
                                        "local directory, or one safetensors file (config.json beside it, else the "
                                        "U-Net's); the student and the DDIM teacher both take it")
    p.add_argument("--control-image", action="append", help="--controlnet's condition image (repeatable: one for all "
                                                            "prompts, or one per prompt)")
    p.add_argument("--control-scale", type=float, default=1.0, help="scale of the ControlNet's residuals")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="VSD distillation into a one-step student (paper defaults)")
    add_common(p)
    p.add_argument("--prompts", help="training prompts: text (one per line), JSON list, or JourneyDB .jsonl")
    p.add_argument("--out", help="run directory: log, checkpoints, samples, student (default: runs/BACKBONE)")
    p.add_argument("--batch-size", type=int, help="per process")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps (0: use --epochs)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--resolution", type=int, help="pixels (default: the backbone's native resolution)")
    p.add_argument("--lr", type=float, help="student learning rate")
    p.add_argument("--lr-fake", type=float, help="fake score network learning rate")
    p.add_argument("--rank", type=int, help="student adapter rank")
    p.add_argument("--rank-fake", type=int, help="fake score adapter rank")
    p.add_argument("--guidance", type=float, help="CFG scale of teacher and fake score")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), default="lorad")
    p.add_argument("--mixed-precision", choices=list(WEIGHT_DTYPES), default="no",
                   help="frozen weights and activations in half precision; adapters stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--ema", type=float, nargs="?", const=0.999,
                   help="EMA of the student adapter: its decay (0.999 when given bare; default off, toy 0.99; 0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--validate-every", type=int)
    p.add_argument("--resume", help="a checkpoint file, or `latest` in --out")
    p.add_argument("--eval-samples", type=int, default=toy.REPORT_SAMPLES,
                   help=f"toy: samples per generator in the final table (evaluate.py --toy: {toy.PROTOCOL['n']}); "
                        f"the shipped teacher's figures are cached for {toy.REPORT_SAMPLES}")
    p.add_argument("--dry-run", action="store_true",
                   help="build the networks on the meta device from the built-in configs: counts and memory")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", help="train the toy teacher and classifier from scratch (rebuilds assets/toy), "
                                        "or with --controlnet a ControlNet for the toy teacher")
    p.add_argument("--backbone", choices=["toy"], default="toy")
    p.add_argument("--controlnet", action="store_true", help="train a ControlNet (condition: the object's mask) for "
                                                             "the frozen teacher of --model")
    p.add_argument("--model", help="the toy repo (default: assets/toy)")
    p.add_argument("--out", help="default: the toy repo, or its controlnet/ with --controlnet")
    p.add_argument("--steps", type=int, help="default: 1500 (teacher), 400 (--controlnet)")
    p.add_argument("--batch-size", type=int, help="default: 32 (teacher), 16 (--controlnet)")
    p.add_argument("--lr", type=float, help="default: 1e-3")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="a run's merged one-step student as one diffusers-key U-Net file")
    p.add_argument("--run", required=True, help="the run directory of `train`")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the latest in --run)")
    p.add_argument("--out", required=True, help="FILE.safetensors")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (LoadError, UsageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
