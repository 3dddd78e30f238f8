"""What the evaluation protocols share (evaluate.py's COCO protocol, hps.py's HPD v2 benchmark): folders of
numbered images generated one per prompt with seed = the prompt's index, resumable and refusing to mix
settings, split over processes under torchrun (ddp.py), and exact fp32 scoring.

- A generated folder holds 00000.png, 00001.png, ... (image i from prompt i and seed i, pipeline.seeded_noise)
  and generation.json, the settings they were made with; images already there are kept, so a run resumes,
  and a folder made with other settings (model, student, steps, prompt list, ...) is refused.
- Another project's images are found by the number in their file name (`indexed_images`).
- Under torchrun, rank r takes the items r, r + world, ...; `ddp.all_gather` brings every rank's results to
  all ranks and `ddp.interleave` puts them back in item order.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from cli import check_steps, pick_dtype, student_backbone
from ddp import all_gather
from dreambooth import add_run
from loading import LoadError, fetch_file, read_json
from metrics import IMAGE_EXTENSIONS, check_images
from pipeline import CACHE_DIR, DTYPES, load_pipeline, pick_backbone, student_a_T



@dataclass(frozen=True)
class Generation:
    """How a protocol generates its images: the commands' generation options."""
    backbone: str = None      # None: the one the `unet` file records, else sd15
    model: str = None         # base model; None: the one the `unet` file records, else the backbone's
    unet: str = None          # the one-step student (a file, or owner/repo/file); None: the teacher
    steps: int = 1            # 1: one step; more: DDIM with CFG `guidance`
    guidance: float = 3.0
    resolution: int = None    # None: the backbone's native resolution
    dtype: str = None         # a key of pipeline.DTYPES; None: fp16 on a GPU, fp32 on the CPU
    batch_size: int = 32
    cache_dir: str = CACHE_DIR  # where a T5 caches its prompt embeddings
    adapters: tuple = ()      # dreambooth runs whose adapters are added to `unet` (dreambooth.add_run)

    @classmethod
    def from_options(cls, options):
        """From a command line's parsed options (an argparse namespace), read, not changed."""
        return cls(**{f.name: getattr(options, f.name) for f in dataclasses.fields(cls) if hasattr(options, f.name)})


def caption_hash(captions):
    """sha256 (hex) of the caption list as used: each caption followed by a newline, UTF-8."""
    return hashlib.sha256("".join(c + "\n" for c in captions).encode()).hexdigest()


# -----------------------------------------------------------------------------------------------
# Numbered image folders

def image_path(directory, index):
    """Where generated image `index` goes: directory/00042.png."""
    return os.path.join(directory, f"{index:05d}.png")


def indexed_images(directory, n):
    """Paths of the images 0 .. n-1 of a folder, each found by the number that is its file name
    (`7.png`, `00007.png`, `000007.jpg`; higher numbers are ignored): a LoadError when one is missing
    or there twice."""
    if not os.path.isdir(directory):
        raise LoadError(f"image folder not found: {directory}")
    found = {}
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and re.fullmatch("[0-9]+", stem):
            if int(stem) in found:
                raise LoadError(f"{directory} has two images numbered {int(stem)}: {found[int(stem)]} and {name}")
            found[int(stem)] = name
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise LoadError(f"{directory} lacks {len(missing)} of the {n} images (the first: number {missing[0]}); "
                        f"images are matched to captions by the number in their file name")
    return [os.path.join(directory, found[i]) for i in range(n)]


# -----------------------------------------------------------------------------------------------
# Resumable generation

def generation_settings(gen: Generation, unet_file, captions, dtype):
    """What the generated images depend on, as recorded in images/generation.json and metrics.json
    (`gen` with its backbone and model resolved)."""
    spec = pick_backbone(gen.backbone, gen.resolution, gen.model)
    return {"backbone": gen.backbone, "model": gen.model or spec.repo, "unet": gen.unet,
            "a_T": student_a_T(unet_file) if gen.steps == 1 else None, "steps": gen.steps,
            "guidance": gen.guidance if gen.steps > 1 else None,
            "resolution": gen.resolution or spec.resolution,
            "dtype": next(k for k, v in DTYPES.items() if v == dtype),
            "captions_sha256": caption_hash(captions), **({"adapters": list(gen.adapters)} if gen.adapters else {})}


def check_settings(directory, settings, rank):
    """Refuse to add images to a folder that holds images generated with other settings (another
    model, caption list, step count, ...); rank 0 records the settings in generation.json."""
    path = os.path.join(directory, "generation.json")
    if os.path.isfile(path):
        previous = read_json(path)
        changed = [f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items() if previous.get(k) != v]
        if changed:
            raise LoadError(f"{directory} holds images generated with other settings ({'; '.join(changed)}); "
                            f"give another --out")
    elif rank == 0:
        with open(f"{path}.tmp", "w") as f:
            json.dump(settings, f, indent=2)
        os.replace(f"{path}.tmp", path)


def generate_images(pipe, captions, indices, directory, settings, batch_size, show=True):
    """Write image i (caption i, seed i) as directory/0000i.png for each i of `indices`, a batch at a
    time. Each file is written under a temporary name and then renamed, so every PNG there is whole."""
    with tqdm(total=len(indices), desc="generate", unit="img", disable=not show) as bar:
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            images = pipe.generate([captions[i] for i in batch], batch, settings["steps"], settings["guidance"],
                                   settings["a_T"], settings["resolution"])  # (b, H, W, 3) uint8
            for i, image in zip(batch, images):
                Image.fromarray(image).save(f"{image_path(directory, i)}.tmp", format="PNG")
                os.replace(f"{image_path(directory, i)}.tmp", image_path(directory, i))
            bar.update(len(batch))


def generate_folders(gen: Generation, folders, device, rank, world):
    """Generate this rank's share (images rank::world) of the images not yet in each of `folders`, a
    list of (captions, directory); the images already there are checked first. The pipeline (backbone
    and base model default to those recorded in the `gen.unet` file) is loaded once, and only when an
    image is missing; a T5 encodes this rank's captions into the prompt cache in gen.cache_dir first
    and is freed. Returns the generation settings of each folder and how many images all ranks
    generated."""
    dtype = pick_dtype(gen.dtype, device)
    unet_file = fetch_file(gen.unet, "--unet") if gen.unet else None
    backbone, model = student_backbone(gen.backbone, gen.model, unet_file, "--unet", gen.resolution)
    gen = dataclasses.replace(gen, backbone=backbone, model=model)
    check_steps(gen.model, gen.steps)
    settings, todo = [], []
    for captions, directory in folders:
        settings.append(generation_settings(gen, unet_file, captions, dtype))
        os.makedirs(directory, exist_ok=True)
        check_settings(directory, settings[-1], rank)
        mine = range(rank, len(captions), world)
        check_images([image_path(directory, i) for i in mine if os.path.isfile(image_path(directory, i))],
                     "generated images")  # those a resumed run keeps, before any long work
        todo.append([i for i in mine if not os.path.isfile(image_path(directory, i))])
    if any(todo):
        pipe = load_pipeline(gen.backbone, gen.model, unet_file, dtype, device, resolution=gen.resolution)
        for run in gen.adapters:
            add_run(pipe.denoiser, run, gen.backbone)
        # this rank's captions (all of them, so that a resumed run finds the same cache), each rank on
        # its own
        mine = [c for captions, _ in folders for c in captions[rank::world]]
        pipe.prepare_prompts(mine + [""], gen.cache_dir)
        for (captions, directory), indices, folder_settings in zip(folders, todo, settings):
            generate_images(pipe, captions, indices, directory, folder_settings, gen.batch_size,
                            show=rank == 0)
        del pipe
    return settings, sum(all_gather(sum(map(len, todo)), world))


# -----------------------------------------------------------------------------------------------
# Scoring

@contextlib.contextmanager
def exact_fp32():
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (restored after), so that the
    features and distances are true fp32 as in the reference implementations."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
