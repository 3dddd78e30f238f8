"""VAE decoding at large sizes: peak memory and time of decoding one latent with Stable Diffusion's
VAE (the built-in SD1.5 config, random weights) at each --sizes HxW, each in a fresh process. It
backs `Pipeline.decode`'s rule (at most one 1024x1024 image's pixels per call) and the high-resolution
sampling of docs/highres.md.

Peak memory is bench/memory.py's: on the CPU the growth of the resident set's peak over what the
process held before the call; on CUDA torch.cuda.max_memory_allocated over memory_allocated.

    python bench/vae_decode.py --sizes 512x512 1024x1024 1024x1792 --device cpu --threads 2
    python bench/vae_decode.py --sizes 1024x1024 1280x1280 1024x1792 2048x2048 --device cuda --dtype fp16
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
sys.path.insert(0, BENCH)
from memory import peak_growth  # noqa: E402
from loading import read_json  # noqa: E402
from pipeline import BACKBONES, DTYPES  # noqa: E402
from vae import AutoencoderKL  # noqa: E402


def worker(size, device, dtype):
    """{"size", "peak_bytes", "seconds"} of one decode of a (1, 4, H/8, W/8) latent."""
    height, width = (int(s) for s in size.split("x"))
    cfg = read_json(os.path.join(BACKBONES["sd15"].configs, "vae", "config.json"))
    vae = AutoencoderKL.from_config(cfg).to(device, dtype).eval()
    z = torch.randn(1, 4, height // 8, width // 8, device=device, dtype=dtype)
    start = time.perf_counter()
    with torch.no_grad():
        image, peak = peak_growth(lambda: vae.decode(z), device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert image.shape[-2:] == (height, width)
    return {"size": size, "peak_bytes": peak, "seconds": time.perf_counter() - start}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "1024x1792"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, torch.device(args.device), DTYPES[args.dtype])))
        return
    print(f"| size | peak memory over the weights | seconds ({args.device}, {args.dtype}, {args.threads} threads) |")
    print("|---|---|---|")
    for size in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--worker", size, "--device", args.device, "--dtype",
                              args.dtype, "--threads", str(args.threads)], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {size} | {row['peak_bytes'] / 2 ** 30:.2f} GiB | {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
