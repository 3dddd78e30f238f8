"""Inception-V3 (Szegedy et al. 2016), the feature extractor of FID (Heusel et al. 2017), written from
scratch: the network with the weights of TensorFlow's "2015-12-05" graph, loading pytorch-fid's port of
those weights (`pt_inception-2015-12-05-6726825d.pth`, torchvision's Inception3 key layout) including the
three places where that graph differs from torchvision's network: average pools that ignore the padding,
and a max pool in the last block (Mixed_7c). `inception_resize` is its input resize (clean-fid's, Parmar
et al. 2022) and `inception_features` gives the 2048-d pool3 features of a list of images.

The input is clean-fid's exactly, as the FIDs of the paper's Table 1 peers are computed: the image
resized to 299 by `inception_resize` on its [0, 255] values, then (x - 128) / 128, the scaling of the
TF graph's own input that clean-fid's InceptionV3W applies (pytorch-fid's 2 x / 255 - 1 differs from it
by 0.4% in scale and 0.4% of the range in offset).
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from loading import LoadError, load_weights, read_tensors

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")


def inception_resize(img, size=299):
    """The network input of one image: each channel of the uint8 RGB image resized by PIL bicubic in
    float32 (no rounding back to uint8), clipped to [0, 255]. Returns a (3, size, size) float32 tensor."""
    pixels = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    channels = [np.asarray(Image.fromarray(pixels[:, :, c]).resize((size, size), Image.Resampling.BICUBIC))
                for c in range(3)]
    return torch.from_numpy(np.stack(channels).clip(0, 255))  # (3, size, size)



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
        x = (x - 128) / 128  # the TF graph's own input scaling, as clean-fid feeds it (pytorch-fid: 2x/255 - 1)
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
