"""Paper Table A1 (memory and latency of LoRA, LoRaD and full fine-tuning) for every adapter kind of
lorad.ADAPTERS: the peak memory of one VSD training step, the trainable parameters, the time per step and the
one-step latency of the merged student.

Each kind runs in a fresh process (`--worker`) that
1. builds the backbone's denoiser from its built-in config with random weights (weights do not change memory or
   time) in the run's dtype, then the student and the fake score network on it as `wadi.py train` does
   (vsd.run_config with the backbone's defaults, vsd.networks_for: ranks or orthogonal blocks, fused AdamW, the EMA
   when the backbone keeps one);
2. runs --warmup untimed and --steps timed VSD steps, each what vsd.train does per batch (vsd.draw, vsd.micro_step,
   vsd.update), on random text embeddings of the text encoder's shape;
3. merges a copy of the student (lorad.merge_adapters, what `export` writes: a plain denoiser for every kind) and
   times one-step generation (diffusion.one_step) at batch 1, eval mode, no gradient.

Memory. "Over the frozen weights" is the peak during the steps minus what the process held once the frozen
denoiser was resident, just before the adapters were built: the adapters, their gradients and AdamW moments, the
EMA, the activations and every temporary (the merged weights LoRaD and the orthogonal maps compute, say); "with
them" adds the frozen denoiser's bytes. On CUDA: torch.cuda.max_memory_allocated (reset before the adapters are
built) minus torch.cuda.memory_allocated. On the CPU: the peak resident set size (VmHWM, reset by writing 5 to
/proc/self/clear_refs) minus the resident set size (`peak_growth`; tests/test_memory.py checks it against tensors
of known size), after a first forward and backward pass and a first AdamW step on a throwaway tensor (libraries
allocate once at first use: oneDNN, the autograd engine, the 160 MiB of modules the fused AdamW imports) and after
giving the C allocator's free pages back (`settle`); allocator slack still counts. Never tracemalloc: it does not
see the memory of tensors. Beside the measurement, "states" is the analytic 16 bytes per trainable parameter (fp32
parameter, gradient and two AdamW moments). On the CPU a kind whose weights + states exceed 80% of MemAvailable is not run (say full
fine-tuning at the SD1.5 config): its row has the analytic figures only.

    python bench/memory.py --backbone toy --threads 1
    python bench/memory.py --backbone sd15 --resolution 128 --batch-size 1 --steps 1 --warmup 1 --threads 1
    python bench/memory.py --backbone sd15 --device cuda --dtype bf16 --batch-size 16 --resolution 512   (the paper's)
"""
import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import t5  # noqa: E402
import vsd  # noqa: E402
from diffusion import NoiseSchedule, Text, one_step, predict  # noqa: E402
from loading import read_json  # noqa: E402
from lorad import ADAPTERS, count_trainable, merge_adapters, shared_copy  # noqa: E402
from pipeline import BACKBONES, DENOISERS, pick_backbone, text_encoder_kind  # noqa: E402

DTYPES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # --dtype -> TrainConfig.mixed_precision
MIB = 2 ** 20


def rss_kib(field="VmRSS"):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS


def held(device):
    """Bytes held now: CUDA memory allocated by tensors, or the resident set size."""
    return torch.cuda.memory_allocated() if device.type == "cuda" else rss_kib() * 1024


def peak(device):
    """The peak of `held` since the last reset_peak."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return rss_kib("VmHWM") * 1024


def settle(device):
    """Give back what no tensor uses any more: Python's garbage, and on the CPU the C allocator's free pages (the
    resident set keeps them otherwise, and a later allocation reusing them would not show in its peak)."""
    gc.collect()
    if device.type == "cpu":
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def peak_growth(fn, device=torch.device("cpu")):
    """(fn's result, bytes by which the peak of `held` during fn() exceeds `held` before it)."""
    settle(device)
    reset_peak(device)
    before = held(device)
    result = fn()
    return result, peak(device) - before


def random_text(spec, batch, device, dtype, generator):
    """Random text conditioning of the backbone's shape: CLIP (B, 77, D), or T5 (B, 120, D) with a mask."""
    cfg = read_json(os.path.join(spec.configs, "text_encoder", "config.json"))
    if text_encoder_kind(cfg) == "t5":
        shape, mask = (batch, t5.MAX_LENGTH, cfg["d_model"]), torch.ones(batch, t5.MAX_LENGTH, dtype=torch.long)
    else:
        shape, mask = (batch, cfg["max_position_embeddings"], cfg["hidden_size"]), None
    embeds = torch.randn(shape, generator=generator, device=device).to(dtype)
    return Text(embeds, None if mask is None else mask.to(device))


def measure(args):
    """One kind in this process (see the module docstring): a dict of figures."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    spec = pick_backbone(args.backbone, args.resolution)
    run, method = vsd.run_config(args.backbone, adapter=args.adapter, batch_size=args.batch_size,
                                 resolution=args.resolution, mixed_precision=DTYPES[args.dtype],
                                 grad_checkpointing=args.grad_checkpointing or None, seed=0)
    dtype = vsd.WEIGHT_DTYPES[run.mixed_precision]
    schedule = NoiseSchedule.from_config(read_json(os.path.join(spec.configs, "scheduler", "scheduler_config.json")))
    torch.manual_seed(0)
    with device:
        teacher = DENOISERS[spec.denoiser].from_config(read_json(os.path.join(spec.configs, spec.denoiser,
                                                                              "config.json")))
    teacher = teacher.to(device, dtype).eval().requires_grad_(False)
    weights = sum(p.numel() * p.element_size() for p in teacher.parameters())
    text = torch.Generator(device).manual_seed(0)
    c = random_text(spec, run.batch_size, device, dtype, text)
    null = random_text(spec, 1, device, dtype, text)
    c_null = null.expand(run.batch_size)
    vae = os.path.join(spec.configs, "vae", "config.json")  # none: pixel space (the toy)
    size = (run.resolution or spec.resolution) // (2 ** (len(read_json(vae)["block_out_channels"]) - 1)
                                                   if os.path.isfile(vae) else 1)
    shape = (teacher.config.in_channels, size, size)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=run.mixed_precision != "no")
    # what is allocated once, at first use, is not the adapters' memory: oneDNN's and the autograd engine's
    # buffers, and the modules the fused AdamW imports (torch._dynamo: 160 MiB of resident set)
    x = torch.randn((1, *shape), device=device, dtype=dtype, requires_grad=True)
    with autocast:
        predict(teacher, x, 500, null).float().sum().backward()
    torch.nn.utils.clip_grad_norm_([x], 1.0)
    torch.optim.AdamW([x], **vsd.ADAMW).step()
    del x
    settle(device)
    reset_peak(device)
    frozen = held(device)
    nets = vsd.networks_for(teacher, run, device, world=1)
    trainable = [count_trainable(nets.student), count_trainable(nets.fake)]
    times, cpu_times = [], []
    for i in range(args.warmup + args.steps):
        draws = vsd.draw(torch.Generator(device).manual_seed(i), run.batch_size, shape, method,
                         len(schedule.alphas_cumprod))
        tic, cpu = time.perf_counter(), time.process_time()
        losses = vsd.micro_step(nets, schedule, c, c_null, draws, method, autocast, True, 1)
        vsd.update(nets, method.max_grad_norm, run.ema)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - tic)
            cpu_times.append(time.process_time() - cpu)
        print(f"  {args.adapter} step {i}: {time.perf_counter() - tic:.3f} s, losses {losses.tolist()}",
              file=sys.stderr, flush=True)
    top = peak(device)

    del nets.opts, nets.ema
    merged = merge_adapters(shared_copy(nets.student)).eval()
    z = torch.randn((1, *shape), generator=torch.Generator(device).manual_seed(0), device=device)
    latency = []
    with torch.no_grad(), autocast:
        for i in range(1 + args.latency_repeats):
            tic = time.perf_counter()
            one_step(merged, z.to(dtype), null, schedule.prediction_type, method.a_T)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                latency.append(time.perf_counter() - tic)
    return dict(adapter=args.adapter, trainable=trainable, weights=weights, states=16 * sum(trainable),
                peak_over_frozen=top - frozen, ms=statistics.median(times) * 1e3,
                cpu_ms=statistics.median(cpu_times) * 1e3, latency_ms=statistics.median(latency) * 1e3,
                ema=run.ema, ranks=[run.rank, run.rank_fake], blocks=[run.orth_blocks, run.orth_blocks_fake],
                device=torch.cuda.get_device_name() if device.type == "cuda" else
                f"CPU, {torch.get_num_threads()} thread(s)", torch=torch.__version__)


def analytic(args, kind):
    """(trainable (student, fake), frozen weight bytes) of a kind, counted on the meta device."""
    spec = pick_backbone(args.backbone, args.resolution)
    run, _ = vsd.run_config(args.backbone, adapter=kind, mixed_precision=DTYPES[args.dtype])
    with torch.device("meta"):
        teacher = DENOISERS[spec.denoiser].from_config(read_json(os.path.join(spec.configs, spec.denoiser,
                                                                              "config.json")))
        nets = vsd.build_networks(teacher, run.rank, run.rank_fake, kind, (run.orth_blocks, run.orth_blocks_fake))
    itemsize = vsd.WEIGHT_DTYPES[run.mixed_precision].itemsize
    return [count_trainable(n) for n in nets], sum(p.numel() for p in teacher.parameters()) * itemsize


def mem_available():
    with open("/proc/meminfo") as f:
        return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024


def worker_argv(args, kind):
    argv = ["--backbone", args.backbone, "--adapter", kind, "--dtype", args.dtype, "--steps", args.steps,
            "--warmup", args.warmup, "--device", args.device, "--threads", args.threads,
            "--latency-repeats", args.latency_repeats, "--worker"]
    argv += [x for name in ("batch_size", "resolution") if getattr(args, name)
             for x in (f"--{name.replace('_', '-')}", getattr(args, name))]
    return [sys.executable, os.path.abspath(__file__), *map(str, argv)] + \
        (["--grad-checkpointing"] if args.grad_checkpointing else [])


def table(args, rows):
    """The markdown table of the rows (measured dicts, or {"adapter", "trainable", "weights", "states", "note"})."""
    memory = "CUDA max allocated" if args.device == "cuda" else "peak RSS growth"
    columns = ["adapter", "trainable (student + fake)", f"{memory} over the frozen weights", "with them",
               "states 16 B/param", "ms/step", "CPU ms/step", "one-step latency (merged)"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        params = f"{r['trainable'][0]:,} + {r['trainable'][1]:,}"
        states = f"{r['states'] / MIB:,.1f} MiB"
        if "note" in r:
            lines.append(f"| {r['adapter']} | {params} | {r['note']} | - | {states} | - | - | - |")
            continue
        lines.append(f"| {r['adapter']} | {params} | {r['peak_over_frozen'] / MIB:,.1f} MiB | "
                     f"{(r['peak_over_frozen'] + r['weights']) / MIB:,.1f} MiB | {states} | {r['ms']:,.0f} | {r['cpu_ms']:,.0f} | "
                     f"{r['latency_ms']:,.1f} ms |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="toy",
                   help="its denoiser, scheduler and text shape come from its built-in configs")
    p.add_argument("--kinds", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    p.add_argument("--adapter", choices=list(ADAPTERS), help=argparse.SUPPRESS)  # the worker's kind
    p.add_argument("--batch-size", type=int, help="default: the backbone's (vsd.BACKBONE_DEFAULTS)")
    p.add_argument("--resolution", type=int, help="pixels (default: the backbone's native resolution)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the frozen weights' and activations' "
                   "dtype (TrainConfig.mixed_precision); adapters stay fp32")
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--steps", type=int, default=3, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (the peak counts them too)")
    p.add_argument("--latency-repeats", type=int, default=5, help="timed one-step calls of the merged student")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    rows = []
    for kind in args.kinds:
        trainable, weights = analytic(args, kind)
        states = 16 * sum(trainable)
        if args.device == "cpu" and weights + states > 0.8 * mem_available():
            rows.append(dict(adapter=kind, trainable=trainable, weights=weights, states=states,
                             note=f"not run: weights + states {(weights + states) / 2**30:.1f} GiB > 80% of the "
                                  f"{mem_available() / 2**30:.1f} GiB available"))
            continue
        out = subprocess.run(worker_argv(args, kind), stdout=subprocess.PIPE, text=True, check=False)
        if out.returncode:
            rows.append(dict(adapter=kind, trainable=trainable, weights=weights, states=states,
                             note=f"failed (exit {out.returncode}), see its message above"))
        else:
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = next((r for r in rows if "note" not in r), {})
    print(f"\n$ {shlex.join(['python', 'bench/memory.py', *(sys.argv[1:] if argv is None else argv)])}")
    print(f"backbone {args.backbone}, batch {args.batch_size or vsd.run_config(args.backbone)[0].batch_size}, "
          f"{args.resolution or pick_backbone(args.backbone).resolution} px, {args.dtype}, grad checkpointing "
          f"{'on' if args.grad_checkpointing else 'off'}; ranks {first.get('ranks')}, orthogonal blocks "
          f"{first.get('blocks')}, EMA {first.get('ema')}; {args.warmup} warm-up + {args.steps} timed step(s); frozen "
          f"weights {rows[0]['weights'] / MIB:,.1f} MiB; {first.get('device')}, torch {torch.__version__}; load "
          f"average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    print(table(args, rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:] if argv is None else argv, "rows": rows}, f, indent=1)
    return 1 if any("failed" in r.get("note", "") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
