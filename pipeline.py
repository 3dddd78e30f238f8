"""A backbone assembled from its repo (README "One-step sampling"): the denoiser, the VAE (absent for the
pixel-space toy), the text encoder with its tokenizer and the noise schedule, plus what every command does
with them: encode prompts, decode latents to images, save images and grids; optionally a ControlNet
(controlnet.py) steering the denoiser, for the one-step student and the DDIM teacher alike.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clip import CLIPTextModel, CLIPTokenizer, convert_text_state_dict
from controlnet import ControlledUNet, load_controlnet, read_control_images
from diffusion import A_T, NoiseSchedule, ddim_sample, one_step
from loading import LoadError, MissingFile, build, fetch, file_metadata, load_component, load_weights, read_json, \
    read_tensors
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

# a tokenizer/ folder: the vocabulary either as vocab.json + merges.txt or as transformers 5's tokenizer.json;
# the settings files are optional
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module          # None in pixel space
    text_encoder: torch.nn.Module
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule
    resolution: int               # native image resolution in pixels

    def downsampling(self):
        """Pixels per latent pixel along each side: the VAE's 2 ** (levels - 1), 1 in pixel space."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    def latent_shape(self, resolution=None):
        """(C, h, w) of the denoiser's input for images of `resolution` pixels (default: native)."""
        size = (resolution or self.resolution) // self.downsampling()
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
        one step of WaDi's generator (paper Sec. 3.3) when steps == 1, else DDIM with CFG scale `guidance`. With a
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
    tokenizer = load_tokenizer(model)
    schedule = load_schedule(model)
    autoencoder = None
    if vae and has_vae(model):
        autoencoder = load_component(AutoencoderKL, model, "vae", torch.float32, device, rename=rename_legacy_keys)
    return Pipeline(unet, autoencoder, text_encoder, tokenizer, schedule, BACKBONES[backbone].resolution)


def load_schedule(model):
    """The noise schedule of a repo's `scheduler/scheduler_config.json`; a LoadError naming the file for a
    setting this project does not implement."""
    path = fetch(model, "scheduler/scheduler_config.json")
    try:
        return NoiseSchedule.from_config(read_json(path))
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None


def load_tokenizer(model):
    """The CLIP tokenizer of a repo's `tokenizer/` folder (see TOKENIZER_FILES)."""
    for files in TOKENIZER_FILES:
        try:
            paths = [fetch(model, f"tokenizer/{name}") for name in files]
            break
        except MissingFile:
            continue
    else:
        raise LoadError(f"no tokenizer in {model}: tokenizer/ needs vocab.json and merges.txt, or tokenizer.json")
    for name in TOKENIZER_SETTINGS:
        try:
            fetch(model, f"tokenizer/{name}")
        except MissingFile:
            pass
    try:
        return CLIPTokenizer(os.path.dirname(paths[0]))
    except (ValueError, KeyError, OSError) as e:
        raise LoadError(f"cannot read the tokenizer of {model}: {type(e).__name__}: {e}") from None


def student_backbone(backbone, model, student, option):
    """(backbone, base model) for a command given a student file (None: none): `backbone`, else the one
    recorded in the file's metadata (our exports record it), else sd15; `model`, else the recorded base
    model when it can be found here (an existing directory, or a Hub id), else the backbone's repo. A
    `backbone` that contradicts the file is a LoadError naming the command-line `option`."""
    meta = file_metadata(student) if student else {}
    recorded = meta.get("backbone") if meta.get("backbone") in BACKBONES else None
    if backbone and recorded and backbone != recorded:
        raise LoadError(f"--backbone {backbone} contradicts {option} {student}, a {recorded} student (its metadata "
                        f"says so); leave --backbone out or give the matching one")
    backbone = backbone or recorded or "sd15"
    base = meta.get("base_model", "") if recorded else ""
    found = os.path.isdir(base) or (base.count("/") == 1 and not base.startswith((".", "/", "~")))
    return backbone, model or (base if found else BACKBONES[backbone].repo)


def check_steps(model, steps, option="--steps"):
    """A LoadError unless DDIM can take `steps` steps on the model's schedule (1 is the one-step generator)."""
    if steps > 1:
        try:
            load_schedule(model).ddim_timesteps(steps)
        except ValueError as e:
            raise LoadError(f"{option} {steps}: {e}") from None


def load_control(pipe, spec, image_paths, resolution=None):
    """The ControlNet `spec` (`controlnet.load_controlnet`: a repo, directory or file) in the pipeline's dtype
    and device, checked to fit its U-Net, and the control images `image_paths` as (N, 3, H, W) in [0, 1] at the
    output resolution. LoadError for a missing, unreadable or unfit file."""
    param = next(pipe.unet.parameters())
    net = load_controlnet(spec, pipe.unet, pipe.downsampling(), param.dtype, param.device)
    return net, read_control_images(image_paths, resolution or pipe.resolution)


def load_unet_file(path, cfg, dtype=torch.float32, device="cpu"):
    """A full U-Net state dict in diffusers keys (our exports, the official `rotated_unet-*.safetensors`,
    or a pickled state dict such as DMD2's `pytorch_model.bin`, read with the weights-only loader)."""
    with torch.device("meta"):
        unet = build(UNet, cfg, "unet/config.json")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in read_tensors(path).items()}
    load_weights(unet, state, what=path)
    return unet.to(device).eval().requires_grad_(False)


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


def read_prompts(path, log=print):
    """Prompts from a file: plain text (one per line), a JSON list of strings, or JSON lines: the
    JourneyDB annotations (the caption under "Task2", key "Caption", "Caption:" or "caption", as the
    official loader reads it; de-duplicated and sorted as there) or rows with a "prompt". Rows without a
    usable caption are skipped and counted in one `log` line. A UTF-8 byte-order mark and CRLF line ends
    (as Windows editors save) make no difference. A LoadError when nothing usable is left."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the prompt file {path}: {e}") from None
    try:
        if path.endswith(".jsonl"):
            captions = [journeydb_caption(json.loads(line)) for line in text.splitlines() if line.strip()]
            usable = [c.strip() for c in captions if c and c.strip()]
            if len(usable) < len(captions):
                log(f"{path}: skipped {len(captions) - len(usable)} prompts without a caption")
            prompts = sorted(set(usable))
        elif path.endswith(".json"):
            prompts = json.loads(text)
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("expected a JSON list of strings")
        else:
            prompts = text.splitlines()
    except ValueError as e:
        raise LoadError(f"cannot parse the prompt file {path}: {type(e).__name__}: {e}") from None
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise LoadError(f"the prompt file {path} has no prompts")
    return prompts


JOURNEYDB_KEYS = ("Caption", "Caption:", "caption")  # the official loader's spellings of the Task2 key


def journeydb_caption(row):
    """The caption of one JSON line (a str, or None when it has none): Task2's caption, else "prompt"."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object per line, got {type(row).__name__}")
    task = row.get("Task2")
    if isinstance(task, dict):
        caption = next((task[k] for k in JOURNEYDB_KEYS if k in task), None)
    else:
        caption = row.get("prompt")
    return caption if isinstance(caption, str) else None
