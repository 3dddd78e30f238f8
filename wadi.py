"""WaDi's command line.

    python wadi.py sample --backbone sd15 --unet STUDENT.safetensors --prompt "a cat" --out cat.png
    python wadi.py sample --backbone sd15 --steps 25 --guidance 7.5 --prompt "a cat" --out teacher.png

`sample` draws one-step images from a student U-Net (the x0 formula of SPEC 1.3) or multi-step DDIM
images with classifier-free guidance from the teacher. Every failure the user can fix (missing or
unreachable weights, a corrupt file, a bad prompt file) is one line on stderr and exit code 2.
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from diffusion import ddim_sample, one_step
from loading import LoadError
from pipeline import BACKBONES, image_grid, load_pipeline, read_prompts, student_a_T

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UsageError(Exception):
    """A bad combination of command-line options."""


def pick_device(name):
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def pick_dtype(name, device):
    return DTYPES[name] if name else (torch.float16 if device.type == "cuda" else torch.float32)


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
    pipe = load_pipeline(args.backbone, args.model, args.unet, dtype, device)
    a_T = student_a_T(args.unet)
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_per_prompt))]
    shape = pipe.latent_shape(args.resolution)
    null = pipe.encode_prompts([""])
    images = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sample", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        # each image's noise comes from its own seed: the same image whatever the batching
        z = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for _, s in batch])
        z = z.to(device, dtype)
        context = pipe.encode_prompts([p for p, _ in batch])
        with torch.no_grad():
            if args.steps == 1:
                x0 = one_step(pipe.unet, z, context, pipe.schedule.prediction_type, a_T)
            else:
                x0 = ddim_sample(pipe.unet, pipe.schedule, z, context, null.expand(len(batch), -1, -1),
                                 args.steps, args.guidance)
        images.append(pipe.decode(x0))
    save_images(np.concatenate(images), args.out, args.grid)
    print(f"wrote {len(jobs)} image(s) to {args.out}")


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
    p.add_argument("--unet", help="one-step student: a U-Net safetensors file in diffusers keys "
                                  "(our export, or the official rotated_unet-*.safetensors)")
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
    p.set_defaults(run=cmd_sample)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (LoadError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
