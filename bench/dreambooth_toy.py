"""DreamBooth on the toy (dreambooth.py, paper Fig. 7) measured as OFT's Table 1 is laid out, and the
subject carried to the one-step student by adding the DreamBooth angles: docs/dreambooth.md.

The subject is a square darkened in a --pattern the toy data never shows (toy.PATTERNS: fine diagonal
stripes, or a coarse two-tone look with its lower half dark): --instances images of a large blue one at the
top left, under the instance prompt "v large blue square at the top
left" ("v" is a byte token the toy never trained on; it takes the article's slot because the toy's text
encoder reads each attribute from its word slot, docs/reversion.md). Class prompts: the 32 "a SIZE COLOUR
square at the POSITION" prompts, --class-images teacher images among them. For each adapter and seed,
`wadi.py dreambooth` fine-tunes the teacher; then on the 32 prompts "v SIZE COLOUR square at the
POSITION" x --n seeds, a subject classifier (toyeval.train_classifier(subject=PATTERN)) reads:

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
SETTINGS = {  # dreambooth options per adapter on the toy (docs/dreambooth.md)
    "full": ["--lr", "1e-4"], "lora": ["--lr", "1e-3"], "lorad": ["--lr", "1e-3"], "dora": ["--lr", "1e-3"]}


def index(size, colour, position):
    """Where a prompt is in `prompts_of`'s order."""
    return size * 16 + colour * 4 + position


def prompts_of(identifier):
    """The 32 prompts of the class "square", with `identifier` in the article's slot, and their rows."""
    rows = [a for a in toy.all_attributes() if a[2] == SUBJECT[2]]
    return [" ".join([identifier, *toy.prompt(a).split()[1:]]) for a in rows], torch.stack(rows)


def write_instances(directory, count, seed, pattern):
    gen = torch.Generator().manual_seed(seed)
    images = toy.render(torch.tensor([SUBJECT] * count), gen, subject=torch.ones(count, dtype=torch.bool),
                        pattern=pattern)
    images = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    os.makedirs(directory, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(directory, f"{i:02d}.png"))
    return images


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
    figures = {"fidelity": read[:, 4].float().mean().item(),
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
    p.add_argument("--adapters", nargs="+", default=["full", "lora", "lorad"], choices=sorted(SETTINGS))
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
    results = {}
    base, base_images, base_classes = measure(pipe, pipe.denoiser, 25, args.n, subject_classifier, classifier)
    plain, plain_images, plain_classes = measure(pipe, student, 1, args.n, subject_classifier, classifier)
    results["teacher"], results["student"] = base, plain
    grid = {"teacher": base_images, "student": plain_images}
    for adapter in args.adapters:
        for seed in args.seeds:
            run = os.path.join(args.out, f"{adapter}-{seed}")
            if not os.path.isfile(os.path.join(run, "unet.safetensors")):
                wadi.main(["dreambooth", "--backbone", "toy", "--model", args.model, "--instance-dir",
                           os.path.join(args.out, "instances"), "--instance-prompt", prompts_of(IDENTIFIER)[0][
                               index(SUBJECT[0], SUBJECT[1], SUBJECT[3])],
                           *[x for q in prompts_of("a")[0] for x in ("--class-prompt", q)],
                           "--num-class-images", str(args.class_images), "--adapter", adapter,
                           "--rank", str(args.rank), "--steps", str(args.steps), "--batch-size",
                           str(args.batch_size), "--seed", str(seed), "--out", run, "--overwrite",
                           "--checkpoint-every", str(args.steps), "--cache-dir",
                           os.path.join(args.out, "cache"), *SETTINGS[adapter]])
            tuned = load_unet_file(os.path.join(run, "unet.safetensors"), config)
            results[f"teacher+{adapter}-{seed}"], images, _ = measure(
                pipe, tuned, 25, args.n, subject_classifier, classifier, base_classes)
            grid.setdefault(f"teacher + {adapter}", images)
            if adapter != "full":
                added = dreambooth.add_run(shared_copy(student), run, "toy")
                results[f"student+{adapter}-{seed}"], images, _ = measure(
                    pipe, added, 1, args.n, subject_classifier, classifier, plain_classes)
                grid.setdefault(f"student + {adapter}", images)
            print(json.dumps({k: v for k, v in results.items() if k.endswith(f"{adapter}-{seed}")}))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results, args.adapters))
    size, colour, _, position = SUBJECT  # the subject's prompt, then other positions, colours and sizes
    pick = [args.n * index(*c) for c in ((size, colour, position), (size, colour, 3), (size, 0, 1),
                                         (size, 3, 2), (0, colour, 0), (0, 1, 3), (size, 1, 0), (0, 0, 2))]
    cells = [torch.from_numpy(instances).permute(0, 3, 1, 2).float() / 127.5 - 1]
    cells = [torch.cat([cells[0], cells[0][:8 - len(cells[0])]])[:8]]
    cells += [grid[name][pick] for name in grid]
    labels = ["instances", *grid]
    image_grid(((torch.cat(cells).permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).byte().numpy(),
               cols=8, row_labels=labels).save(os.path.join(args.out, "grid.png"))


def table(results, adapters):
    lines = ["| generator | subject fidelity | prompt adherence | prior preservation | FD to undisturbed |",
             "|---|---|---|---|---|"]
    names = ["teacher", *[f"teacher+{a}" for a in adapters], "student",
             *[f"student+{a}" for a in adapters if a != "full"]]
    for name in names:
        runs = [v for k, v in results.items() if k == name or k.startswith(name + "-")]
        cells = []
        for key in ("fidelity", "adherence", "prior", "fd"):
            values = [r[key] for r in runs if key in r]
            cells.append("-" if not values else f"{values[0]:.3f}" if len(values) == 1 else
                         f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
