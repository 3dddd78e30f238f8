"""Image-quality metrics: FID and k-NN precision/recall on Inception-V3 pool3 features.

- FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Frechet distance between Gaussians fitted to the 2048-d pool3 features of the
  real and the generated images.
- Precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models"): each feature set spans a manifold, the union of balls reaching to
  every point's k-th nearest neighbour (k = 3); precision is the share of generated points inside
  the real manifold, recall the share of real points inside the generated one.
- CLIP score: the mean cosine similarity between each image's and its caption's OpenCLIP ViT-g-14
  embeddings (scale 1; the paper reports 0.30-0.33), with clip.py's towers.

The feature extractor is Inception-V3 (Szegedy et al. 2016) with the weights of TensorFlow's
"2015-12-05" graph, written here from scratch and loading pytorch-fid's port of those weights
(`pt_inception-2015-12-05-6726825d.pth`, torchvision's Inception3 key layout) including the three
places where that graph differs from torchvision's network: average pools that ignore the padding,
and a max pool in the last block (Mixed_7c).

Every image, real or generated, goes through the same two steps:
1. `center_crop_resize`: square centre crop on the short side, PIL Lanczos to 256 x 256 (uint8);
2. `inception_resize`: PIL bicubic to 299 x 299 on the uint8 values, per channel in float and not
   re-quantised, as clean-fid's "clean" mode (Parmar et al. 2022); the network then maps [0, 255]
   to [-1, 1] as pytorch-fid does (2 * x / 255 - 1).

Reference statistics are cached once per reference set in an .npz (no pickle) together with a hash
of this preprocessing, so a stale cache is refused rather than silently reused.
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from clip import open_clip_tokenize, preprocess_image
from loading import LoadError, load_weights, read_tensors

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

PREPROCESSING = {
    "crop": "centre square on the short side",
    "size": 256,
    "resize": "PIL lanczos, uint8",
    "inception_size": 299,
    "inception_resize": "PIL bicubic per channel in float32 on uint8 values, clipped to [0, 255]",
    "inception_input": "2 * x / 255 - 1",
    "inception_weights": "pt_inception-2015-12-05",
    "features": "pool3, 2048",
}


# -----------------------------------------------------------------------------------------------
# Preprocessing

def center_crop_resize(img, size=256):
    """Square crop centred on the image (side = the short side; an odd margin leaves the extra pixel
    on the right/bottom), then PIL Lanczos to (size, size). Returns an RGB uint8 PIL image."""
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def inception_resize(img, size=299):
    """The network input of one image: each channel of the uint8 RGB image resized by PIL bicubic in
    float32 (no rounding back to uint8), clipped to [0, 255]. Returns a (3, size, size) float32 tensor."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    channels = [np.asarray(Image.fromarray(pixels[:, :, c]).resize((size, size), Image.Resampling.BICUBIC))
                for c in range(3)]
    return torch.from_numpy(np.stack(channels).clip(0, 255))  # (3, size, size)


# -----------------------------------------------------------------------------------------------
# Inception-V3, the FID variant (keys as torchvision's Inception3 and pytorch-fid's weight file)

class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics (TensorFlow's eps 1e-3). Keys weight, bias, running_mean,
    running_var; there is no num_batches_tracked, since this network is never trained."""

    def __init__(self, channels, eps=1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm, ReLU."""

    def __init__(self, in_ch, out_ch, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = FrozenBatchNorm2d(out_ch)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool, stride 1, that (like TensorFlow's) averages only the pixels inside the image."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block: 1x1, 5x5, double 3x3 and pooled branches; 224 + pool_features channels out."""

    def __init__(self, in_ch, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_features, 1)

    def forward(self, x):
        b5x5 = self.branch5x5_2(self.branch5x5_1(x))
        b3x3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), b5x5, b3x3, pool], 1)  # (B, 224 + pool_features, H, W)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17: strided 3x3, strided double 3x3, max pool; in_ch + 480 channels."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = F.max_pool2d(x, 3, stride=2)
        return torch.cat([self.branch3x3(x), b3x3dbl, pool], 1)  # (B, in_ch + 480, H', W')


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 then 7x1) of width c7; 768 channels out."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7x7dbl = conv(b7x7dbl)
        pool = self.branch_pool(tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), b7x7, b7x7dbl, pool], 1)  # (B, 768, H, W)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8: strided 3x3, 7x7 then strided 3x3, max pool; in_ch + 512 channels."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3x3 = self.branch3x3_2(self.branch3x3_1(x))
        b7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7x7x3 = conv(b7x7x3)
        pool = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3x3, b7x7x3, pool], 1)  # (B, in_ch + 512, H', W')


class InceptionE(nn.Module):
    """8x8 block whose 3x3 branches split into parallel 1x3 and 3x1; 2048 channels out. The pooled
    branch uses `pool`: "avg" in Mixed_7b, "max" in Mixed_7c (a quirk of the TF graph kept by FID)."""

    def __init__(self, in_ch, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b3x3 = self.branch3x3_1(x)
        b3x3 = torch.cat([self.branch3x3_2a(b3x3), self.branch3x3_2b(b3x3)], 1)  # (B, 768, H, W)
        b3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3x3dbl = torch.cat([self.branch3x3dbl_3a(b3x3dbl), self.branch3x3dbl_3b(b3x3dbl)], 1)  # (B, 768, H, W)
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3x3, b3x3dbl, self.branch_pool(pooled)], 1)  # (B, 2048, H, W)


class InceptionV3(nn.Module):
    """Inception-V3 up to the pool3 features. Input: (B, 3, 299, 299) RGB floats in [0, 255] (the
    output of `inception_resize`); output: (B, 2048). The classifier head (`fc`) is not built."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, x):  # (B, 3, 299, 299) in [0, 255]
        x = 2 * (x / 255) - 1  # the [-1, 1] range of the TF graph, scaled as pytorch-fid does
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048) pool3


def read_inception_state(path=None):
    """The weights as a state dict: pytorch-fid's .pth file (read with torch.load(weights_only=True)),
    a .safetensors file with the same keys, or, with no path, a download from FID_WEIGHTS_URL into
    torch's hub cache (where pytorch-fid keeps it too)."""
    if path is None:
        try:
            return torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", check_hash=True,
                                                      weights_only=True)
        except (OSError, RuntimeError) as e:
            raise LoadError(f"cannot download the FID Inception weights from {FID_WEIGHTS_URL} ({e}); "
                            f"fetch that file elsewhere and pass --inception PATH") from None
    return read_tensors(os.fspath(path))


def load_inception(path=None, device="cpu"):
    """The FID Inception network in eval mode on `device`, weights from `read_inception_state(path)`.
    The file's classifier (`fc.*`) and batch-norm step counters (`*.num_batches_tracked`) are not
    needed for pool3 features and are dropped; every other key must match exactly."""
    state = read_inception_state(path)
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}
    with torch.device("meta"):
        model = InceptionV3()
    load_weights(model, state, what=f"Inception weights {path or FID_WEIGHTS_URL}", dtype=torch.float32)
    return model.requires_grad_(False).eval().to(device)


@torch.no_grad()
def inception_features(model, images, batch_size=50):
    """pool3 features of an iterable of PIL images (already through `center_crop_resize`), computed
    on the model's device in batches. Returns an (N, 2048) float32 numpy array."""
    device = next(model.parameters()).device
    features, batch = [], []
    for img in tqdm(images, desc="inception features", unit="img"):
        batch.append(inception_resize(img))
        if len(batch) == batch_size:
            features.append(model(torch.stack(batch).to(device)).cpu())  # (batch_size, 2048)
            batch = []
    if batch:
        features.append(model(torch.stack(batch).to(device)).cpu())
    return torch.cat(features).numpy() if features else np.zeros((0, 2048), np.float32)


# -----------------------------------------------------------------------------------------------
# Frechet distance and its cached reference statistics

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
def clip_score(model, tokenizer, images, captions, batch_size=32):
    """Mean over the pairs of cos(image embedding, caption embedding) with an OpenCLIP `model`
    (`clip.load_open_clip()`, fp32) and its CLIP `tokenizer` (`clip.load_open_clip_tokenizer()`):
    scale 1, not x100, no clipping at zero. Images (PIL) go through open_clip's evaluation transform,
    captions through open_clip's tokenization; batches run on the model's device, the sum in float64."""
    if len(images) != len(captions) or not images:
        raise ValueError(f"clip_score needs as many captions as images, at least one: "
                         f"got {len(images)} images and {len(captions)} captions")
    param = next(model.parameters())
    size, context = model.config.vision.image_size, model.config.text.max_position_embeddings
    total = 0.0
    with tqdm(total=len(images), desc="clip score", unit="img") as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixels = torch.stack([preprocess_image(img, size) for img in batch]).to(param.device, param.dtype)
            ids = open_clip_tokenize(tokenizer, captions[start:start + batch_size], context).to(param.device)
            image_emb = F.normalize(model.encode_image(pixels).float(), dim=-1)  # (b, E)
            text_emb = F.normalize(model.encode_text(ids).float(), dim=-1)  # (b, E)
            total += (image_emb * text_emb).sum(-1).double().sum().item()
            bar.update(len(batch))
            bar.set_postfix(score=f"{total / min(start + batch_size, len(images)):.4f}")
    return total / len(images)
