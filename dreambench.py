"""The DreamBooth benchmark (Ruiz et al., CVPR 2023, Sec. 4.1), `evaluate.py --dreambooth`: for each
subject of the dataset, the 25 prompts of its kind (objects, or live subjects: cats and dogs) x 4
images from the subject's `wadi.py dreambooth` run, scored by (docs/dreambooth.md)

- DINO: the mean cosine similarity of DINO ViT-S/16 CLS embeddings (dino.py) over all (generated,
  real) image pairs of the subject;
- CLIP-I: the same with CLIP image embeddings (OpenAI's ViT-L/14, openclip.load_transformers_clip,
  as OFT's evaluation code);
- CLIP-T: the mean cosine of each image's CLIP embedding with its prompt's, the identifier left out
  of the text ("a cat in the jungle"; `keep_identifier` keeps it: the papers do not say which);
- and the real images' own row: DINO and CLIP-I over their distinct pairs.

A subject's images come from RUNS/SUBJECT (a dreambooth run): its fine-tuned teacher (unet.safetensors,
DDIM with CFG), or with a one-step student its adapter added (`Generation.adapters`). Images are
kept in OUT/SUBJECT/ (protocol.py: numbered, resumable) and each subject's scores in
OUT/SUBJECT/scores.json, so a stopped evaluation goes on where it was.
"""
import dataclasses
import json
import os
import re
import statistics

import torch
from PIL import Image

from dino import DINO_REPO, dino_embed, load_dino, mean_cosine
from loading import LoadError, read_json
from metrics import check_images, image_files
from openclip import (OPENAI_CLIP_REPO, load_open_clip_tokenizer, load_transformers_clip, open_clip_tokenize,
                      preprocess_image)
from protocol import Generation, generate_folders, image_path

LIVE_CLASSES = ("cat", "dog")  # the benchmark's live subjects (cat, cat2, dog ... dog8)
METRICS = ("dino", "clip_i", "clip_t")


def read_benchmark(dataset):
    """({subject: class noun}, {"object": 25 templates, "live": 25 templates}) from the dataset's
    prompts_and_classes.txt; a template has {0} (the identifier) and {1} (the class noun)."""
    path = os.path.join(dataset, "prompts_and_classes.txt")
    if not os.path.isfile(path):
        raise LoadError(f"--dreambooth {dataset}: no prompts_and_classes.txt (the DreamBooth dataset's "
                        f"dataset/ folder holds it)")
    text = open(path, encoding="utf-8").read()
    classes = dict(re.findall(r"^(\w+),([^\n,]+)$", text.split("Prompts")[0], re.M))
    classes.pop("subject_name", None)
    lists = [re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", part)
             for part in re.split(r"\n(?:Object|Live Subject) Prompts\n", text)[1:]]
    if not classes or len(lists) != 2 or any(len(x) != 25 for x in lists):
        raise LoadError(f"{path} is not the DreamBooth benchmark's prompt file")
    return classes, {"object": lists[0], "live": lists[1]}


def subject_prompts(templates, class_noun, identifier, keep_identifier=False):
    """(prompts with the identifier, the CLIP-T texts) of one subject."""
    prompts = [t.format(identifier, class_noun) for t in templates]
    texts = prompts if keep_identifier else [" ".join(t.format("", class_noun).split()) for t in templates]
    return prompts, texts


def real_images(dataset, subject):
    folder = os.path.join(dataset, subject)
    names = image_files(folder) if os.path.isdir(folder) else []
    if not names:
        raise LoadError(f"no images of subject {subject} in {folder}")
    paths = [os.path.join(folder, n) for n in names]
    check_images(paths, f"{subject} images")
    return paths


def load_rgb(paths):
    out = []
    for p in paths:
        with Image.open(p) as img:
            out.append(img.convert("RGB"))
    return out


@torch.no_grad()
def clip_embed(clip, images, batch_size=32):
    """(N, E) CLIP image embeddings of PIL images (openclip.preprocess_image)."""
    device = next(clip.parameters()).device
    size = clip.config.vision.image_size
    return torch.cat([clip.encode_image(torch.stack([preprocess_image(im, size) for im in images[i:i + batch_size]])
                                        .to(device)) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def score_subject(generated, real, texts, dino, clip, tokenizer):
    """{dino, clip_i, clip_t} of one subject: PIL `generated` images, each with its CLIP-T text."""
    g_clip, r_clip = clip_embed(clip, generated), clip_embed(clip, real)
    ids = open_clip_tokenize(tokenizer, texts, clip.config.text.max_position_embeddings)
    t_clip = clip.encode_text(ids.to(g_clip.device))
    cos = torch.nn.functional.cosine_similarity(g_clip.double(), t_clip.double(), dim=-1)
    return {"dino": mean_cosine(dino_embed(dino, generated), dino_embed(dino, real)),
            "clip_i": mean_cosine(g_clip, r_clip), "clip_t": cos.mean().item()}


@torch.no_grad()
def real_row(real, dino, clip):
    """DINO and CLIP-I of a subject's real images against each other (distinct pairs)."""
    out = {}
    for key, emb in (("dino", dino_embed(dino, real)), ("clip_i", clip_embed(clip, real))):
        e = torch.nn.functional.normalize(emb.double(), dim=-1)
        sim, n = e @ e.T, len(e)
        out[key] = ((sim.sum() - sim.diagonal().sum()) / max(n * (n - 1), 1)).item()
    return out


def evaluate_dreambooth(dataset, runs, out, gen: Generation, subjects=None, per_prompt=4, identifier="sks",
                        keep_identifier=False, images=None, dino_path=DINO_REPO, clip_path=OPENAI_CLIP_REPO,
                        device="cpu", log=print):
    """The benchmark (module docstring) over `subjects` (default: all). `gen` generates: with
    `gen.unet` (a one-step student) each run's adapter is added to it, else each run's fine-tuned
    teacher draws with DDIM; `images`: score this folder (IMAGES/SUBJECT/00000.png ...) instead.
    Writes OUT/metrics.json and returns it."""
    classes, templates = read_benchmark(dataset)
    subjects = subjects or sorted(classes)
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise LoadError(f"--subjects: {', '.join(unknown)} not in the benchmark ({', '.join(sorted(classes))})")
    dino, clip = load_dino(dino_path, device), load_transformers_clip(clip_path, device)
    tokenizer = load_open_clip_tokenizer(clip_path)
    results = {}
    for subject in subjects:
        kind = "live" if classes[subject] in LIVE_CLASSES else "object"
        prompts, texts = subject_prompts(templates[kind], classes[subject], identifier, keep_identifier)
        captions = [p for p in prompts for _ in range(per_prompt)]
        folder = os.path.join(images or out, subject)
        saved = os.path.join(out, subject, "scores.json")
        if os.path.isfile(saved) and read_json(saved).get("captions") == captions:
            results[subject] = read_json(saved)["scores"]
            continue
        if images is None:
            run = os.path.join(runs, subject)
            if not os.path.isfile(os.path.join(run, "adapter.safetensors")):
                raise LoadError(f"--runs {runs}: no dreambooth run for {subject} ({run}/adapter.safetensors)")
            this = dataclasses.replace(gen, adapters=(run,)) if gen.unet else \
                dataclasses.replace(gen, unet=os.path.join(run, "unet.safetensors"))
            generate_folders(this, [(captions, folder)], device, 0, 1)
        paths = [image_path(folder, i) for i in range(len(captions))]
        check_images(paths, f"{subject}'s images")
        real = load_rgb(real_images(dataset, subject))
        scores = score_subject(load_rgb(paths), real, [t for t in texts for _ in range(per_prompt)], dino, clip,
                               tokenizer)
        scores["real"] = real_row(real, dino, clip)
        os.makedirs(os.path.dirname(saved), exist_ok=True)
        with open(saved, "w") as f:
            json.dump({"captions": captions, "scores": scores}, f, indent=1)
        results[subject] = scores
        log(f"{subject}: " + ", ".join(f"{k} {scores[k]:.3f}" for k in METRICS))
    mean = {k: statistics.mean(r[k] for r in results.values()) for k in METRICS}
    real = {k: statistics.mean(r["real"][k] for r in results.values()) for k in ("dino", "clip_i")}
    metrics = {"mean": mean, "real_images": real, "subjects": results, "per_prompt": per_prompt,
               "identifier": identifier, "keep_identifier": keep_identifier, "dino": dino_path, "clip": clip_path,
               "generation": None if images else dataclasses.asdict(gen), "runs": runs, "images": images}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    log(table(metrics))
    return metrics


def table(metrics):
    """OFT's Table 1 layout: real images, then the evaluated generator."""
    real, mean = metrics["real_images"], metrics["mean"]
    return "\n".join(["| | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|",
                      f"| real images | {real['dino']:.3f} | {real['clip_i']:.3f} | - |",
                      f"| generated ({len(metrics['subjects'])} subjects) | {mean['dino']:.3f} | "
                      f"{mean['clip_i']:.3f} | {mean['clip_t']:.3f} |"])



def add_arguments(parser, protocol):
    """evaluate.py's --dreambooth on its `protocol` group, and this benchmark's options."""
    protocol.add_argument("--dreambooth", metavar="DATASET", help="the DreamBooth benchmark (dreambench.py): "
                          "DINO, CLIP-I, CLIP-T of --runs' subjects; DATASET: the dataset/ folder")
    g = parser.add_argument_group("DreamBooth")
    g.add_argument("--runs", help="folder of `wadi.py dreambooth` runs, one per subject (RUNS/cat, ...); with "
                                  "--unet each run is added to that one-step student, else its teacher draws")
    g.add_argument("--subjects", nargs="+", help="the subjects to evaluate (default: all 30)")
    g.add_argument("--per-prompt", type=int, default=4, help="images per prompt (default: 4)")
    g.add_argument("--identifier", default="sks", help="the runs' identifier word (default: sks)")
    g.add_argument("--keep-identifier", action="store_true", help="CLIP-T reads the prompt with it")
    g.add_argument("--dino", default=DINO_REPO, help="DINO ViT-S/16 in transformers' layout")
    g.add_argument("--clip-i", default=OPENAI_CLIP_REPO, help="CLIP for CLIP-I and CLIP-T (transformers')")


def command(args, device):
    """`evaluate.py --dreambooth`."""
    if not args.out or not (args.runs or args.images):
        raise LoadError("--dreambooth needs --out DIR and --runs DIR (or --images DIR)")
    evaluate_dreambooth(args.dreambooth, args.runs, args.out, Generation.from_options(args), args.subjects,
                        args.per_prompt, args.identifier, args.keep_identifier, args.images, args.dino,
                        args.clip_i, device)
