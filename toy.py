"""The toy backbones' data: a procedural text-to-image dataset small enough to train and distill a
diffusion model on a laptop CPU in minutes (the measuring stick that scores it is toyeval.py).

- Data: one coloured shape on a textured background, 32 x 32 RGB in [-1, 1], described by four
  attributes (size, colour, shape, position) and the prompt "a large red circle at the top left";
  2 x 4 x 4 x 4 = 128 combinations, all valid. Within a combination the object's exact place, size,
  colour and shading and the background (a tinted gradient with soft blotches and pixel noise) vary,
  all drawn from a torch.Generator, so the same seed gives the same images.
- Tokenizer: `write_tokenizer` writes a tiny CLIP BPE tokenizer in the Hugging Face file format
  (`bpe.CLIPTokenizer` reads it) in which every word of the prompts is one token.
- ControlNet data (paper Fig. 5 on the toy): prompts that name size, colour and shape but not the
  position ("a large red circle"), with the object's silhouette (`render(..., mask=True)`) as the
  ControlNet's condition.
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

from bpe import bytes_to_unicode

BACKBONES = ("toy", "toy-dit")  # the toy backbones (pipeline.BACKBONES): a U-Net with CLIP, a DiT with T5

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
# DreamBooth's toy subjects (render's `subject`, docs/dreambooth.md): where the object is darkened, from
# the pixels' offsets dx, dy (B, H, W) to its centre: diagonal stripes 2 px wide every 4 px (fine
# texture), or the lower half (a coarse two-tone look)
PATTERNS = {"striped": lambda dx, dy: (dx + dy) % 4 < 2, "two-tone": lambda dx, dy: dy > 0}
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


def unknown_words(prompts):
    """The words of `prompts` the toy never saw (WORDS), in order of appearance: its text encoder
    reads them as unknown tokens, and its images of them are faint blobs."""
    return list(dict.fromkeys(w for p in prompts for w in p.lower().replace(",", " ").split()
                              if w not in WORDS))


def warn_unknown_words(prompts, backbone, known=()):
    """One line on stderr when `prompts` use words the toy `backbone` never saw (`unknown_words`), but
    the `known` ones (learned tokens)."""
    unknown = [w for w in unknown_words(prompts) if w not in {k.lower() for k in known}]
    if unknown:
        print(f"warning: the {backbone} backbone knows only the words of its prompts ({' '.join(WORDS)}); "
              f"not: {' '.join(unknown)}", file=sys.stderr)


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


def render(attributes, generator, mask=False, subject=None, pattern="striped"):
    """Images (B, 3, 32, 32) in [-1, 1] showing the given attributes (B, 4); everything else is
    drawn from `generator` (the same generator state gives the same images). With `mask`, also the
    object's coverage (B, 1, 32, 32) in [0, 1]: its silhouette, anti-aliased at the edge. `subject`
    (B,) bool: those objects are DreamBooth's toy subject, darkened where PATTERNS[pattern] says
    (to 0.3 of their colour, towards black), a look the toy data never shows; the draws from
    `generator` are the same either way."""
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
    if subject is not None:
        dark = PATTERNS[pattern](dx, dy) & subject[:, None, None]  # (B, H, W)
        obj = torch.where(dark[:, None], 0.3 * obj - 0.6, obj)
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
# ControlNet data: the prompt names size, colour and shape; the object's place comes from a mask

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
