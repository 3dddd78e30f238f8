"""DreamBooth on the toy (dreambooth.py, paper Fig. 7) measured as OFT's Table 1 is laid out, and the
subject carried to the one-step student by adding the DreamBooth angles: docs/dreambooth.md.

The subject is a square darkened in a --pattern the toy data never shows (toy.PATTERNS: a coarse two-tone
look with its lower half dark, or fine diagonal stripes): --instances images of a large blue one at the four
positions in turn, each captioned "v large blue square at the POSITION" in the folder's metadata.jsonl ("v" is a
byte token the toy never trained on; it takes the article's slot because the toy's text encoder reads each
attribute from its word slot, docs/reversion.md). Class prompts: the 32 "a SIZE COLOUR square at the POSITION"
prompts, --class-images teacher images among them. For each adapter and seed, `wadi.py dreambooth` fine-tunes
the teacher; then on the 32 prompts "v SIZE COLOUR square at the POSITION" x --n seeds (the 4 of the
instances' size and colour, "seen", and 28 with another size or colour, DreamBooth's property changes), a
subject classifier (toyeval.train_classifier(subject=PATTERN)) reads:

- subject fidelity: the share of images showing the subject;
- prompt adherence: the share with size, colour and position as prompted;
- and on the 32 class prompts x --n seeds, prior preservation: the share that still show an ordinary
  (not the subject's) object with all four attributes as prompted, and the Frechet distance (toy classifier
  features) to the same prompts and seeds drawn by the undisturbed generator (the base teacher, or for
  a student the plain student).

Generators: the teacher at 25 DDIM steps (CFG 3) before and after each fine-tuning, and the one-step
student (--student) plain and with each LoRaD / LoRA run added (`sample --adapter-add`).

    python bench/dreambooth_toy.py --student runs/toy --seeds 0 1 2 --out runs/dreambooth
"""
import argparse
import json
import os
import statistics
import sys

import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dreambooth  # noqa: E402
import toy  # noqa: E402
import toyeval  # noqa: E402
import wadi  # noqa: E402
from loading import fetch, fetch_file, read_json  # noqa: E402
from lorad import shared_copy  # noqa: E402
from metrics import feature_statistics, frechet_distance  # noqa: E402
from pipeline import BACKBONES, image_grid, load_pipeline, load_unet_file  # noqa: E402

SUBJECT = (1, 2, 1, 0)  # large blue square at the top left
IDENTIFIER = "v"
LR = {"full": 1e-3, "lora": 1e-2, "lorad": 1e-2, "dora": 1e-2}  # on the toy: docs/dreambooth.md


def index(size, colour, position):
    """Where a prompt is in `prompts_of`'s order."""
    return size * 16 + colour * 4 + position


def prompts_of(identifier):
    """The 32 prompts of the class "square", with `identifier` in the article's slot, and their rows."""
    rows = [a for a in toy.all_attributes() if a[2] == SUBJECT[2]]
    return [" ".join([identifier, *toy.prompt(a).split()[1:]]) for a in rows], torch.stack(rows)


def write_instances(directory, count, seed, pattern):
    """`count` images of the subject at the four positions in turn, each captioned in metadata.jsonl."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([SUBJECT] * count)
    rows[:, 3] = torch.arange(count) % 4
    images = toy.render(rows, gen, subject=torch.ones(count, dtype=torch.bool), pattern=pattern)
    images = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    if os.path.isfile(os.path.join(directory, "metadata.jsonl")):  # written already (another seed's run)
        return images
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "metadata.jsonl"), "w") as f:
        for i, (image, row) in enumerate(zip(images, rows)):
            Image.fromarray(image).save(os.path.join(directory, f"{i:02d}.png"))
            caption = " ".join([IDENTIFIER, *toy.prompt(row).split()[1:]])
            f.write(json.dumps({"file_name": f"{i:02d}.png", "text": caption}) + "\n")
    return images


def picks(n):
    """The grid's 8 images: the subject at two positions, then other colours and sizes."""
    size, colour, _, position = SUBJECT
    return [n * index(*c) for c in ((size, colour, position), (size, colour, 3), (size, 0, 1), (size, 3, 2),
                                    (0, colour, 0), (0, 1, 3), (size, 1, 0), (0, 0, 2))]


def draw(pipe, unet, prompts, n, steps):
    """Images (32 n, 3, 32, 32) in [-1, 1]: each prompt with seeds 0 .. n-1."""
    jobs = [(p, s) for p in prompts for s in range(n)]
    return toyeval.toy_images(pipe, unet, [p for p, _ in jobs], [s for _, s in jobs], steps,
                              toyeval.TEACHER_GUIDANCE)


def measure(pipe, unet, steps, n, subject_classifier, classifier, reference=None):
    """{fidelity, adherence, prior, fd} of one generator; `reference`: the class-prompt images of the
    undisturbed generator (None: this is it). Returns (figures, subject images, class images)."""
    prompts, rows = prompts_of(IDENTIFIER)
    rows = rows.repeat_interleave(n, 0)
    images = draw(pipe, unet, prompts, n, steps)
    read = toyeval.classify(subject_classifier, images)[1]
    classes = draw(pipe, unet, prompts_of("a")[0], n, steps)
    read_class = toyeval.classify(subject_classifier, classes)[1]
    seen = (rows[:, 0] == SUBJECT[0]) & (rows[:, 1] == SUBJECT[1])  # the instances' size and colour
    figures = {"fidelity": read[:, 4].float().mean().item(),
               "fidelity_seen": read[seen, 4].float().mean().item(),
               "fidelity_new": read[~seen, 4].float().mean().item(),
               "adherence": (read[:, [0, 1, 3]] == rows[:, [0, 1, 3]]).all(1).float().mean().item(),
               "prior": ((read_class[:, :4] == rows).all(1) & (read_class[:, 4] == 0)).float().mean().item()}
    if reference is not None:
        stats = [feature_statistics(toyeval.classify(classifier, x)[0].numpy()) for x in (classes, reference)]
        figures["fd"] = frechet_distance(*stats[0], *stats[1])
    return figures, images, classes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="the toy student (a file or a train run directory)")
    p.add_argument("--model", default=BACKBONES["toy"].repo)
    p.add_argument("--adapters", nargs="+", default=["full", "lora", "lorad"],
                   help="adapters, each with its learning rate as ADAPTER@LR (default: LR's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pattern", default="two-tone", choices=sorted(toy.PATTERNS), help="the subject's look")
    p.add_argument("--instances", type=int, default=5, help="subject images (DreamBooth: 3 to 5)")
    p.add_argument("--class-images", type=int, default=256)
    p.add_argument("--steps", type=int, default=400, help="dreambooth --steps")
    p.add_argument("--rank", type=int, default=4, help="dreambooth --rank")
    p.add_argument("--batch-size", type=int, default=4, help="dreambooth --batch-size")
    p.add_argument("--n", type=int, default=4, help="seeds per prompt (x 32 prompts)")
    p.add_argument("--out", default="runs/dreambooth")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    student_file = fetch_file(args.student, "--student")
    pipe = load_pipeline("toy", args.model)
    config = read_json(fetch(args.model, "unet/config.json"))
    student = load_unet_file(student_file, config)
    classifier = toyeval.load_classifier(os.path.join(args.model, "classifier"))
    subject_classifier = toyeval.train_classifier(subject=args.pattern, progress=False)
    instances = write_instances(os.path.join(args.out, "instances"), args.instances, 100, args.pattern)
    pipe.prepare_prompts(prompts_of(IDENTIFIER)[0] + prompts_of("a")[0] + [""])
    results, grid = {}, {}
    pick = picks(args.n)

    def measured(name, folder, net, steps, reference):
        """`measure`, kept in folder/figures.json and images.pt (the grid's cells, the class images)."""
        path = os.path.join(folder, f"figures-{name}.json")
        if not os.path.isfile(path):
            figures, images, classes = measure(pipe, net, steps, args.n, subject_classifier, classifier, reference)
            torch.save({"grid": images[pick], "classes": classes}, os.path.join(folder, f"images-{name}.pt"))
            json.dump(figures, open(path, "w"))
        results[name] = json.load(open(path))
        kept = torch.load(os.path.join(folder, f"images-{name}.pt"))
        grid.setdefault(name.rsplit("-", 1)[0] if "+" in name else name, kept["grid"])
        return kept["classes"]

    base_classes = measured("teacher", args.out, pipe.denoiser, 25, None)
    plain_classes = measured("student", args.out, student, 1, None)
    for name in args.adapters:
        adapter, _, lr = name.partition("@")
        for seed in args.seeds:
            run = os.path.join(args.out, f"{name}-{seed}")
            if not os.path.isfile(os.path.join(run, "unet.safetensors")):
                wadi.main(["dreambooth", "--backbone", "toy", "--model", args.model, "--instance-dir",
                           os.path.join(args.out, "instances"), "--instance-prompt", "(metadata.jsonl)",
                           *[x for q in prompts_of("a")[0] for x in ("--class-prompt", q)],
                           "--num-class-images", str(args.class_images), "--adapter", adapter,
                           "--rank", str(args.rank), "--steps", str(args.steps), "--batch-size",
                           str(args.batch_size), "--seed", str(seed), "--out", run, "--overwrite",
                           "--checkpoint-every", str(args.steps), "--cache-dir",
                           os.path.join(args.out, "cache"), "--threads", "1", "--lr", lr or str(LR[adapter])])
            tuned = load_unet_file(os.path.join(run, "unet.safetensors"), config)
            measured(f"teacher+{name}-{seed}", run, tuned, 25, base_classes)
            if adapter in dreambooth.ADDABLE:
                added = dreambooth.add_run(shared_copy(student), run, "toy")
                measured(f"student+{name}-{seed}", run, added, 1, plain_classes)
            print(json.dumps({k: v for k, v in results.items() if k.endswith(f"{name}-{seed}")}), flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, args.adapters))
    cells = [torch.from_numpy(instances).permute(0, 3, 1, 2).float() / 127.5 - 1]
    cells = [torch.cat([cells[0], cells[0][:8 - len(cells[0])]])[:8]]
    cells += [grid[name] for name in grid]
    labels = ["instances", *grid]
    image_grid(((torch.cat(cells).permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy(),
               cols=8, row_labels=labels).save(os.path.join(args.out, "grid.png"))


def table(results, adapters):
    lines = ["| generator | subject fidelity: seen size and colour | new size or colour | prompt adherence | "
             "prior preservation | FD to undisturbed |", "|---|---|---|---|---|---|"]
    names = ["teacher", *[f"teacher+{a}" for a in adapters], "student",
             *[f"student+{a}" for a in adapters if a.partition("@")[0] in dreambooth.ADDABLE]]
    for name in names:
        runs = [v for k, v in results.items() if k == name or k.startswith(name + "-")]
        cells = []
        for key in ("fidelity_seen", "fidelity_new", "adherence", "prior", "fd"):
            values = [r[key] for r in runs if key in r]
            cells.append("-" if not values else f"{values[0]:.3f}" if len(values) == 1 else
                         f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
