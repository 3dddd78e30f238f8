"""A training run's `train.log` (docs/training.md): one line per step, read back, and drawn as loss
curves: `losses.png` beside the run's sample grids, and `wadi.py plot RUN...` to overlay runs.

A line is `key value` pairs, in this order:

    step 12 loss_G 0.00123 loss_fake 0.0456 grad_G 0.781 grad_fake 2.34 images/s 7.52 time 2026-...

`loss_G` and `loss_fake` are the student's VSD loss and the fake score network's denoising loss
(paper Sec. 3.3), averaged over the step's micro-batches and processes; `grad_G` and `grad_fake`
the L2 norms of their gradients before clipping (the step clips both at VSDConfig.max_grad_norm).
Logs written before the gradient norms were logged read back without them.

`--log tensorboard` (train, invert) also writes TensorBoard event files in `<out>/tensorboard/`
(`open_writer`, torch's SummaryWriter; the optional `tensorboard` package,
requirements-tensorboard.txt): train's scalars `loss/G`, `loss/fake`, `grad_norm/G`,
`grad_norm/fake`, `lr/G`, `lr/fake`, `images_per_s` per step and its sample grids (`samples`),
invert's `loss/total`, `loss/denoise`, `loss/steer`. Only rank 0 writes.
"""
import contextlib
import os
import time

import numpy as np

from loading import LoadError, disk_space

NUMBERS = ("loss_G", "loss_fake", "grad_G", "grad_fake", "images/s")  # what a line holds besides the time
LOGS = ("file", "tensorboard")  # --log: the text log alone, or TensorBoard event files too


def check_log(kind):
    """torch's SummaryWriter for --log tensorboard (None for file); a one-line LoadError when the
    optional tensorboard package is missing, for the commands to call before they load anything."""
    if kind == "file":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LoadError("--log tensorboard needs the tensorboard package: "
                         "pip install -r requirements-tensorboard.txt") from None
    return SummaryWriter


@contextlib.contextmanager
def open_writer(out, kind, step=0):
    """The TensorBoard writer on out/tensorboard for --log tensorboard (None for file), closed when
    the block ends, however it ends. `step`: where the run starts (a resume's step); the points an
    earlier run in `out` wrote from step + 1 on (a crashed run's, or one --overwrite removed) are
    dropped (purge_step)."""
    writer_class = check_log(kind)
    writer = writer_class(os.path.join(out, "tensorboard"), purge_step=step + 1) if writer_class else None
    try:
        yield writer
    finally:
        if writer:
            writer.close()


def keep_log(path, step):
    """Drop the lines of a step-numbered log after `step` (a resumed run writes them again)."""
    if os.path.isfile(path):
        lines = [line for line in open(path) if int(line.split()[0]) <= step]
        open(path, "w").writelines(lines)


def log_scalars(writer, step, scalars):
    """{tag: number} at `step` to `writer` (None: nothing)."""
    for tag, value in scalars.items() if writer else ():
        writer.add_scalar(tag, value, step)


def log_image(writer, step, image, tag="samples"):
    """A PIL image (a sample grid) at `step` to `writer` (None: nothing)."""
    if writer:
        writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def log_step(bar, out, step, totals, grad_norms, images_per_s, writer=None, lrs=None):
    """The losses (totals[:2]), the gradient norms (2,) and the throughput of a step, in the
    progress bar and in out/train.log; with a TensorBoard `writer` (open_writer) also there, with
    the learning rates `lrs` (student, fake)."""
    loss_g, loss_fake = totals[0].item(), totals[1].item()
    grad_g, grad_fake = grad_norms.tolist()
    bar.update(1)
    bar.set_postfix(loss_G=f"{loss_g:.4g}", loss_fake=f"{loss_fake:.4g}",
                    img_s=f"{images_per_s:.2f}")
    path = os.path.join(out, "train.log")
    with disk_space(path), open(path, "a") as f:
        f.write(f"step {step} loss_G {loss_g:.6g} loss_fake {loss_fake:.6g} grad_G {grad_g:.6g} "
                f"grad_fake {grad_fake:.6g} images/s {images_per_s:.3f} "
                f"time {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    if writer:
        log_scalars(writer, step, {"loss/G": loss_g, "loss/fake": loss_fake, "grad_norm/G": grad_g,
                                   "grad_norm/fake": grad_fake, "lr/G": lrs[0], "lr/fake": lrs[1],
                                   "images_per_s": images_per_s})


def read_log(run_dir):
    """train.log of a run directory as {"step": [...], "loss_G": [...], ...}: a list per key of
    NUMBERS that its lines hold (a resumed run's repeated steps: the last one written)."""
    path = os.path.join(run_dir, "train.log")
    rows = {}
    try:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                words = line.split()
                try:
                    row = {k: float(v) for k, v in zip(words[::2], words[1::2]) if k in NUMBERS}
                    rows[int(words[1])] = row
                except (ValueError, IndexError):
                    raise LoadError(f"{path}, line {number}: not a train.log line: {line.strip()!r}") \
                        from None
    except OSError as e:
        raise LoadError(f"cannot read {path}: {e.strerror} (is {run_dir} a `wadi.py train` run?)") \
            from None
    steps = sorted(rows)
    keys = [k for k in NUMBERS if steps and all(k in rows[s] for s in steps)]
    return {"step": steps, **{k: [rows[s][k] for s in steps] for k in keys}}


def smooth(values, window):
    """A trailing moving average over `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_losses(run_dirs, path, labels=None):
    """Both losses and both gradient norms against the step, one panel each, one line per run
    (smoothed over 2% of the longest run; the raw values faint behind), written to `path`."""
    import matplotlib  # a plot only: training imports this module without drawing
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = [read_log(d) for d in run_dirs]
    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    window = max(1, max(len(log["step"]) for log in logs) // 50)
    panels = [("loss_G", "student: VSD loss"), ("loss_fake", "fake score: denoising loss"),
              ("grad_G", "student: gradient norm"), ("grad_fake", "fake score: gradient norm")]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (log, label) in enumerate(zip(logs, labels)):
            if key not in log:
                continue
            color = f"C{i}"
            ax.plot(log["step"], log[key], color=color, alpha=0.2, linewidth=0.6)
            ax.plot(log["step"], smooth(log[key], window), color=color, label=label)
        ax.set_title(title)
        if any(v > 0 for log in logs for v in log.get(key, ())):  # (a first step's loss_G is 0)
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    with disk_space(path):
        fig.savefig(path, dpi=100)
    plt.close(fig)
