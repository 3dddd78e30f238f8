"""The first-GPU check: one command for a session with one H100 / H200, under 8 minutes, on random weights at
the full SD1.5 and PixArt-alpha (256 px) configs (configs/, no download), writing the figures that
BENCHMARKS.md quotes. On a fresh machine with only this repository:

    pip install -r requirements-dev.txt && python bench/gpu_check.py   # bench/gpu_check.json and .md
    python bench/gpu_check.py --dry-run     # the same parts on the CPU at tiny configs (about a minute)

The parts run in this order, each in its own process group with a hard time limit (PARTS: seconds on the GPU).
The whole run has BUDGET seconds: a part gets what is left if that is less than its limit, and is skipped when
under MIN_PART is left. A part that fails, runs out of time or is skipped is recorded as such with the end of
its output; the others still run.

  train       vsd.train on the SD1.5 U-Net in bf16, batch 4 at 512 px, EMA on: 20 steps with checkpoints at 10
              and 20, then twice 10 steps resumed from the step-10 checkpoint. Checks that every logged loss is
              finite and that the resumed step-20 checkpoint (both adapters, both AdamW states, the EMA) equals
              the uninterrupted one bit for bit, with torch's deterministic algorithms on; where it does not,
              the difference between the two resumed runs is the floor that nondeterministic kernels leave
              (then listed), so that a resume bug (resumed runs equal, but not to the uninterrupted one) is told
              apart from kernel noise.
  vsd_sd15    bench/vsd_step.py: one VSD step, ours against the official-style loop, bf16, batch 16 at 512 px
              with gradient checkpointing (the official SD setting): ms/step, images/s, peak CUDA memory,
              weights held, GFLOP/step, first-step losses.
  vsd_pixart  the same on PixArt-alpha, batch 16 at 256 px with gradient checkpointing (the official setting).
  one_step    bench/one_step.py: one-step latency, ours against diffusers / transformers, SD1.5 at 512 px
              (prompt to image) and PixArt at 256 px (T5 embeddings to image), batch 1, and the largest
              difference between the two images.
  controlnet  bench/controlnet_speed.py: the one-step student + ControlNet against the 50-step DDIM teacher
              with CFG + ControlNet, SD1.5 at 512 px (the poster's Fig. 5 setting).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
BUDGET, MIN_PART = 460, 15  # seconds: the whole run (8 minutes less the start) and the least worth starting
# part: (hard limit in seconds on the GPU, its arguments on the GPU, on the CPU with --dry-run)
PARTS = {
    "train": (130, ["--config", "sd15", "--steps", "20", "--batch-size", "4", "--resolution", "512"],
              ["--config", "small", "--steps", "4", "--batch-size", "1", "--resolution", "64"]),
    "vsd_sd15": (120, ["--config", "sd15", "--batch-size", "16", "--resolution", "512", "--grad-checkpointing",
                       "--warmup", "1", "--steps", "3"],
                 ["--config", "small", "--batch-size", "1", "--resolution", "64", "--grad-checkpointing",
                  "--warmup", "0", "--steps", "1", "--threads", "1"]),
    "vsd_pixart": (80, ["--config", "pixart", "--batch-size", "16", "--resolution", "256", "--grad-checkpointing",
                        "--warmup", "1", "--steps", "3"],
                   ["--config", "pixart-small", "--batch-size", "1", "--resolution", "64", "--grad-checkpointing",
                    "--warmup", "0", "--steps", "1", "--threads", "1"]),
    "one_step": (50, ["--config", "sd15", "pixart", "--warmup", "2", "--repeats", "10"],
                 ["--config", "small", "pixart-small", "--warmup", "0", "--repeats", "1", "--threads", "1"]),
    "controlnet": (60, ["--config", "sd15", "--warmup", "1", "--repeats", "5"],
                   ["--config", "small", "--steps", "2", "--warmup", "0", "--repeats", "1", "--threads", "1"]),
}
SCRIPTS = {"vsd_sd15": "vsd_step.py", "vsd_pixart": "vsd_step.py", "one_step": "one_step.py",
           "controlnet": "controlnet_speed.py"}


# -------------------------------------------------------------------------------------------------
# the train part, in its own process

def train_part(args):
    """The 20-step run and its two resumed halves (module docstring); returns the figures."""
    import warnings

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, read at its start
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    sys.path.insert(0, BENCH)
    from controlnet_speed import sd_pipeline, sd_tokenizer  # also puts the repository on the path
    from safetensors.torch import load_file

    import toy
    import vsd
    from trainlog import read_log
    device = torch.device(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        pipe, _, _ = sd_pipeline(args.config, torch.float32, device, sd_tokenizer(tokenizer_dir), False)
    prompts = [toy.prompt(a) for a in toy.all_attributes()]
    half = args.steps // 2
    ranks = dict(rank=256, rank_fake=32) if args.config == "sd15" else dict(rank=8, rank_fake=4)
    config = dict(batch_size=args.batch_size, max_steps=args.steps, resolution=args.resolution,
                  mixed_precision="bf16", ema=0.999, checkpoint_every=half, keep_checkpoints=0,
                  validate_every=10 ** 9, **ranks)
    runs = {"straight": None, "resumed": f"straight/checkpoint-{half:07d}.safetensors",
            "resumed_again": f"straight/checkpoint-{half:07d}.safetensors"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, resume in runs.items():
            run = vsd.TrainConfig(out=os.path.join(args.work, name),
                                  resume=resume and os.path.join(args.work, resume), **config)
            vsd.train(pipe, prompts, run, vsd.VSDConfig(), device, {"backbone": args.config}, log=print)
    kernels = sorted({str(w.message).splitlines()[0] for w in caught if "deterministic" in str(w.message)})
    final = {name: load_file(os.path.join(args.work, name, f"checkpoint-{args.steps:07d}.safetensors"))
             for name in runs}

    def difference(a, b):  # the largest |a - b| over the training state (RNG states left out)
        keys = [k for k in a if not k.startswith("rng.")]
        assert sorted(keys) == sorted(k for k in b if not k.startswith("rng.")), "different checkpoint keys"
        return max((a[k].double() - b[k].double()).abs().max().item() for k in keys)

    losses = {}
    for name in runs:
        log = read_log(os.path.join(args.work, name))
        losses[name] = list(zip(log["loss_G"], log["loss_fake"]))
    resumed, floor = difference(final["straight"], final["resumed"]), difference(final["resumed"], final["resumed_again"])
    finite = all(v == v and abs(v) != float("inf") for run in losses.values() for pair in run for v in pair)
    verdict = ("exact" if resumed == 0 else "resume bug: the resumed runs agree with each other, not with the "
               "uninterrupted one" if floor == 0 else "nondeterministic kernels: see the floor")
    return {"config": args.config, "steps": args.steps, "batch_size": args.batch_size, "resolution": args.resolution,
            "mixed_precision": "bf16", "losses_finite": finite, "losses": losses["straight"],
            "resumed_losses": losses["resumed"], "resume_exact": resumed == 0, "resume_max_diff": resumed,
            "resumed_twice_max_diff": floor, "verdict": verdict, "nondeterministic_kernels": kernels,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"}


# -------------------------------------------------------------------------------------------------
# the driver

def part_command(name, device, dry_run, result_file, work):
    extra = PARTS[name][2 if dry_run else 1]
    if name == "train":
        return [sys.executable, os.path.abspath(__file__), "--part", "train", "--device", device,
                "--result", result_file, "--work", work, *extra]
    common = ["--device", device, "--dtype", "bf16", "--json", result_file]
    return [sys.executable, os.path.join(BENCH, SCRIPTS[name]), *extra, *common]


def run_part(command, limit):
    """(status, seconds, output tail) of a command in a new process group, killed with its children at
    `limit` seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timeout ({limit:.0f} s)"
    return status, time.perf_counter() - start, output[-3000:]


def machine(device):
    import torch
    info = {"torch": torch.__version__, "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
    else:
        info["device"] = "CPU"
    return info


def markdown(report):
    """The report as the Markdown that BENCHMARKS.md quotes."""
    m = report["machine"]
    lines = [f"`{report['command']}`: {m['device']}, torch {m['torch']}, {report['seconds']:.0f} s in all "
             f"({'dry run: tiny configs on the CPU' if report['dry_run'] else 'full configs, random weights'})", "",
             "| part | status | seconds | figures |", "| --- | --- | --- | --- |"]
    for name, part in report["parts"].items():
        r, figures = part.get("result") or {}, ""
        if name == "train" and r:
            first, last = r["losses"][0], r["losses"][-1]
            figures = (f"{r['steps']} steps of {r['batch_size']} at {r['resolution']} px, bf16; losses finite: "
                       f"{r['losses_finite']}; loss_G / loss_fake step 1 {first[0]:.4g} / {first[1]:.4g}, step "
                       f"{r['steps']} {last[0]:.4g} / {last[1]:.4g}; resume: {r['verdict']} (max diff "
                       f"{r['resume_max_diff']:.3g}, two resumed runs {r['resumed_twice_max_diff']:.3g})")
        elif name.startswith("vsd") and r:
            s = r["styles"]
            figures = "; ".join(f"{style}: {v['ms']:.0f} ms/step, {v['images_per_s']:.1f} images/s, peak "
                                f"{v['peak'] / 2 ** 30:.2f} GiB, weights {v['weights'] / 2 ** 30:.2f} GiB, "
                                f"{v['flops'] / 1e9:,.0f} GFLOP/step" for style, v in s.items())
            if len(s) == 2:
                figures += (f"; official / ours: time {s['official']['ms'] / s['ours']['ms']:.2f}x, peak "
                            f"{s['official']['peak'] / s['ours']['peak']:.2f}x")
            figures = f"{r['config']}, batch {r['batch_size']} at {r['resolution']} px: {figures}"
        elif name == "one_step" and r:
            figures = "; ".join(f"{c} ({v['resolution']} px): ours {v['ours_s'] * 1e3:.1f} ms, diffusers "
                                f"{v['reference_s'] * 1e3:.1f} ms ({v['ratio']:.2f}x), image diff {v['max_image_diff']}"
                                for c, v in r["configs"].items())
        elif name == "controlnet" and r:
            figures = "; ".join(f"{mode}: {s:.3f} s" for mode, s in r["seconds"].items()) + f"; {r['ratio']:.1f}x"
        lines.append(f"| {name} | {part['status']} | {part['seconds']:.0f} | {figures} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny configs on the CPU (for a machine without a GPU)")
    p.add_argument("--out", help="the JSON report; the Markdown goes beside it (default: bench/gpu_check.json, "
                                 "with --dry-run gpu_check-dry.json in the temporary directory)")
    p.add_argument("--only", nargs="+", choices=list(PARTS), help="run these parts only")
    p.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    p.add_argument("--part", choices=["train"], help=argparse.SUPPRESS)  # the train part's own process
    for name, kw in (("--device", {}), ("--result", {}), ("--work", {}), ("--config", {}),
                     ("--steps", dict(type=int)), ("--batch-size", dict(type=int)), ("--resolution", dict(type=int))):
        p.add_argument(name, help=argparse.SUPPRESS, **kw)
    args = p.parse_args(argv)
    if args.part:
        with open(args.result, "w") as f:
            json.dump(train_part(args), f, indent=1)
        return 0

    import torch
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device here: run on a GPU machine, or --dry-run for the CPU path")
    out = args.out or (os.path.join(tempfile.gettempdir(), "gpu_check-dry.json") if args.dry_run
                       else os.path.join(BENCH, "gpu_check.json"))
    start, parts = time.perf_counter(), {}
    report = {"command": " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
              "dry_run": args.dry_run, "machine": machine(device), "budget_s": args.budget, "parts": parts}
    with tempfile.TemporaryDirectory() as work:
        for name, (limit, _, _) in PARTS.items():
            if args.only and name not in args.only:
                continue
            left = args.budget - (time.perf_counter() - start)
            if left < MIN_PART:
                parts[name] = {"status": "skipped (out of time)", "seconds": 0}
                continue
            result_file = os.path.join(work, f"{name}.json")
            command = part_command(name, device, args.dry_run, result_file, os.path.join(work, name))
            status, seconds, tail = run_part(command, min(limit, left))
            parts[name] = {"status": status, "seconds": seconds, "limit_s": min(limit, left), "command": command[1:]}
            if os.path.isfile(result_file):
                with open(result_file) as f:
                    parts[name]["result"] = json.load(f)
            if status != "ok":
                parts[name]["output_tail"] = tail
            print(f"{name}: {status} in {seconds:.0f} s", flush=True)
    report["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(report)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(text)
    print(f"\n{text}\nwrote {out} and {os.path.splitext(out)[0]}.md")
    return 0 if all(part["status"] == "ok" for part in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
