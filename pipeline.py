"""A backbone assembled from its repo (README "One-step sampling"): the denoiser (the SD U-Net or PixArt's
DiT), the VAE (absent for the pixel-space toy), the text encoder with its tokenizer (CLIP, or T5 with its
padding mask) and the noise schedule, plus what every command does with them: encode prompts, decode latents
to images, save images and grids; optionally a ControlNet (controlnet.py) steering the U-Net, for the
one-step student and the DDIM teacher alike. T5 XXL is too large to keep beside the denoiser: its
embeddings come from a disk cache (textcache.py) that `Pipeline.prepare_prompts` fills once.
"""
import gc
import os
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import embeddings
import sdxl
import textcache
from redilate import Plan, Redilated
from bpe import CLIPTokenizer
from clip import CLIPTextModel, CLIPTextModelWithProjection, convert_text_state_dict
from controlnet import ControlledUNet
from diffusion import A_T, NoiseSchedule, Text, ddim_sample, one_step
from dit import PixArt
from loading import LoadError, MissingFile, build, fetch, file_metadata, load_component, load_weights, read_json, \
    read_tensors, weight_files
from t5 import T5Encoder, T5Tokenizer, convert_state_dict as convert_t5_state_dict
from unet import UNet
from vae import AutoencoderKL, rename_legacy_keys

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Backbone:
    repo: str          # default weights: a Hugging Face repo id, or a directory shipped with the project
    resolution: int    # native image resolution in pixels
    configs: str       # built-in copies of the repo's configs: models build with no download
    denoiser: str = "unet"  # the denoiser's folder in the repo: unet/ (unet.UNet) or transformer/ (dit.PixArt)
    guidance: float = 7.5   # the teacher's CFG scale for DDIM sampling (diffusers' pipeline default)
    text_encoders: tuple = ("text_encoder",)  # their folders; SDXL's two: sdxl.TEXT_ENCODERS


def _pixart(repo, resolution):
    return Backbone(repo, resolution, os.path.join(HERE, "configs", f"pixart-{resolution}"), "transformer", 4.5)


# PixArt-alpha: one model (Hub repo) per resolution, chosen by --resolution
PIXART = {256: _pixart("PixArt-alpha/PixArt-XL-2-256x256", 256), 512: _pixart("PixArt-alpha/PixArt-XL-2-512x512", 512),
          1024: _pixart("PixArt-alpha/PixArt-XL-2-1024-MS", 1024)}
BACKBONES = {
    "sd15": Backbone("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, os.path.join(HERE, "configs", "sd15")),
    "sd21": Backbone("stabilityai/stable-diffusion-2-1-base", 512, os.path.join(HERE, "configs", "sd21")),
    "sdxl": Backbone("stabilityai/stable-diffusion-xl-base-1.0", 1024, os.path.join(HERE, "configs", "sdxl"),
                     guidance=5.0, text_encoders=sdxl.TEXT_ENCODERS),  # docs/sdxl.md
    "pixart": PIXART[256],
    # pixel-space toys, shipped with the project (`python wadi.py pretrain --backbone toy` / `toy-dit` rebuilds them):
    # SD's layout (U-Net, CLIP) and PixArt's (DiT, T5)
    # (the toys' teacher samples at CFG 3: docs/toy.md)
    "toy": Backbone(os.path.join(HERE, "assets", "toy"), 32, os.path.join(HERE, "assets", "toy"), guidance=3.0),
    "toy-dit": Backbone(os.path.join(HERE, "assets", "toy-dit"), 32, os.path.join(HERE, "assets", "toy-dit"),
                        "transformer", 3.0),
}
VARIANTS = {"pixart": PIXART}  # backbones with a model per resolution
# Hub repos holding only the denoiser, and the repo of the same model's VAE, text encoder, tokenizer and
# scheduler (on the Hub the 256 px PixArt repo has only transformer/; the 512 px repo has the same parts)
COMPANIONS = {"PixArt-alpha/PixArt-XL-2-256x256": "PixArt-alpha/PixArt-XL-2-512x512"}
DENOISERS = {"unet": UNet, "transformer": PixArt}  # by folder
# a key only that family's files hold, and what to call it in messages
FAMILIES = {"unet": ("conv_in.weight", "U-Net", "sd15, sd21 or sdxl"),
            "transformer": ("adaln_single.linear.weight", "PixArt transformer", "pixart")}
# text encoders by kind: class and state-dict rename; CACHED ones are too large to keep beside the
# denoiser (T5 XXL: 4.76B parameters) and only ever fill the prompt cache
TEXT_ENCODERS = {"clip": (CLIPTextModel, convert_text_state_dict), "t5": (T5Encoder, convert_t5_state_dict),
                 "clip-projection": (CLIPTextModelWithProjection, convert_text_state_dict)}
CACHED = ("t5",)
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser(os.path.join("~", ".cache"))), "wadi")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DECODE_PIXELS = 1024 * 1024  # the most image pixels the VAE decodes in one call (Pipeline.decode)

# a tokenizer/ folder: the vocabulary either as vocab.json + merges.txt or as transformers 5's tokenizer.json;
# the settings files are optional
TOKENIZER_FILES = (("vocab.json", "merges.txt"), ("tokenizer.json",))
TOKENIZER_SETTINGS = ("tokenizer_config.json", "special_tokens_map.json")


def pick_backbone(name, resolution=None, model=None):
    """The backbone `name`: PixArt's 256, 512 and 1024 px models are three repos (PIXART), and `model`
    when it is one of them picks it (and its native resolution), else `resolution`; any other resolution,
    and every other backbone, has the default."""
    variants = VARIANTS.get(name, {})
    return next((b for b in variants.values() if b.repo == model), variants.get(resolution, BACKBONES[name]))


def parts_of(model):
    """The repo or directory holding a model's VAE, text encoder, tokenizer and scheduler: `model` itself,
    or for a Hub repo that holds only the denoiser its companion (COMPANIONS)."""
    return COMPANIONS.get(model, model)


def text_encoder_kind(cfg):
    """"t5" for a transformers T5 config (model_type t5, or a T5EncoderModel), "clip-projection" for
    a CLIPTextModelWithProjection (SDXL's text_encoder_2), else "clip"."""
    architectures = cfg.get("architectures") or ()
    if cfg.get("model_type") == "t5" or "T5EncoderModel" in architectures:
        return "t5"
    return "clip-projection" if "CLIPTextModelWithProjection" in architectures else "clip"


def encode_text(encoder, tokenizer, prompts, clip_mask=False):
    """Text of a list of prompts, on the encoder's device, with gradients where the encoder has
    trainable weights (invert.py's token row; `Pipeline.encode_prompts` and `prepare_prompts` turn
    them off). CLIP: ids -> last hidden state, without a mask as Stable Diffusion encodes (with
    `clip_mask`, CLIP attends to the prompt's tokens only, as the official training code encodes its
    training prompts; the denoiser gets no mask either way);
    T5: (ids, mask) -> last hidden state (B, 120, D) and the mask ("" has one valid token, eos);
    SDXL's pair (sdxl.TextEncoders): the two penultimate states and the pooled text, no mask."""
    device = next(encoder.parameters()).device
    if isinstance(encoder, sdxl.TextEncoders):
        return encoder(*(t.to(device) for t in tokenizer(prompts)))
    if isinstance(tokenizer, CLIPTokenizer) and clip_mask:
        ids, mask = (t.to(device) for t in tokenizer(prompts, return_mask=True))
        return Text(encoder(ids, mask))
    tokens = tokenizer(prompts)
    if isinstance(tokens, tuple):  # T5: ids and padding mask
        ids, mask = (t.to(device) for t in tokens)
        return Text(encoder(ids, mask), mask)
    return Text(encoder(tokens.to(device)))


@dataclass
class Pipeline:
    denoiser: torch.nn.Module     # unet.UNet or dit.PixArt
    vae: torch.nn.Module          # None in pixel space
    text_encoder: torch.nn.Module  # None for a CACHED one (T5), built only by prepare_prompts
    tokenizer: object             # CLIPTokenizer, T5Tokenizer (ids and mask) or SDXL's sdxl.Tokenizers
    schedule: NoiseSchedule
    resolution: int               # native image resolution in pixels
    text_model: str = None        # the repo or directory of text_encoder/ and tokenizer/
    prompt_cache: textcache.PromptCache = None

    def add_embeddings(self, files):
        """Add the learned tokens of embedding `files` (embeddings.read_embeddings) to the CLIP text
        encoder and tokenizer, for every prompt after; returns the tokens."""
        if files and not isinstance(self.tokenizer, CLIPTokenizer):
            raise LoadError("--embedding: learned tokens are for one CLIP text encoder (sd15, sd21, toy), not "
                            "PixArt's T5 or SDXL's two")
        tokens = []
        for file in files:
            learned = embeddings.read_embeddings(file)
            embeddings.add_embeddings(self.tokenizer, self.text_encoder, learned)
            tokens += learned
        return tokens

    def downsampling(self):
        """Pixels per latent pixel along each side (`vae_downsampling`), 1 in pixel space."""
        return vae_downsampling(self.vae.config.block_out_channels) if self.vae is not None else 1

    def image_size(self, resolution=None):
        """(height, width) in pixels of `resolution`, a side or (height, width) (default: native)."""
        return resolution if isinstance(resolution, tuple) else (resolution or self.resolution,) * 2

    def latent_shape(self, resolution=None):
        """(C, h, w) of the denoiser's input for images of `resolution` pixels (`image_size`)."""
        height, width = self.image_size(resolution)
        return (self.denoiser.config.in_channels, height // self.downsampling(), width // self.downsampling())

    @torch.no_grad()
    def encode_prompts(self, prompts, clip_mask=False, resolution=None):
        """Text of a list of prompts: embeddings (B, L, D) and mask (None for CLIP), from the resident text
        encoder (`clip_mask`: see `encode_text`), else from the prompt cache (on the denoiser's device and
        dtype), which must hold them: `prepare_prompts` first. SDXL's also carries the pooled text and the
        time ids of images of `resolution` (`image_size`; sdxl.with_time_ids)."""
        if self.text_encoder is not None:
            text = encode_text(self.text_encoder, self.tokenizer, prompts, clip_mask)
            return text if text.pooled is None else sdxl.with_time_ids(text, *self.image_size(resolution))
        missing = [p for p in prompts if self.prompt_cache is None or p not in self.prompt_cache]
        if missing:
            raise KeyError(f"{len(missing)} prompts (e.g. {missing[0]!r}) are not in the prompt cache; "
                           f"Pipeline.prepare_prompts encodes them first")
        param = next(self.denoiser.parameters())
        return self.prompt_cache.lookup(prompts).to(param.device, param.dtype)

    def null_text(self, resolution=None):
        """The unconditional text (1, ...) of CFG and of the fake score's dropped prompts: "" encoded,
        or SDXL's zeros (sdxl.null_text) with the time ids of `resolution`."""
        text = self.encode_prompts([""], resolution=resolution)
        return text if text.pooled is None else sdxl.null_text(text)

    @torch.no_grad()
    def prepare_prompts(self, prompts, cache_dir=None, rank=0, world=1, batch_size=64):
        """Make `encode_prompts` answer every one of `prompts` without a large text encoder resident. A
        resident encoder (CLIP) needs nothing. T5: the prompt cache of this prompt list, encoder, tokenizer
        and the denoiser's dtype in `cache_dir` (default CACHE_DIR) is opened, after building it when missing:
        T5 in that dtype on the denoiser's device, `batch_size` prompts at a time, then freed (del,
        torch.cuda.empty_cache) before anything else runs; one warning line says how many prompts were cut
        to 120 tokens. Under torchrun every rank calls it with the same list and encodes its share."""
        if self.text_encoder is not None:
            return
        param = next(self.denoiser.parameters())
        files = [fetch(self.text_model, "text_encoder/config.json"), *weight_files(self.text_model, "text_encoder"),
                 fetch(self.text_model, "tokenizer/spiece.model")]
        max_length = self.tokenizer.max_length
        path = textcache.cache_path(cache_dir or CACHE_DIR, textcache.cache_key(files, prompts, param.dtype, max_length))
        if not textcache.exists(path, world):
            cut = self.tokenizer.truncated(prompts) if rank == 0 else []
            if cut:
                print(f"warning: {len(cut)} of {len(prompts)} prompts are longer than {max_length} T5 tokens (eos "
                      f"included) and are cut to that length", file=sys.stderr)
            encoder = load_text_encoder(self.text_model, param.dtype, param.device)
            textcache.write(path, prompts, lambda batch: encode_text(encoder, self.tokenizer, batch),
                            encoder.config.d_model, param.dtype, max_length, batch_size, rank, world)
            del encoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.prompt_cache = textcache.PromptCache(path, prompts)

    @torch.no_grad()
    def generate(self, prompts, seeds, steps=1, guidance=7.5, a_T=A_T, resolution=None, controlnet=None,
                 control_image=None, control_scale=1.0, redilate: Plan = None):
        """uint8 images (B, H, W, 3), image i for prompts[i] from the noise of seeds[i] (`seeded_noise`):
        one step of WaDi's generator (paper Sec. 3.3) when steps == 1, else DDIM with CFG scale `guidance`. With a
        `controlnet`, the denoiser is steered by `control_image` (1 or B, 3, H, W) in [0, 1] at the output
        resolution (`read_control_images`), its residuals scaled by `control_scale`, on every step. With a
        `redilate` plan, the U-Net's convolutions run re-dilated as it says (redilate.py: above the
        training resolution)."""
        param = next(self.denoiser.parameters())
        z = seeded_noise(self.latent_shape(resolution), seeds).to(param.device, param.dtype)  # (B, C, h, w)
        text = self.encode_prompts(prompts, resolution=resolution)
        net = self.denoiser if controlnet is None else ControlledUNet(self.denoiser, controlnet, control_image, control_scale)
        timesteps = self.schedule.ddim_timesteps(steps) if steps > 1 else [999]
        damped = None
        if redilate:
            damped = Redilated(net, redilate, timesteps, self.denoiser, damped=True)
            net = Redilated(net, redilate, timesteps, self.denoiser)
        if steps == 1:
            x0 = one_step(net, z, text, self.schedule.prediction_type, a_T)
        else:
            null = self.null_text(resolution).expand(len(prompts))
            x0 = ddim_sample(net, self.schedule, z, text, null, steps, guidance, damped=damped,
                             damped_steps=redilate.damped_steps if redilate else 0)
        return self.decode(x0)

    @torch.no_grad()
    def decode(self, latents):
        """Denoiser-space samples (B, C, h, w) -> uint8 images (B, H, W, 3) as a numpy array. The
        VAE decodes at most DECODE_PIXELS of images at once (one image above it), which bounds its
        memory whatever the batch (BENCHMARKS.md, "VAE decoding")."""
        if self.vae is not None:
            per_call = max(1, DECODE_PIXELS // (latents[0, 0].numel() * self.downsampling() ** 2))
            dtype = next(self.vae.parameters()).dtype
            latents = torch.cat([self.vae.decode(z.to(dtype)) for z in latents.split(per_call)])
        images = ((latents.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def vae_downsampling(block_out_channels):
    """Pixels per latent pixel along each side of a VAE with these levels: 2 ** (levels - 1)."""
    return 2 ** (len(block_out_channels) - 1)


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


def load_pipeline(backbone, model=None, unet_file=None, dtype=torch.float32, device="cpu", vae=True, resolution=None):
    """Load a backbone's parts from `model` (repo id or directory; default: the backbone's repo for images
    of `resolution` pixels, `pick_backbone`): the denoiser from its unet/ or transformer/ folder, the rest
    from `parts_of(model)`. `unet_file` replaces the denoiser's weights (a one-step student in diffusers
    keys). A CACHED text encoder (T5) is not loaded here: `Pipeline.prepare_prompts` builds it when needed.
    SDXL's two text encoders and tokenizers come as one (sdxl.TextEncoders, sdxl.Tokenizers)."""
    spec = pick_backbone(backbone, resolution, model)
    model = model or spec.repo
    parts = parts_of(model)
    cls = DENOISERS[spec.denoiser]
    config = read_json(fetch(model, f"{spec.denoiser}/config.json"))
    sdxl.check_family(config, spec.text_encoders == sdxl.TEXT_ENCODERS, f"{model}/{spec.denoiser}/config.json")
    unet = load_component(cls, model, spec.denoiser, dtype, device) if unet_file is None \
        else load_unet_file(unet_file, config, dtype, device, cls)
    kind = text_encoder_kind(read_json(fetch(parts, "text_encoder/config.json")))
    if spec.text_encoders == sdxl.TEXT_ENCODERS:
        text_encoder = sdxl.TextEncoders(*(load_text_encoder(parts, dtype, device, f) for f in sdxl.TEXT_ENCODERS))
        tokenizer = sdxl.Tokenizers(*(load_tokenizer(parts, kind, f) for f in sdxl.TOKENIZERS))
    else:
        text_encoder = None if kind in CACHED else load_text_encoder(parts, dtype, device)
        tokenizer = load_tokenizer(parts, kind)
    schedule = load_schedule(parts)
    autoencoder = None
    if vae and has_vae(parts):
        autoencoder = load_component(AutoencoderKL, parts, "vae", torch.float32, device, rename=rename_legacy_keys)
    return Pipeline(unet, autoencoder, text_encoder, tokenizer, schedule, spec.resolution, parts)


def load_text_encoder(model, dtype=torch.float32, device="cpu", folder="text_encoder"):
    """The text encoder of a repo's text_encoder/ (or `folder`: CLIP, CLIP with projection or T5, by
    its config), frozen."""
    cls, rename = TEXT_ENCODERS[text_encoder_kind(read_json(fetch(model, f"{folder}/config.json")))]
    return load_component(cls, model, folder, dtype, device, rename=rename)


def load_schedule(model):
    """The noise schedule of a model's `scheduler/scheduler_config.json` (in `parts_of(model)`); a LoadError
    naming the file for a setting this project does not implement."""
    path = fetch(parts_of(model), "scheduler/scheduler_config.json")
    try:
        return NoiseSchedule.from_config(read_json(path))
    except ValueError as e:
        raise LoadError(f"{path}: {e}") from None


def load_tokenizer(model, kind="clip", folder="tokenizer"):
    """The tokenizer of a repo's `tokenizer/` folder (or `folder`): T5's `spiece.model` (kind "t5"), else
    CLIP's files (see TOKENIZER_FILES)."""
    if kind == "t5":
        return T5Tokenizer(os.path.dirname(fetch(model, f"{folder}/spiece.model")))
    for files in TOKENIZER_FILES:
        try:
            paths = [fetch(model, f"{folder}/{name}") for name in files]
            break
        except MissingFile:
            continue
    else:
        raise LoadError(f"no tokenizer in {model}: {folder}/ needs vocab.json and merges.txt, or tokenizer.json")
    for name in TOKENIZER_SETTINGS:
        try:
            fetch(model, f"{folder}/{name}")
        except MissingFile:
            pass
    try:
        return CLIPTokenizer(os.path.dirname(paths[0]))
    except (ValueError, KeyError, OSError) as e:
        raise LoadError(f"cannot read the tokenizer of {model}: {type(e).__name__}: {e}") from None


def load_unet_file(path, cfg, dtype=torch.float32, device="cpu", cls=UNet):
    """A full denoiser state dict in diffusers keys (our exports, the official `rotated_unet-*.safetensors`
    or `rotated_transformer.safetensors`, or a pickled state dict such as DMD2's `pytorch_model.bin`, read
    with the weights-only loader) as a `cls` (UNet or PixArt) built from `cfg`. A file of the other family
    (a PixArt transformer for a U-Net or the reverse) is a LoadError saying so."""
    want = next(folder for folder, c in DENOISERS.items() if c is cls)
    with torch.device("meta"):
        unet = build(cls, cfg, f"{want}/config.json")
    state = read_tensors(path)
    for family, (key, name, backbones) in FAMILIES.items():
        if family != want and key in state and FAMILIES[want][0] not in state:
            raise LoadError(f"{path} is a {name} (it has {key}), not the {FAMILIES[want][1]} this backbone needs: "
                            f"it goes with --backbone {backbones}")
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_weights(unet, state, what=path)
    return unet.to(device).eval().requires_grad_(False)


def student_a_T(path):
    """The one-step noise level stored with an exported student, else the official constant."""
    return float(file_metadata(path).get("a_T", A_T)) if path else A_T


def image_grid(images, cols=None, labels=None, row_labels=None, min_cell=128):
    """uint8 images (N, H, W, 3) -> one PIL image, `cols` per row (default: about square). Images
    smaller than `min_cell` pixels are enlarged by a whole factor (nearest: a pixel stays a square of
    pixels), so a grid of 32 px toys is seen as it is; `labels` (one per image) are written under the
    images, `row_labels` (one per row) left of the rows."""
    n, h, w, _ = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    scale = max(1, min_cell // max(h, w))
    h, w = h * scale, w * scale
    font = ImageFont.load_default()
    char_w, line_h = font.getbbox("x")[2] + 1, font.getbbox("Xy")[3] + 3
    wrapped = [textwrap.wrap(t, max(1, (w - 4) // char_w)) for t in labels or []]
    label_h = max((len(lines) for lines in wrapped), default=0) * line_h + 4 * bool(labels)
    left = max((len(t) for t in row_labels or []), default=-1) * char_w + 8 if row_labels else 0
    grid = Image.new("RGB", (left + cols * w, rows * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        x, y = left + (i % cols) * w, (i // cols) * (h + label_h)
        grid.paste(Image.fromarray(im.repeat(scale, 0).repeat(scale, 1)), (x, y))
        for j, line in enumerate(wrapped[i] if labels else []):
            draw.text((x + 2, y + h + 2 + j * line_h), line, fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, r * (h + label_h) + h // 2 - line_h // 2), text, fill="black", font=font)
    return grid
