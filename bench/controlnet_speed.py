"""Time sampling with a ControlNet: the one-step student against the 50-step DDIM teacher with CFG (the paper's
poster, Fig. 5: 0.65 s against 4.73 s on SD1.5), both through `Pipeline.generate` with the same ControlNet,
prompts, seeds and control image, so that the figures include text encoding and decoding, as a user waits
for them. The student has the teacher's architecture (a merged LoRaD student costs what the teacher does), so
--config small and sd15 time the teacher's network in both roles, with random weights (no download).

  toy    the shipped toy backbone (assets/toy: 32 px, pixel space) and its ControlNet (assets/toy/controlnet);
         --student FILE uses a distilled student (default: the teacher in its place)
  small  an SD-shaped pipeline at 128 px: bench/vsd_step.py's reduced U-Net (64, 128, 128), its ControlNet
         (SD's conditioning embedding, 8x down), a 2-layer CLIP text encoder, a 4-level VAE (32..128 wide)
  sd15   the real SD1.5 configs (configs/sd15, configs/sd-controlnet-canny) at 512 px: for a GPU

The text has 77 tokens except on the toy (16, its tokenizer's length). Each mode runs --warmup untimed calls,
then --repeats timed ones, alternating between the modes so that a change in a shared machine's load hits both;
the medians and their ratio are printed (CUDA is synchronised around each call), and with --json FILE written
as JSON (bench/gpu_check.py reads them).

    python bench/controlnet_speed.py --config toy --threads 1 --repeats 5
    python bench/controlnet_speed.py --config small --threads 1 --repeats 3
    python bench/controlnet_speed.py --config sd15 --device cuda --dtype fp16 --repeats 10
"""
import argparse
import dataclasses
import json
import os
import shlex
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import toy
from bpe import CLIPTokenizer
from clip import CLIPTextModel
from controlnet import ControlNet, load_controlnet
from diffusion import NoiseSchedule
from pipeline import BACKBONES, DTYPES, Pipeline, load_pipeline, load_unet_file
from unet import UNet
from vae import AutoencoderKL

SMALL_UNET = json.load(open(os.path.join(ROOT, "configs", "sd15", "unet", "config.json")))
SMALL_UNET.update({"block_out_channels": [64, 128, 128], "attention_head_dim": 4, "cross_attention_dim": 64,
                   "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]})
SMALL_TEXT = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL_VAE = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1}
RESOLUTION = {"toy": 32, "small": 128, "sd15": 512}


def read(*path):
    with open(os.path.join(ROOT, "configs", *path)) as f:
        return json.load(f)


def sd_tokenizer(directory):
    """The toy's word-level tokenizer, padded to SD's 77 tokens, written to `directory` (SD's vocabulary is
    not in configs/)."""
    toy.write_tokenizer(directory)
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 77}, f)
    return directory


def sd_pipeline(config, dtype, device, tokenizer_dir, with_controlnet=True):
    """A Stable-Diffusion-shaped pipeline and ControlNet (None without `with_controlnet`) with random
    weights, built on `device`."""
    small = config == "small"
    unet_cfg = SMALL_UNET if small else read("sd15", "unet", "config.json")
    text_cfg = {**read("sd15", "text_encoder", "config.json"), **(SMALL_TEXT if small else {})}
    vae_cfg = {**read("sd15", "vae", "config.json"), **(SMALL_VAE if small else {})}
    with torch.device(device):
        unet = UNet.from_config(unet_cfg)
        controlnet = None if not with_controlnet else ControlNet.from_config(unet_cfg) if small else \
            ControlNet.from_config(read("sd-controlnet-canny", "config.json"))
        text, vae = CLIPTextModel.from_config(text_cfg), AutoencoderKL.from_config(vae_cfg)
    with open(os.path.join(ROOT, "configs", "sd15", "scheduler", "scheduler_config.json")) as f:
        schedule = NoiseSchedule.from_config(json.load(f))
    nets = [n.to(dtype).eval().requires_grad_(False) for n in (unet, text, controlnet) if n is not None]
    pipe = Pipeline(nets[0], vae.eval().requires_grad_(False), nets[1], CLIPTokenizer(tokenizer_dir), schedule,
                    RESOLUTION[config])
    return pipe, pipe.denoiser, controlnet and nets[2]


def toy_pipeline(student, controlnet, dtype, device):
    pipe = load_pipeline("toy", dtype=dtype, device=device)
    unet_cfg = os.path.join(BACKBONES["toy"].repo, "unet", "config.json")
    with open(unet_cfg) as f:
        student = load_unet_file(student, json.load(f), dtype, device) if student else pipe.denoiser
    controlnet = load_controlnet(controlnet or os.path.join(BACKBONES["toy"].repo, "controlnet"), pipe.denoiser,
                                 pipe.downsampling(), dtype, device)
    return pipe, student, controlnet


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(RESOLUTION), default="toy")
    p.add_argument("--student", help="toy: a distilled student (wadi.py train's student.safetensors)")
    p.add_argument("--controlnet", help="toy: the ControlNet (default: assets/toy/controlnet)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per call")
    p.add_argument("--steps", type=int, default=50, help="the teacher's DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="the teacher's CFG scale")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        if args.config == "toy":
            pipe, student, controlnet = toy_pipeline(args.student, args.controlnet, dtype, device)
        else:
            pipe, student, controlnet = sd_pipeline(args.config, dtype, device, sd_tokenizer(tokenizer_dir))
    attributes = toy.balanced_attributes(args.batch_size)
    prompts, seeds = [toy.unplaced_prompt(a) for a in attributes], list(range(args.batch_size))
    image = torch.rand(1, 3, pipe.resolution, pipe.resolution, generator=torch.Generator().manual_seed(0))
    student_pipe = dataclasses.replace(pipe, denoiser=student)
    modes = {
        "student, 1 step + ControlNet": lambda: student_pipe.generate(prompts, seeds, 1, controlnet=controlnet,
                                                                      control_image=image),
        f"teacher, {args.steps}-step DDIM + CFG {args.guidance:g} + ControlNet": lambda: pipe.generate(
            prompts, seeds, args.steps, args.guidance, controlnet=controlnet, control_image=image)}
    load_before = os.getloadavg()
    times = {name: [] for name in modes}
    for i in range(args.warmup + args.repeats):
        for name, fn in modes.items():
            elapsed = timed(fn, device)
            if i >= args.warmup:
                times[name].append(elapsed)
    load_after = os.getloadavg()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = sum(t.numel() for t in pipe.denoiser.parameters()) / 1e6, sum(t.numel() for t in controlnet.parameters()) / 1e6
    print(f"$ {shlex.join(['python', 'bench/controlnet_speed.py', *(argv or sys.argv[1:])])}")
    print(f"config {args.config}: {pipe.resolution} px, batch {args.batch_size}, {args.dtype}, U-Net {params[0]:.2f}M, "
          f"ControlNet {params[1]:.2f}M; {where}, torch {torch.__version__}; load average (1 min) "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    print("\n| mode | s per call: median (min-max) |\n| --- | --- |")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} ({min(t):.3f}-{max(t):.3f}) |")
    one, many = (statistics.median(t) for t in times.values())
    print(f"\nteacher / student: {many / one:.1f}x ({100 * (1 - one / many):.2f}% less time)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "resolution": pipe.resolution, "batch_size": args.batch_size,
                       "dtype": args.dtype, "device": where, "torch": torch.__version__,
                       "seconds": {name: statistics.median(t) for name, t in times.items()},
                       "ratio": many / one}, f, indent=1)
    return many / one


if __name__ == "__main__":
    main()
