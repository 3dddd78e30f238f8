"""Tests of toy.py: the procedural dataset (determinism, prompts, what the pixels show), the tiny
CLIP tokenizer (against bpe.py and transformers), the classifier (accuracy, save/load) and the
Frechet distance in its feature space (small between samples of the data, large for corrupted data).
The measured numbers these thresholds leave margin to are in the comments."""
import time

import pytest
import torch
import torch.nn.functional as F
import transformers

import toy
import toyeval
from bpe import CLIPTokenizer
from loading import LoadError


# ---------------------------------------------------------------------------------------------
# The dataset

def test_sample_is_deterministic_and_well_formed():
    images, prompts, attributes = toy.sample(64, torch.Generator().manual_seed(0))
    again, prompts_again, attributes_again = toy.sample(64, torch.Generator().manual_seed(0))
    other, _, _ = toy.sample(64, torch.Generator().manual_seed(1))
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert attributes.shape == (64, 4) and attributes.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, again) and prompts == prompts_again and torch.equal(attributes, attributes_again)
    assert (images - other).abs().mean() > 0.1
    assert prompts == [toy.prompt(row) for row in attributes]


def test_attributes_are_uniform_and_details_vary():
    _, _, attributes = toy.sample(12800, torch.Generator().manual_seed(0))
    for column, values in zip(attributes.T, toy.ATTRIBUTES):
        share = torch.bincount(column, minlength=len(values)) / len(column)
        assert (share - 1 / len(values)).abs().max() < 0.02
    same = toy.render(toy.balanced_attributes(256)[::128], torch.Generator().manual_seed(0))  # one combination twice
    assert (same[0] - same[1]).abs().mean() > 0.05


def test_ten_thousand_images_take_under_two_seconds():
    generator = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        toy.sample(10000, generator)
        best = min(best, time.perf_counter() - start)
    assert best < 2.0  # measured 0.5-1.1 s on 2 CPU cores shared with other jobs


def test_prompt_round_trip():
    combinations = toy.all_attributes()
    prompts = [toy.prompt(row) for row in combinations]
    assert len(combinations) == 128 == len(set(prompts))
    assert prompts[0] == "a small red circle at the top left"
    assert toy.prompt(torch.tensor([1, 3, 1, 3])) == "a large yellow square at the bottom right"
    for row, text in zip(combinations, prompts):
        assert torch.equal(toy.parse_prompt(text), row)
    for bad in ["", "a photo of a cat", "a large purple circle at the top left", "a large red circle at the top"]:
        with pytest.raises(ValueError, match="toy prompt"):
            toy.parse_prompt(bad)


def object_pixels(images):
    """The object: the saturated pixels (max - min channel > 0.8; the background stays below it)."""
    return images.amax(1) - images.amin(1) > 0.8  # (B, H, W)


def test_pixels_show_the_attributes():
    attributes = toy.balanced_attributes(1024)
    images = toy.render(attributes, torch.Generator().manual_seed(0))
    size, colour, shape, position = attributes.T
    mask = object_pixels(images)
    area = mask.flatten(1).sum(1).float()
    # colour: the mean colour of the object is nearest to the palette entry of its colour word
    mean = (images * mask[:, None]).sum((2, 3)) / area[:, None]  # (B, 3)
    assert torch.equal(torch.cdist(mean, toy.PALETTE).argmin(1), colour)
    # position: the object's centre of mass lies in the named quadrant
    coordinate = torch.arange(32.0) + 0.5
    x = (mask.sum(1) * coordinate).sum(1) / area
    y = (mask.sum(2) * coordinate).sum(1) / area
    assert torch.equal(y > 16, position >= 2) and torch.equal(x > 16, position % 2 == 1)
    # size: for every shape, the largest small object is smaller than the smallest large one
    # measured (pixels): circle 66 < 131, square 64 < 121, triangle 40 < 65, cross 48 < 88
    for s in range(len(toy.SHAPES)):
        assert area[(shape == s) & (size == 0)].max() < area[(shape == s) & (size == 1)].min()
    # shape: how much of its bounding box the object fills, and where
    rows, cols = mask.any(2), mask.any(1)  # (B, H), (B, W)
    fill = area / (rows.sum(1) * cols.sum(1))
    mean_fill = [fill[shape == s].mean().item() for s in range(4)]  # measured: 0.79, 1.00, 0.56, 0.58
    assert mean_fill[1] > 0.95 and 0.72 < mean_fill[0] < 0.86 and mean_fill[2] < 0.65 and mean_fill[3] < 0.65
    top = rows.float().argmax(1)
    bottom = 31 - rows.float().flip(1).argmax(1)
    index = torch.arange(len(images))
    width_top = mask[index, top].sum(1)
    width_bottom = mask[index, bottom].sum(1)
    triangle, cross = shape == 2, shape == 3
    assert (width_top[triangle] < width_bottom[triangle]).all()  # apex up
    assert (width_top[cross] < 0.8 * cols[cross].sum(1)).all()  # the top arm is narrower than the cross


def test_the_mask_is_the_objects_silhouette():
    attributes = toy.balanced_attributes(512)
    images, coverage = toy.render(attributes, torch.Generator().manual_seed(0), mask=True)
    assert torch.equal(images, toy.render(attributes, torch.Generator().manual_seed(0)))  # the same draws
    assert coverage.shape == (512, 1, 32, 32) and coverage.min() == 0 and coverage.max() == 1
    inside, outside = coverage[:, 0] == 1, coverage[:, 0] == 0
    saturated = object_pixels(images)
    assert (saturated & outside).sum() == 0 and (saturated & inside).sum() / inside.sum() > 0.95
    control = toy.control_image(coverage)
    assert control.shape == (512, 3, 32, 32) and torch.equal(control * 255, (control * 255).round())
    assert (control[:, 0] - coverage[:, 0]).abs().max() <= 0.5 / 255


def test_control_sample_and_unplaced_prompts():
    images, prompts, masks = toy.control_sample(16, torch.Generator().manual_seed(0))
    assert images.shape == masks.shape == (16, 3, 32, 32) and len(prompts) == 16
    assert toy.unplaced_prompt(toy.parse_prompt("a large red circle at the top left")) == "a large red circle"
    assert all(len(p.split()) == 4 and "the" not in p for p in prompts)


# ---------------------------------------------------------------------------------------------
# The tokenizer

def test_tokenizer_encodes_every_word_as_one_token(tmp_path):
    vocab_size = toy.write_tokenizer(tmp_path)
    tokenizer = CLIPTokenizer(tmp_path)
    assert vocab_size == len(tokenizer.vocab) < 600
    word_ids = {word: tokenizer.encode(word) for word in toy.WORDS}
    assert all(len(ids) == 1 for ids in word_ids.values())
    assert len({ids[0] for ids in word_ids.values()}) == len(toy.WORDS)
    assert max(ids[0] for ids in word_ids.values()) < vocab_size - 2  # below the two special tokens
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    assert (bos, eos, tokenizer.pad_id) == (vocab_size - 2, vocab_size - 1, vocab_size - 1)
    prompts = [toy.prompt(row) for row in toy.all_attributes()]
    ids = tokenizer(prompts + [""])
    assert ids.shape == (129, toy.MAX_TOKENS)
    for text, row in zip(prompts, ids):
        words = [word_ids[w][0] for w in text.split()]
        assert row.tolist() == [bos, *words, eos] + [eos] * (toy.MAX_TOKENS - len(words) - 2)
    assert ids[-1].tolist() == [bos] + [eos] * (toy.MAX_TOKENS - 1)


def test_tokenizer_files_read_by_transformers(tmp_path):
    toy.write_tokenizer(tmp_path)
    prompts = [toy.prompt(row) for row in toy.all_attributes()] + ["", "A Large RED circle, at the top-left!"]
    want = transformers.CLIPTokenizer.from_pretrained(tmp_path)(prompts, padding="max_length", truncation=True,
                                                                 return_tensors="pt").input_ids
    assert torch.equal(CLIPTokenizer(tmp_path)(prompts), want)


# ---------------------------------------------------------------------------------------------
# The classifier and the Frechet distance

SHORT_RUN = dict(steps=150, batch_size=64)  # 5 s on 2 cores; the default (500 steps) is test_default_classifier


@pytest.fixture(scope="module")
def classifier():
    return toyeval.train_classifier(**SHORT_RUN, seed=0, progress=False)


def test_training_is_reproducible():
    a = toyeval.train_classifier(steps=2, batch_size=8, seed=3, progress=False).state_dict()
    b = toyeval.train_classifier(steps=2, batch_size=8, seed=3, progress=False).state_dict()
    c = toyeval.train_classifier(steps=2, batch_size=8, seed=4, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_classifier_accuracy(classifier):
    images, _, attributes = toy.sample(4000, torch.Generator().manual_seed(123))
    features, predictions = toyeval.classify(classifier, images)
    assert features.shape == (4000, 64) and predictions.shape == (4000, 4)
    per_attribute = (predictions == attributes).float().mean(0)
    assert per_attribute.min() > 0.97, per_attribute  # measured: size 1, colour 1, shape 0.990, position 1


def test_save_load_round_trip(classifier, tmp_path):
    toyeval.save_classifier(classifier, tmp_path)
    loaded = toyeval.load_classifier(tmp_path)
    images, _, _ = toy.sample(32, torch.Generator().manual_seed(5))
    assert not loaded.training
    assert torch.equal(loaded.features(images), classifier.features(images))
    assert all(torch.equal(a, b) for a, b in zip(loaded(images), classifier(images)))
    (tmp_path / "config.json").write_text('{"width": 16, "features": 64, "attributes": [["tiny"]]}')
    with pytest.raises(LoadError, match="other attributes"):
        toyeval.load_classifier(tmp_path)


def blur(images, sigma):
    """Gaussian blur, 5 taps, separable, edges replicated."""
    k = torch.exp(-torch.arange(-2.0, 3.0) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1, 1, 1)  # (3, 1, 1, 5)
    images = F.conv2d(F.pad(images, (2, 2, 0, 0), mode="replicate"), k, groups=3)
    return F.conv2d(F.pad(images, (0, 0, 2, 2), mode="replicate"), k.transpose(2, 3), groups=3)


def check_frechet_distance(classifier, reference, floor, accuracy):
    """FD of 2048 data images (every prompt 16 times) below `floor`, of corrupted ones at least five
    times that of the data, prompt accuracy of the data above `accuracy` and of mismatched prompts ~0."""
    attributes = toy.balanced_attributes(2048)
    images = toy.render(attributes, torch.Generator().manual_seed(7))
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(8))
    data = toyeval.toy_metrics(images, attributes, classifier, reference)
    fresh = toyeval.toy_metrics(toy.render(attributes, torch.Generator().manual_seed(9)), attributes, classifier, reference)
    assert data["accuracy"] > accuracy and fresh["accuracy"] > accuracy
    assert max(data["fd"], fresh["fd"]) < floor
    corrupted = {
        "blur": blur(images, 0.7),
        "noise": images + 0.2 * noise,
        "colour cast": images + torch.tensor([0.1, 0.0, -0.1]).view(1, 3, 1, 1),
        "one image per prompt": torch.cat([images[:128]] * 16),
        "mean image per prompt": images.view(16, 128, 3, 32, 32).mean(0).repeat(16, 1, 1, 1),
    }
    for name, corrupt in corrupted.items():
        fd = toyeval.toy_metrics(corrupt, attributes, classifier, reference)["fd"]
        assert fd > 5 * max(data["fd"], fresh["fd"]), name
    wrong = toyeval.toy_metrics(images, attributes.roll(1, 0), classifier, reference)  # every prompt swapped for another
    assert wrong["accuracy"] < 0.02 and wrong["fd"] == data["fd"]


def test_frechet_distance_tells_data_from_corrupted_data(classifier):
    # measured FD: data 0.12 and 0.13; blur 3.7, noise 2.2, colour cast 2.2, one image 2.2, mean image 8.0
    check_frechet_distance(classifier, toyeval.data_statistics(classifier), floor=0.3, accuracy=0.97)


@pytest.mark.slow
def test_default_classifier():
    classifier = toyeval.train_classifier(progress=False)  # 500 steps of 64
    images, _, attributes = toy.sample(10000, torch.Generator().manual_seed(123))
    per_attribute = (toyeval.classify(classifier, images)[1] == attributes).float().mean(0)
    assert per_attribute.min() > 0.995, per_attribute  # measured: 1, 1, 0.9999, 1
    # measured FD: data 0.17 and 0.24; blur 8.0, noise 5.7, colour cast 3.1, one image 3.0, mean image 17.5
    check_frechet_distance(classifier, toyeval.data_statistics(classifier), floor=0.4, accuracy=0.995)


def test_unknown_words():
    assert toy.unknown_words(["a large red circle at the top left", "A small blue cross"]) == []
    assert toy.unknown_words(["a purple dog on the beach", "a purple cat"]) == ["purple", "dog", "on", "beach", "cat"]


def test_the_printed_table_is_the_readmes():
    """The toy table of `train --backbone toy`: the README's rows, the targets, the ratios and a verdict each."""
    results = {"teacher_25": {"fd": 11.307, "accuracy": 0.955}, "teacher_1": {"fd": 66.117, "accuracy": 0.879},
               "student_1": {"fd": 22.622, "accuracy": 0.891}}
    lines = toyeval.metrics_table(results).splitlines()
    assert lines[1].split() == ["teacher,", "25-step", "DDIM", "+", "CFG", "3", "11.307", "0.955"]
    assert lines[4].split() == ["target", "<=33.059", ">=0.859"]
    assert lines[5] == "FD: the student's is 0.34x the one-step teacher's (target: <= 0.5x): met"
    assert lines[6] == "accuracy: the student's is 0.93x the 25-step teacher's (target: >= 0.9x): met"
    worse = {**results, "student_1": {"fd": 40.0, "accuracy": 0.8}}
    assert toyeval.metrics_table(worse).count("NOT met") == 2
    assert len(toyeval.metrics_table({"teacher_25": results["teacher_25"]}).splitlines()) == 2  # no target row
