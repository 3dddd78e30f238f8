"""A relation learned on the toy teacher and used by the one-step student (invert.py, ReVersion):
docs/reversion.md.

The toy's positions are relations between the object and the canvas. The exemplars are --exemplars
toy images whose object sits at one --position ("top left") with random size, colour and shape, each
with the template "a SIZE COLOUR SHAPE {}" (text.json, ReVersion's layout). `wadi.py invert` learns
<R> from them on the teacher, with ReVersion's steering loss and importance sampling ("reversion") and
without ("plain": textual inversion), for each --seeds. Then, for the 32 size x colour x shape prompts
"a SIZE COLOUR SHAPE <R>" x --n noise seeds, the 25-step teacher (CFG 3) and the one-step student draw
images and the toy classifier reads them:

- relation: the share of images with the object at the exemplars' position (chance 0.25);
- attributes: the share with size, colour and shape all as prompted, against the same share for the
  plain prompts that name the position ("... at the top left"), the "plain prompt" rows;
- seconds per image on this machine (batches of 32).

    python bench/reversion.py --student runs/toy --seeds 0 1 2 --out runs/reversion
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
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
import toyeval  # noqa: E402
import wadi  # noqa: E402
from loading import fetch, fetch_file, read_json  # noqa: E402
from pipeline import BACKBONES, image_grid, load_pipeline, load_unet_file  # noqa: E402

VARIANTS = {"reversion": [], "plain": ["--steer-weight", "0", "--uniform-t"]}


def write_exemplars(directory, position, count, seed):
    """`count` toy images at `position` (random other attributes) and their text.json."""
    gen = torch.Generator().manual_seed(seed)
    attributes = torch.stack([torch.randint(len(values), (count,), generator=gen) for values in toy.ATTRIBUTES], 1)
    attributes[:, 3] = toy.POSITIONS.index(position)
    images = ((toy.render(attributes, gen) + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    os.makedirs(directory, exist_ok=True)
    texts = {}
    for i, (image, row) in enumerate(zip(images.numpy(), attributes.tolist())):
        Image.fromarray(image).save(os.path.join(directory, f"{i}.png"))
        texts[f"{i}.png"] = [" ".join(["a", *(values[v] for values, v in zip(toy.ATTRIBUTES[:3], row[:3])), "at the {}"])]
    with open(os.path.join(directory, "text.json"), "w") as f:
        json.dump(texts, f, indent=1)
    return images


def measure(pipe, prompts, attributes, seeds, steps, classifier, batch_size):
    """(relation share, attribute accuracy, s per image, uint8 images) of one generator."""
    start, out = time.perf_counter(), []
    for i in range(0, len(prompts), batch_size):
        out.append(pipe.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], steps,
                                 toyeval.TEACHER_GUIDANCE))
    seconds = (time.perf_counter() - start) / len(prompts)
    images = np.concatenate(out)
    read = toyeval.classify(classifier, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)[1]
    relation = (read[:, 3] == attributes[:, 3]).float().mean().item()
    others = (read[:, :3] == attributes[:, :3]).all(1).float().mean().item()
    return relation, others, seconds, images


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="the toy student (a file or a train run directory)")
    p.add_argument("--model", default=BACKBONES["toy"].repo)
    p.add_argument("--position", default="top left", choices=toy.POSITIONS)
    p.add_argument("--exemplars", type=int, default=8, help="exemplar images (ReVersion: 4 to 10)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="inversion seeds (and exemplar sets)")
    p.add_argument("--n", type=int, default=4, help="noise seeds per prompt (x 32 prompts)")
    p.add_argument("--steps", type=int, default=400, help="invert --steps")
    p.add_argument("--lr", type=float, default=2e-3, help="invert --lr")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default=os.path.join("runs", "reversion"))
    args = p.parse_args(argv)
    classifier = toyeval.load_classifier(os.path.join(args.model, "classifier"))
    student = load_unet_file(fetch_file(args.student, "--student"), read_json(fetch(args.model, "unet/config.json")))
    combos = torch.tensor([(s, c, h, toy.POSITIONS.index(args.position)) for s in range(len(toy.SIZES))
                           for c in range(len(toy.COLOURS)) for h in range(len(toy.SHAPES))])  # (32, 4)
    attributes = combos.repeat_interleave(args.n, 0)
    noise = list(range(len(attributes)))
    named = [toy.prompt(a) for a in attributes]
    relation = [" ".join(p.split()[:6] + ["<R>"]) for p in named]  # "a SIZE COLOUR SHAPE at the <R>"
    rows, grid, labels = {}, [], []

    def record(name, prompts, steps, pipe):
        result = measure(pipe, prompts, attributes, noise, steps, classifier, args.batch_size)
        row = rows.setdefault(name, {"relation": [], "attributes": [], "s_per_image": []})
        for key, value in zip(row, result[:3]):
            row[key].append(value)
        print(f"{name:<34} relation {result[0]:.3f}, attributes {result[1]:.3f}, {result[2]:.3f} s/image",
              flush=True)
        return result[3]

    base = load_pipeline("toy", args.model)
    for generator, net, steps in (("teacher, 25 steps", base.denoiser, 25), ("student, 1 step", student, 1)):
        images = record(f"{generator}, plain prompt", named, steps,
                        dataclasses.replace(base, denoiser=net))
        grid.append(images[::args.n][:8])
        labels.append(f"{generator}, plain prompt")
    for seed in args.seeds:
        exemplars = write_exemplars(os.path.join(args.out, f"exemplars-{seed}"), args.position, args.exemplars,
                                    seed)
        if seed == args.seeds[0]:
            grid.insert(0, exemplars[:8].numpy())
            labels.insert(0, f"exemplars ({args.position})")
        for variant in args.variants:
            run = os.path.join(args.out, f"{variant}-{seed}")
            start = time.perf_counter()
            assert wadi.main(["invert", "--backbone", "toy", "--model", args.model, "--exemplars",
                              os.path.join(args.out, f"exemplars-{seed}"), "--out", run, "--overwrite",
                              "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(seed),
                              *VARIANTS[variant]]) == 0
            rows.setdefault(f"{variant}: invert", {"seconds": []})["seconds"].append(time.perf_counter() - start)
            pipe = load_pipeline("toy", args.model)
            pipe.add_embeddings([os.path.join(run, "learned_embeds.safetensors")])
            for generator, net, steps in (("teacher, 25 steps", pipe.denoiser, 25), ("student, 1 step", student, 1)):
                images = record(f"{variant}: {generator}", relation, steps,
                                dataclasses.replace(pipe, denoiser=net))
                if seed == args.seeds[0]:
                    grid.append(images[::args.n][:8])
                    labels.append(f"{generator}, <R> ({variant})")
    with open(os.path.join(args.out, "reversion.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
    image_grid(np.concatenate(grid), cols=8, row_labels=labels).save(os.path.join(args.out, "reversion.png"))
    for name, row in rows.items():
        print(f"{name:<34} " + ", ".join(f"{k} {statistics.mean(v):.3f}" + (
            f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "") for k, v in row.items()))
    print(f"wrote {args.out}/reversion.json and reversion.png")


if __name__ == "__main__":
    main()
