"""The toy backbone's data and its measuring stick: a procedural text-to-image dataset small enough
to train and distill a diffusion model on a laptop CPU in minutes, and a classifier that scores
generated images the way FID and a prompt-following check score real ones.

- Data: one coloured shape on a textured background, 32 x 32 RGB in [-1, 1], described by four
  attributes (size, colour, shape, position) and the prompt "a large red circle at the top left";
  2 x 4 x 4 x 4 = 128 combinations, all valid. Within a combination the object's exact place, size,
  colour and shading and the background (a tinted gradient with soft blotches and pixel noise) vary,
  all drawn from a torch.Generator, so the same seed gives the same images.
- Tokenizer: `write_tokenizer` writes a tiny CLIP BPE tokenizer in the Hugging Face file format
  (`clip.CLIPTokenizer` reads it) in which every word of the prompts is one token.
- Classifier: `ToyClassifier`, a small CNN with one head per attribute, trained on fresh samples by
  `train_classifier` (seconds on a CPU, > 99.9% per attribute). Its 64-d penultimate features play
  Inception's part: `toy_metrics` gives the Frechet distance (FD) of generated images to the data in
  that space, and the prompt accuracy, the share of images whose four predicted attributes all match
  their prompt. Compare sets with every prompt equally often (`balanced_attributes`): then FD between
  two samples of the data is small (about 0.2 for 2048 images) and blur, noise, a colour cast or lost
  diversity raise it many times over.
- ControlNet protocol (`evaluate_toy_controlnet`, paper Fig. 5 on the toy): prompts that name size, colour and
  shape but not the position ("a large red circle"), the object's silhouette (`render(..., mask=True)`) as the
  ControlNet's condition; the position accuracy is how often the classifier finds the object where the mask is.
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

from clip import bytes_to_unicode
from metrics import feature_statistics, frechet_distance, weights_hash
from loading import LoadError, load_weights, read_json, read_safetensors, save_tensors
from pipeline import load_text_encoder

# -----------------------------------------------------------------------------------------------
# The dataset

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = (SIZES, COLOURS, SHAPES, POSITIONS)  # the columns of an attribute tensor, in prompt order
ATTRIBUTE_NAMES = ("size", "colour", "shape", "position")
TEMPLATE = "a {} {} {} at the {}"
RESOLUTION = 32

PALETTE = torch.tensor([[0.85, -0.75, -0.75],  # red
                        [-0.75, 0.70, -0.75],  # green
                        [-0.75, -0.55, 0.85],  # blue
                        [0.85, 0.75, -0.75]])  # yellow, RGB in [-1, 1]
RADII = torch.tensor([4.0, 7.0])  # object radius in pixels, small and large, +- 0.5
CENTRES = torch.tensor([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0], [24.0, 24.0]])  # (x, y) of each position, +- 1.5


def all_attributes():
    """Every combination once: LongTensor (128, 4)."""
    return torch.cartesian_prod(*(torch.arange(len(values)) for values in ATTRIBUTES))


def balanced_attributes(n):
    """n attribute rows (n, 4) going through all combinations in turn: every prompt equally often
    when n is a multiple of 128. Comparing balanced sets keeps the chance mix of prompts out of FD."""
    combinations = all_attributes()
    return combinations.repeat(-(-n // len(combinations)), 1)[:n]


def prompt(attributes):
    """The prompt of one attribute row (4 ints), e.g. "a large red circle at the top left"."""
    return TEMPLATE.format(*(values[int(i)] for values, i in zip(ATTRIBUTES, attributes)))


def parse_prompt(text):
    """The attribute row (4,) of a toy prompt; the inverse of `prompt`. ValueError for anything else."""
    words = text.split()
    if len(words) != 8 or words[0] != "a" or words[4:6] != ["at", "the"]:
        raise ValueError(f"not a toy prompt ({TEMPLATE.format('SIZE', 'COLOUR', 'SHAPE', 'POSITION')}): {text!r}")
    row = []
    for name, values, word in zip(ATTRIBUTE_NAMES, ATTRIBUTES, [*words[1:4], " ".join(words[6:])]):
        if word not in values:
            raise ValueError(f"unknown {name} {word!r} in toy prompt {text!r} (known: {', '.join(values)})")
        row.append(values.index(word))
    return torch.tensor(row)


# Bilinear upsampling from 4 x 4 to 32 x 32 as a matrix: image = UPSAMPLE @ grid @ UPSAMPLE.T
# (what F.interpolate(mode="bilinear") computes, several times faster on a large batch).
UPSAMPLE = F.interpolate(torch.eye(4)[None], size=RESOLUTION, mode="linear")[0].T  # (32, 4)


def _circle(dx, dy, r):
    return torch.sqrt(dx ** 2 + dy ** 2) - r


def _square(dx, dy, r):
    return torch.maximum(dx.abs(), dy.abs()) - 0.85 * r


def _triangle(dx, dy, r):  # apex (0, -r), base corners (+-r, 0.7 r); y points down
    return torch.maximum(dy - 0.7 * r, (1.7 * dx.abs() - dy - r) / (1.7 ** 2 + 1) ** 0.5)


def _cross(dx, dy, r):  # arms of half-length r and half-thickness 0.35 r
    bar = 0.35 * r
    return torch.minimum(torch.maximum(dx.abs() - r, dy.abs() - bar), torch.maximum(dx.abs() - bar, dy.abs() - r))


def _shape_distance(shape, dx, dy, r):
    """Signed distance in pixels (negative inside, exact near the edges) from every pixel to the
    boundary of each image's shape. shape (B,), dx and dy (B, H, W) offsets from the centre, r (B, 1, 1)."""
    distance = torch.empty_like(dx)
    for i, shape_distance in enumerate((_circle, _square, _triangle, _cross)):  # the order of SHAPES
        chosen = shape == i
        distance[chosen] = shape_distance(dx[chosen], dy[chosen], r[chosen])
    return distance  # (B, H, W)


def render(attributes, generator, mask=False):
    """Images (B, 3, 32, 32) in [-1, 1] showing the given attributes (B, 4); everything else is
    drawn from `generator` (the same generator state gives the same images). With `mask`, also the
    object's coverage (B, 1, 32, 32) in [0, 1]: its silhouette, anti-aliased at the edge."""
    size, colour, shape, position = attributes.T
    b, n = len(attributes), RESOLUTION

    def uniform(*dims, low, high):
        return low + (high - low) * torch.rand(*dims, generator=generator)

    # the object: place, size, colour (with a slight jitter) and a linear shading across it
    centre = CENTRES[position] + uniform(b, 2, low=-1.5, high=1.5)  # (B, 2) as (x, y)
    r = (RADII[size] + uniform(b, low=-0.5, high=0.5))[:, None, None]  # (B, 1, 1)
    rgb = PALETTE[colour] + uniform(b, 3, low=-0.1, high=0.1)  # (B, 3)
    light = uniform(b, 2, 1, 1, low=-0.2, high=0.2)  # (B, 2, 1, 1) shading change per radius, along x and y
    # the background: a smooth field upsampled from a 4 x 4 grid holding a grey level with a slight
    # tint, a linear gradient and random blotches; then pixel noise over everything
    grey = uniform(b, 1, 1, 1, low=-0.5, high=0.3) + uniform(b, 3, 1, 1, low=-0.1, high=0.1)  # (B, 3, 1, 1)
    slope = uniform(b, 2, 1, 1, low=-0.25, high=0.25)  # (B, 2, 1, 1) change across the image, along x and y
    cells = torch.linspace(-0.5, 0.5, 4)
    ramp = slope[:, 0] * cells[None, :] + slope[:, 1] * cells[:, None]  # (B, 4, 4)
    blotches = 0.15 * torch.randn(b, 1, 4, 4, generator=generator) + 0.04 * torch.randn(b, 3, 4, 4, generator=generator)
    noise = 0.03 * torch.randn(b, 1, n, n, generator=generator)

    pixel = torch.arange(n, dtype=torch.float32) + 0.5
    dx = (pixel[None, None, :] - centre[:, 0, None, None]).expand(b, n, n)  # (B, H, W)
    dy = (pixel[None, :, None] - centre[:, 1, None, None]).expand(b, n, n)  # (B, H, W)
    coverage = (0.5 - _shape_distance(shape, dx, dy, r)).clamp_(0, 1)[:, None]  # (B, 1, H, W), anti-aliased edge
    obj = rgb[:, :, None, None] + ((light[:, 0] * dx + light[:, 1] * dy) / r)[:, None]  # (B, 3, H, W)
    image = UPSAMPLE @ (grey + ramp[:, None] + blotches) @ UPSAMPLE.T  # (B, 3, H, W), the background
    image.lerp_(obj, coverage)  # the object over it; in place, as below: batches of thousands are common
    image = image.add_(noise).clamp_(-1, 1)  # (B, 3, 32, 32)
    return (image, coverage) if mask else image


def sample(n, generator):
    """n fresh dataset items, attributes drawn uniformly: images (n, 3, 32, 32) in [-1, 1], prompts
    (list of n str), attributes LongTensor (n, 4)."""
    attributes = torch.stack([torch.randint(len(values), (n,), generator=generator) for values in ATTRIBUTES], 1)
    images = render(attributes, generator)
    return images, [prompt(row) for row in attributes], attributes


# -----------------------------------------------------------------------------------------------
# The tokenizer

WORDS = tuple(dict.fromkeys(w for text in ("a at the", *SIZES, *COLOURS, *SHAPES, *POSITIONS) for w in text.split()))
MAX_TOKENS = 16  # BOS, up to 14 words, EOS


def tokenizer_vocabulary():
    """(vocab: token -> id, merges: list of pairs) of a CLIP BPE in which every word of WORDS is one
    token. Laid out as CLIP's: the 256 byte characters, the same with `</w>`, the merge results,
    then `<|startoftext|>` and `<|endoftext|>`.

    Each word is built right to left: "red" by ("e", "d</w>") then ("r", "ed</w>"). Every merge
    result then ends a word, so a word in the making is single characters followed by one `</w>`
    piece and only one pair can merge at a time: the word's own next merge. (Built left to right,
    ("r", "e") from "red" could take the "re" inside "green" before "green"'s own ("g", "r").)"""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        for i in range(len(word) - 2, -1, -1):
            pair = (word[i], word[i + 1:] + "</w>")
            if pair not in merges:
                merges.append(pair)
                tokens.append("".join(pair))
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_tokenizer(directory):
    """Write `vocab.json`, `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json` (the
    Hugging Face CLIP tokenizer files, model_max_length MAX_TOKENS) into `directory`. Returns the
    vocabulary size (the text encoder's `vocab_size`)."""
    vocab, merges = tokenizer_vocabulary()
    special = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    specials = {"bos_token": {**special, "content": "<|startoftext|>"}, "eos_token": special,
                "pad_token": "<|endoftext|>", "unk_token": special}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_TOKENS,
              "tokenizer_class": "CLIPTokenizer", **specials}
    os.makedirs(directory, exist_ok=True)
    files = {"vocab.json": vocab, "special_tokens_map.json": specials, "tokenizer_config.json": config}
    for name, content in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


# -----------------------------------------------------------------------------------------------
# The classifier

class ToyClassifier(nn.Module):
    """A small CNN: four 3x3 convolutions (32x32 -> 4x4), each followed by a GroupNorm with one
    group (per-image statistics, so train and eval behave the same) and SiLU; a linear layer to the
    `features`-d penultimate vector; one linear head per attribute."""

    def __init__(self, width=16, features=64):
        super().__init__()
        self.config = {"width": width, "features": features, "attributes": [list(v) for v in ATTRIBUTES]}
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(1, w), nn.SiLU(),  # (B, w, 32, 32)
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 2 * w), nn.SiLU(),  # (B, 2w, 16, 16)
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 4 * w), nn.SiLU(),  # (B, 4w, 8, 8)
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1), nn.GroupNorm(1, 4 * w), nn.SiLU(),  # (B, 4w, 4, 4)
        )
        self.project = nn.Linear(4 * w * 16, features)
        self.heads = nn.ModuleList([nn.Linear(features, len(values)) for values in ATTRIBUTES])

    def features(self, x):  # (B, 3, 32, 32) in [-1, 1] -> (B, features)
        return F.silu(self.project(self.convs(x).flatten(1)))

    def forward(self, x):  # (B, 3, 32, 32) -> [(B, 2), (B, 4), (B, 4), (B, 4)] logits
        h = self.features(x)
        return [head(h) for head in self.heads]


def train_classifier(steps=500, batch_size=64, seed=0, lr=2e-3, progress=True):
    """A ToyClassifier trained on fresh samples (a new batch every step, from a generator seeded
    with `seed`, as are the initial weights) with AdamW and a linearly decaying learning rate.
    Returns it in eval mode, on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyClassifier()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    bar = tqdm(range(steps), desc="toy classifier", unit="step", disable=not progress)
    for _ in bar:
        images, _, attributes = sample(batch_size, generator)
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
    model = ToyClassifier(config["width"], config["features"])
    state = read_safetensors(os.path.join(directory, "model.safetensors"))
    load_weights(model, state, what=f"toy classifier {directory}")
    return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------------------------
# Measuring

@torch.no_grad()
def classify(classifier, images, batch_size=1000):
    """Features (N, F) and predicted attributes (N, 4) of images (N, 3, 32, 32), clamped to
    [-1, 1] first (as saving them would), in batches on the classifier's device."""
    device = next(classifier.parameters()).device
    features, predictions = [], []
    for batch in images.split(batch_size):
        batch = batch.to(device, torch.float32).clamp(-1, 1)
        h = classifier.features(batch)
        features.append(h.cpu())
        predictions.append(torch.stack([head(h).argmax(1) for head in classifier.heads], 1).cpu())
    return torch.cat(features), torch.cat(predictions)


def reference_statistics(classifier, n=10240, seed=1):
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
            "accuracy": (predictions == attributes.cpu()).all(1).float().mean().item()}


# -----------------------------------------------------------------------------------------------
# The protocol: teacher (25-step DDIM with CFG), teacher in one step (undistilled), student in one step

GENERATORS = {"teacher_25": 25, "teacher_1": 1, "student_1": 1}  # name: sampling steps
TEACHER_GUIDANCE = 3.0  # CFG scale of the 25-step teacher
PROTOCOL = {"n": 2048, "seed": 0, "guidance": TEACHER_GUIDANCE}  # evaluate.py --toy's evaluate_toy arguments
REPORT_SAMPLES = 512  # samples per generator in `wadi.py train`'s table; pretraining stores the teacher's for it
TEACHER_METRICS = "teacher_metrics.json"  # in the model repo: the teacher's figures, measured by pretraining
BACKBONES = ("toy", "toy-dit")  # the toy backbones (pipeline.BACKBONES): a U-Net with CLIP, a DiT with T5


def teacher_fingerprint(pipe):
    """What the teacher's figures depend on besides the protocol: a hash of the denoiser's and the text
    encoder's weights (metrics.weights_hash; a T5, which the pipeline does not keep, is read for it), so
    figures of another teacher are never reused."""
    text = pipe.text_encoder if pipe.text_encoder is not None else load_text_encoder(pipe.text_model)
    return weights_hash(pipe.unet) + weights_hash(text)


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


def generate_images(pipe, unet, prompts, seeds, steps, guidance, batch_size=32, controlnet=None, control_image=None):
    """Images (N, 3, 32, 32) in [-1, 1] from `unet` in `pipe`, image i from prompts[i] and seeds[i] (and
    control_image[i], (N, 3, 32, 32) in [0, 1], through `controlnet` when given). Batches of 32 (64 through
    the U-Net with CFG) keep every activation small enough for the C allocator to reuse its memory: at 256
    each step's tensors were fresh mappings from the kernel, and a third of the CPU time went to page faults
    (BENCHMARKS.md)."""
    pipe = dataclasses.replace(pipe, unet=unet)
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
    `reference`: the data's `reference_statistics(classifier)` when already computed; `cache_dir`: where a
    T5 caches the embeddings of the 128 prompts and "" (pipeline.Pipeline.prepare_prompts)."""
    attributes = balanced_attributes(n)
    prompts, seeds = [prompt(a) for a in attributes], list(range(seed, seed + n))
    pipe.prepare_prompts([prompt(a) for a in all_attributes()] + [""], cache_dir)
    reference = reference or reference_statistics(classifier)
    results, rows = dict(cached or {}), []
    for name in names:
        unet = student if name.startswith("student") else pipe.unet
        if name in results:
            images = generate_images(pipe, unet, prompts[:8], seeds[:8], GENERATORS[name], guidance)
        else:
            images = generate_images(pipe, unet, prompts, seeds, GENERATORS[name], guidance)
            results[name] = toy_metrics(images, attributes, classifier, reference)
        rows.append(images[:8])
    return results, torch.cat(rows)  # grid rows: (len(names) * 8, 3, 32, 32)


def metrics_table(results):
    lines = [f"{'generator':<12} {'FD':>8} {'accuracy':>9}"]
    lines += [f"{name:<12} {r['fd']:8.3f} {r['accuracy']:9.3f}" for name, r in results.items()]
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# The ControlNet protocol: the prompt names size, colour and shape; the object's place comes from a mask

CONTROL_GENERATORS = {  # name: (network, sampling steps, with the ControlNet)
    "teacher_25_controlnet": ("teacher", 25, True), "teacher_1_controlnet": ("teacher", 1, True),
    "student_1_controlnet": ("student", 1, True), "student_1": ("student", 1, False)}
CONTROL_PROTOCOL = {"n": 512, "seed": 0, "guidance": TEACHER_GUIDANCE}  # evaluate_toy_controlnet's arguments


def unplaced_prompt(attributes):
    """The prompt of one attribute row without its position, e.g. "a large red circle"."""
    return prompt(attributes).split(" at the ")[0]


def control_image(coverage):
    """Masks (B, 1, H, W) in [0, 1] -> the ControlNet's input (B, 3, H, W) in [0, 1]: what a greyscale PNG of
    the mask becomes through `controlnet.prepare_control_image` (8-bit levels, RGB)."""
    return (coverage * 255).round().div(255).expand(-1, 3, -1, -1)


def control_sample(n, generator):
    """n fresh dataset items for ControlNet training: images (n, 3, 32, 32) in [-1, 1], prompts without the
    position (list of n str), control images of the objects' silhouettes (n, 3, 32, 32) in [0, 1]."""
    attributes = torch.stack([torch.randint(len(values), (n,), generator=generator) for values in ATTRIBUTES], 1)
    images, coverage = render(attributes, generator, mask=True)
    return images, [unplaced_prompt(row) for row in attributes], control_image(coverage)


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
        images = generate_images(pipe, student if network == "student" else pipe.unet, prompts, seeds, steps, guidance,
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
