"""Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A Solid Benchmark for Evaluating
Human Preferences of Text-to-Image Synthesis"), the fourth metric of the paper's evaluation: an OpenCLIP
ViT-H-14 fine-tuned on human preference pairs, whose image-prompt cosine (x100) scores an image; and its
benchmark, the HPD v2 prompts. Reimplemented from the `hpsv2` package (v1.2.0) on openclip.py's towers:

    python evaluate.py --hps --backbone sd15 --unet STUDENT.safetensors --hps-prompts DIR --out DIR
    python evaluate.py --hps --hps-version 2 --steps 25 --guidance 3 --hps-prompts DIR --out DIR
    python evaluate.py --hps CHECKPOINT.pt --images FOLDER --hps-prompts DIR --out DIR   (another project's)
    torchrun --nproc_per_node 8 evaluate.py --hps ...                            (generation and scoring split)

The protocol (`evaluate_hps`):
- checkpoint: HPS v2.1 (`HPS_v2.1_compressed.pt`, the package's default for its benchmark) or with
  --hps-version 2 HPS v2 (`HPS_v2_compressed.pt`), from the Hugging Face repo xswu/HPSv2 as the package
  fetches them, or --hps FILE (or a folder holding the two files). Both are pickles {"state_dict": open_clip
  ViT-H-14 keys}, read with torch's weights-only loader. The tokenizer is the CLIP BPE (vocab.json and
  merges.txt beside a local checkpoint, else from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, HPS's base model).
- prompts: the HPD v2 benchmark, 800 prompts in each of four styles, the JSON lists anime.json,
  concept-art.json, paintings.json and photo.json (--hps-prompts DIR). The package does not ship them: it
  downloads them from the Hugging Face dataset zhwang/HPDv2 (folder benchmark/) into
  ~/.cache/hpsv2/datasets/benchmark/; either folder will do.
- generation: one image per prompt and style; image i of a style comes from prompt i of that style and seed i
  (pipeline.seeded_noise; the four styles use the same seeds 0..799), at the backbone's resolution (512 px
  for sd15 and sd21) unless --resolution; saved as <out>/images/<style>/00000.png, ... Images already there
  are kept (a run resumes), a folder generated with other settings is refused (protocol.py).
- score of an image: 100 x cos(image embedding, prompt embedding) of the HPS network, the prompt without
  prefix through open_clip's tokenization (77 tokens), the image through the package's transform
  (`letterbox_image`: longest side to 224, zero padding). Computed in fp32 (TF32 off); the package runs
  under CUDA autocast (fp16 matmuls), which moves its figures by rounding, far below the two decimals it prints.
- figures, as the package's benchmark prints them: per style the mean of the means of consecutive chunks of
  80 prompts (with 800 prompts: the mean of the style) and the standard deviation of those chunk means;
  the average is the mean over all images of the four styles. In metrics.json and a printed table.
- torchrun: rank r generates the images r, r + world, ... of every style and scores every world-th image of
  the 3,200; rank 0 gathers the scores, writes metrics.json and prints the table.

Where this differs from the package: the prompt text is not cleaned by ftfy / html.unescape
(openclip.open_clip_tokenize lists the cases); RGBA images lose their alpha channel, and an image whose
longest side is already 224 is still padded to a square (the package fails on both); the package expects
JPEG files (<style>/00000.jpg), we write PNG and read either.
"""
import functools
import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from loading import LoadError, fetch, fetch_file, read_json
from metrics import check_images, clip_cosines, read_image
from openclip import OPENAI_MEAN, OPENAI_STD, VIT_H_14, load_open_clip, load_open_clip_tokenizer, read_open_clip_config
from ddp import all_gather, interleave, process_device
from protocol import Generation, caption_hash, exact_fp32, generate_folders, indexed_images

HPS_REPO = "xswu/HPSv2"  # the checkpoints, where the hpsv2 package downloads them from
HPS_FILES = {"2": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}
HPS_TOKENIZER_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # vocab.json, merges.txt of HPS's base model
HPD_REPO = "zhwang/HPDv2"  # Hugging Face dataset: benchmark/<style>.json
STYLES = ("anime", "concept-art", "paintings", "photo")
CHUNK = 80  # prompts per chunk of the package's per-style statistics
SCALE = 100  # the benchmark's scale: 100 x cosine
WHERE_PROMPTS = (f"the HPD v2 benchmark prompts are the Hugging Face dataset {HPD_REPO}'s benchmark/"
                 f"{{{','.join(STYLES)}}}.json (`hf download {HPD_REPO} --repo-type dataset --include "
                 f"'benchmark/*.json' --local-dir hpdv2`, then --hps-prompts hpdv2/benchmark)")


def benchmark_prompts(directory):
    """{style: [prompt, ...]} for each of STYLES from `directory`/<style>.json, a JSON list of strings (the
    hpsv2 package's files, 800 prompts each). A missing folder or file, or another format, is a LoadError
    that says where the files come from."""
    if not directory:
        raise LoadError(f"--hps needs --hps-prompts DIR: {WHERE_PROMPTS}")
    prompts = {}
    for style in STYLES:
        path = os.path.join(directory, f"{style}.json")
        if not os.path.isfile(path):
            raise LoadError(f"{path} not found: {WHERE_PROMPTS}")
        prompts[style] = read_json(path)
        if not isinstance(prompts[style], list) or not prompts[style] or \
                not all(isinstance(p, str) for p in prompts[style]):
            raise LoadError(f"{path} is not a JSON list of prompt strings (the hpsv2 package's format)")
    return prompts


def hps_checkpoint(path, version):
    """The local file of the HPS `version` ("2" or "2.1") checkpoint: `path` (a file, a folder holding
    HPS_FILES[version], or owner/repo/file on the Hub), by default HPS_FILES[version] from HPS_REPO. A file
    named as the other version's release is a LoadError."""
    if not path:
        return fetch(HPS_REPO, HPS_FILES[version])
    if os.path.isdir(path):
        file = os.path.join(path, HPS_FILES[version])
        if not os.path.isfile(file):
            raise LoadError(f"{path} has no {HPS_FILES[version]} (the HPS v{version} checkpoint)")
    else:
        file = fetch_file(path, "--hps")
    other = {name: v for v, name in HPS_FILES.items()}.get(os.path.basename(file), version)
    if other != version:
        raise LoadError(f"{file} is the HPS v{other} checkpoint, but --hps-version is {version}")
    return file


def load_hps(path, version, device="cpu"):
    """(model, tokenizer, checkpoint file) of HPS `version`: openclip.OpenCLIP in fp32, frozen, on
    `device`, and the CLIP BPE for `openclip.open_clip_tokenize`. The network is ViT-H-14 unless the
    checkpoint's local folder has an open_clip_config.json; the BPE is vocab.json and merges.txt from
    that folder when there, else from HPS_TOKENIZER_REPO."""
    file = hps_checkpoint(path, version)
    folder = os.path.dirname(file) if path else None
    config = read_open_clip_config(folder, default=VIT_H_14) if folder else VIT_H_14
    model = load_open_clip(file, config=config, device=device)
    has_bpe = folder and all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt"))
    return model, load_open_clip_tokenizer(folder if has_bpe else HPS_TOKENIZER_REPO), file


def letterbox_image(img, size=224):
    """The hpsv2 package's image transform (its open_clip copy's `image_transform(resize_longest_max=True)`,
    which `create_model_and_transforms(light_augmentation=True)` gives for scoring): RGB values in [0, 1]
    (float32); the longest side resized to `size`, the other to round(side * size / longest), by torch's
    antialiased bicubic on the float tensor (torchvision's tensor Resize, no clamping); zero padding to
    size x size, half on each side (the odd pixel right / bottom); OpenAI's mean and std. Returns
    (3, size, size) float32."""
    x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)
    h, w = x.shape[1:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[0]
    pad_h, pad_w = size - new_h, size - new_w
    x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))  # (3, size, size)
    return (x - torch.tensor(OPENAI_MEAN)[:, None, None]) / torch.tensor(OPENAI_STD)[:, None, None]


def load_pixels(path, size=224):
    """An image file through `letterbox_image`: (3, size, size); a LoadError naming a damaged file."""
    return read_image(path, functools.partial(letterbox_image, size=size))


def hps_scores(model, tokenizer, paths, prompts, batch_size=32, show=True):
    """The HPS of each image file with its prompt, SCALE x cosine: (n,) float64. Images are read and
    preprocessed by a thread pool, a batch at a time, and scored on the model's device."""
    size, scores = model.config.vision.image_size, []
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(paths), desc="hps", unit="img", disable=not show) as bar:
        for start in range(0, len(paths), batch_size):
            pixels = torch.stack(list(pool.map(load_pixels, paths[start:start + batch_size], [size] * batch_size)))
            cosines = clip_cosines(model, tokenizer, pixels, prompts[start:start + batch_size])  # (b,)
            scores.append((SCALE * cosines).cpu().numpy())
            bar.update(len(pixels))
    return np.concatenate(scores or [np.zeros(0, np.float32)]).astype(np.float64)


def style_score(scores):
    """(score, std) of one style as the hpsv2 package's benchmark gives them: the mean and the standard
    deviation (ddof 0) of the means of consecutive chunks of CHUNK prompts (the last one may be shorter;
    with 800 prompts the score is the plain mean)."""
    means = np.array([np.mean(scores[i:i + CHUNK]) for i in range(0, len(scores), CHUNK)])
    return float(means.mean()), float(means.std())


def evaluate_hps(prompts_dir, out, generation: Generation, checkpoint="", version="2.1", images=None,
                 batch_size=32):
    """The HPD v2 protocol end to end: the prompts in `prompts_dir`, the HPS `checkpoint` of `version`
    (a file or folder; "": the Hub's), generation (unless `images`, a folder of one folder per style
    to score), the HPS of every image, then on rank 0 metrics.json in `out` and the printed table."""
    rank, world, device = process_device()
    prompts = benchmark_prompts(prompts_dir)
    model, tokenizer, file = load_hps(checkpoint, version, device)
    root = images or os.path.join(out, "images")
    folders = {style: os.path.join(root, style) for style in STYLES}
    if rank == 0:
        print(f"HPS v{version} ({file}) on HPD v2: " +
              ", ".join(f"{len(prompts[s])} {s}" for s in STYLES) + f" prompts from {prompts_dir}")
    settings, generated = None, 0
    if not images:
        settings, generated = generate_folders(generation, [(prompts[s], folders[s]) for s in STYLES], device,
                                               rank, world)
    if world > 1:
        dist.barrier()
    paths = [p for s in STYLES for p in indexed_images(folders[s], len(prompts[s]))]
    if images:
        check_images(paths[rank::world], "--images")
    texts = [p for s in STYLES for p in prompts[s]]
    with exact_fp32():
        share = hps_scores(model, tokenizer, paths[rank::world], texts[rank::world], batch_size, rank == 0)
    scores = interleave(all_gather(share[:, None], world), len(paths))[:, 0]
    if rank != 0:
        return
    styles, start = {}, 0
    for style in STYLES:
        n = len(prompts[style])
        score, std = style_score(scores[start:start + n])
        styles[style] = {"hps": score, "std": std, "images": n, "prompts_sha256": caption_hash(prompts[style])}
        start += n
    metrics = {
        "protocol": "hpdv2", "hps_version": version, "images": len(paths), "hps": float(scores.mean()),
        "styles": styles, "prompts": prompts_dir, "image_folder": root,
        "generator": dict(zip(STYLES, settings)) if settings else None, "generated_now": generated,
        "checkpoint": checkpoint or f"{HPS_REPO}/{HPS_FILES[version]}", "checkpoint_file": file,
        "scale": SCALE, "chunk": CHUNK, "world_size": world,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(hps_table(metrics))


def hps_table(metrics):
    """Per style the HPS and the std over its 80-prompt chunks, then the average, as the package prints."""
    lines = [f"HPS v{metrics['hps_version']}, HPD v2 benchmark, {metrics['images']} images "
             f"({metrics['image_folder']}):", f"  {'style':<12} {'HPS':>6} {'std':>7}"]
    lines += [f"  {style:<12} {row['hps']:>6.2f} {row['std']:>7.4f}" for style, row in metrics["styles"].items()]
    return "\n".join(lines + [f"  {'average':<12} {metrics['hps']:>6.2f}"])
