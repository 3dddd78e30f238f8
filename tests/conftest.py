"""What the tests share (pytest reads this file first): small configs and random reference networks for
the parity tests, real tokenizer files, and a command runner. The tiny model repositories are written by
tests/repo.py."""
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from bpe import bytes_to_unicode
from openclip import OPENAI_MEAN, OPENAI_STD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the commands' `--threads auto` reads OMP_NUM_THREADS first: the suite's runs keep torch's thread count,
# whatever the machine's load, so two runs in it compute the same numbers (tests/test_cli.py unsets it)
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def randomize(model, weight_std, vector_std=0.5):
    """Overwrite `model`'s parameters in place with N(0, weight_std^2) for matrices and kernels and
    N(0, vector_std^2) for biases and norm scales (from the global RNG, in parameter order); returns it."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (weight_std if p.dim() > 1 else vector_std))
    return model


# ---------------------------------------------------------------------------------------------
# Small configs and reference networks


def small_unet_config(**overrides):
    """A small SD1.5-shaped U-Net config (diffusers keys): three levels, cross-attention on two."""
    cfg = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64, 64],
           "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
           "layers_per_block": 2, "attention_head_dim": 2, "cross_attention_dim": 32, "norm_num_groups": 8,
           "in_channels": 4, "out_channels": 4, "sample_size": 16, "flip_sin_to_cos": True, "freq_shift": 0}
    return {**cfg, **overrides}


SD21_STYLE = dict(attention_head_dim=[1, 2, 4], use_linear_projection=True, upcast_attention=True,
                  cross_attention_dim=48)


# every SDXL feature, small: no attention at the first level, per-level head counts and transformer
# depths (mid block: the last), linear projections, the "text_time" embedding of a pooled text (24)
# and 6 time ids (8 each)
SDXL_STYLE = dict(block_out_channels=[32, 64, 96], attention_head_dim=[1, 2, 4],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  transformer_layers_per_block=[1, 2, 3], use_linear_projection=True,
                  cross_attention_dim=40, addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=24 + 6 * 8)


# the toy teacher's kind of layout: text-only attention (no self-attention) at the full-resolution level
ONLY_CROSS = dict(only_cross_attention=[True, False, False], use_linear_projection=True)


def unet_reference(cfg, seed=0):
    """diffusers' U-Net with random weights (norm affines included, so every parameter matters)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = UNet2DConditionModel.from_config(cfg).eval()
    return randomize(ref, 0.05)


CAPTION = 24  # text-embedding width of the small configs


def small_dit_config(**overrides):
    """A small PixArt (diffusers keys): 2 blocks of width 24 (2 heads x 12, divisible by 3 for the
    micro-condition embedders), a 16 x 16 latent in patches of 2 (base grid 8 x 8)."""
    cfg = {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 2, "attention_head_dim": 12,
           "in_channels": 4, "out_channels": 8, "num_layers": 2, "cross_attention_dim": 24, "attention_bias": True,
           "sample_size": 16, "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
           "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
           "caption_channels": CAPTION}
    return {**cfg, **overrides}


# ViT-B-32's layout, shrunk; ViT-g-14's fractional mlp_ratio (int(64 * 4.3637) = 279)
OPENCLIP_SMALL = {"embed_dim": 16,
         "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "mlp_ratio": 4.3637,
                        "patch_size": 8},
         "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def openclip_reference(cfg):
    """open_clip's CLIP at `cfg`, every parameter (LayerNorms, embeddings, projections) randomised."""
    import open_clip
    torch.manual_seed(0)
    ref = open_clip.CLIP(**cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def write_openclip_repo(directory, ref, cfg):
    """A directory in an open_clip Hub repo's layout: open_clip_config.json and the safetensors weights."""
    with open(os.path.join(directory, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}}, f)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              os.path.join(directory, "open_clip_model.safetensors"))
    return str(directory)


def random_ids(batch, generator):
    """open_clip-style ids: start, 1 to 75 ordinary tokens, end, zero padding."""
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for row in ids:
        n = int(torch.randint(1, 76, (), generator=generator))
        row[0], row[1:n + 1], row[n + 1] = 49406, torch.randint(1, 49406, (n,), generator=generator), 49407
    return ids


def random_fid_inception_state(seed=0):
    """A state dict in the layout of pytorch-fid's weight file (torchvision's Inception3 with 1008
    classes, no aux head), built without any download, with random convolutions (He-scaled, so the
    activations keep their size through 94 layers) and random batch-norm statistics."""
    from pytorch_fid.inception import _inception_v3

    torch.manual_seed(seed)
    state = _inception_v3(num_classes=1008, aux_logits=False, weights=None).state_dict()
    for key, value in state.items():
        if key.endswith("conv.weight"):
            value.normal_(0, math.sqrt(2 / value[0].numel()))
        elif key.endswith("bn.weight") or key.endswith("bn.running_var"):
            value.uniform_(0.5, 1.5)
        elif key.endswith("bn.bias") or key.endswith("bn.running_mean"):
            value.normal_(0, 0.2)
    return state


def write_clip_vocab(directory):
    """vocab.json and merges.txt of the real CLIP BPE in the Hugging Face layout: the 256 byte
    characters, the same with `</w>`, the merges joined, then the two special tokens. Built from the
    merges file in open_clip_torch's package directory, found without importing open_clip (that
    would pull in torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.fail("open_clip_torch is not installed (requirements-dev.txt): its bpe_simple_vocab_16e6.txt.gz "
                    "is the real CLIP vocabulary the tokenizer tests need")
    path = os.path.join(list(spec.submodule_search_locations)[0], "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(vocab)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


# ---------------------------------------------------------------------------------------------
# Commands


def run_evaluate(*args, launcher=()):
    """`python [launcher] evaluate.py ARGS` in a fresh process, offline, with numpy's BLAS on one thread
    (on two shared cores its idle threads spinning next to torch's would double the time)."""
    return subprocess.run([sys.executable, *launcher, "evaluate.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------
# Training on a tiny SD repository

TRAIN = ["train", "--batch-size", "2", "--resolution", "16", "--rank", "4", "--rank-fake", "2",
         "--validate-every", "100"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny SD repository (tests/repo.py) with five training prompts in prompts.txt."""
    from tests.repo import write_prompts, write_tiny_sd_repo
    root = str(tmp_path_factory.mktemp("tiny-sd"))
    write_tiny_sd_repo(root)
    return write_prompts(root, ["a red cat", "a blue dog", "a green tree", "the sea at night", "a small house"])


def train_cli(repo, out, *extra):
    """`wadi.py train` in this process on the tiny repository: batch 2 at 16 px, ranks 4 / 2."""
    import wadi
    return wadi.main([*TRAIN, "--model", repo, "--prompts", os.path.join(repo, "prompts.txt"),
                      "--out", str(out), *extra])
