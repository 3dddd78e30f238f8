"""Time one VSD training step (paper Sec. 3.3) of our loop against a re-creation of the official one,
on the SD1.5 U-Net or PixArt-alpha's DiT (--config sd15 / pixart: the built-in full configs; small /
pixart-small: reduced ones for CPUs).

A step is what vsd.train does per batch, minus data loading and text encoding (the text embeddings are
random tensors of the right shape): the student's one-step forward and backward, the four no-grad CFG
passes (teacher and fake score network, each with and without the prompt), the fake score network's own
forward and backward (PixArt: 120 T5 tokens of which 40 valid, 1 for ""; SD: 77 CLIP tokens), gradient clipping and the two AdamW steps (torch's default AdamW in both styles, as the
official loop; vsd.train's is fused, vsd.ADAMW). Per style we report images/s and the
median ms/step over --steps steps after --warmup untimed ones, the peak memory and the weight bytes held.

  ours      unet.UNet is the teacher; the student and the fake score network come from
            vsd.build_networks (adapters over ONE shared frozen copy); a step is vsd.generator_loss (CFG as
            one batch of cond + uncond) and its backward, then vsd.fake_loss and its backward, clipping, two AdamW steps, as in vsd.train.
  official  a RE-CREATION, for measurement only, of the official training loop (github.com/gudaochangsheng/
            WaDi, train_dkd_sd.py and train_dkd_dit.py), written here from a description of it: three
            diffusers UNet2DConditionModel (or PixArtTransformer2DModel) instances (teacher, student, fake),
            each with its own copy of the weights; LoRaD as a forward hook on every nn.Linear that our
            adapters target (lorad.LAYERS), which throws the layer's output
            away and calls F.linear again with a rotated weight (wrapped angles, torch.empty_like and
            strided assignment, bias added afterwards); CFG as two separate calls; the student's backward
            and optimizer step come before the fake score network's forward. Kept as ours, so that both
            compute the same numbers: the frozen weights in --dtype (the official loads them in fp16) and
            vsd.draw's per-sample empty prompt (the official empties the whole batch's with probability 0.1).

Both styles start from the same weights (our seeded U-Net, its state dict loaded into the diffusers models),
the same adapter values (theta_a drawn away from zero, so that the score difference g is not 0) and the same
random draws; the first step's loss_G and loss_fake of the two are printed side by side.

Each style runs in its own subprocess, so that neither sees the other's memory; --repeats runs them again,
alternating, and pools the timed steps (on a shared machine the load drifts between runs). Peak memory is
torch.cuda.max_memory_allocated on CUDA; on CPU it is the growth of the resident set size (the peak over the
steps, reset through /proc/self/clear_refs once the networks are built, minus the size before building):
weights, optimizer state, activations and allocator slack. "weights held" counts each parameter or buffer
storage once, however many networks use it. "CPU time" is the process's CPU time per step: on a shared CPU
machine it leaves out the time spent waiting for a core (on CUDA it only shows the host side). GFLOP/step is
torch's FlopCounterMode over one more step: matmuls and convolutions, plus attention where the counter knows
the kernel (on CUDA, not on CPU); it does not depend on the machine's load. --json FILE also writes the
figures as JSON (bench/gpu_check.py reads them).

    python bench/vsd_step.py --config small --device cpu --threads 1 --repeats 2 --steps 3 --warmup 1
    python bench/vsd_step.py --config sd15 --device cuda --dtype bf16 --batch-size 16 --resolution 512 \
        --grad-checkpointing --repeats 3
    python bench/vsd_step.py --config pixart --device cuda --dtype bf16 --grad-checkpointing
"""
import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel, UNet2DConditionModel  # the official style's networks
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from diffusion import A_T, T_MAX, NoiseSchedule, Text
from dit import PixArt
from lorad import adapter_state_dict
from unet import UNet
from vsd import VSDConfig, build_networks, draw, fake_loss, generator_loss

# a reduced SD1.5-shaped U-Net (diffusers config keys) for CPU runs
SMALL = {"block_out_channels": [64, 128, 128], "layers_per_block": 2, "attention_head_dim": 4,
         "cross_attention_dim": 64, "norm_num_groups": 32, "in_channels": 4, "out_channels": 4, "sample_size": 16,
         "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
         "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
# a reduced PixArt-alpha (diffusers config keys): 2 blocks of width 64, 16 x 16 latents
SMALL_DIT = {"num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4, "out_channels": 8,
             "num_layers": 2, "cross_attention_dim": 64, "attention_bias": True, "sample_size": 16,
             "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
             "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
             "caption_channels": 64}
# per config: resolution, batch size, student rank, fake score rank (small: the SD1.5 ranks / 8; PixArt:
# the paper's 128 and our fake score rank, 32; pixart-small: / 8)
DEFAULTS = {"small": (128, 4, 32, 4), "sd15": (512, 16, 256, 32), "pixart-small": (128, 4, 16, 4),
            "pixart": (256, 16, 128, 32)}
# text tokens of CLIP (SD) and of T5 (PixArt), of which a prompt's and "" are valid (T5's mask)
TEXT = {"unet": (77, None, None), "dit": (120, 40, 1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(DEFAULTS), default="small",
                   help="small / pixart-small: a reduced SD U-Net / PixArt DiT for CPUs; sd15, pixart: "
                        "configs/sd15/unet, configs/pixart-256/transformer")
    p.add_argument("--batch-size", type=int, help="sd15: 16, small: 4")
    p.add_argument("--resolution", type=int,
                   help="image side in pixels, latents are 1/8 of it (sd15: 512, small: 128)")
    p.add_argument("--rank", type=int, help="student LoRaD rank (sd15: 256, small: 32)")
    p.add_argument("--rank-fake", type=int, help="fake score LoRaD rank (sd15: 32, small: 4)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--style", choices=["ours", "official", "both"], default="both")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="CPU threads (on a loaded machine 1 avoids OpenMP threads waiting on each other)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each style this many times, alternating, and pool the timed steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one style, one JSON line
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    resolution, batch, rank, rank_fake = DEFAULTS[args.config]
    args.resolution = args.resolution or resolution
    args.batch_size = args.batch_size or batch
    args.rank = args.rank or rank
    args.rank_fake = args.rank_fake or rank_fake
    return args


def read_config(*path):
    with open(os.path.join(ROOT, "configs", *path)) as f:
        return json.load(f)


def denoiser_config(name):
    """(diffusers config, family, schedule) of --config."""
    if name.startswith("pixart"):
        cfg = SMALL_DIT if name == "pixart-small" else read_config("pixart-256", "transformer", "config.json")
        return cfg, "dit", read_config("pixart-256", "scheduler", "scheduler_config.json")
    cfg = SMALL if name == "small" else read_config("sd15", "unet", "config.json")
    return cfg, "unet", read_config("sd15", "scheduler", "scheduler_config.json")


def rss_kib(field="VmRSS"):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def held_bytes(nets):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for net in nets for t in [*net.parameters(), *net.buffers()]}
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------------
# ours

def build_ours(cfg, args, device, dtype):
    """(student, teacher, fake) as vsd.train builds them, adapters drawn away from the identity."""
    torch.manual_seed(args.seed)
    with device:
        teacher = (PixArt if args.config.startswith("pixart") else UNet).from_config(cfg)
    teacher.to(dtype).eval()
    student, fake = build_networks(teacher, args.rank, args.rank_fake)
    with torch.no_grad():
        for k, p in [*adapter_state_dict(student).items(), *adapter_state_dict(fake).items()]:
            if k.endswith("theta_a"):
                p.normal_(0, 0.05)
    for net in (student, fake):
        net.train()
        net.gradient_checkpointing = args.grad_checkpointing
    return student, teacher, fake


def step_ours(nets, opts, schedule, c, c_null, d, vsd, autocast):
    student, teacher, fake = nets
    c, c_null = Text(*c), Text(*c_null)
    with autocast:
        loss_g, x0 = generator_loss(student, teacher, fake, schedule, c, c_null, d, vsd)
    loss_g.backward()
    with autocast:
        loss_fake = fake_loss(fake, schedule, x0, c, c_null, d)
    loss_fake.backward()
    for opt in opts:
        torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], vsd.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_g.detach(), loss_fake.detach()


# ---------------------------------------------------------------------------------------------------
# the official style (a re-creation for measurement, see the module docstring)

def lorad_hook(module, inputs, output):
    """LoRaD as a forward hook: `output`, the frozen layer's own result, is discarded."""
    W = module.weight
    theta = module.theta_a @ module.theta_b
    theta = (theta + math.pi) % (2 * math.pi) - math.pi
    cos, sin = theta.cos(), theta.sin()
    rotated = torch.empty_like(W)
    rotated[:, 0::2] = W[:, 0::2] * cos - W[:, 1::2] * sin
    rotated[:, 1::2] = W[:, 0::2] * sin + W[:, 1::2] * cos
    out = F.linear(inputs[0], rotated)
    if module.bias is not None:
        out += module.bias
    return out


def hook_adapters(net, adapters):
    """Give every nn.Linear that our `adapters` name (same module paths: diffusers keys) fp32 `theta_a`,
    `theta_b` parameters with their values, and the LoRaD hook."""
    modules = dict(net.named_modules())
    for name in sorted({k.rsplit(".", 1)[0] for k in adapters}):
        m = modules[name]
        assert isinstance(m, nn.Linear), name
        m.theta_a = nn.Parameter(adapters[f"{name}.theta_a"].detach().clone())
        m.theta_b = nn.Parameter(adapters[f"{name}.theta_b"].detach().clone())
        m.register_forward_hook(lorad_hook)


def build_official(cfg, args, device, dtype):
    """Three diffusers denoisers, each with its own copy of the weights of `build_ours`."""
    student, teacher, fake = build_ours(cfg, args, device, dtype)
    state = teacher.state_dict()
    hooks = {"student": adapter_state_dict(student), "teacher": None, "fake": adapter_state_dict(fake)}
    reference = PixArtTransformer2DModel if args.config.startswith("pixart") else UNet2DConditionModel
    nets = []
    for role, adapters in hooks.items():
        with torch.device("meta"):
            net = reference.from_config({k: v for k, v in cfg.items() if k != "_class_name"})
        net.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
        net.requires_grad_(False)
        if role != "teacher":
            hook_adapters(net, adapters)
            net.train()
            if args.grad_checkpointing:
                net.enable_gradient_checkpointing()
        nets.append(net)
    return nets


def call(net, x, t, text):
    """A diffusers denoiser's noise prediction under text (embeddings, mask): the U-Net's, or the first
    C channels of PixArt's (the rest is its learned variance)."""
    embeds, mask = text
    if isinstance(net, UNet2DConditionModel):
        return net(x, t, embeds).sample
    return net(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample[:, :x.shape[1]]


def step_official(nets, opts, schedule, c, c_null, d, vsd, autocast):
    student, teacher, fake = nets
    opt_student, opt_fake = opts
    s, dtype = vsd.guidance, c[0].dtype
    with autocast:
        z = d["z"].to(dtype)
        x0 = (z.float() - math.sqrt(1 - A_T) * call(student, z, torch.full_like(d["t"], T_MAX), c).float()) \
            / math.sqrt(A_T)
        xt = schedule.add_noise(x0.detach(), d["eps"], d["t"]).to(dtype)
        a = schedule.alpha(d["t"], xt)
        with torch.no_grad():
            cond, uncond = call(teacher, xt, d["t"], c), call(teacher, xt, d["t"], c_null)
            eps_real = (uncond + s * (cond - uncond)).float()
            cond, uncond = call(fake, xt, d["t"], c), call(fake, xt, d["t"], c_null)
            eps_fake = (uncond + s * (cond - uncond)).float()
            g = torch.nan_to_num((1 - a) * (eps_real - eps_fake))
        loss_g = 0.5 * F.mse_loss(x0, (x0 - g).detach())
    loss_g.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), vsd.max_grad_norm)
    opt_student.step()
    opt_student.zero_grad(set_to_none=False)

    with autocast:
        xt = schedule.add_noise(x0.detach(), d["eps_fake"], d["t_fake"])
        a = schedule.alpha(d["t_fake"], xt)
        drop = d["drop"]
        prompt = (torch.where(drop[:, None, None], c_null[0], c[0]),
                  None if c[1] is None else torch.where(drop[:, None], c_null[1], c[1]))
        pred = call(fake, xt.to(dtype), d["t_fake"], prompt).float()
        loss_fake = F.mse_loss(a.sqrt() * pred, a.sqrt() * d["eps_fake"])
    loss_fake.backward()
    torch.nn.utils.clip_grad_norm_(fake.parameters(), vsd.max_grad_norm)
    opt_fake.step()
    opt_fake.zero_grad(set_to_none=False)
    return loss_g.detach(), loss_fake.detach()


# ---------------------------------------------------------------------------------------------------
# one style in this process

def measure(args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg, family, schedule = denoiser_config(args.config)
    schedule = NoiseSchedule.from_config(schedule)
    vsd = VSDConfig()
    rss_before = rss_kib()

    if args.style == "ours":
        nets, step = build_ours(cfg, args, device, dtype), step_ours
        params = [[p for p in net.parameters() if p.requires_grad] for net in (nets[0], nets[2])]
    else:
        nets, step = build_official(cfg, args, device, dtype), step_official
        params = [nets[0].parameters(), nets[2].parameters()]  # the official optimizers get every parameter
    adamw = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    opts = [torch.optim.AdamW(params[0], lr=1e-4, **adamw), torch.optim.AdamW(params[1], lr=1e-2, **adamw)]
    weights = held_bytes(nets)
    trainable = [sum(p.numel() for p in net.parameters() if p.requires_grad) for net in (nets[0], nets[2])]

    text, (tokens, valid, valid_null) = torch.Generator(device).manual_seed(args.seed), TEXT[family]
    width = cfg["caption_channels"] if family == "dit" else cfg["cross_attention_dim"]
    c = torch.randn(args.batch_size, tokens, width, generator=text, device=device).to(dtype)
    c_null = torch.randn(1, tokens, width, generator=text, device=device).to(dtype)
    c_null = c_null.expand(args.batch_size, -1, -1)
    masks = [None if n is None else (torch.arange(tokens, device=device) < n).long().expand(args.batch_size, -1)
             for n in (valid, valid_null)]
    c, c_null = (c, masks[0]), (c_null, masks[1])
    shape = (cfg["in_channels"], args.resolution // 8, args.resolution // 8)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    cuda = device.type == "cuda"

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident set size (VmHWM)
    times, cpu_times, first = [], [], None
    for i in range(args.warmup + args.steps):
        d = draw(torch.Generator(device).manual_seed(args.seed + i), args.batch_size, shape, vsd)
        if cuda:
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        losses = step(nets, opts, schedule, c, c_null, d, vsd, autocast)
        if cuda:
            torch.cuda.synchronize()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if i == 0:
            first = [x.item() for x in losses]
        if i >= args.warmup:
            times.append(elapsed)
            cpu_times.append(elapsed_cpu)
        print(f"  {args.style} step {i + 1}/{args.warmup + args.steps}: {elapsed * 1e3:.0f} ms, CPU time "
              f"{elapsed_cpu * 1e3:.0f} ms{' (warm-up)' if i < args.warmup else ''}", file=sys.stderr, flush=True)
    peak = torch.cuda.max_memory_allocated() if cuda else (rss_kib("VmHWM") - rss_before) * 1024
    with FlopCounterMode(display=False) as flops:  # one more step, counted: independent of the machine's load
        step(nets, opts, schedule, c, c_null, d, vsd, autocast)
    return dict(style=args.style, ms=[t * 1e3 for t in times], cpu_ms=[t * 1e3 for t in cpu_times],
                peak_bytes=peak, weight_bytes=weights, flops=flops.get_total_flops(), trainable=trainable,
                loss_g=first[0], loss_fake=first[1], torch=torch.__version__,
                device=torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads")


# ---------------------------------------------------------------------------------------------------
# the driver: one subprocess per style, then the table

def worker_argv(args, style):
    argv = ["--config", args.config, "--batch-size", args.batch_size, "--resolution", args.resolution,
            "--rank", args.rank, "--rank-fake", args.rank_fake, "--dtype", args.dtype, "--steps", args.steps,
            "--warmup", args.warmup, "--device", args.device, "--threads", args.threads, "--seed", args.seed,
            "--style", style, "--worker"]
    return [sys.executable, os.path.abspath(__file__), *map(str, argv)] + \
        (["--grad-checkpointing"] if args.grad_checkpointing else [])


def main():
    args = parse_args()
    if args.worker:
        try:
            print(json.dumps(measure(args)))
        except torch.OutOfMemoryError as e:
            sys.exit(f"error: {args.style}: out of memory ({str(e).splitlines()[0]})")
        return 0
    styles = ["ours", "official"] if args.style == "both" else [args.style]
    load_before = os.getloadavg()
    runs, failed = {style: [] for style in styles}, {}
    for _ in range(args.repeats):  # the styles alternate, so that a change in the machine's load hits both
        for style in [s for s in styles if s not in failed]:
            out = subprocess.run(worker_argv(args, style), stdout=subprocess.PIPE, text=True, check=False)
            if out.returncode:
                failed[style] = out.returncode
            else:
                runs[style].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    if len(failed) == len(styles):
        sys.exit(f"error: every style failed (exit codes {failed}); see the messages above")

    first = next(results[0] for results in runs.values() if results)
    print(f"\n$ {shlex.join(['python', 'bench/vsd_step.py', *sys.argv[1:]])}")
    print(f"config {args.config}, batch {args.batch_size}, {args.resolution}px (latents {args.resolution // 8}x"
          f"{args.resolution // 8}), {args.dtype}, ranks {args.rank}/{args.rank_fake} (trainable: student "
          f"{first['trainable'][0] / 1e6:.2f}M, fake score {first['trainable'][1] / 1e6:.2f}M), grad checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}; {args.repeats} run(s) per style of {args.warmup} warm-up + "
          f"{args.steps} timed steps")
    print(f"{first['device']}, torch {first['torch']}; load average (1 min) {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs")
    memory = "peak CUDA memory" if args.device == "cuda" else "peak RSS growth"
    columns = ["style", "images/s", "ms/step: median (min-max)", "per-run medians", "CPU time ms/step", memory,
               "weights held", "GFLOP/step"]
    rows, summary = [], {}
    for style, results in runs.items():
        if style in failed:
            rows.append([style, f"failed (exit {failed[style]}), see its message above", *[""] * 6])
            continue
        ms, cpu_ms = [t for r in results for t in r["ms"]], [t for r in results for t in r["cpu_ms"]]
        s = summary[style] = dict(ms=statistics.median(ms), cpu_ms=statistics.median(cpu_ms),
                                  peak=max(r["peak_bytes"] for r in results), weights=results[0]["weight_bytes"],
                                  flops=results[0]["flops"])
        rows.append([style, f"{args.batch_size / s['ms'] * 1e3:.2f}", f"{s['ms']:.0f} ({min(ms):.0f}-{max(ms):.0f})",
                     ", ".join(f"{statistics.median(r['ms']):.0f}" for r in results), f"{s['cpu_ms']:.0f}",
                     f"{s['peak'] / 2**20:,.0f} MiB", f"{s['weights'] / 2**20:,.0f} MiB", f"{s['flops'] / 1e9:,.1f}"])
    print()
    for row in [columns, ["---"] * len(columns), *rows]:
        print("| " + " | ".join(row) + " |")
    if len(summary) == 2:
        ours, official = summary["ours"], summary["official"]
        print("\nofficial / ours: " + ", ".join(f"{name} {official[key] / ours[key]:.2f}x" for key, name in
                                                (("ms", "ms/step"), ("cpu_ms", "CPU time"), ("peak", memory),
                                                 ("weights", "weights held"), ("flops", "GFLOP/step"))))
        for key in ("loss_g", "loss_fake"):  # in bf16, batched and separate CFG calls round differently
            a, b = runs["ours"][0][key], runs["official"][0][key]
            relative = abs(a - b) / max(abs(b), 1e-30)
            verdict = "" if args.dtype != "fp32" else ", equal within 1e-4" if relative < 1e-4 else ", DIFFERENT"
            print(f"first step {key}: ours {a:.8g}, official {b:.8g}, |diff| {abs(a - b):.1e} "
                  f"(relative {relative:.1e}{verdict})")
    if args.json:
        styles = {style: {**s, "images_per_s": args.batch_size / s["ms"] * 1e3, "loss_g": runs[style][0]["loss_g"],
                          "loss_fake": runs[style][0]["loss_fake"]} for style, s in summary.items()}
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "batch_size": args.batch_size, "resolution": args.resolution,
                       "dtype": args.dtype, "grad_checkpointing": args.grad_checkpointing, "ranks": [args.rank, args.rank_fake],
                       "device": first["device"], "torch": first["torch"], "styles": styles, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
