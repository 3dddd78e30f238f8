"""Image-quality metrics (FID, k-NN precision/recall, CLIP score) and the COCO protocol of the
paper's Table 1 (COCO 2014, 30k) and Table A6 (COCO 2017, 5k), shared with GigaGAN, DMD2, SiD-LSG and
SwiftBrushV2:

    python evaluate.py --coco 2014 --backbone sd15 --unet STUDENT.safetensors --coco-dir DIR \
        [--captions captions.txt] --out DIR
    python evaluate.py --coco 2014 --steps 25 --guidance 3 --coco-dir DIR --out DIR   (the teacher, DDIM)
    python evaluate.py --coco 2017 --images FOLDER --coco-dir DIR --out DIR      (another project's images)
    python evaluate.py --toy-controlnet --student STUDENT.safetensors --out DIR   (the toy ControlNet, toy.py)
    torchrun --nproc_per_node 8 evaluate.py --coco 2014 ...                      (generation and features split)

The metrics (metrics.py):

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Frechet distance between Gaussians fitted to the 2048-d pool3 features of the
  real and the generated images.
- Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): each feature set spans a manifold, the union of balls reaching to
  every point's k-th nearest neighbour (k = 3); precision is the share of generated points inside
  the real manifold, recall the share of real points inside the generated one.
- CLIP score: the mean cosine similarity between each image's and its caption's OpenCLIP ViT-g-14
  embeddings (scale 1; the paper reports 0.30-0.33), with openclip.py's towers.

The networks live in their own modules (inception.py, openclip.py) and the metrics in metrics.py;
this file holds the protocols and the command line. Every image, real or generated, goes through
`metrics.center_crop_resize` (256 px) and then Inception's own resize (`inception.inception_resize`).

The COCO protocol (`evaluate_coco`):
- captions: COCO 2014 uses the 30,000-line `captions.txt` of GigaGAN / DMD2 given with --captions, or
  else the first caption of each val2014 image in ascending image id, the first 30,000; COCO 2017 the
  first caption of each of the 5,000 val2017 images in ascending image id. "First" is the order of
  `annotations/captions_*.json`; whitespace runs become one space. The list's sha256 is logged.
- reference images: every image of val2014/ (40,504), or the val2017 images of the captions.
- generation: image i from caption i and seed i (pipeline.seeded_noise), at the backbone's native
  resolution, saved as images/00000.png, ...; images already there are kept, so a run resumes.
- every image, real or generated, goes through `center_crop_resize` (256 px) for all three metrics;
  the CLIP score prefixes each caption with "A photo depicts " as GigaGAN's and DMD2's evaluators do;
  precision and recall compare the generated set to the whole reference set (k = 3).
- under torchrun, rank r generates and extracts the features of the images r, r + world, ... and
  torch.distributed.all_gather_object brings the features to every rank (gloo on CPU, NCCL on GPU);
  rank 0 computes the metrics and writes metrics.json, grid.png and the reference cache.
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import toy
from inception import FID_WEIGHTS_URL, inception_features, load_inception
from controlnet import load_controlnet
from loading import LoadError, fetch, fetch_file, read_json
from metrics import (PREPROCESSING, center_crop_resize, clip_score, feature_statistics, frechet_distance,
                     load_statistics, precision_recall, preprocessing_hash, save_statistics, weights_hash)
from openclip import OPEN_CLIP_REPO, load_open_clip, load_open_clip_tokenizer
from pipeline import BACKBONES, DTYPES, image_grid, load_pipeline, load_unet_file, pick_dtype, read_prompts, student_a_T
from vsd import distributed

# -----------------------------------------------------------------------------------------------
# The COCO protocol: captions and reference images

COCO = {"2014": ("val2014", 30_000), "2017": ("val2017", 5_000)}  # year: (split, number of captions)
CLIP_PREFIX = "A photo depicts "  # GigaGAN's and DMD2's CLIP-score prompt (Hessel et al. 2021, CLIPScore)
PR_K = 3  # neighbours of the precision/recall manifolds
GRID = 16  # generated images in grid.png
CHUNK = 5000  # images held in memory at once while scoring (about 1.3 GB at 256 px)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def coco_captions(coco_dir, split):
    """(file names, captions) of every captioned image of a COCO split, in ascending image id, each with
    its first caption in the order of `annotations/captions_<split>.json`, runs of whitespace (newlines
    included) turned into one space."""
    path = os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if not os.path.isfile(path):
        raise LoadError(f"COCO captions not found: {path} (--coco-dir is the folder holding {split}/ and "
                        f"annotations/)")
    data = read_json(path)
    try:
        names = {img["id"]: img["file_name"] for img in data["images"]}
        first = {}
        for ann in data["annotations"]:
            first.setdefault(ann["image_id"], " ".join(ann["caption"].split()))
        ids = sorted(first)
        return [names[i] for i in ids], [first[i] for i in ids]
    except (KeyError, TypeError, AttributeError) as e:
        raise LoadError(f"{path} is not in the COCO captions format: {type(e).__name__}: {e}") from None


def coco_protocol(year, coco_dir, captions_file=None, num=None):
    """(captions, where they come from, reference image paths) of one COCO evaluation:
    - 2014: the captions of `captions_file` (e.g. GigaGAN's / DMD2's 30,000-line captions.txt) when given,
      else `coco_captions` of val2014; the reference set is every image in val2014/, whatever `num`;
    - 2017: `coco_captions` of val2017 (or those of `captions_file`); the reference set is the images
      of the first `num` captions.
    The first `num` captions are used (default: 30,000 / 5,000); fewer is a LoadError."""
    split, num = COCO[year][0], num or COCO[year][1]
    image_dir = os.path.join(coco_dir, split)
    if not os.path.isdir(image_dir):
        raise LoadError(f"COCO images not found: {image_dir} (--coco-dir is the folder holding {split}/ and "
                        f"annotations/)")
    if year == "2017" or not captions_file:  # COCO 2014 with a captions file needs no annotations
        names, captions = coco_captions(coco_dir, split)
    if captions_file:
        if not os.path.isfile(captions_file):
            raise LoadError(f"captions file not found: {captions_file}")
        captions = read_prompts(captions_file)
    source = captions_file or os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if len(captions) < num:
        raise LoadError(f"{source} has {len(captions)} captions, fewer than the {num} to evaluate (--num)")
    if year == "2014":  # every val2014 image, whatever --num
        names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
    else:  # the images of the captions
        names = names[:num]
    references = [os.path.join(image_dir, name) for name in names]
    if not references:
        raise LoadError(f"no images in {image_dir}")
    missing = [p for p in references if not os.path.isfile(p)]
    if missing:
        raise LoadError(f"{len(missing)} COCO images not found, e.g. {missing[0]}")
    return captions[:num], source, references


def caption_hash(captions):
    """sha256 (hex) of the caption list as used: each caption followed by a newline, UTF-8."""
    return hashlib.sha256("".join(c + "\n" for c in captions).encode()).hexdigest()


# -----------------------------------------------------------------------------------------------
# The COCO protocol: generation

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


def generation_settings(args, unet_file, captions, dtype):
    """What the generated images depend on, as recorded in images/generation.json and metrics.json."""
    return {"backbone": args.backbone, "model": args.model or BACKBONES[args.backbone].repo, "unet": args.unet,
            "a_T": student_a_T(unet_file) if args.steps == 1 else None, "steps": args.steps,
            "guidance": args.guidance if args.steps > 1 else None,
            "resolution": args.resolution or BACKBONES[args.backbone].resolution,
            "dtype": next(k for k, v in DTYPES.items() if v == dtype), "captions_sha256": caption_hash(captions)}


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


# -----------------------------------------------------------------------------------------------
# The COCO protocol: scoring, over all ranks

def all_gather(obj, world):
    """Every rank's `obj` in rank order (torch.distributed.all_gather_object); [obj] in one process."""
    if world == 1:
        return [obj]
    parts = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def interleave(parts, n):
    """Rank r's rows are items r, r + world, ...: the (n, D) array of all items in order."""
    out = np.empty((n, parts[0].shape[1]), parts[0].dtype)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


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


def load_image(path):
    """An image file through `center_crop_resize` (256 x 256 RGB)."""
    with Image.open(path) as img:
        return center_crop_resize(img)


def score_images(paths, inception, batch_size, clip=None, tokenizer=None, captions=None):
    """Inception pool3 features (n, 2048) of the image files and, given a CLIP model, the sum of their
    CLIP cosines with CLIP_PREFIX + caption (0.0 without). Chunks of CHUNK images are read and
    preprocessed by a thread pool, then scored on the models' device."""
    features, clip_sum = [np.zeros((0, 2048), np.float32)], 0.0
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            images = list(tqdm(pool.map(load_image, chunk), total=len(chunk), desc="read images", unit="img"))
            features.append(inception_features(inception, images, batch_size))
            if clip is not None:
                texts = [CLIP_PREFIX + c for c in captions[start:start + CHUNK]]
                clip_sum += clip_score(clip, tokenizer, images, texts, batch_size) * len(images)
    return np.concatenate(features), clip_sum



def reference_statistics(paths, name, inception, cache_dir, batch_size, rank, world):
    """(statistics, cache path, whether the cache was there). The reference set's Inception statistics
    (`load_statistics`: mu, sigma, count, features) are computed once, each rank taking the images
    rank::world, and cached in `cache_dir` under a fingerprint of the preprocessing, the Inception
    weights and the image files (names and byte sizes). Only rank 0 gets the statistics (None elsewhere)."""
    files = hashlib.sha256("".join(f"{os.path.basename(p)}:{os.path.getsize(p)}\n" for p in paths).encode())
    fingerprint = preprocessing_hash(reference=name, files=files.hexdigest(), inception=weights_hash(inception))
    path = os.path.join(cache_dir, f"{name}-{len(paths)}-{fingerprint}.npz")
    cached = all_gather(os.path.isfile(path), world)[0]  # rank 0 decides, for a cache only it can see
    if not cached:
        features = interleave(all_gather(score_images(paths[rank::world], inception, batch_size)[0], world),
                              len(paths))
        if rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            save_statistics(path, features, fingerprint)
    return (load_statistics(path, fingerprint) if rank == 0 else None), path, cached


# -----------------------------------------------------------------------------------------------
# The COCO protocol: the command line

def generate_coco(args, captions, directory, device, rank, world):
    """Generate this rank's share (images rank::world) of the images not yet in `directory`. Returns
    the generation settings and how many images all ranks generated."""
    dtype = pick_dtype(args.dtype, device)
    unet_file = fetch_file(args.unet) if args.unet else None
    settings = generation_settings(args, unet_file, captions, dtype)
    os.makedirs(directory, exist_ok=True)
    check_settings(directory, settings, rank)
    todo = [i for i in range(rank, len(captions), world) if not os.path.isfile(image_path(directory, i))]
    if todo:
        pipe = load_pipeline(args.backbone, args.model, unet_file, dtype, device)
        generate_images(pipe, captions, todo, directory, settings, args.batch_size, show=rank == 0)
        del pipe
    return settings, sum(all_gather(len(todo), world))


def evaluate_coco(args):
    """The COCO protocol end to end: captions and reference images, generation (unless --images),
    Inception features, FID, CLIP score and precision/recall; rank 0 writes metrics.json and grid.png
    in --out and prints the table."""
    rank, world, local_rank = distributed()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    captions, source, references = coco_protocol(args.coco, args.coco_dir, args.captions, args.num)
    n, sha = len(captions), caption_hash(captions)
    if not args.no_pr and len(references) <= PR_K:
        raise LoadError(f"precision/recall (k={PR_K}) needs more than {PR_K} reference images, "
                        f"{args.coco_dir} has {len(references)}")
    inception = load_inception(fetch_file(args.inception) if args.inception else None, device)
    clip = tokenizer = None
    if not args.no_clip:
        clip = load_open_clip(args.clip, device=device)
        tokenizer = load_open_clip_tokenizer(os.path.dirname(args.clip) if os.path.isfile(args.clip) else args.clip)
    if rank == 0:
        print(f"COCO {args.coco}: {n} captions from {source} (sha256 {sha}), {len(references)} reference images")

    directory, settings, generated = args.images, None, 0
    if not args.images:
        directory = os.path.join(args.out, "images")
        settings, generated = generate_coco(args, captions, directory, device, rank, world)
    if world > 1:
        dist.barrier()
    paths = indexed_images(directory, n)

    with exact_fp32():
        name = f"coco{args.coco}-{COCO[args.coco][0]}"
        ref, cache, cached = reference_statistics(references, name, inception, args.cache_dir, args.batch_size,
                                                  rank, world)
        features, clip_sum = score_images(paths[rank::world], inception, args.batch_size, clip, tokenizer,
                                          captions[rank::world])
        features, clip_sum = interleave(all_gather(features, world), n), sum(all_gather(clip_sum, world))
        if rank != 0:
            return
        fid = frechet_distance(ref["mu"], ref["sigma"], *feature_statistics(features))
        precision, recall = (None, None) if args.no_pr else precision_recall(ref["features"], features, PR_K,
                                                                             device=device)
    metrics = {
        "protocol": f"coco{args.coco}", "images": n,
        "fid": fid, "clip_score": None if args.no_clip else clip_sum / n, "precision": precision, "recall": recall,
        "captions": {"source": source, "sha256": sha},
        "image_folder": directory, "generator": settings, "generated_now": generated,
        "reference": {"images": len(references), "folder": os.path.dirname(references[0]), "statistics": cache,
                      "statistics_cached": cached},
        "inception": args.inception or FID_WEIGHTS_URL, "clip": None if args.no_clip else args.clip,
        "clip_prefix": CLIP_PREFIX, "precision_recall_k": PR_K, "preprocessing": PREPROCESSING, "world_size": world,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    image_grid(np.stack([np.asarray(load_image(p)) for p in paths[:GRID]])).save(os.path.join(args.out, "grid.png"))
    print_table(metrics)


def print_table(metrics):
    """The row of Table 1 / Table A6: FID, CLIP, precision, recall ('-' for a skipped metric)."""
    cells = [f"{metrics[k]:.{d}f}" if metrics[k] is not None else "-"
             for k, d in (("fid", 2), ("clip_score", 4), ("precision", 4), ("recall", 4))]
    print(f"{metrics['protocol']}, {metrics['images']} images ({metrics['image_folder']}):")
    print(f"  {'FID':>8} {'CLIP':>8} {'Precision':>10} {'Recall':>8}")
    print(f"  {cells[0]:>8} {cells[1]:>8} {cells[2]:>10} {cells[3]:>8}")


def evaluate_toy(args):
    """The toy protocol (toy.py): teacher_25, teacher_1 and student_1 on the same --num (default 2048)
    balanced prompts and seeds, printed as a table and written to --json."""
    model = args.model or BACKBONES["toy"].repo
    pipe = load_pipeline("toy", model)
    student = load_unet_file(fetch_file(args.student), read_json(fetch(model, "unet/config.json")))
    classifier = toy.load_classifier(os.path.join(model, "classifier"))
    protocol = {**toy.PROTOCOL, "n": args.num or toy.PROTOCOL["n"]}
    cached = None if args.no_cache else toy.cached_teacher_metrics(model, protocol)
    if cached:
        print(f"teacher figures from {os.path.join(model, toy.TEACHER_METRICS)} (same protocol; --no-cache "
              f"recomputes them)")
    results, _ = toy.evaluate_toy(pipe, student, classifier, cached=cached, **protocol)
    print(toy.metrics_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def evaluate_toy_controlnet(args):
    """The toy ControlNet protocol (toy.CONTROL_PROTOCOL): position accuracy of teacher and --student with
    --controlnet on --num (default 512) prompts without position, printed, and metrics.json + grid.png in --out."""
    model = args.model or BACKBONES["toy"].repo
    pipe = load_pipeline("toy", model)
    student = load_unet_file(fetch_file(args.student), read_json(fetch(model, "unet/config.json")))
    controlnet = load_controlnet(args.controlnet or os.path.join(model, "controlnet"), pipe.unet, pipe.downscale)
    protocol = {**toy.CONTROL_PROTOCOL, "n": args.num or toy.CONTROL_PROTOCOL["n"]}
    results, rows = toy.evaluate_toy_controlnet(pipe, student, controlnet, toy.load_classifier(
        os.path.join(model, "classifier")), **protocol)
    print(toy.control_table(results))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump({"protocol": protocol, "results": results}, f, indent=2)
    image_grid(((rows.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy(), cols=8).save(
        os.path.join(args.out, "grid.png"))
    print(f"rows of {os.path.join(args.out, 'grid.png')}: mask | " + " | ".join(results))


def build_parser():
    """The command line; a protocol (--coco) is required, the rest has the paper's defaults."""
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    protocol = parser.add_mutually_exclusive_group(required=True)
    protocol.add_argument("--coco", choices=sorted(COCO),
                          help="COCO 2014 (30k captions, Table 1) or COCO 2017 (5k, Table A6)")
    protocol.add_argument("--toy", action="store_true", help="the toy protocol: FD and prompt accuracy of the "
                                                             "teacher (25-step DDIM + CFG and 1 step) and --student")
    protocol.add_argument("--toy-controlnet", action="store_true", help="the toy ControlNet protocol: position "
                                                                        "accuracy with the object's mask as condition")
    parser.add_argument("--student", help="--toy: the merged one-step student (wadi.py train's student.safetensors)")
    parser.add_argument("--controlnet", help="--toy-controlnet: the ControlNet (default: MODEL/controlnet)")
    parser.add_argument("--json", help="--toy: write the metrics to this file")
    parser.add_argument("--no-cache", action="store_true", help="--toy: measure the teacher again instead of "
                                                                "reading the figures pretraining stored")
    parser.add_argument("--coco-dir", help="COCO folder holding val2014/ or val2017/ and annotations/")
    parser.add_argument("--captions", help="caption list, one per line (COCO 2014: GigaGAN's / DMD2's "
                                           "captions.txt; default: the first caption of each image)")
    parser.add_argument("--num", "--num-images", type=int, help="evaluate the first N captions (default: 30000 / "
                                                                "5000; under torchrun write --num-images, as "
                                                                "torchrun takes --num for its --numa-binding)")
    parser.add_argument("--out", help="--coco: output folder for metrics.json, grid.png, images/; "
                                      "--toy-controlnet: for metrics.json, grid.png")
    parser.add_argument("--images", help="score this folder of generated images (0.png or 00000.png, ... "
                                         "numbered as the captions) instead of generating")

    g = parser.add_argument_group("generation")
    g.add_argument("--backbone", choices=sorted(BACKBONES), default="sd15")
    g.add_argument("--model", help="base model: Hugging Face repo id or local directory (default: the backbone's)")
    g.add_argument("--unet", help="one-step student U-Net: a safetensors file in diffusers keys, or "
                                  "owner/repo/file on the Hub (default: the base model's U-Net)")
    g.add_argument("--steps", type=int, default=1, help="1: one-step generation; >1: DDIM with CFG (the teacher)")
    g.add_argument("--guidance", type=float, default=3.0, help="CFG scale for DDIM (Table 1's teacher: 3.0)")
    g.add_argument("--resolution", type=int, help="pixels (default: the backbone's native resolution)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on GPU, fp32 on CPU)")
    g.add_argument("--batch-size", type=int, default=32, help="images per batch (generation and features)")

    g = parser.add_argument_group("metrics")
    g.add_argument("--inception", help=f"FID Inception weights, .pth or .safetensors (default: download "
                                       f"{FID_WEIGHTS_URL.rsplit('/', 1)[1]})")
    g.add_argument("--clip", default=OPEN_CLIP_REPO, help="OpenCLIP ViT-g-14: Hub repo, local directory, or "
                                                          "weight file with vocab.json and merges.txt beside it")
    g.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    g.add_argument("--no-pr", action="store_true", help="skip precision and recall")
    g.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(
        os.path.join("~", ".cache"))), "wadi"), help="reference statistics cache (default: %(default)s)")
    return parser


def main(argv=None):
    """Run the command line; a problem the user can fix is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco and not (args.coco_dir and args.out):
        parser.error("--coco needs --coco-dir DIR and --out DIR")
    if (args.toy or args.toy_controlnet) and not args.student:
        parser.error("--toy and --toy-controlnet need --student FILE")
    if args.toy_controlnet and not args.out:
        parser.error("--toy-controlnet needs --out DIR")
    if args.images and (args.unet or args.model):
        parser.error("--images scores existing images: --unet and --model are for generating them")
    if args.num is not None and args.num <= (1 if args.no_pr else PR_K):
        parser.error(f"--num must be above {1 if args.no_pr else PR_K} (FID needs 2 images, precision/recall "
                     f"with k={PR_K} needs {PR_K + 1})")
    try:
        if args.toy:
            evaluate_toy(args)
        elif args.toy_controlnet:
            evaluate_toy_controlnet(args)
        else:
            evaluate_coco(args)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
