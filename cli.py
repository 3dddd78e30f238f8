"""What the command lines (wadi.py, evaluate.py) share: a parser whose errors are one line, option
types that check their range when the command line is parsed, defaults shown in every --help, and
the helpers that turn options into what the library takes (the device and dtype, the backbone a
student file records, checked step counts, resolutions and output names, prompt files, images).

A value the user can fix is one line on stderr, `PROG: error: argument --batch-size: must be an
integer >= 1, got '0'` or `error: ...` (UsageError, loading.LoadError), and exit code 2, never a
traceback.
"""
import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys

import torch
from PIL import Image

from checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, own_adapters
from controlnet import load_controlnet, read_control_images
from loading import LoadError, fetch, file_metadata, read_json, read_tensors
from lorad import load_adapters
from pipeline import (BACKBONES, DTYPES, has_vae, image_grid, load_pipeline, load_schedule, parts_of,
                      pick_backbone, vae_downsampling)
from vsd import build_networks


class UsageError(Exception):
    """A bad combination of command-line options."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block: `--help` has it) and each option's default in its
    help text, subcommands included."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps descriptions as written and appends "(default: X)" to options that have a default and whose
    help does not mention one already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def integer(low=None, high=None):
    """An argparse type: an int within [low, high] (either bound may be None)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        return _in_range(value, text, "an integer", low, high)
    parse.__name__ = "integer"
    return parse


def number(low=None, high=None, low_open=False, high_open=False):
    """An argparse type: a finite float within the bounds, each bound included unless `*_open` is set."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        return _in_range(value, text, "a number", low, high, low_open, high_open)
    parse.__name__ = "number"
    return parse


def _in_range(value, text, kind, low, high, low_open=False, high_open=False):
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not (too_low or too_high):
        return value
    if low is not None and high is not None:
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    else:
        bounds = f"{'<' if high_open else '<='} {high:g}"
    raise argparse.ArgumentTypeError(f"must be {kind} {bounds}, got {text!r}")


POSITIVE = integer(1)           # counts: batch sizes, steps, ranks, sample numbers
NON_NEGATIVE = integer(0)       # seeds, optional counts where 0 means "off"
RATE = number(0, low_open=True)  # learning rates
SCALE = number(0)                # guidance scales


def threads(text):
    """An argparse type for --threads: `auto` or an integer >= 1."""
    return text if text == "auto" else POSITIVE(text)


def add_threads(parser):
    parser.add_argument("--threads", type=threads, default="auto", help="CPU threads for torch: auto (the "
                        "cores other processes leave idle; OMP_NUM_THREADS when set) or a number")


# -------------------------------------------------------------------------------------------------
# From options to what the library takes

def pick_device(name):
    """--device: auto (a GPU when there is one), cpu, cuda, cuda:1, ..."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def busy_cores():
    """How many cores other processes keep busy: the smaller of the last minute's load average and
    the number of threads running now besides this one (Linux's /proc/loadavg; elsewhere the load
    average alone). The smaller, because each alone overcounts: the average remembers a job that
    just ended, the count a process that runs for an instant."""
    busy = round(os.getloadavg()[0])
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return busy
    return max(0, min(busy, running))


def set_threads(count="auto"):
    """--threads: how many CPU threads torch computes with; returns (threads, one line saying why).
    `auto`: OMP_NUM_THREADS when it is set, else the cores that others do not keep busy
    (`busy_cores`, at least one), shared by torchrun's processes on this machine. torch's threads
    wait at every barrier for each other, so a thread more than the free cores runs several times
    slower than one fewer (BENCHMARKS.md, "Threads")."""
    cores = os.cpu_count() or 1
    if count != "auto":
        why = "--threads"
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        count, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    else:
        busy = busy_cores()
        count = max(1, (cores - busy) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        why = f"auto: {cores} cores, {busy} kept busy by other processes; --threads N sets it"
    torch.set_num_threads(count)
    return count, f"threads: {count} ({why})"


def pick_dtype(name, device):
    """The weights dtype named by --dtype (a key of DTYPES), by default fp16 on a GPU and fp32 on the CPU."""
    return DTYPES[name] if name else (torch.float16 if device.type == "cuda" else torch.float32)


def student_backbone(backbone, model, student, option, resolution=None, default="sd15"):
    """(backbone, base model) for a command given a student file (None: none): `backbone`, else the one
    recorded in the file's metadata (our exports record it), else `default`; `model`, else the recorded base
    model when it can be found here (an existing directory, or a Hub id), else the backbone's repo (for
    `resolution`: `pick_backbone`). A `backbone` that contradicts the file is a LoadError naming the
    command-line `option`."""
    meta = file_metadata(student) if student else {}
    recorded = meta.get("backbone") if meta.get("backbone") in BACKBONES else None
    if backbone and recorded and backbone != recorded:
        raise LoadError(f"--backbone {backbone} contradicts {option} {student}, a {recorded} student (its metadata "
                        f"says so); leave --backbone out or give the matching one")
    backbone = backbone or recorded or default
    base = meta.get("base_model", "") if recorded else ""
    found = os.path.isdir(base) or (base.count("/") == 1 and not base.startswith((".", "/", "~")))
    return backbone, model or (base if found else pick_backbone(backbone, resolution).repo)


def check_steps(model, steps, option="--steps"):
    """A LoadError unless DDIM can take `steps` steps on the model's schedule (1 is the one-step generator)."""
    if steps > 1:
        try:
            load_schedule(model).ddim_timesteps(steps)
        except ValueError as e:
            raise LoadError(f"{option} {steps}: {e}") from None


def read_prompts(path, log=print):
    """Prompts from a file: plain text (one per line), a JSON list of strings, or JSON lines: the
    JourneyDB annotations (the caption under "Task2", key "Caption", "Caption:" or "caption", as the
    official loader reads it; de-duplicated and sorted as there) or rows with a "prompt". Text and JSON
    lines are read line by line, so memory holds the prompts, not the file (JourneyDB's 1.4M-row
    annotations: BENCHMARKS.md); a JSON list is one value and is parsed whole. Rows without a usable
    caption are skipped and counted in one `log` line. A UTF-8 byte-order mark and CRLF line ends (as
    Windows editors save) make no difference. A LoadError when the file cannot be read or parsed (with
    the line) or nothing usable is left."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            if path.endswith(".jsonl"):
                prompts = journeydb_prompts(f, path, log)
            elif path.endswith(".json"):
                prompts = json.load(f)
                if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                    raise ValueError("expected a JSON list of strings")
                prompts = [p.strip() for p in prompts if p.strip()]
            else:
                prompts = [p for p in map(str.strip, f) if p]
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"cannot read the prompt file {path}: {e}") from None
    except ValueError as e:  # json's errors say where: line and column
        raise LoadError(f"cannot parse the prompt file {path}: {e}") from None
    if not prompts:
        raise LoadError(f"the prompt file {path} has no prompts")
    return prompts


def journeydb_prompts(lines, path, log=print):
    """The sorted distinct captions (`journeydb_caption`, stripped) of JSON lines, one row at a time;
    rows without one are counted in one `log` line. A ValueError names the line it cannot parse."""
    captions, skipped = set(), 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            caption = journeydb_caption(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"line {number}, column {e.colno}: {e.msg}") from None
        except ValueError as e:
            raise ValueError(f"line {number}: {e}") from None
        caption = caption.strip() if caption else ""
        if caption:
            captions.add(caption)
        else:
            skipped += 1
    if skipped:
        log(f"{path}: skipped {skipped} prompts without a caption")
    return sorted(captions)


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


def check_control(controlnet, control_images, n_prompts):
    """A UsageError unless --controlnet and --control-image come together, with one image for all
    prompts or one per prompt."""
    if bool(controlnet) != bool(control_images):
        raise UsageError("--controlnet and --control-image go together")
    if control_images and len(control_images) not in (1, n_prompts):
        raise UsageError(f"give one --control-image for all prompts or one per prompt "
                         f"({n_prompts} prompts, {len(control_images)} images)")


def load_control(pipe, spec, image_paths, resolution=None):
    """The ControlNet `spec` (`controlnet.load_controlnet`: a repo, directory or file) in the
    pipeline's dtype and device, checked to fit its U-Net, and the control images `image_paths` as
    (N, 3, H, W) in [0, 1] at the output resolution. LoadError for a missing, unreadable or unfit
    file."""
    param = next(pipe.denoiser.parameters())
    net = load_controlnet(spec, pipe.denoiser, pipe.downsampling(), param.dtype, param.device)
    return net, read_control_images(image_paths, resolution or pipe.resolution)


def check_resolution(backbone, model, resolution, option="--resolution"):
    """`resolution` (None: the backbone's native one), or a UsageError when the denoiser's input grid
    cannot take it: a multiple of the autoencoder's downsampling, times the patch size of a DiT. Read
    from the configs of `model` (default: the backbone's repo), before any weights are loaded."""
    if resolution is None:
        return None
    spec = pick_backbone(backbone, resolution, model)
    model, parts = model or spec.repo, parts_of(model or spec.repo)
    down = vae_downsampling(read_json(fetch(parts, "vae/config.json"))["block_out_channels"]) \
        if has_vae(parts) else 1
    patch = read_json(fetch(model, f"{spec.denoiser}/config.json")).get("patch_size") or 1
    factor = down * patch
    if resolution % factor:
        patch = f" x the denoiser's patch size {patch}" if patch > 1 else ""
        raise UsageError(f"{option} {resolution} is not a multiple of {factor} (the autoencoder's "
                         f"downsampling{patch})")
    return resolution


RUN_FILES = ("run.json", "train.log", "student.safetensors", "metrics.json", "comparison.png",
             "losses.png", "samples", "tensorboard")  # what `train` writes to --out, besides its checkpoints


def check_run_out(out, resume, overwrite, files=RUN_FILES):
    """Before `train` (or another command writing `files`) writes to `out`: a UsageError when it
    holds a run and the command neither resumes nor overwrites it (two runs would mix their
    checkpoints and logs); with `overwrite`, the old run's files to remove (`remove_run`, once the new run has loaded; nothing else in
    `out` is touched)."""
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one")
    found = [f for f in files if os.path.exists(os.path.join(out, f))] + list_checkpoints(out)
    if not found or resume:
        return []
    if not overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(found[:3])}"
                         f"{', ...' if len(found) > 3 else ''}): continue it with --resume latest, "
                         f"start over with --overwrite, or give another --out")
    return found


def remove_run(out, found):
    """Remove the files `check_run_out` found in `out` (--overwrite)."""
    for f in found:
        path = os.path.join(out, f)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def environment(device, threads):
    """What a run's numbers also depend on, for its run.json: the code's git commit, the torch and
    CUDA versions, the CPU threads and the device."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "not a git checkout"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"git_commit": commit, "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": threads, "device": f"{device} ({name})", "python": platform.python_version()}


def cpu_name():
    """The CPU's model name and core count, e.g. "Intel(R) Xeon(R) ..., 2 cores"."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "CPU"
    return f"{name}, {os.cpu_count()} cores"


def check_out_file(path, suffixes, option, directory_ok=False):
    """A UsageError unless `path` can be written as a file ending in one of `suffixes` (or, with
    `directory_ok`, names a directory)."""
    if path.endswith(suffixes) and not os.path.isdir(path):
        return
    if directory_ok and not path.endswith(suffixes):
        return
    raise UsageError(f"{option} {path}: give a file name ending in {' or '.join(suffixes)}"
                     + (" (or a directory)" if directory_ok else ""))


def save_images(images, out, grid=False, labels=None):
    """uint8 images (N, H, W, 3): `out` ending in .png takes a single image (or the grid of several,
    with each image beside it as NAME-i.png); otherwise `out` is a directory of 00000.png, ... (and
    with `grid`, grid.png). The images keep their size; a grid enlarges small ones and writes
    `labels` (one per image, e.g. the prompts) under them (pipeline.image_grid)."""
    if out.endswith(".png"):
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        if len(images) == 1:
            Image.fromarray(images[0]).save(out)
            return
        for i, im in enumerate(images):
            Image.fromarray(im).save(f"{out[:-4]}-{i}.png")
        image_grid(images, labels=labels).save(out)
        return
    os.makedirs(out, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(out, f"{i:05d}.png"))
    if grid:
        image_grid(images, labels=labels).save(os.path.join(out, "grid.png"))


def load_run(run_dir, checkpoint="latest", ema=False):
    """A `train` run directory: its options (run.json), the checkpoint file (`checkpoint`: a path or
    latest), the pipeline (no VAE) and the student and fake score networks holding that checkpoint's
    adapters; with `ema`, the student holds the checkpoint's EMA adapters when it has them (what
    `train` exports)."""
    if not os.path.isfile(os.path.join(run_dir, "run.json")):
        raise LoadError(f"--run {run_dir} is not a train run directory (it has no run.json)")
    run = read_json(os.path.join(run_dir, "run.json"))
    option = "--run" if checkpoint == "latest" else "--checkpoint"
    checkpoint = find_checkpoint(run_dir, checkpoint, option=option)
    pipe = load_pipeline(run["backbone"], run["base_model"], vae=False)
    student, fake = build_networks(pipe.denoiser, run["rank"], run["rank_fake"], run["adapter"],
                                   (run.get("orth_blocks"), run.get("orth_blocks_fake")))
    load_checkpoint(checkpoint, student, fake, {}, None, log=lambda _: None)
    averaged = own_adapters(read_tensors(checkpoint), "ema")
    if ema and averaged:
        load_adapters(student, averaged)
    return run, checkpoint, pipe, student, fake
