"""The image-quality metrics that several protocols share (the COCO protocol of evaluate.py, the toy
protocol of toy.py): the common image preprocessing, the Frechet distance between feature statistics (FID,
Heusel et al. 2017) and their cache, improved precision and recall (Kynkaanniemi et al. 2019) and the CLIP
score (Hessel et al. 2021) with openclip.py's towers.

Every image, real or generated, goes through `center_crop_resize` (square centre crop on the short
side, PIL Lanczos to 256 x 256, uint8) before any metric; Inception then takes it through
`inception.inception_resize`. Reference statistics are cached in an .npz (no pickle) together with a
hash of this preprocessing, so a stale cache is refused rather than silently reused.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from loading import LoadError
from openclip import open_clip_tokenize, preprocess_image

PREPROCESSING = {
    "crop": "centre square on the short side",
    "size": 256,
    "resize": "PIL lanczos, uint8",
    "inception_size": 299,
    "inception_resize": "PIL bicubic per channel in float32 on uint8 values, clipped to [0, 255]",
    "inception_input": "(x - 128) / 128 on [0, 255] values, as clean-fid's InceptionV3W",
    "inception_weights": "pt_inception-2015-12-05",
    "features": "pool3, 2048",
}



def center_crop_resize(img, size=256):
    """Square crop centred on the image (side = the short side; an odd margin leaves the extra pixel
    on the right/bottom), then PIL Lanczos to (size, size). Returns an RGB uint8 PIL image."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.LANCZOS)


# -----------------------------------------------------------------------------------------------
# Frechet distance and its cached reference statistics

PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with


def read_image(path, transform=center_crop_resize):
    """An image file through `transform` (default `center_crop_resize`: 256 x 256 RGB uint8, PIL); a
    LoadError naming the file when it is empty, not an image, or truncated."""
    try:
        with Image.open(path) as img:
            return transform(img)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise LoadError(f"cannot read the image {path}: {image_problem(path, e)}") from None


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def image_files(directory):
    """The names of the image files in `directory` (by extension, any case), sorted."""
    return sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_EXTENSIONS))


def read_image_folder(directory, resolution, option, at_least=1, hint=""):
    """(images (N, 3, S, S) float32 in [-1, 1], file names) of the images in `directory`, sorted by
    name, centre-cropped and resized (Lanczos) to `resolution`; a LoadError naming the command-line
    `option` when the folder is missing, has fewer than `at_least` images (`hint` says how many it
    wants) or an image cannot be read."""
    if not os.path.isdir(directory):
        raise LoadError(f"{option} {directory}: no such directory")
    names = image_files(directory)
    if len(names) < at_least:
        raise LoadError(f"{option} {directory} holds {len(names)} image(s); it needs {at_least} or more"
                        f"{f' ({hint})' if hint else ''}")
    images = np.stack([np.asarray(read_image(os.path.join(directory, n), lambda im: center_crop_resize(
        im, resolution))) for n in names])  # (N, S, S, 3) uint8
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1, names


def image_problem(path, error):
    """What is wrong with an image file that PIL could not read, in words."""
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if "truncated" in str(error) or isinstance(error, SyntaxError):
        return f"the file is cut short or damaged ({error})"
    if "cannot identify" in str(error):
        return "not an image file (PIL cannot identify its format)"
    return f"{type(error).__name__}: {error}"


def check_images(paths, what="images"):
    """Cheap checks of image files before long work uses them (no decoding): each opens as an image (its
    header is read), and a PNG ends with its IEND chunk, which a file cut short does not. A LoadError
    names the first bad file and what is wrong with it."""
    for path in tqdm(paths, desc=f"check {what}", unit="img", disable=len(paths) < 1000, leave=False):
        try:
            with Image.open(path) as img:
                kind = img.format
        except (OSError, SyntaxError, ValueError) as e:
            raise LoadError(f"cannot read the image {path}: {image_problem(path, e)}") from None
        if kind == "PNG":
            with open(path, "rb") as f:
                f.seek(max(0, os.path.getsize(path) - len(PNG_END)))
                complete = f.read() == PNG_END
            if not complete:
                raise LoadError(f"cannot read the image {path}: the PNG is cut short (it does not end with its IEND "
                                f"chunk; an interrupted copy?)")


def feature_statistics(features):
    """Mean (D,) and unbiased covariance (D, D), in float64, of (N, D) features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def _psd_sqrt(matrix):
    """Symmetric square root of a symmetric positive semi-definite matrix; eigenvalues that rounding
    pushed below zero count as zero."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(eigenvalues.clip(min=0))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sqrt(sigma1) sigma2 sqrt(sigma1))).
    The product under the last root is symmetric PSD, so its trace-root is the sum of the roots of
    its eigenvalues (clipped at zero); this stays finite for singular covariances (fewer samples
    than dimensions) where a general matrix square root of sigma1 @ sigma2 can fail."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    inner = root1 @ sigma2 @ root1
    trace_sqrt = np.sqrt(np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def preprocessing_hash(**extra):
    """First 16 hex digits of the sha256 of PREPROCESSING plus `extra` (e.g. which images were used),
    stored with cached statistics so that a change to either invalidates the cache."""
    text = json.dumps({**PREPROCESSING, **extra}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_statistics(path, features, fingerprint):
    """Cache the reference set as an .npz: mu, sigma, the feature count, the preprocessing
    fingerprint, and the (N, D) features themselves (precision/recall needs them). Written to a
    temporary file, then renamed."""
    features = np.asarray(features, dtype=np.float32)
    mu, sigma = feature_statistics(features)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=np.int64(len(features)), fingerprint=np.str_(fingerprint),
                 features=features)
    os.replace(tmp, path)


def load_statistics(path, fingerprint):
    """The cache written by `save_statistics` as a dict (mu, sigma, count, fingerprint, features), or a
    LoadError when it is missing, unreadable, or was made with another preprocessing."""
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {k: data[k] for k in ("mu", "sigma", "count", "fingerprint", "features")}
    except FileNotFoundError:
        raise LoadError(f"reference statistics not found: {path}") from None
    except (OSError, ValueError, KeyError) as e:
        raise LoadError(f"cannot read reference statistics {path}: {e}") from None
    stats["count"], stats["fingerprint"] = int(stats["count"]), str(stats["fingerprint"])
    if stats["fingerprint"] != fingerprint:
        raise LoadError(f"reference statistics {path} were computed with another preprocessing "
                        f"({stats['fingerprint']}, expected {fingerprint}); delete the file to recompute them")
    return stats


# -----------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)

def _squared_distances(a, b):
    """Squared Euclidean distances between the rows of a (n, D) and b (m, D): (n, m)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def _knn_radii(x, k, batch_size):
    """Squared distance from every row of x (N, D) to its k-th nearest other row: (N,). Blocks of
    batch_size x batch_size distances, keeping only the k + 1 smallest per row (the first is the
    point itself)."""
    radii = []
    for rows in x.split(batch_size):
        nearest = rows.new_empty(len(rows), 0)
        for cols in x.split(batch_size):
            candidates = torch.cat([nearest, _squared_distances(rows, cols)], 1)  # (b, k + 1 + c)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)  # (N,)


def _inside(points, centres, radii, batch_size):
    """Whether each row of points (n, D) lies in at least one ball (centres (m, D), squared radii (m,))."""
    inside = []
    for rows in points.split(batch_size):
        hit = torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        for cols, r in zip(centres.split(batch_size), radii.split(batch_size)):
            hit |= (_squared_distances(rows, cols) <= r[None]).any(1)
        inside.append(hit)
    return torch.cat(inside)  # (n,)


def precision_recall(real, fake, k=3, batch_size=5000, device=None):
    """Improved precision and recall of `fake` (M, D) against `real` (N, D) features (numpy arrays
    or tensors), in float32 on `device` (default: where the tensors are). No full distance matrix
    is held: memory is a few batch_size x batch_size blocks. Returns (precision, recall) floats."""
    real = torch.as_tensor(real, dtype=torch.float32, device=device)
    fake = torch.as_tensor(fake, dtype=torch.float32, device=device)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    precision = _inside(fake, real, _knn_radii(real, k, batch_size), batch_size).sum().item() / len(fake)
    recall = _inside(real, fake, _knn_radii(fake, k, batch_size), batch_size).sum().item() / len(real)
    return precision, recall


# -----------------------------------------------------------------------------------------------
# CLIP score

@torch.no_grad()
def clip_cosines(model, tokenizer, pixels, captions):
    """cos(image embedding, caption embedding) of each pair with an OpenCLIP `model` and its CLIP
    `tokenizer`: pixels (b, 3, S, S) already preprocessed, b captions through open_clip's tokenization.
    Returns (b,) float32 on the model's device; the embeddings are normalized in float32."""
    param = next(model.parameters())
    ids = open_clip_tokenize(tokenizer, captions, model.config.text.max_position_embeddings).to(param.device)
    image_emb = F.normalize(model.encode_image(pixels.to(param.device, param.dtype)).float(), dim=-1)  # (b, E)
    text_emb = F.normalize(model.encode_text(ids).float(), dim=-1)  # (b, E)
    return (image_emb * text_emb).sum(-1)  # (b,)


def clip_score(model, tokenizer, images, captions, batch_size=32):
    """Mean over the pairs of cos(image embedding, caption embedding) with an OpenCLIP `model`
    (`openclip.load_open_clip()`, fp32) and its CLIP `tokenizer` (`openclip.load_open_clip_tokenizer()`):
    scale 1, not x100, no clipping at zero. Images (PIL) go through open_clip's evaluation transform,
    captions through open_clip's tokenization; batches run on the model's device, the sum in float64."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"clip_score needs as many captions as images, at least one: "
                         f"got {len(images)} images and {len(captions)} captions")
    size = model.config.vision.image_size
    total = 0.0
    with tqdm(total=len(images), desc="clip score", unit="img") as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixels = torch.stack([preprocess_image(img, size) for img in batch])
            total += clip_cosines(model, tokenizer, pixels, captions[start:start + batch_size]).double().sum().item()
            bar.update(len(batch))
            bar.set_postfix(score=f"{total / min(start + batch_size, len(images)):.4f}")
    return total / len(images)


def weights_hash(model):
    """First 16 hex digits of the sha256 of a model's weights (keys, shapes and values)."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        digest.update(f"{key}{tuple(value.shape)}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
