"""Variational score distillation (SwiftBrush, Nguyen & Tran 2024; WaDi Sec. 3.3): the
distillation step and the training loop around it.

Three networks share ONE copy of the frozen denoiser weights (a U-Net or PixArt's DiT): the teacher (no
adapter), the one-step student (LoRaD, rank 256 for SD, 128 for PixArt) and the fake score network (LoRaD,
rank 32). One step:

    x0        = (z - sqrt(1 - a_T) eps_student(z, T, c)) / sqrt(a_T)             T = 999
    xt        = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  t ~ U{20..980}
    g         = (1 - a_t) (cfg(teacher, xt, t) - cfg(fake, xt, t))               no grad, CFG s = 1.5
    loss_G    = 0.5 |x0 - sg(x0 - g)|^2                      -> student  (its gradient is g dx0/dtheta)
    loss_fake = |sqrt(a_t') (eps_fake(xt', t', c') - eps')|^2,  t' ~ U{0..999}, xt' from sg(x0), c' = ""
                with probability 0.1 per sample                  -> fake score network

Randomness and data order are pure functions of (seed, rank, step), so a resumed run draws exactly what
an uninterrupted one would.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from diffusion import A_T, Text, guided, one_step, predict, to_eps
from loading import LoadError, file_metadata, read_safetensors, save_tensors
from lorad import add_adapters, adapter_state_dict, count_trainable, load_adapters, merge_adapters, shared_copy
from pipeline import image_grid


class TrainingError(Exception):
    """Training cannot go on (a non-finite loss); the message says where and what was kept."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C (SIGINT) or SIGTERM stopped the run after a whole step, which was saved; the message says where."""


@dataclass
class VSDConfig:
    guidance: float = 1.5     # CFG scale of the teacher and of the fake score network
    t_min: int = 20           # the generator loss draws t ~ U{t_min, ..., t_max - 1}
    t_max: int = 981
    drop_prob: float = 0.1    # empty prompt for the fake score network's own loss
    max_grad_norm: float = 1.0
    a_T: float = A_T


def build_networks(teacher, rank=256, rank_fake=32, adapter="lorad"):
    """The student and the fake score network on top of `teacher` (frozen, shared), adapted by the rules
    the network names (`adapter_rules`: lorad.TARGETS["unet_student"], ["dit_fake"], ...). A layer the
    adapter cannot take (LoRaD needs an even input width) is a LoadError naming it."""
    teacher.requires_grad_(False)
    rules = teacher.adapter_rules
    try:
        student = add_adapters(shared_copy(teacher), f"{rules}_student", rank, adapter)
        fake = add_adapters(shared_copy(teacher), f"{rules}_fake", rank_fake, adapter)
    except ValueError as e:
        raise LoadError(f"cannot put {adapter} adapters on this denoiser: {e}") from None
    return student, fake


def draw(generator, batch, shape, cfg: VSDConfig, n_timesteps=1000):
    """Every random quantity of one step, in a fixed order, from one generator."""
    dev = generator.device
    return dict(z=torch.randn((batch, *shape), generator=generator, device=dev),
                t=torch.randint(cfg.t_min, cfg.t_max, (batch,), generator=generator, device=dev),
                eps=torch.randn((batch, *shape), generator=generator, device=dev),
                t_fake=torch.randint(0, n_timesteps, (batch,), generator=generator, device=dev),
                eps_fake=torch.randn((batch, *shape), generator=generator, device=dev),
                drop=torch.rand((batch,), generator=generator, device=dev) < cfg.drop_prob)


def generator_loss(student, teacher, fake, schedule, c: Text, c_null: Text, d, cfg: VSDConfig):
    """(loss_G, x0): the student's VSD loss on the draws `d`, whose gradient is g dx0/dtheta, and its
    one-step samples x0 (B, C, h, w) fp32; `fake` is used without gradient for the score difference."""
    dtype = c.embeds.dtype
    pt = schedule.prediction_type
    x0 = one_step(student, d["z"].to(dtype), c, pt, cfg.a_T)  # carries the gradient
    with torch.no_grad():
        xt = schedule.add_noise(x0.detach(), d["eps"], d["t"])
        a = schedule.alpha(d["t"], xt)
        eps_real = to_eps(guided(teacher, xt.to(dtype), d["t"], c, c_null, cfg.guidance).float(), xt, a, pt)
        eps_fake = to_eps(guided(fake, xt.to(dtype), d["t"], c, c_null, cfg.guidance).float(), xt, a, pt)
        g = torch.nan_to_num((1 - a) * (eps_real - eps_fake))
    return 0.5 * F.mse_loss(x0, (x0 - g).detach()), x0.detach()


def fake_loss(fake, schedule, x0, c: Text, c_null: Text, d):
    """The fake score network's denoising loss on the student's samples x0 (no gradient to the student),
    with the prompt dropped to "" where d["drop"]."""
    xt = schedule.add_noise(x0, d["eps_fake"], d["t_fake"])
    a = schedule.alpha(d["t_fake"], xt)
    c_fake = c_null.where(d["drop"], c)
    pred = to_eps(predict(fake, xt.to(c.embeds.dtype), d["t_fake"], c_fake).float(), xt, a, schedule.prediction_type)
    return F.mse_loss(a.sqrt() * pred, a.sqrt() * d["eps_fake"])


def step_seed(seed, rank, step, micro=0):
    """The seed of one micro-step's generator: distinct per rank, reproducible per step."""
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_prompts, seed, epoch):
    return torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def batch_indices(n_prompts, seed, position, size):
    """Prompt indices [position, position + size) of the endless stream of per-epoch permutations."""
    return [epoch_permutation(n_prompts, seed, i // n_prompts)[i % n_prompts] for i in range(position, position + size)]


# ---------------------------------------------------------------------------------------------------
# checkpoints: one safetensors file (adapters, EMA, optimizer moments, RNG states) with JSON metadata
# (step, options, optimizer hyper-parameters), written atomically.

def optimizer_tensors(opt, prefix):
    state = opt.state_dict()
    tensors = {f"{prefix}.{i}.{k}": v.reshape(-1) if v.dim() == 0 else v
               for i, s in state["state"].items() for k, v in s.items()}
    return tensors, state["param_groups"]


def load_optimizer(opt, tensors, groups, prefix):
    state = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(i), {})[name] = v.reshape(()) if name == "step" else v
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(path, step, student, fake, opts, ema, meta):
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
    save_tensors(tensors, path, {"step": step, "meta": json.dumps(meta), "param_groups": json.dumps(groups)})


def list_checkpoints(out_dir):
    """The checkpoint files of a run directory, oldest first (step-numbered names sort by step)."""
    if not os.path.isdir(out_dir):
        return []
    return sorted(f for f in os.listdir(out_dir) if f.startswith("checkpoint-") and f.endswith(".safetensors"))


def find_checkpoint(out_dir, which, option="--resume"):
    """The checkpoint file `which` names: a path, or `latest` in `out_dir`; `option` is what the user
    typed to ask for it (for the message)."""
    if which != "latest":
        if not os.path.isfile(which):
            raise LoadError(f"{option}: no checkpoint file {which}")
        return which
    found = list_checkpoints(out_dir)
    if not found:
        raise LoadError(f"{option}: no checkpoint-*.safetensors in {out_dir} (train writes one every "
                        f"--checkpoint-every steps, at the end, and when interrupted)")
    return os.path.join(out_dir, found[-1])


def load_checkpoint(path, student, fake, opts, ema, log=print):
    """Restore adapters, optimizers, EMA and RNG states; returns the step. EMA may be switched on or off
    at a resume: a checkpoint without EMA starts the EMA from the restored student adapters, and a
    checkpoint's EMA is left unused when `ema` is None (either said in one `log` line)."""
    tensors = read_safetensors(path)
    meta = file_metadata(path)
    if "step" not in meta:
        raise LoadError(f"{path} is not a WaDi training checkpoint (no step in its metadata)")
    for prefix, net in (("student", student), ("fake", fake)):
        params = adapter_state_dict(net)
        own = own_adapters(tensors, prefix)
        if own.keys() != params.keys():
            missing, unexpected = params.keys() - own.keys(), own.keys() - params.keys()
            raise LoadError(f"{path} does not match the {prefix}'s adapters: {len(missing)} missing "
                            f"{sorted(missing)[:3]}, {len(unexpected)} unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(own[k])
    has_ema = any(k.startswith("ema.") for k in tensors)
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"] if has_ema else own_adapters(tensors, "student")[k])
        if not has_ema:
            log(f"{path} has no EMA: the student's EMA starts from its adapters at step {meta['step']}")
    elif has_ema:
        log(f"{path} holds an EMA of the student, which this run (EMA off) does not use")
    groups = json.loads(meta["param_groups"])
    for name, opt in opts.items():
        load_optimizer(opt, tensors, groups[name], f"opt_{name}")
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return int(meta["step"])


def own_adapters(tensors, prefix):
    """The tensors of a checkpoint under `prefix.` (student, fake, ema), by adapter key."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


@contextlib.contextmanager
def adapters_swapped(net, adapters):
    """Inside the block `net` holds `adapters` (e.g. the EMA; None: no change); its own come back after."""
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
    """Inside the block, Ctrl-C (SIGINT) and SIGTERM set `stop["requested"]` instead of raising, so the
    training loop can finish its step and save it; a second signal raises KeyboardInterrupt at once.
    (Signal handlers live in the main thread only; elsewhere the block changes nothing.)"""
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


def update_ema(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * the adapters of `net` (tensors by adapter_state_dict key)."""
    with torch.no_grad():
        for k, v in adapter_state_dict(net).items():
            ema[k].lerp_(v, 1 - decay)


def export_student(student, path, metadata):
    """The merged one-step student as a full denoiser state dict in diffusers keys (adapters folded in)."""
    merged = merge_adapters(shared_copy(student))
    save_tensors(merged.state_dict(), path, metadata)


# ---------------------------------------------------------------------------------------------------
# the training loop

# --mixed-precision: the dtype of the frozen weights and activations (adapters stay fp32)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# both optimizers; fused: one kernel over all adapter tensors (on the toy's CPU steps, 17 -> 4 ms per student step)
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


@dataclass
class TrainConfig:
    out: str
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 0            # 0: run `epochs` over the prompts
    epochs: float = 2.0
    resolution: int = 512
    lr: float = 1e-4
    lr_fake: float = 1e-2
    rank: int = 256
    rank_fake: int = 32
    adapter: str = "lorad"
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    ema: float = 0.0              # EMA decay of the student adapter (0: off)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    validation_prompts: tuple = ("a photo of a cat", "a watercolor painting of a lighthouse at dawn",
                                 "an astronaut riding a horse", "a bowl of ramen, studio lighting")
    resume: str = None
    cache_dir: str = None         # the prompt-embedding cache of a text encoder too large to keep (PixArt's T5)


def distributed():
    """(rank, world size, local rank), initialising the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def no_sync(net, skip):
    """DDP's no_sync (gradients accumulate locally) on all but the last micro-step."""
    return net.no_sync() if skip else contextlib.nullcontext()


def all_mean(x, world):
    if world > 1:
        dist.all_reduce(x)
        x = x / world
    return x


def train(pipe, prompts, tc: TrainConfig, vsd: VSDConfig, device, meta=None, log=print):
    """Distill `pipe.unet` into a one-step student on `prompts`; returns (student, fake). Prompts go
    through `pipe.prepare_prompts` first: a text encoder too large to keep beside training (PixArt's T5)
    encodes them once into the cache in `tc.cache_dir` and is freed."""
    rank, world, _ = distributed()
    weight_dtype = WEIGHT_DTYPES[tc.mixed_precision]
    teacher = pipe.unet.to(device, weight_dtype).eval().requires_grad_(False)
    if pipe.text_encoder is not None:
        pipe.text_encoder.to(device, weight_dtype)
    pipe.prepare_prompts([*prompts, "", *tc.validation_prompts], tc.cache_dir, rank, world)
    torch.manual_seed(tc.seed)  # identical adapter initialisation on every rank
    student, fake = build_networks(teacher, tc.rank, tc.rank_fake, tc.adapter)
    for net in (student, fake):
        net.train()
        net.gradient_checkpointing = tc.grad_checkpointing
    student_params = [p for p in student.parameters() if p.requires_grad]
    fake_params = [p for p in fake.parameters() if p.requires_grad]
    opts = {"student": torch.optim.AdamW(student_params, lr=tc.lr, **ADAMW),
            "fake": torch.optim.AdamW(fake_params, lr=tc.lr_fake, **ADAMW)}
    scalers = {k: torch.amp.GradScaler(device.type, enabled=tc.mixed_precision == "fp16") for k in opts}
    ema = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()} if tc.ema else None
    student_ddp, fake_ddp = student, fake
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        student_ddp = torch.nn.parallel.DistributedDataParallel(student, device_ids=ids)
        fake_ddp = torch.nn.parallel.DistributedDataParallel(fake, device_ids=ids)

    per_step = tc.batch_size * tc.grad_accum * world
    max_steps = tc.max_steps or math.ceil(tc.epochs * len(prompts) / per_step)
    os.makedirs(tc.out, exist_ok=True)
    step, last_ckpt = 0, None
    if tc.resume:
        last_ckpt = find_checkpoint(tc.out, tc.resume)
        step = load_checkpoint(last_ckpt, student, fake, opts, ema, log if rank == 0 else lambda _: None)
    c_null = pipe.encode_prompts([""]).to(device, weight_dtype)
    shape = pipe.latent_shape(tc.resolution)
    meta = {**(meta or {}), "a_T": vsd.a_T, "prediction_type": pipe.schedule.prediction_type}
    if rank == 0:
        log(f"student: {count_trainable(student) / 1e6:.2f}M trainable, fake score: "
            f"{count_trainable(fake) / 1e6:.2f}M trainable; {len(prompts)} prompts, {world} process(es), "
            f"{per_step} images per step, {max_steps} steps")
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=tc.mixed_precision != "no")
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    try:
        with interruptible() as stop:
            while step < max_steps:
                start = time.perf_counter()
                totals = torch.zeros(3, device=device)  # loss_G, loss_fake, whether this rank was interrupted
                for micro in range(tc.grad_accum):
                    position = ((step * tc.grad_accum + micro) * world + rank) * tc.batch_size
                    batch = [prompts[i] for i in batch_indices(len(prompts), tc.seed, position, tc.batch_size)]
                    generator = torch.Generator(device).manual_seed(step_seed(tc.seed, rank, step, micro))
                    d = draw(generator, tc.batch_size, shape, vsd, len(pipe.schedule.alphas_cumprod))
                    c = pipe.encode_prompts(batch).to(device, weight_dtype)
                    last = micro == tc.grad_accum - 1
                    nulls = c_null.expand(len(batch))
                    # the student's backward runs before the fake score's forward: one graph alive at a time
                    with no_sync(student_ddp, world > 1 and not last), autocast:
                        loss_g, x0 = generator_loss(student_ddp, teacher, fake, pipe.schedule, c, nulls, d, vsd)
                    scalers["student"].scale(loss_g / tc.grad_accum).backward()
                    with no_sync(fake_ddp, world > 1 and not last), autocast:
                        loss_fake = fake_loss(fake_ddp, pipe.schedule, x0, c, nulls, d)
                    scalers["fake"].scale(loss_fake / tc.grad_accum).backward()
                    totals[:2] += torch.stack([loss_g.detach(), loss_fake.detach()]).float() / tc.grad_accum
                totals[2] = float(stop["requested"])
                totals = all_mean(totals, world)  # every rank learns of an interrupt at the same step
                if not torch.isfinite(totals[:2]).all():
                    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise TrainingError(f"non-finite loss at step {step + 1} (loss_G={totals[0].item()}, "
                                        f"loss_fake={totals[1].item()}); stopped, {kept}")
                for name, params in (("student", student_params), ("fake", fake_params)):
                    scalers[name].unscale_(opts[name])
                    torch.nn.utils.clip_grad_norm_(params, vsd.max_grad_norm)
                    scalers[name].step(opts[name])
                    scalers[name].update()
                    opts[name].zero_grad(set_to_none=True)
                if ema is not None:
                    update_ema(ema, student, tc.ema)
                step += 1
                images_per_s = per_step / (time.perf_counter() - start)
                interrupted = totals[2].item() > 0
                if rank == 0:
                    bar.update(1)
                    bar.set_postfix(loss_G=f"{totals[0].item():.4g}", loss_fake=f"{totals[1].item():.4g}",
                                    img_s=f"{images_per_s:.2f}")
                    with open(os.path.join(tc.out, "train.log"), "a") as f:
                        f.write(f"step {step} loss_G {totals[0].item():.6g} loss_fake {totals[1].item():.6g} "
                                f"images/s {images_per_s:.3f} time {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
                    if step % tc.checkpoint_every == 0 or step == max_steps or interrupted:
                        last_ckpt = os.path.join(tc.out, f"checkpoint-{step:07d}.safetensors")
                        save_checkpoint(last_ckpt, step, student, fake, opts, ema, meta)
                        prune_checkpoints(tc.out, tc.keep_checkpoints)
                    if (step % tc.validate_every == 0 or step == max_steps) and not interrupted:
                        with adapters_swapped(student, ema):
                            validate(pipe, student, tc, vsd, step)
                if interrupted:
                    saved = os.path.join(tc.out, f"checkpoint-{step:07d}.safetensors")
                    raise TrainingInterrupted(f"interrupted at step {step} of {max_steps}: saved {saved}; continue "
                                              f"with the same command and --resume latest")
    finally:
        bar.close()
    if rank == 0:
        if ema is not None:
            load_adapters(student, ema)
        export_student(student, os.path.join(tc.out, "student.safetensors"), meta)
        log(f"wrote {os.path.join(tc.out, 'student.safetensors')} (merged one-step denoiser, diffusers keys)")
    return student, fake


def prune_checkpoints(out_dir, keep):
    found = list_checkpoints(out_dir)
    for f in found[:-keep] if keep > 0 else []:
        os.remove(os.path.join(out_dir, f))


@torch.no_grad()
def validate(pipe, student, tc, vsd, step):
    """A grid of one-step samples for fixed prompts and seeds: samples/step-NNNNNNN.png (of the EMA
    student when the run keeps one: `train` swaps it in)."""
    prompts = list(tc.validation_prompts)
    student.eval()
    images = dataclasses.replace(pipe, unet=student).generate(prompts, list(range(len(prompts))), 1, a_T=vsd.a_T,
                                                              resolution=tc.resolution)
    student.train()
    os.makedirs(os.path.join(tc.out, "samples"), exist_ok=True)
    image_grid(images, cols=len(prompts)).save(os.path.join(tc.out, "samples", f"step-{step:07d}.png"))
