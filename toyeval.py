"""The toy backbones' measuring stick (paper Table 1's metrics, scaled to the toy): a classifier
that scores generated images the way FID and a prompt-following check score real ones, the toy
protocol (teacher and student on the same prompts and seeds), and its ControlNet protocol.

- Classifier: `ToyClassifier`, a small CNN with one head per attribute, trained on fresh samples by
  `train_classifier` (seconds on a CPU, > 99.9% per attribute). Its 64-d penultimate features play
  Inception's part: `toy_metrics` gives the Frechet distance (FD) of generated images to the data in
  that space, and the prompt accuracy, the share of images whose four predicted attributes all match
  their prompt. Compare sets with every prompt equally often (`toy.balanced_attributes`): then FD
  between two samples of the data is small (about 0.2 for 2048 images) and blur, noise, a colour
  cast or lost diversity raise it many times over.
- The protocol (`evaluate_toy`): FD and accuracy of the teacher (25-step DDIM with CFG 3, and one
  step) and the student (one step); the teacher's figures are measured once per teacher and
  protocol and kept (`teacher_metrics*.json` beside the model, or the cache directory).
- ControlNet protocol (`evaluate_toy_controlnet`, paper Fig. 5 on the toy): the position accuracy
  is how often the classifier finds the object where the mask puts it.
"""
import dataclasses
import glob
import hashlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from loading import LoadError, load_weights, read_json, read_safetensors, save_tensors, write_json
from metrics import feature_statistics, frechet_distance, weights_hash
from pipeline import BACKBONES, image_grid, load_text_encoder
from toy import (ATTRIBUTES, all_attributes, balanced_attributes, control_image, prompt, render,
                 sample, unplaced_prompt)

# -----------------------------------------------------------------------------------------------
# The classifier

class ToyClassifier(nn.Module):
    """A small CNN: four 3x3 convolutions (32x32 -> 4x4), each followed by a GroupNorm with one
    group (per-image statistics, so train and eval behave the same) and SiLU; a linear layer to the
    `features`-d penultimate vector; one linear head per attribute, and with a `subject` pattern
    (toy.PATTERNS) a fifth that tells DreamBooth's toy subject from ordinary objects."""

    def __init__(self, width=16, features=64, subject=None):
        super().__init__()
        self.config = {"width": width, "features": features, "attributes": [list(v) for v in ATTRIBUTES],
                       **({"subject": subject} if subject else {})}
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(1, w), nn.SiLU(),  # (B, w, 32, 32)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 2 * w), nn.SiLU(),  # (B, 2w, 16, 16)
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 4 * w), nn.SiLU(),  # (B, 4w, 8, 8)
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 4 * w), nn.SiLU(),  # (B, 4w, 4, 4)
        )
        self.project = nn.Linear(4 * w * 16, features)
        self.heads = nn.ModuleList([nn.Linear(features, len(values))
                                    for values in (*ATTRIBUTES, *[(False, True)] * bool(subject))])

    def features(self, x):  # (B, 3, 32, 32) in [-1, 1] -> (B, features)
        return F.silu(self.project(self.convs(x).flatten(1)))

    def forward(self, x):  # (B, 3, 32, 32) -> [(B, 2), (B, 4), (B, 4), (B, 4)] logits (, (B, 2))
        h = self.features(x)
        return [head(h) for head in self.heads]


def train_classifier(steps=500, batch_size=64, seed=0, lr=2e-3, progress=True, subject=None):
    """A ToyClassifier trained on fresh samples (a new batch every step, from a generator seeded
    with `seed`, as are the initial weights) with AdamW and a linearly decaying learning rate; with
    a `subject` pattern, half of each batch shows that subject and the fifth head learns which.
    Returns it in eval mode, on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyClassifier(subject=subject)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    bar = tqdm(range(steps), desc="toy classifier", unit="step", disable=not progress)
    for _ in bar:
        images, _, attributes = sample(batch_size, generator)
        if subject:
            shown = torch.arange(batch_size) % 2 == 1
            images = render(attributes, generator, subject=shown, pattern=subject)
            attributes = torch.cat([attributes, shown[:, None].long()], 1)
        loss = sum(F.cross_entropy(logits, target) for logits, target in zip(model(images), attributes.T))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return model.eval().requires_grad_(False)


def save_classifier(model, directory):
    """Write `config.json` and `model.safetensors` into `directory`."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    save_tensors(model.state_dict(), os.path.join(directory, "model.safetensors"))


def load_classifier(directory):
    """The ToyClassifier saved by `save_classifier`, in eval mode; a LoadError if the files are missing,
    do not match, or were trained on other attributes than this file's."""
    config = read_json(os.path.join(directory, "config.json"))
    missing = [k for k in ("width", "features", "attributes") if k not in config]
    if missing:
        raise LoadError(f"{directory}/config.json lacks {', '.join(missing)}: not a toy classifier config")
    if config["attributes"] != [list(v) for v in ATTRIBUTES]:
        raise LoadError(f"the toy classifier in {directory} was trained on other attributes than toy.py's")
    model = ToyClassifier(config["width"], config["features"], config.get("subject"))
    state = read_safetensors(os.path.join(directory, "model.safetensors"))
    load_weights(model, state, what=f"toy classifier {directory}")
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------------------------
# Measuring

@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """Features (N, F) and predicted attributes (N, 4; a subject classifier's (N, 5), the fifth 1
    for the subject) of images (N, 3, 32, 32), clamped to
    [-1, 1] first (as saving them would), in batches on the classifier's device."""
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for batch in images.split(batch_size):
        batch = batch.to(device, torch.float32).clamp(-1, 1)
        h = classifier.features(batch)
        features.append(h.cpu())
        predictions.append(torch.stack([head(h).argmax(1) for head in classifier.heads], 1).cpu())
    return torch.cat(features), torch.cat(predictions)


def data_statistics(classifier, n=10240, seed=1):
    """(mu, sigma) of the classifier features of n fresh dataset images with `balanced_attributes(n)`,
    details drawn with `seed`."""
    images = render(balanced_attributes(n), torch.Generator().manual_seed(seed))
    return feature_statistics(classify(classifier, images)[0].numpy())


def toy_metrics(images, attributes, classifier, reference_stats):
    """{"fd": Frechet distance of the images' features to `reference_stats` (mu, sigma),
    "accuracy": share of images whose predicted attributes all equal their prompt's `attributes` (N, 4)}."""
    features, predictions = classify(classifier, images)
    mu, sigma = feature_statistics(features.numpy())
    return {"fd": frechet_distance(mu, sigma, *reference_stats),
            "accuracy": (predictions[:, :4] == attributes.cpu()).all(1).float().mean().item()}


# -----------------------------------------------------------------------------------------------
# The protocol: teacher (25-step DDIM with CFG), teacher in one step (undistilled), student in one step

GENERATORS = {"teacher_25": 25, "teacher_1": 1, "student_1": 1}  # name: sampling steps
TEACHER_GUIDANCE = BACKBONES["toy"].guidance  # CFG scale of the 25-step teacher
PROTOCOL = {"n": 2048, "seed": 0, "guidance": TEACHER_GUIDANCE}  # evaluate.py --toy's evaluate_toy arguments
REPORT_SAMPLES = 512  # samples per generator in `wadi.py train`'s table; pretraining stores the teacher's for it
TEACHER_METRICS = "teacher_metrics.json"  # in the model repo: the teacher's figures, measured by pretraining


def teacher_fingerprint(pipe):
    """What the teacher's figures depend on besides the protocol: a hash of the denoiser's and the text
    encoder's weights (metrics.weights_hash; a T5, which the pipeline does not keep, is read for it), so
    figures of another teacher are never reused."""
    text = pipe.text_encoder if pipe.text_encoder is not None else load_text_encoder(pipe.text_model)
    return weights_hash(pipe.denoiser) + weights_hash(text)


def cached_teacher_metrics(model, protocol, weights, cache_dir=None):
    """(results, the file they come from) of the teacher under `protocol` (n, seed, guidance) when they were
    measured before for the same `weights` (`teacher_fingerprint`), else (None, None). Looked for in the
    model's `teacher_metrics*.json` (pretraining writes teacher_metrics.json) and in `cache_dir`; each file
    is {"weights", "protocol", "results"}. The 25-step teacher takes most of the protocol's CPU time."""
    paths = sorted(glob.glob(os.path.join(model, "teacher_metrics*.json")))
    paths += sorted(glob.glob(os.path.join(cache_dir, "toy-teacher-*.json"))) if cache_dir else []
    for path in paths:
        stored = read_json(path)
        if stored.get("weights") == weights and stored.get("protocol") == protocol:
            return stored["results"], path
    return None, None


def store_teacher_metrics(path, protocol, weights, results):
    """Write the teacher's rows of `results` with the protocol and weights they belong to (a temporary
    file, then renamed)."""
    teacher = {k: v for k, v in results.items() if k.startswith("teacher")}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump({"weights": weights, "protocol": protocol, "results": teacher}, f, indent=2)
        f.write("\n")
    os.replace(f"{path}.tmp", path)


def cache_teacher_metrics(cache_dir, protocol, weights, results):
    """Keep the teacher's figures in `cache_dir` for the next evaluation of the same teacher and protocol."""
    key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:8]
    store_teacher_metrics(os.path.join(cache_dir, f"toy-teacher-{weights[:16]}-{key}.json"), protocol, weights,
                          results)


def toy_images(pipe, unet, prompts, seeds, steps, guidance, batch_size=32, controlnet=None, control_image=None):
    """Images (N, 3, 32, 32) in [-1, 1] from `unet` in `pipe`, image i from prompts[i] and seeds[i] (and
    control_image[i], (N, 3, 32, 32) in [0, 1], through `controlnet` when given). Batches of 32 (64 through
    the U-Net with CFG) keep every activation small enough for the C allocator to reuse its memory: at 256
    each step's tensors were fresh mappings from the kernel, and a third of the CPU time went to page faults
    (BENCHMARKS.md)."""
    pipe = dataclasses.replace(pipe, denoiser=unet)
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"generate ({steps} step{'s' * (steps > 1)})",
                      unit="batch", leave=False):
        control = None if controlnet is None else control_image[start:start + batch_size]
        images = pipe.generate(prompts[start:start + batch_size], seeds[start:start + batch_size], steps, guidance,
                               controlnet=controlnet, control_image=control)
        out.append(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)  # (B, 3, 32, 32)
    return torch.cat(out)


def evaluate_toy(pipe, student, classifier, n, seed, guidance, names=tuple(GENERATORS), cached=None, reference=None,
                 cache_dir=None):
    """{name: {"fd", "accuracy"}} for the generators in `names` on the same n balanced prompts and seeds
    (`cached` results, e.g. the shipped teacher's, are reused), and a grid: one row per generator.
    `reference`: the data's `data_statistics(classifier)` when already computed; `cache_dir`: where a
    T5 caches the embeddings of the 128 prompts and "" (pipeline.Pipeline.prepare_prompts)."""
    attributes = balanced_attributes(n)
    prompts, seeds = [prompt(a) for a in attributes], list(range(seed, seed + n))
    pipe.prepare_prompts([prompt(a) for a in all_attributes()] + [""], cache_dir)
    reference = reference or data_statistics(classifier)
    results, rows = dict(cached or {}), []
    for name in names:
        unet = student if name.startswith("student") else pipe.denoiser
        if name in results:
            images = toy_images(pipe, unet, prompts[:8], seeds[:8], GENERATORS[name], guidance)
        else:
            images = toy_images(pipe, unet, prompts, seeds, GENERATORS[name], guidance)
            results[name] = toy_metrics(images, attributes, classifier, reference)
        rows.append(images[:8])
    return results, torch.cat(rows)  # grid rows: (len(names) * 8, 3, 32, 32)


ROWS = {"teacher_25": f"teacher, 25-step DDIM + CFG {TEACHER_GUIDANCE:g}",
        "teacher_1": "teacher, 1 step (undistilled)", "student_1": "student, 1 step"}
# the targets of a distilled toy student: FD at most 0.5x the one-step teacher's, prompt accuracy at
# least 0.9x the 25-step teacher's (docs/toy.md)
TARGETS = {"fd": ("teacher_1", 0.5), "accuracy": ("teacher_25", 0.9)}
TEACHERS = {"teacher_1": "one-step teacher", "teacher_25": "25-step teacher"}


def metrics_table(results):
    """The README's toy table: a row per generator in `results`; with the student and both teachers,
    the targets, the student's ratios and whether each target is met."""
    lines = [f"{'generator':<31} {'FD':>9} {'accuracy':>9}"]
    lines += [f"{ROWS.get(name, name):<31} {r['fd']:9.3f} {r['accuracy']:9.3f}" for name, r in results.items()]
    if not {"student_1", *(ref for ref, _ in TARGETS.values())} <= results.keys():
        return "\n".join(lines)
    bound = {k: factor * results[ref][k] for k, (ref, factor) in TARGETS.items()}
    lines.append(f"{'target':<31} {'<=' + format(bound['fd'], '.3f'):>9} "
                 f"{'>=' + format(bound['accuracy'], '.3f'):>9}")
    for key, name, better in (("fd", "FD", "<="), ("accuracy", "accuracy", ">=")):
        ref, factor = TARGETS[key]
        ratio = results["student_1"][key] / results[ref][key]
        met = ratio <= factor if better == "<=" else ratio >= factor
        lines.append(f"{name}: the student's is {ratio:.2f}x the {TEACHERS[ref]}'s (target: {better} "
                     f"{factor:g}x): {'met' if met else 'NOT met'}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The ControlNet protocol: the prompt names size, colour and shape; the object's place comes from a mask

CONTROL_GENERATORS = {  # name: (network, sampling steps, with the ControlNet)
    "teacher_25_controlnet": ("teacher", 25, True), "teacher_1_controlnet": ("teacher", 1, True),
    "student_1_controlnet": ("student", 1, True), "student_1": ("student", 1, False)}
CONTROL_PROTOCOL = {"n": 512, "seed": 0, "guidance": TEACHER_GUIDANCE}  # evaluate_toy_controlnet's arguments


def evaluate_toy_controlnet(pipe, student, controlnet, classifier, n, seed, guidance, names=tuple(CONTROL_GENERATORS)):
    """{name: {"position", "attributes"}}: how often the classifier finds the object at the mask's position, and
    its size, colour and shape those of the prompt, for the generators in `names` (CONTROL_GENERATORS) on the same
    n prompts without position, masks (`balanced_attributes(n)`: every position equally often; shapes drawn
    with `seed`) and noise seeds; and a grid, one row of 8 per mask | generator (images (rows * 8, 3, 32, 32))."""
    attributes = balanced_attributes(n)
    _, coverage = render(attributes, torch.Generator().manual_seed(seed), mask=True)
    masks = control_image(coverage)  # (n, 3, 32, 32)
    prompts, seeds = [unplaced_prompt(a) for a in attributes], list(range(seed, seed + n))
    shown = torch.arange(8) * 21 % min(n, len(all_attributes()))  # in the grid: sizes, colours, shapes, positions
    results, rows = {}, [masks[shown] * 2 - 1]
    for name in names:
        network, steps, control = CONTROL_GENERATORS[name]
        images = toy_images(pipe, student if network == "student" else pipe.denoiser, prompts, seeds, steps, guidance,
                                 controlnet=controlnet if control else None, control_image=masks)
        predictions = classify(classifier, images)[1]
        results[name] = {"position": (predictions[:, 3] == attributes[:, 3]).float().mean().item(),
                         "attributes": (predictions[:, :3] == attributes[:, :3]).all(1).float().mean().item()}
        rows.append(images[shown])
    return results, torch.cat(rows)


def control_table(results):
    lines = [f"{'generator':<22} {'position':>9} {'size+colour+shape':>18}"]
    lines += [f"{name:<22} {r['position']:9.3f} {r['attributes']:18.3f}" for name, r in results.items()]
    return "\n".join(lines)


def report(pipe, student, model, out, n, cache_dir=None, log=print):
    """`wadi.py train`'s result on a toy: FD and prompt accuracy of the teacher (25-step DDIM + CFG,
    and 1 step) and the student (1 step) on the same n prompts and seeds, as a table, out/metrics.json
    and out/comparison.png. The teacher's figures come from the repo's teacher_metrics.json when
    they were measured under the same protocol."""
    classifier = load_classifier(os.path.join(model, "classifier"))
    protocol = {**PROTOCOL, "n": n}
    cached, _ = cached_teacher_metrics(model, protocol, teacher_fingerprint(pipe))
    results, rows = evaluate_toy(pipe, student.eval(), classifier, cached=cached, cache_dir=cache_dir,
                                 **protocol)
    image_grid(pipe.decode(rows), cols=8, row_labels=list(results)).save(os.path.join(out, "comparison.png"))
    write_json(os.path.join(out, "metrics.json"), results)
    log(metrics_table(results))
    log(f"rows of {os.path.join(out, 'comparison.png')}: " + " | ".join(results))
