"""One-step sampling latency (paper Sec. 3.3's generator x0 = (z - sqrt(1 - a_T) eps(z, 999)) / sqrt(a_T)):
ours against the same computation written with diffusers / transformers, as the official inference script
(infer_sd_model.py) does it, both on the same random weights (no download).

  SD (--config sd15, small): prompt -> CLIP -> U-Net -> x0 -> VAE decode -> uint8 image. Ours is
      Pipeline.generate(prompts, seeds, steps=1); the reference transformers' CLIPTextModel, diffusers'
      UNet2DConditionModel and AutoencoderKL on the same token ids and noise.
  PixArt (--config pixart, pixart-small): T5 embeddings (120 tokens, 40 valid) -> DiT -> x0 -> VAE decode.
      T5 XXL encodes each prompt once into the prompt cache (textcache.py), so sampling starts from the
      embeddings; ours is diffusion.one_step on dit.PixArt and Pipeline.decode, the reference diffusers'
      PixArtTransformer2DModel and AutoencoderKL.

The denoiser and text encoder run in --dtype, the VAE in fp32 on both sides (as load_pipeline loads it); the
text tokens come from the toy's word-level tokenizer padded to 77 (SD's vocabulary is not in configs/). Per
config: --warmup untimed calls, then --repeats timed ones, alternating (CUDA synchronised around each);
the medians, their ratio and the largest difference between the two images (uint8 levels) are printed,
and with --json FILE written as JSON (bench/gpu_check.py reads them).

    python bench/one_step.py --config sd15 pixart --device cuda --dtype bf16
    python bench/one_step.py --config small pixart-small --threads 1
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import torch
import transformers
from diffusers import AutoencoderKL as ReferenceVAE, PixArtTransformer2DModel, UNet2DConditionModel

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from controlnet_speed import SMALL_TEXT, SMALL_UNET, SMALL_VAE, read, sd_tokenizer  # noqa: E402 (and the repo on the path)
from vsd_step import SMALL_DIT  # noqa: E402
import toy  # noqa: E402
from bpe import CLIPTokenizer  # noqa: E402
from clip import CLIPTextModel, convert_text_state_dict  # noqa: E402
from diffusion import A_T, T_MAX, NoiseSchedule, Text, one_step  # noqa: E402
from dit import PixArt  # noqa: E402
from loading import load_weights  # noqa: E402
from pipeline import DTYPES, Pipeline, seeded_noise  # noqa: E402
from unet import UNet  # noqa: E402
from vae import AutoencoderKL  # noqa: E402

RESOLUTION = {"small": 128, "sd15": 512, "pixart-small": 128, "pixart": 256}
T5_TOKENS, T5_VALID = 120, 40


def ours_from(cls, reference, cfg, dtype, convert=dict):
    """Our network `cls` from `cfg`, holding the reference network's weights."""
    with torch.device("meta"):
        net = cls.from_config(cfg)
    return load_weights(net, convert(reference.state_dict()), dtype=dtype).eval().requires_grad_(False)


def build(config, dtype, device, tokenizer_dir):
    """(ours: a function of (prompts, seeds) -> uint8 images, the reference's, parameter counts)."""
    pixart = config.startswith("pixart")
    vae_cfg = {**read("sd15", "vae", "config.json"), **(SMALL_VAE if "small" in config else {})}
    if pixart:
        cfg = SMALL_DIT if config == "pixart-small" else read("pixart-256", "transformer", "config.json")
        cfg = {k: v for k, v in cfg.items() if k != "_class_name"}
    else:
        cfg = SMALL_UNET if config == "small" else read("sd15", "unet", "config.json")
    with torch.device(device):
        ref = (PixArtTransformer2DModel if pixart else UNet2DConditionModel).from_config(cfg).to(dtype).eval()
        ref_vae = ReferenceVAE.from_config(vae_cfg).eval()
    denoiser = ours_from(PixArt if pixart else UNet, ref, cfg, dtype)
    vae = ours_from(AutoencoderKL, ref_vae, vae_cfg, torch.float32)
    resolution, a = RESOLUTION[config], A_T
    schedule = NoiseSchedule.from_config(read("pixart-256" if pixart else "sd15", "scheduler", "scheduler_config.json"))
    shape = (cfg["in_channels"], resolution // 8, resolution // 8)
    to_uint8 = lambda x: ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()  # noqa: E731
    counts = {"denoiser": sum(p.numel() for p in ref.parameters()), "vae": sum(p.numel() for p in ref_vae.parameters())}

    if pixart:
        g = torch.Generator(device).manual_seed(1)
        embeds = torch.randn(1, T5_TOKENS, cfg["caption_channels"], generator=g, device=device).to(dtype)
        mask = (torch.arange(T5_TOKENS, device=device) < T5_VALID).long()[None]
        pipe = Pipeline(denoiser, vae, None, None, schedule, resolution)

        def ours(prompts, seeds):
            z = seeded_noise(shape, seeds).to(device, dtype)
            text = Text(embeds.expand(len(seeds), -1, -1), mask.expand(len(seeds), -1))
            return torch.from_numpy(pipe.decode(one_step(denoiser, z, text, schedule.prediction_type, a)))

        def reference(prompts, seeds):
            z = seeded_noise(shape, seeds).to(device, dtype)
            t = torch.full((len(seeds),), T_MAX, device=device)
            eps = ref(z, encoder_hidden_states=embeds.expand(len(seeds), -1, -1), timestep=t,
                      encoder_attention_mask=mask.expand(len(seeds), -1),
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :shape[0]]
            x0 = (z.float() - math.sqrt(1 - a) * eps.float()) / math.sqrt(a)
            return to_uint8(ref_vae.decode(x0 / ref_vae.config.scaling_factor).sample)
        return ours, reference, counts

    text_cfg = {**read("sd15", "text_encoder", "config.json"), **(SMALL_TEXT if config == "small" else {})}
    with torch.device(device):
        ref_text = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(text_cfg)).to(dtype).eval()
    text = ours_from(CLIPTextModel, ref_text, text_cfg, dtype, convert_text_state_dict)
    counts["text_encoder"] = sum(p.numel() for p in ref_text.parameters())
    tokenizer = CLIPTokenizer(tokenizer_dir)
    pipe = Pipeline(denoiser, vae, text, tokenizer, schedule, resolution)

    def ours(prompts, seeds):
        return torch.from_numpy(pipe.generate(prompts, seeds, 1, a_T=a))

    def reference(prompts, seeds):
        z = seeded_noise(shape, seeds).to(device, dtype)
        embeds = ref_text(tokenizer(prompts).to(device)).last_hidden_state
        eps = ref(z, T_MAX, embeds).sample
        x0 = (z.float() - math.sqrt(1 - a) * eps.float()) / math.sqrt(a)
        return to_uint8(ref_vae.decode(x0 / ref_vae.config.scaling_factor).sample)
    return ours, reference, counts


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", choices=sorted(RESOLUTION), default=["small"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--batch-size", type=int, default=1, help="images per call")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    prompts = [toy.unplaced_prompt(a) for a in toy.balanced_attributes(args.batch_size)]
    seeds = list(range(args.batch_size))
    results = {}
    print(f"one-step latency, batch {args.batch_size}, {args.dtype} (VAE fp32); {where}, torch {torch.__version__}")
    print("\n| config | ours: s per call | diffusers / transformers: s per call | reference / ours | "
          "largest image difference |\n| --- | --- | --- | --- | --- |")
    for config in args.config:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            ours, reference, counts = build(config, dtype, device, sd_tokenizer(tokenizer_dir))
        times, images = {"ours": [], "reference": []}, {}
        for i in range(args.warmup + args.repeats):
            for name, fn in (("ours", ours), ("reference", reference)):
                elapsed, images[name] = timed(lambda: fn(prompts, seeds), device)
                if i >= args.warmup:
                    times[name].append(elapsed)
        medians = {name: statistics.median(t) for name, t in times.items()}
        diff = (images["ours"].int() - images["reference"].int()).abs().max().item()
        results[config] = {**{f"{k}_s": v for k, v in medians.items()}, "ratio": medians["reference"] / medians["ours"],
                           "max_image_diff": diff, "resolution": RESOLUTION[config], "parameters": counts}
        print(f"| {config} ({RESOLUTION[config]} px) | {medians['ours']:.4f} | {medians['reference']:.4f} | "
              f"{medians['reference'] / medians['ours']:.2f}x | {diff} |")
        del ours, reference
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch_size": args.batch_size, "dtype": args.dtype, "device": where, "torch": torch.__version__,
                       "configs": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
