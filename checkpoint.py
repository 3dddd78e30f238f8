"""What a training run writes and reads back (docs/training.md): checkpoints, the EMA's place in
them, the log, sample grids, interrupts, and the exported student.

- A checkpoint is one safetensors file `checkpoint-NNNNNNN.safetensors` holding the student's and
  the fake score network's adapters (`student.*`, `fake.*`), the student's EMA (`ema.*`, when
  kept), both optimizers' moments (`opt_student.*`, `opt_fake.*`) and the RNG states (`rng.*`),
  with JSON metadata: the step, the run's options and the optimizers' hyper-parameters. It is
  written atomically (loading.save_tensors: a temporary file, then a rename), so a crash leaves
  the last one whole.
- Ctrl-C (SIGINT) or SIGTERM during training asks the loop to finish its step and save it
  (`interruptible`); a second signal stops at once.
- `train.log` has a line per step (trainlog.py); `samples/step-NNNNNNN.png` is a grid of one-step
  samples for fixed prompts and seeds, drawn by the EMA student when the run keeps one, and
  `losses.png` the loss curves so far.
- The exported student is the merged one-step denoiser, in the original network's keys.
"""
import contextlib
import dataclasses
import json
import os
import signal
import threading

import torch

from loading import DiskFull, LoadError, disk_space, file_metadata, read_safetensors, save_tensors
from lorad import adapter_state_dict, load_adapters, merge_adapters, shared_copy
from pipeline import image_grid
from trainlog import log_image, plot_losses


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss); the message says where and what was kept."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C or SIGTERM stopped the run after a whole step, which was saved; the message says
    where."""


def checkpoint_path(out_dir, step):
    return os.path.join(out_dir, f"checkpoint-{step:07d}.safetensors")


def save_checkpoint(path, step, student, fake, opts, ema, meta):
    """Write the training state after `step` to `path` (see the module docstring)."""
    tensors = {f"student.{k}": v for k, v in adapter_state_dict(student).items()}
    tensors.update({f"fake.{k}": v for k, v in adapter_state_dict(fake).items()})
    tensors.update({f"ema.{k}": v for k, v in (ema or {}).items()})
    groups = {}
    for name, opt in opts.items():
        t, groups[name] = optimizer_tensors(opt, f"opt_{name}")
        tensors.update(t)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_tensors(tensors, path, {"step": step, "meta": json.dumps(meta, sort_keys=True),
                                 "param_groups": json.dumps(groups)})


def optimizer_tensors(opt, prefix):
    """An optimizer's state as flat tensors `prefix.<param index>.<name>` and its param groups."""
    state = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
               for i, s in state["state"].items() for k, v in s.items()}
    return tensors, state["param_groups"]


def load_optimizer(opt, tensors, prefix):
    """The inverse of `optimizer_tensors`: the moments are the checkpoint's, the hyper-parameters
    (learning rate, betas, ...) the optimizer's own, so that a resume with a new --lr takes it."""
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def list_checkpoints(out_dir):
    """The checkpoint files of a run directory, oldest first (step-numbered names sort by step)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir)
                  if f.startswith("checkpoint-") and f.endswith(".safetensors"))


def prune_checkpoints(out_dir, keep):
    """Remove all but the `keep` latest checkpoints (0: keep all)."""
    found = list_checkpoints(out_dir)
    for f in found[:-keep] if keep > 0 else []:
        os.remove(os.path.join(out_dir, f))


def find_checkpoint(out_dir, which, option="--resume"):
    """The checkpoint file `which` names: a path, or `latest` in `out_dir`; `option` is what the
    user typed to ask for it (for the message)."""
    if which != "latest":
        if not os.path.isfile(which):
            raise LoadError(f"{option}: no checkpoint file {which}")
        return which
    found = list_checkpoints(out_dir)
    if not found:
        raise LoadError(f"{option}: no checkpoint-*.safetensors in {out_dir} (train writes one "
                        f"every --checkpoint-every steps, at the end, and when interrupted)")
    return os.path.join(out_dir, found[-1])


def load_checkpoint(path, student, fake, opts, ema, log=print):
    """Restore adapters, optimizers, EMA and RNG states; returns the step. EMA may be switched on or
    off at a resume: a checkpoint without EMA starts the EMA from the restored student adapters, and
    a checkpoint's EMA is left unused when `ema` is None (either said in one `log` line)."""
    tensors = read_safetensors(path)
    meta = file_metadata(path)
    if "step" not in meta:
        raise LoadError(f"{path} is not a WaDi training checkpoint (no step in its metadata)")
    for prefix, net in (("student", student), ("fake", fake)):
        load_adapters(net, own_adapters(tensors, prefix), what=f"the {prefix} adapters of {path}")
    has_ema = any(k.startswith("ema.") for k in tensors)
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"] if has_ema else own_adapters(tensors, "student")[k])
        if not has_ema:
            log(f"{path} has no EMA: the student's EMA starts from its adapters at step "
                f"{meta['step']}")
    elif has_ema:
        log(f"{path} holds an EMA of the student, which this run (EMA off) does not use")
    for name, opt in opts.items():
        load_optimizer(opt, tensors, f"opt_{name}")
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


# What a resume may change (docs/training.md), each change said in one line and taking effect: the
# optimisation, the schedule of the run, how it is computed and the method's scalars. Every other
# option is what the adapters, the data order and the noise were made with, and stays as it was.
RESUME_MAY_CHANGE = ("lr", "lr_fake", "max_steps", "epochs", "batch_size", "grad_accum",
                     "processes", "mixed_precision", "grad_checkpointing", "ema",
                     "checkpoint_every", "keep_checkpoints", "validate_every",
                     "validation_prompts", "guidance", "t_min", "t_max", "drop_prob",
                     "max_grad_norm", "log_to")
WHERE = ("out", "resume", "cache_dir")  # where the run's files are, not what the run is


def check_resume(path, options, log=print):
    """Compare a resumed run's `options` (vsd.run_options) with those the checkpoint at `path` was
    written with: each change RESUME_MAY_CHANGE allows is one `log` line; any other is a LoadError
    naming them all, raised before anything is written. (A checkpoint of an earlier version, which
    stored only backbone, base model and adapter, is checked on those.)"""
    stored = checkpoint_meta(path)
    before = {**stored, **stored.get("options", {})}
    now = json.loads(json.dumps(options))  # tuples as JSON stores them
    changed = {k: (before[k], v) for k, v in now.items()
               if k in before and k not in WHERE and before[k] != v}
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE]
    if refused:
        listing = "; ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise LoadError(f"--resume {path}: a resume cannot change {listing} (the checkpoint's "
                        f"adapters, data order and noise depend on them); give them as they were, "
                        f"or start a new run in another --out")
    step = file_metadata(path).get("step", "?")
    for k, (old, new) in changed.items():
        log(f"resume: {k} {old!r} -> {new!r}, from step {step} on")


def checkpoint_meta(path):
    """The run's metadata stored with a checkpoint (backbone, options, images seen, ...)."""
    return json.loads(file_metadata(path).get("meta", "{}"))


def own_adapters(tensors, prefix):
    """The tensors of a checkpoint under `prefix.` (student, fake, ema), by adapter key."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


@contextlib.contextmanager
def adapters_swapped(net, adapters):
    """Inside the block `net` holds `adapters` (e.g. the EMA; None: no change); its own come back
    after."""
    if adapters is None:
        yield net
        return
    own = {k: v.detach().clone() for k, v in adapter_state_dict(net).items()}
    load_adapters(net, adapters)
    try:
        yield net
    finally:
        load_adapters(net, own)


@contextlib.contextmanager
def interruptible():
    """Inside the block, Ctrl-C (SIGINT) and SIGTERM set `stop["requested"]` instead of raising, so
    the training loop can finish its step and save it; a second signal raises KeyboardInterrupt at
    once. (Signal handlers live in the main thread only; elsewhere the block changes nothing.)"""
    stop = {"requested": False}

    def request(signum, frame):
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def export_student(student, path, metadata, last_checkpoint=None, ema=None):
    """The merged one-step student (with the adapters `ema` when given: the run's own student) as a
    full denoiser state dict in the original network's keys, with `metadata` (backbone, base model,
    a_T, ...). A full disk at the end of a run (`last_checkpoint`: its final one) is a
    TrainingError saying how to export later."""
    if ema is not None:
        load_adapters(student, ema)
    merged = merge_adapters(shared_copy(student))
    try:
        save_tensors(merged.state_dict(), path, metadata)
    except DiskFull as e:
        if last_checkpoint is None:
            raise
        run_dir = os.path.dirname(last_checkpoint) or "."
        raise TrainingError(f"{e}; the run's last checkpoint {last_checkpoint} is whole: free some "
                            f"space and write the student with `wadi.py export --run {run_dir}`") \
            from None


def kept(last_checkpoint):
    """What a run that stops now leaves behind, for its message."""
    return (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint
            else "no checkpoint was written yet")


def stopped_by_full_disk(error: DiskFull, last_checkpoint):
    """The one line of a run that stopped because rank 0 could not write its step."""
    resume = "; free some space and continue with --resume latest" if last_checkpoint else ""
    return f"stopped: {error}; {kept(last_checkpoint)}, whole{resume}"


def save_and_validate(pipe, nets, run, a_T, meta, step, max_steps, interrupted, writer=None):
    """Rank 0 after a step of `train` (`nets`: vsd.Networks, `run`: vsd.TrainConfig): a checkpoint
    every run.checkpoint_every steps, at the end and when interrupted (returns its path, else None);
    a sample grid (also to the TensorBoard `writer`, when there is one) and the loss curves
    (losses.png) every run.validate_every steps and at the end."""
    path = None
    if step % run.checkpoint_every == 0 or step == max_steps or interrupted:
        path = checkpoint_path(run.out, step)
        save_checkpoint(path, step, nets.student, nets.fake, nets.opts, nets.ema, meta)
        prune_checkpoints(run.out, run.keep_checkpoints)
    if (step % run.validate_every == 0 or step == max_steps) and not interrupted:
        with adapters_swapped(nets.student, nets.ema):
            grid = validate(pipe, nets.student, run.validation_prompts, run.resolution, a_T,
                            os.path.join(run.out, "samples", f"step-{step:07d}.png"))
        log_image(writer, step, grid)
        plot_losses([run.out], os.path.join(run.out, "losses.png"))
    return path


@torch.no_grad()
def validate(pipe, student, prompts, resolution, a_T, path):
    """A grid of the student's one-step samples of `prompts`, seeds 0, 1, ..., saved to `path`;
    returns it (a PIL image)."""
    prompts = list(prompts)
    student.eval()
    images = dataclasses.replace(pipe, denoiser=student).generate(
        prompts, list(range(len(prompts))), 1, a_T=a_T, resolution=resolution)
    student.train()
    with disk_space(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid = image_grid(images, cols=len(prompts), labels=prompts)
        grid.save(path)
    return grid


def resume(run, nets, per_step, log):
    """(step, images seen, checkpoint) where the run `run` (vsd.TrainConfig) starts: (0, 0, None),
    or the state of the checkpoint run.resume names restored into `nets` (vsd.Networks)."""
    if not run.resume:
        return 0, 0, None
    path = find_checkpoint(run.out, run.resume)
    step = load_checkpoint(path, nets.student, nets.fake, nets.opts, nets.ema, log)
    return step, checkpoint_meta(path).get("images_seen", step * per_step), path


def check_step(totals, step, rank, failed, last_ckpt):
    """Stop every rank at once when rank 0 could not write the last step (`failed`, totals[3]) or
    a loss (totals[:2]) is not finite."""
    if totals[3] > 0:
        raise TrainingError(stopped_by_full_disk(failed, last_ckpt) if rank == 0 else
                            f"stopped at step {step}: rank 0 could not write (full disk)")
    if not torch.isfinite(totals[:2]).all():
        loss_g, loss_fake = totals[:2].tolist()
        raise TrainingError(f"non-finite loss at step {step + 1} (loss_G={loss_g}, "
                            f"loss_fake={loss_fake}); stopped, {kept(last_ckpt)}")
