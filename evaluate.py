"""Image-quality metrics (FID, k-NN precision/recall, CLIP score) and the COCO protocol of the
paper's Table 1 (COCO 2014, 30k) and Table A6 (COCO 2017, 5k), shared with GigaGAN, DMD2, SiD-LSG and
SwiftBrushV2:

    python evaluate.py --coco 2014 --backbone sd15 --unet STUDENT.safetensors --coco-dir DIR \
        [--captions captions.txt] --out DIR
    python evaluate.py --coco 2014 --steps 25 --guidance 3 --coco-dir DIR --out DIR   (the teacher, DDIM)
    python evaluate.py --coco 2017 --images FOLDER --coco-dir DIR --out DIR      (another project's images)
    python evaluate.py --toy-controlnet --student STUDENT.safetensors --out DIR   (the toy ControlNet, toyeval.py)
    torchrun --nproc_per_node 8 evaluate.py --coco 2014 ...                      (generation and features split)
    python evaluate.py --hps [FILE] --backbone sd15 --unet STUDENT.safetensors --hps-prompts DIR --out DIR
                                                           (HPS v2.1 on the HPD v2 benchmark: hps.py)
    python evaluate.py --dreambooth DATASET --runs RUNS [--unet STUDENT] --out DIR   (dreambench.py)

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

The networks live in inception.py and openclip.py, the metrics in metrics.py; this file holds the
protocols (DreamBooth's: dreambench.py) and the command line.

The COCO protocol (`evaluate_coco`):
- captions: COCO 2014 uses the 30,000-line `captions.txt` of GigaGAN / DMD2 given with --captions, or
  else the first caption of each val2014 image in ascending image id, the first 30,000; COCO 2017 the
  first caption of each of the 5,000 val2017 images in ascending image id. "First" is the order of
  `annotations/captions_*.json`; whitespace runs become one space. The list's sha256 is logged.
- reference images: every image of val2014/ (40,504), or the val2017 images of the captions.
- generation: image i from caption i and seed i (pipeline.seeded_noise), at the backbone's native
  resolution, saved as images/00000.png, ...; images already there are kept, so a run resumes.
- every image, real or generated, goes through `metrics.center_crop_resize` (256 px) for all three
  metrics (and then Inception's own resize, `inception.inception_resize`);
  the CLIP score prefixes each caption with "A photo depicts " as GigaGAN's and DMD2's evaluators do;
  precision and recall compare the generated set to the whole reference set (k = 3).
- under torchrun, rank r generates and extracts the features of the images r, r + world, ... and
  torch.distributed.all_gather_object brings the features to every rank (gloo on CPU, NCCL on GPU);
  rank 0 computes the metrics and writes metrics.json, grid.png and the reference cache.
"""
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

import cli
import dreambench
import toy
import toyeval
from controlnet import load_controlnet
from ddp import all_gather, interleave, process_device
from hps import HPS_FILES, HPS_REPO, evaluate_hps
from inception import FID_WEIGHTS_URL, inception_features, load_inception
from loading import LoadError, fetch, fetch_file, read_json, write_json
from metrics import (PREPROCESSING, check_images, clip_score, feature_statistics, frechet_distance, image_files,
                     load_statistics, precision_recall, preprocessing_hash, read_image, save_statistics, weights_hash)
from openclip import OPEN_CLIP_REPO, load_open_clip, load_open_clip_tokenizer
from pipeline import BACKBONES, CACHE_DIR, DTYPES, image_grid, load_pipeline, load_unet_file
from protocol import Generation, caption_hash, exact_fp32, generate_folders, indexed_images

# -----------------------------------------------------------------------------------------------
# The COCO protocol: captions and reference images

COCO = {"2014": ("val2014", 30_000), "2017": ("val2017", 5_000)}  # year: (split, number of captions)
CLIP_PREFIX = "A photo depicts "  # GigaGAN's and DMD2's CLIP-score prompt (Hessel et al. 2021, CLIPScore)
PR_K = 3  # neighbours of the precision/recall manifolds
GRID = 16  # generated images in grid.png
CHUNK = 5000  # images held in memory at once while scoring (about 1.3 GB at 256 px)


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
        captions = cli.read_prompts(captions_file)
    source = captions_file or os.path.join(coco_dir, "annotations", f"captions_{split}.json")
    if len(captions) < num:
        raise LoadError(f"{source} has {len(captions)} captions, fewer than the {num} to evaluate (--num)")
    if year == "2014":  # every val2014 image, whatever --num
        names = image_files(image_dir)
    else:  # the images of the captions
        names = names[:num]
    references = [os.path.join(image_dir, name) for name in names]
    if not references:
        raise LoadError(f"no images in {image_dir}")
    missing = [p for p in references if not os.path.isfile(p)]
    if missing:
        raise LoadError(f"{len(missing)} COCO images not found, e.g. {missing[0]}")
    return captions[:num], source, references


# -----------------------------------------------------------------------------------------------
# The COCO protocol: scoring, over all ranks


def score_images(paths, inception, batch_size, clip=None, tokenizer=None, captions=None):
    """Inception pool3 features (n, 2048) of the image files and, given a CLIP model, the sum of their
    CLIP cosines with CLIP_PREFIX + caption (0.0 without). Chunks of CHUNK images are read and
    preprocessed by a thread pool, then scored on the models' device."""
    features, clip_sum = [np.zeros((0, 2048), np.float32)], 0.0
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), CHUNK):
            chunk = paths[start:start + CHUNK]
            images = list(tqdm(pool.map(read_image, chunk), total=len(chunk), desc="read images", unit="img"))
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
        check_images(paths[rank::world], "reference images")
        features = interleave(all_gather(score_images(paths[rank::world], inception, batch_size)[0], world),
                              len(paths))
        if rank == 0:
            os.makedirs(cache_dir, exist_ok=True)
            save_statistics(path, features, fingerprint)
    return (load_statistics(path, fingerprint) if rank == 0 else None), path, cached


# -----------------------------------------------------------------------------------------------
# The COCO protocol: the command line

def evaluate_coco(year, coco_dir, out, generation: Generation, captions_file=None, num=None, images=None,
                  inception_file=None, clip_model=OPEN_CLIP_REPO, no_clip=False, no_pr=False,
                  cache_dir=CACHE_DIR, batch_size=32):
    """The COCO protocol end to end: captions and reference images, generation (unless `images`, a
    folder to score), Inception features, FID, CLIP score and precision/recall; rank 0 writes
    metrics.json and grid.png in `out` and prints the table."""
    rank, world, device = process_device()
    captions, source, references = coco_protocol(year, coco_dir, captions_file, num)
    n, sha = len(captions), caption_hash(captions)
    if not no_pr and len(references) <= PR_K:
        raise LoadError(f"precision/recall (k={PR_K}) needs more than {PR_K} reference images, "
                        f"{coco_dir} has {len(references)}")
    inception = load_inception(fetch_file(inception_file, "--inception") if inception_file else None, device)
    clip = tokenizer = None
    if not no_clip:
        clip = load_open_clip(clip_model, device=device)
        tokenizer = load_open_clip_tokenizer(os.path.dirname(clip_model) if os.path.isfile(clip_model)
                                             else clip_model)
    if rank == 0:
        print(f"COCO {year}: {n} captions from {source} (sha256 {sha}), {len(references)} reference images")

    directory, settings, generated = images, None, 0
    if not images:
        directory = os.path.join(out, "images")
        (settings,), generated = generate_folders(generation, [(captions, directory)], device, rank, world)
    if world > 1:
        dist.barrier()
    paths = indexed_images(directory, n)
    if images:
        check_images(paths[rank::world], "--images")

    with exact_fp32():
        name = f"coco{year}-{COCO[year][0]}"
        ref, cache, cached = reference_statistics(references, name, inception, cache_dir, batch_size, rank, world)
        features, clip_sum = score_images(paths[rank::world], inception, batch_size, clip, tokenizer,
                                          captions[rank::world])
        features, clip_sum = interleave(all_gather(features, world), n), sum(all_gather(clip_sum, world))
        if rank != 0:
            return
        fid = frechet_distance(ref["mu"], ref["sigma"], *feature_statistics(features))
        precision, recall = (None, None) if no_pr else precision_recall(ref["features"], features, PR_K,
                                                                        device=device)
    metrics = {
        "protocol": f"coco{year}", "images": n,
        "fid": fid, "clip_score": None if no_clip else clip_sum / n, "precision": precision, "recall": recall,
        "captions": {"source": source, "sha256": sha},
        "image_folder": directory, "generator": settings, "generated_now": generated,
        "reference": {"images": len(references), "folder": os.path.dirname(references[0]), "statistics": cache,
                      "statistics_cached": cached},
        "inception": inception_file or FID_WEIGHTS_URL, "clip": None if no_clip else clip_model,
        "clip_prefix": CLIP_PREFIX, "precision_recall_k": PR_K, "preprocessing": PREPROCESSING, "world_size": world,
    }
    write_json(os.path.join(out, "metrics.json"), metrics)
    image_grid(np.stack([np.asarray(read_image(p)) for p in paths[:GRID]])).save(os.path.join(out, "grid.png"))
    print(coco_table(metrics))


def coco_table(metrics):
    """The row of Table 1 / Table A6: FID, CLIP, precision, recall ('-' for a skipped metric)."""
    cells = [f"{metrics[k]:.{d}f}" if metrics[k] is not None else "-"
             for k, d in (("fid", 2), ("clip_score", 4), ("precision", 4), ("recall", 4))]
    return "\n".join([f"{metrics['protocol']}, {metrics['images']} images ({metrics['image_folder']}):",
                      f"  {'FID':>8} {'CLIP':>8} {'Precision':>10} {'Recall':>8}",
                      f"  {cells[0]:>8} {cells[1]:>8} {cells[2]:>10} {cells[3]:>8}"])


def cmd_toy(args):
    """The toy protocol (toyeval.py) for either toy backbone (--backbone, else the one --student records): the
    teacher (25-step DDIM with CFG --guidance, and one step) and the student (one step) on the same --num
    (default 2048) balanced prompts and seeds, printed as a table and written to --json. The teacher's figures
    are measured once per teacher and protocol: shipped with the model (teacher_metrics*.json) or cached in
    --cache-dir."""
    student_file = fetch_file(args.student, "--student")
    backbone, model = cli.student_backbone(args.backbone, args.model, student_file, "--student", default="toy")
    if backbone not in toy.BACKBONES:
        raise LoadError(f"--toy scores a toy student ({', '.join(toy.BACKBONES)}), not {backbone}")
    pipe = load_pipeline(backbone, model)
    denoiser = BACKBONES[backbone].denoiser
    student = load_unet_file(student_file, read_json(fetch(model, f"{denoiser}/config.json")), cls=type(pipe.denoiser))
    classifier = toyeval.load_classifier(os.path.join(model, "classifier"))
    protocol = {**toyeval.PROTOCOL, "n": args.num or toyeval.PROTOCOL["n"], "guidance": args.guidance}
    weights = toyeval.teacher_fingerprint(pipe)
    cached, source = (None, None) if args.no_cache else toyeval.cached_teacher_metrics(model, protocol, weights,
                                                                                    args.cache_dir)
    if cached:
        print(f"teacher figures from {source} (the same teacher and protocol; --no-cache measures them again)")
    results, _ = toyeval.evaluate_toy(pipe, student, classifier, cached=cached, cache_dir=args.cache_dir, **protocol)
    if not cached:
        toyeval.cache_teacher_metrics(args.cache_dir, protocol, weights, results)
    print(toyeval.metrics_table(results))
    if args.json:
        write_json(args.json, results)


def cmd_toy_controlnet(args):
    """The toy ControlNet protocol (toyeval.CONTROL_PROTOCOL): position accuracy of teacher and --student with
    --controlnet on --num (default 512) prompts without position, printed, and metrics.json + grid.png in --out."""
    model = args.model or BACKBONES["toy"].repo
    pipe = load_pipeline("toy", model)
    student = load_unet_file(fetch_file(args.student, "--student"), read_json(fetch(model, "unet/config.json")))
    controlnet = load_controlnet(args.controlnet or os.path.join(model, "controlnet"), pipe.denoiser, pipe.downsampling())
    protocol = {**toyeval.CONTROL_PROTOCOL, "n": args.num or toyeval.CONTROL_PROTOCOL["n"]}
    results, rows = toyeval.evaluate_toy_controlnet(pipe, student, controlnet, toyeval.load_classifier(
        os.path.join(model, "classifier")), **protocol)
    print(toyeval.control_table(results))
    write_json(os.path.join(args.out, "metrics.json"), {"protocol": protocol, "results": results})
    image_grid(pipe.decode(rows), cols=8, row_labels=["mask", *results]).save(os.path.join(args.out, "grid.png"))
    print(f"rows of {os.path.join(args.out, 'grid.png')}: mask | " + " | ".join(results))


def build_parser():
    """The command line; a protocol (--coco, --hps, --toy) is required, the rest has the paper's defaults."""
    parser = cli.Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    protocol = parser.add_mutually_exclusive_group(required=True)
    protocol.add_argument("--coco", choices=sorted(COCO),
                          help="COCO 2014 (30k captions, Table 1) or COCO 2017 (5k, Table A6)")
    protocol.add_argument("--hps", nargs="?", const="", metavar="FILE",
                          help=f"the HPD v2 benchmark scored by HPS v2 / v2.1 (hps.py); FILE: a local copy of the "
                               f"checkpoint or a folder holding it (default: the Hub repo {HPS_REPO})")
    protocol.add_argument("--toy", action="store_true", help="the toy protocol: FD and prompt accuracy of the "
                                                             "teacher (25-step DDIM + CFG and 1 step) and --student")
    protocol.add_argument("--toy-controlnet", action="store_true", help="the toy ControlNet protocol: position "
                                                                        "accuracy with the object's mask as condition")
    dreambench.add_arguments(parser, protocol)
    g = parser.add_argument_group("COCO")
    g.add_argument("--coco-dir", help="COCO folder holding val2014/ or val2017/ and annotations/")
    g.add_argument("--captions", help="caption list, one per line (COCO 2014: GigaGAN's / DMD2's captions.txt; "
                                      "default: the first caption of each image)")
    g.add_argument("--num", "--num-images", type=cli.POSITIVE,
                   help="evaluate the first N captions (default: 30000 / 5000; --toy: 2048); under torchrun "
                        "write --num-images, as torchrun takes --num for its --numa-binding")
    g.add_argument("--out", help="--coco, --hps, --toy-controlnet: output folder for metrics.json, grid.png, "
                                 "images/")
    g.add_argument("--images", help="score this folder of generated images (0.png or 00000.png, ... numbered as "
                                    "the captions; --hps: one such folder per style) instead of generating")
    g = parser.add_argument_group("toy")
    g.add_argument("--student", help="the merged one-step student (wadi.py train's student.safetensors)")
    g.add_argument("--controlnet", help="--toy-controlnet: the ControlNet (default: MODEL/controlnet)")
    g.add_argument("--json", help="write the metrics to this file")
    g.add_argument("--no-cache", action="store_true", help="measure the teacher again instead of reading its "
                                                           "stored figures")
    g = parser.add_argument_group("HPS")
    g.add_argument("--hps-version", choices=sorted(HPS_FILES), default="2.1",
                   help="the HPS checkpoint, v2 or v2.1 (v2.1 is the hpsv2 package's default)")
    g.add_argument("--hps-prompts", metavar="DIR", help="folder of the HPD v2 benchmark prompts (anime.json, "
                                                        "concept-art.json, paintings.json, photo.json)")

    g = parser.add_argument_group("generation")
    g.add_argument("--backbone", choices=sorted(BACKBONES),
                   help="the model family (default: the one recorded in --unet's metadata, else sd15)")
    g.add_argument("--model", help="base model: Hugging Face repo id or local directory (default: the backbone's)")
    g.add_argument("--unet", "--transformer", dest="unet",
                   help="one-step student U-Net (or PixArt transformer) in diffusers keys, safetensors or a PyTorch "
                        "state dict: a local path or owner/repo/file on the Hub (default: the base model's own)")
    g.add_argument("--steps", type=cli.POSITIVE, default=1,
                   help="1: one-step generation; 2 up to the schedule's 1000: DDIM with CFG (the teacher)")
    g.add_argument("--guidance", type=cli.SCALE, default=3.0,
                   help="CFG scale for DDIM (Table 1's teacher and the toy protocol: 3)")
    g.add_argument("--resolution", type=cli.POSITIVE, help="pixels (default: the backbone's native resolution; "
                                                          "pixart: 256, 512 or 1024 picks that model)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on a GPU, fp32 on the CPU)")
    g.add_argument("--batch-size", type=cli.POSITIVE, default=32, help="images per batch (generation and features)")

    g = parser.add_argument_group("metrics")
    g.add_argument("--inception", help=f"FID Inception weights, .pth or .safetensors (default: download "
                                       f"{FID_WEIGHTS_URL.rsplit('/', 1)[1]})")
    g.add_argument("--clip", default=OPEN_CLIP_REPO, help="OpenCLIP ViT-g-14: Hub repo, local directory, or "
                                                          "weight file with vocab.json and merges.txt beside it")
    g.add_argument("--no-clip", action="store_true", help="skip the CLIP score")
    g.add_argument("--no-pr", action="store_true", help="skip precision and recall")
    g.add_argument("--cache-dir", default=CACHE_DIR, help="reference statistics, toy teacher figures, pixart's T5 "
                                                         "prompt embeddings")
    cli.add_threads(parser)
    return parser


def main(argv=None):
    """Run the command line; a problem the user can fix is one line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.coco and not (args.coco_dir and args.out):
        parser.error("--coco needs --coco-dir DIR and --out DIR")
    if args.hps is not None and not args.out:
        parser.error("--hps needs --out DIR")
    if (args.toy or args.toy_controlnet) and not args.student:
        parser.error("--toy and --toy-controlnet need --student FILE")
    if args.toy_controlnet and not args.out:
        parser.error("--toy-controlnet needs --out DIR")
    if args.images and (args.unet or args.model):
        parser.error("--images scores existing images: --unet and --model are for generating them")
    least = 1 if args.no_pr or args.toy or args.toy_controlnet else PR_K
    if args.num is not None and args.num <= least:
        parser.error(f"--num must be above {least} (FID needs 2 images, precision/recall with k={PR_K} needs {PR_K + 1})")
    cli.set_threads(args.threads)
    try:
        if args.toy:
            cmd_toy(args)
        elif args.toy_controlnet:
            cmd_toy_controlnet(args)
        elif args.dreambooth:
            dreambench.command(args, process_device()[2])
        elif args.hps is not None:
            evaluate_hps(args.hps_prompts, args.out, Generation.from_options(args), args.hps, args.hps_version,
                         args.images, args.batch_size)
        else:
            evaluate_coco(args.coco, args.coco_dir, args.out, Generation.from_options(args), args.captions,
                          args.num, args.images, args.inception, args.clip, args.no_clip, args.no_pr,
                          args.cache_dir, args.batch_size)
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
