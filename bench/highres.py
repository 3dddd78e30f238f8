"""The toy asked for more pixels than it was trained on, with and without re-dilation (redilate.py,
ScaleCrafter): docs/highres.md.

The toy student (one step) and its teacher (25-step DDIM + CFG 3) were trained at 32 px. At each
--sizes S they draw --n images per seed (the balanced toy prompts, noise seeds seed * 10,000 + i) with
re-dilation off and on (`--redilate auto`: factor S / 32), and we count:

- repeated objects: the share of images with more than one blob of the prompted colour. A blob is an
  8-connected set of pixels within --tolerance (max over RGB, in [-1, 1]) of the colour's palette
  entry (toy.PALETTE), at least --min-area pixels at 32 px (scaled by (S / 32)^2). The toy data
  itself has one blob per image: the first row checks the counter at 32 px;
- prompt following: the share of images whose four attributes the toy classifier (toyeval.py) reads as
  prompted, on the image resized to 32 px (area averaging);
- seconds per image on this machine.

    python bench/highres.py --student runs/toy/student.safetensors --sizes 64 96 --seeds 0 1 2
    python bench/highres.py --student runs/toy --generators student --freeu --out runs/highres-freeu
    python bench/highres.py --student runs/toy --sizes 128 --options off 4 auto --settings sd15 --out runs/highres-128
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
import toyeval  # noqa: E402
from pipeline import BACKBONES, image_grid, load_pipeline, load_unet_file  # noqa: E402
from loading import fetch, fetch_file, read_json  # noqa: E402
from redilate import parse_option, plan, set_freeu  # noqa: E402


def count_blobs(images, colours, tolerance=0.35, min_area=6):
    """The number of blobs of each image's colour: images (N, 3, H, W) in [-1, 1], colours (N,) indices
    into toy.PALETTE; 8-connected components of at least `min_area` pixels, found by propagating the
    largest pixel index over each component (one max-pool per step of its diameter)."""
    n, _, h, w = images.shape
    target = toy.PALETTE[colours][:, :, None, None]  # (N, 3, 1, 1)
    mask = ((images - target).abs().amax(1) < tolerance).float()  # (N, H, W)
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w) * mask
    while True:
        grown = F.max_pool2d(labels[:, None], 3, 1, 1)[:, 0] * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    counts = []
    for image in labels:  # (H, W): one label per component
        _, area = torch.unique(image[image > 0], return_counts=True)
        counts.append(int((area >= min_area).sum()))
    return torch.tensor(counts)


def measure(pipe, unet, attributes, seeds, steps, size, option, classifier, args):
    """(repeated share, prompt accuracy, s per image, images) of one generator at one size."""
    prompts = [toy.prompt(a) for a in attributes]
    recipe, _ = plan(option, args.settings, unet, (size, size), 32,
                     pipe.schedule.ddim_timesteps(steps) if steps > 1 else [999])
    start, out = time.perf_counter(), []
    for i in range(0, len(prompts), args.batch_size):
        out.append(pipe.generate(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size], steps,
                                 toyeval.TEACHER_GUIDANCE, resolution=size, redilate=recipe))
    seconds = (time.perf_counter() - start) / len(prompts)
    images = torch.from_numpy(np.concatenate(out)).permute(0, 3, 1, 2).float() / 127.5 - 1
    blobs = count_blobs(images, attributes[:, 1], args.tolerance, args.min_area * (size / 32) ** 2)
    small = F.interpolate(images, size=32, mode="area")
    accuracy = (toyeval.classify(classifier, small)[1] == attributes).all(1).float().mean().item()
    return (blobs > 1).float().mean().item(), accuracy, seconds, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="the toy student (a file or a train run directory)")
    p.add_argument("--model", default=BACKBONES["toy"].repo)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n", type=int, default=128, help="student images per seed, size and setting")
    p.add_argument("--teacher-n", type=int, default=32, help="the same for the 25-step teacher")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.35)
    p.add_argument("--min-area", type=float, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--generators", nargs="+", choices=["student", "teacher"], default=["student", "teacher"])
    p.add_argument("--options", nargs="+", type=parse_option, default=["off", "auto"],
                   help="--redilate settings to compare (e.g. off auto 4: at 128 px, the ladder against 4 for all)")
    p.add_argument("--settings", default="toy", choices=["toy", "sd15", "sd21"], help="whose ScaleCrafter "
                   "settings `auto` takes (sd15: at 128 px its 2048 px recipe; the toy's own: one factor for all)")
    p.add_argument("--freeu", action="store_true", help="FreeU on (SD1.5's settings) for every generator")
    p.add_argument("--out", default=os.path.join("runs", "highres"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline("toy", args.model)
    student = load_unet_file(fetch_file(args.student, "--student"), read_json(fetch(args.model, "unet/config.json")))
    classifier = toyeval.load_classifier(os.path.join(args.model, "classifier"))
    attributes = toy.balanced_attributes(args.n)
    images = toy.render(attributes, torch.Generator().manual_seed(0))
    rows = [{"generator": "data", "size": 32, "redilate": "-", "repeated": [
        (count_blobs(images, attributes[:, 1], args.tolerance, args.min_area) > 1).float().mean().item()]}]
    grid = []
    for size in args.sizes:
        generators = {"student": ("student, 1 step", student, 1, args.n),
                      "teacher": ("teacher, 25 steps", pipe.denoiser, 25, args.teacher_n)}
        for name, unet, steps, n in (generators[g] for g in args.generators):
            set_freeu(unet, "sd15", args.freeu)
            for option in args.options:
                row = {"generator": name, "size": size, "redilate": option, "repeated": [], "accuracy": [],
                       "s_per_image": []}
                for seed in args.seeds:
                    seeds = [seed * 10_000 + i for i in range(n)]
                    pipe_net = dataclasses.replace(pipe, denoiser=unet)
                    repeated, accuracy, seconds, made = measure(pipe_net, unet, attributes[:n], seeds, steps, size,
                                                                option, classifier, args)
                    row["repeated"].append(repeated)
                    row["accuracy"].append(accuracy)
                    row["s_per_image"].append(seconds)
                    if seed == args.seeds[0]:
                        grid.append(((made[:8] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1))
                rows.append(row)
                print(summary(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "highres.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    for size in args.sizes:  # one grid per size: a row of 8 per generator and setting
        chosen = [g for g, r in zip(grid, rows[1:]) if r["size"] == size]
        labels = [f"{r['generator']}, redilate {r['redilate']}" for r in rows[1:] if r["size"] == size]
        image_grid(torch.cat(chosen).numpy(), cols=8, row_labels=labels).save(
            os.path.join(args.out, f"highres-{size}.png"))
    print(f"wrote {args.out}/highres.json and highres-SIZE.png")
    return rows


def mean_std(values):
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def summary(row):
    figures = [f"repeated {mean_std(row['repeated'])}"]
    if "accuracy" in row:
        figures += [f"accuracy {mean_std(row['accuracy'])}", f"{statistics.mean(row['s_per_image']):.3f} s/image"]
    return f"{row['generator']:<18} {row['size']:>3} px, redilate {str(row['redilate']):<4}: " + ", ".join(figures)


if __name__ == "__main__":
    main()
