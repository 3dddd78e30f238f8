"""A backbone assembled from its repo (SPEC 1.4): the denoiser, the VAE (absent for the pixel-space toy),
the text encoder with its tokenizer and the noise schedule, plus what every command does with them:
encode prompts, decode latents to images, save images and grids; optionally a ControlNet (controlnet.py)
steering the denoiser, for the one-step student and the DDIM teacher alike.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open

from clip import CLIPTextModel, CLIPTokenizer, convert_text_state_dict
from controlnet import ControlledUNet, load_controlnet, read_control_images
from diffusion import A_T, NoiseSchedule, ddim_sample, one_step
from loading import LoadError, fetch, load_component, load_weights, read_json, read_safetensors
from unet import UNet
from vae import AutoencoderKL, rename_legacy_keys

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Backbone:
    repo: str          # default weights: a Hugging Face repo id, or a directory shipped with the project
    resolution: int    # native image resolution in pixels
    configs: str       # built-in copies of the repo's configs: models build with no download


BACKBONES = {
    "sd15": Backbone("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, os.path.join(HERE, "configs", "sd15")),
    "sd21": Backbone("stabilityai/stable-diffusion-2-1-base", 512, os.path.join(HERE, "configs", "sd21")),
    # pixel-space toy, shipped with the project (`python wadi.py pretrain --backbone toy` rebuilds it)
    "toy": Backbone(os.path.join(HERE, "assets", "toy"), 32, os.path.join(HERE, "assets", "toy")),
}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module          # None in pixel space
    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    resolution: int               # native image resolution in pixels

    @property
    def downscale(self):
        """How much smaller than the image the denoiser's input is: the VAE's factor (1 in pixel space)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_shape(self, resolution=None):
        """(C, h, w) of the denoiser's input for images of `resolution` pixels (default: native)."""
        size = (resolution or self.resolution) // self.downscale
        return (self.unet.config.in_channels, size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Text embeddings (B, L, D) of a list of prompts."""
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(self.tokenizer(prompts).to(device))

    @torch.no_grad()
    def generate(self, prompts, seeds, steps=1, guidance=7.5, a_T=A_T, resolution=None, controlnet=None,
                 control_image=None, control_scale=1.0):
        """uint8 images (B, H, W, 3), image i for prompts[i] from the noise of seeds[i] (`seeded_noise`):
        one step of the generator of SPEC 1.3 when steps == 1, else DDIM with CFG scale `guidance`. With a
        `controlnet`, the denoiser is steered by `control_image` (1 or B, 3, H, W) in [0, 1] at the output
        resolution (`read_control_images`), its residuals scaled by `control_scale`, on every step."""
        param = next(self.unet.parameters())
        z = seeded_noise(self.latent_shape(resolution), seeds).to(param.device, param.dtype)  # (B, C, h, w)
        context = self.encode_prompts(prompts)
        net = self.unet if controlnet is None else ControlledUNet(self.unet, controlnet, control_image, control_scale)
        if steps == 1:
            x0 = one_step(net, z, context, self.schedule.prediction_type, a_T)
        else:
            null = self.encode_prompts([""]).expand(len(prompts), -1, -1)
            x0 = ddim_sample(net, self.schedule, z, context, null, steps, guidance)
        return self.decode(x0)

    @torch.no_grad()
    def decode(self, latents):
        """Denoiser-space samples (B, C, h, w) -> uint8 images (B, H, W, 3) as a numpy array."""
        if self.vae is not None:
            latents = self.vae.decode(latents.to(next(self.vae.parameters()).dtype))
        images = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def pick_dtype(name, device):
    """The weights dtype named by --dtype (a key of DTYPES), by default fp16 on a GPU and fp32 on the CPU."""
    return DTYPES[name] if name else (torch.float16 if device.type == "cuda" else torch.float32)


def seeded_noise(shape, seeds):
    """Standard normal noise (len(seeds), *shape), row i drawn on the CPU from its own generator seeded
    with seeds[i]: an image depends on its seed alone, not on the batch or the process that draws it."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def has_vae(model):
    """Whether a repo has a `vae/` (the toy backbone works in pixel space and has none)."""
    try:
        fetch(model, "vae/config.json")
        return True
    except LoadError:
        return False


def load_pipeline(backbone, model=None, unet_file=None, dtype=torch.float32, device="cpu", vae=True):
    """Load a backbone's parts from `model` (repo id or directory; default: the backbone's repo).
    `unet_file` replaces the repo's denoiser weights (a one-step student in diffusers keys)."""
    model = model or BACKBONES[backbone].repo
    if unet_file is None:
        unet = load_component(UNet, model, "unet", dtype, device)
    else:
        unet = load_unet_file(unet_file, read_json(fetch(model, "unet/config.json")), dtype, device)
    text_encoder = load_component(CLIPTextModel, model, "text_encoder", dtype, device, rename=convert_text_state_dict)
    tokenizer = CLIPTokenizer(os.path.dirname([fetch(model, f"tokenizer/{f}") for f in TOKENIZER_FILES][0]))
    schedule = NoiseSchedule.from_config(read_json(fetch(model, "scheduler/scheduler_config.json")))
    autoencoder = None
    if vae and has_vae(model):
        autoencoder = load_component(AutoencoderKL, model, "vae", torch.float32, device, rename=rename_legacy_keys)
    return Pipeline(unet, autoencoder, text_encoder, tokenizer, schedule, BACKBONES[backbone].resolution)


def load_control(pipe, spec, image_paths, resolution=None):
    """The ControlNet `spec` (`controlnet.load_controlnet`: a repo, directory or file) in the pipeline's dtype
    and device, checked to fit its U-Net, and the control images `image_paths` as (N, 3, H, W) in [0, 1] at the
    output resolution. LoadError for a missing, unreadable or unfit file."""
    param = next(pipe.unet.parameters())
    net = load_controlnet(spec, pipe.unet, pipe.downscale, param.dtype, param.device)
    return net, read_control_images(image_paths, resolution or pipe.resolution)


def load_unet_file(path, cfg, dtype=torch.float32, device="cpu"):
    """A full U-Net state dict in diffusers keys (our exports, the official `rotated_unet-*.safetensors`)."""
    with torch.device("meta"):
        unet = UNet.from_config(cfg)
    load_weights(unet, read_safetensors(path, dtype), what=path)
    return unet.to(device).eval().requires_grad_(False)


def file_metadata(path):
    """The string metadata of a safetensors file ({} if none)."""
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def student_a_T(path):
    """The one-step noise level stored with an exported student, else the official constant."""
    return float(file_metadata(path).get("a_T", A_T)) if path else A_T


def image_grid(images, cols=None):
    """uint8 images (N, H, W, 3) -> one PIL image, `cols` per row (default: about square)."""
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = im
    return Image.fromarray(grid)


def read_prompts(path):
    """Prompts from a file: plain text (one per line), a JSON list of strings, or the JourneyDB `.jsonl`
    annotations (the caption under "Task2"; de-duplicated and sorted, as the official loader does)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the prompt file {path}: {e}") from None
    try:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            prompts = sorted({next(iter(r["Task2"].values())) if "Task2" in r else r["prompt"] for r in rows} - {""})
        elif path.endswith(".json"):
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("expected a JSON list of strings")
        else:
            prompts = text.splitlines()
    except (ValueError, KeyError, StopIteration, AttributeError) as e:
        raise LoadError(f"cannot parse the prompt file {path}: {type(e).__name__}: {e}") from None
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise LoadError(f"the prompt file {path} has no prompts")
    return prompts
