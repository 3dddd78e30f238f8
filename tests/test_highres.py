"""bench/highres.py's blob counter, on images whose blobs are known: one per toy data image, two side by side,
one when enlarged (docs/highres.md)."""
import importlib.util
import os

import torch
import torch.nn.functional as F

import toy
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("highres", os.path.join(ROOT, "bench", "highres.py"))
highres = importlib.util.module_from_spec(spec)
spec.loader.exec_module(highres)


def test_count_blobs():
    attributes = toy.balanced_attributes(256)
    images = toy.render(attributes, torch.Generator().manual_seed(0))  # (256, 3, 32, 32)
    colours = attributes[:, 1]
    assert highres.count_blobs(images, colours).tolist() == [1] * 256
    assert highres.count_blobs(torch.cat([images, images], -1), colours).tolist() == [2] * 256  # a repeated object
    enlarged = F.interpolate(images[:64], scale_factor=3, mode="bilinear")
    assert highres.count_blobs(enlarged, colours[:64], min_area=6 * 9).tolist() == [1] * 64
    other = (colours + 1) % len(toy.COLOURS)  # no blob of another colour
    assert highres.count_blobs(images[:64], other[:64]).sum() == 0
