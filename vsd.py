"""Variational score distillation (SwiftBrush, Nguyen & Tran 2024; WaDi Sec. 3.3): the distillation
step and the training loop around it.

Three networks share ONE copy of the frozen denoiser weights (a U-Net or PixArt's DiT): the teacher
(no adapter), the one-step student (LoRaD, `TrainConfig.rank`) and the fake score network (LoRaD,
`TrainConfig.rank_fake`). One step:

    x0        = (z - sqrt(1 - a_T) eps_student(z, T, c)) / sqrt(a_T)             T = 999
    xt        = sqrt(a_t) x0 + sqrt(1 - a_t) eps,  t ~ U{20..980}
    g         = (1 - a_t) (cfg(teacher, xt, t) - cfg(fake, xt, t))           no grad, CFG s = 1.5
    loss_G    = 0.5 |x0 - sg(x0 - g)|^2                  -> student  (its gradient is g dx0/dtheta)
    loss_fake = |sqrt(a_t') (eps_fake(xt', t', c') - eps')|^2,  t' ~ U{0..999}, xt' from sg(x0),
                c' = "" with probability 0.1 per sample         -> fake score network
                (per batch with VSDConfig.official_prompts, docs/training.md)

The paper's settings are the defaults of `VSDConfig` (the method) and `TrainConfig` (the run), and
`BACKBONE_DEFAULTS` says where a backbone departs from them. Randomness and data order are pure
functions of (seed, rank, step), so a resumed run draws exactly what an uninterrupted one would.
"""
import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoint import (TrainingError, TrainingInterrupted, check_step, checkpoint_path,
                        export_student, interruptible, resume, save_and_validate,
                        stopped_by_full_disk)
from ddp import all_mean, no_sync, ranks
from diffusion import A_T, Text, guided, one_step, predict, to_eps
from loading import DiskFull, LoadError
from lorad import ORTHOGONAL_MAPS, add_adapters, adapter_state_dict, count_trainable, shared_copy
from trainlog import check_log, log_step, open_writer


@dataclass
class VSDConfig:
    """The method (paper Sec. 3.3, the official code's values)."""
    guidance: float = 1.5     # CFG scale of the teacher and of the fake score network
    t_min: int = 20           # the generator loss draws t ~ U{t_min, ..., t_max - 1}
    t_max: int = 981
    drop_prob: float = 0.1    # empty prompt for the fake score network's own loss, per sample
    # the official SD code's text handling (docs/training.md): CLIP's attention mask on the
    # training prompts only, and the fake score's empty prompt drawn per batch
    official_prompts: bool = False
    max_grad_norm: float = 1.0
    a_T: float = A_T          # the one-step generator's noise level


def build_networks(teacher, rank, rank_fake, adapter="lorad", blocks=None):
    """The student and the fake score network on top of `teacher` (frozen, shared), adapted on the
    layers lorad.LAYERS names for the teacher's family: at ranks `rank` / `rank_fake`, or for an
    orthogonal adapter (lorad.ORTHOGONAL_MAPS) with `blocks` = (student, fake score) diagonal
    blocks per layer. A layer the adapter cannot take (LoRaD needs an even input width, the blocks
    must divide it) is a LoadError naming it."""
    teacher.requires_grad_(False)
    sizes = blocks if adapter in ORTHOGONAL_MAPS else (rank, rank_fake)
    try:
        student = add_adapters(shared_copy(teacher), "student", sizes[0], adapter)
        fake = add_adapters(shared_copy(teacher), "fake", sizes[1], adapter)
    except ValueError as e:
        raise LoadError(f"cannot put {adapter} adapters on this denoiser: {e}") from None
    return student, fake


def draw(generator, batch, shape, method: VSDConfig, n_timesteps=1000):
    """Every random quantity of one step, in a fixed order, from one generator; the fake score's
    empty prompt per sample, or for the whole batch with `method.official_prompts`."""
    kw = dict(generator=generator, device=generator.device)
    drops = 1 if method.official_prompts else batch
    return dict(z=torch.randn((batch, *shape), **kw),
                t=torch.randint(method.t_min, method.t_max, (batch,), **kw),
                eps=torch.randn((batch, *shape), **kw),
                t_fake=torch.randint(0, n_timesteps, (batch,), **kw),
                eps_fake=torch.randn((batch, *shape), **kw),
                drop=(torch.rand((drops,), **kw) < method.drop_prob).expand(batch))


def generator_loss(student, teacher, fake, schedule, c: Text, c_null: Text, draws,
                   method: VSDConfig):
    """(loss_G, x0): the student's VSD loss on `draws`, whose gradient is g dx0/dtheta, and its
    one-step samples x0 (B, C, h, w) fp32; `fake` is used without gradient for the score
    difference."""
    dtype, pt = c.embeds.dtype, schedule.prediction_type
    x0 = one_step(student, draws["z"].to(dtype), c, pt, method.a_T)  # carries the gradient
    with torch.no_grad():
        t = draws["t"]
        xt = schedule.add_noise(x0.detach(), draws["eps"], t)
        a = schedule.alpha(t, xt)
        s = method.guidance
        eps_real = to_eps(guided(teacher, xt.to(dtype), t, c, c_null, s).float(), xt, a, pt)
        eps_fake = to_eps(guided(fake, xt.to(dtype), t, c, c_null, s).float(), xt, a, pt)
        g = torch.nan_to_num((1 - a) * (eps_real - eps_fake))
    return 0.5 * F.mse_loss(x0, (x0 - g).detach()), x0.detach()


def fake_loss(fake, schedule, x0, c: Text, c_null: Text, draws):
    """The fake score network's denoising loss on the student's samples x0 (no gradient to the
    student), with the prompt dropped to "" where draws["drop"]."""
    t, eps = draws["t_fake"], draws["eps_fake"]
    xt = schedule.add_noise(x0, eps, t)
    a = schedule.alpha(t, xt)
    c_fake = c_null.where(draws["drop"], c)
    pred = to_eps(predict(fake, xt.to(c.embeds.dtype), t, c_fake).float(), xt, a,
                  schedule.prediction_type)
    return F.mse_loss(a.sqrt() * pred, a.sqrt() * eps)


@dataclass
class Networks:
    """One run's networks over one frozen denoiser, and what trains the two adapted ones."""
    teacher: torch.nn.Module
    student: torch.nn.Module
    fake: torch.nn.Module
    student_ddp: torch.nn.Module  # the same networks, wrapped by DDP under torchrun
    fake_ddp: torch.nn.Module
    params: dict                  # "student" / "fake": their trainable parameters
    opts: dict
    scalers: dict                 # fp16 loss scaling (disabled otherwise)
    ema: dict = None              # the student's adapters, averaged


def micro_step(nets: Networks, schedule, c, c_null, draws, method, autocast, sync, accum):
    """The student's VSD loss and its backward, then the fake score loss on the student's samples
    and its backward, each gradient divided by the `accum` micro-steps of a step (DDP syncs only
    when `sync`). The student's backward runs before the fake's forward: one graph alive at a time.
    Returns the two losses (2,)."""
    with no_sync(nets.student_ddp, not sync), autocast:
        loss_g, x0 = generator_loss(nets.student_ddp, nets.teacher, nets.fake, schedule, c, c_null,
                                    draws, method)
    nets.scalers["student"].scale(loss_g / accum).backward()
    with no_sync(nets.fake_ddp, not sync), autocast:
        loss_fake = fake_loss(nets.fake_ddp, schedule, x0, c, c_null, draws)
    nets.scalers["fake"].scale(loss_fake / accum).backward()
    return torch.stack([loss_g.detach(), loss_fake.detach()]).float()


def update(nets: Networks, max_grad_norm, ema_decay):
    """Both optimizers' step (unscale, clip the gradient norm, step, zero), then the student's
    EMA. Returns the two gradient norms before clipping (2,)."""
    norms = []
    for name, opt in nets.opts.items():
        scaler = nets.scalers[name]
        scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(nets.params[name], max_grad_norm))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    if nets.ema is not None:
        update_ema(nets.ema, nets.student, ema_decay)
    return torch.stack(norms).float()


def update_ema(ema, net, decay):
    """ema <- decay * ema + (1 - decay) * the adapters of `net` (by adapter_state_dict key)."""
    with torch.no_grad():
        for k, v in adapter_state_dict(net).items():
            ema[k].lerp_(v, 1 - decay)


# -------------------------------------------------------------------------------------------------
# The run

@dataclass
class TrainConfig:
    """A training run, by default the paper's (Sec. 4.1, the official scripts)."""
    out: str = None               # run directory: log, checkpoints, samples, student
    rank: int = 256               # LoRaD rank of the student
    rank_fake: int = 32           # and of the fake score network
    adapter: str = "lorad"        # or a baseline of paper Table 2 or R4 (lorad.ADAPTERS)
    # an orthogonal adapter's diagonal blocks per layer: the numbers whose stored counts come
    # closest to LoRaD's at the ranks above (SD1.5 84.97M / 9.50M, LoRaD 83.80M / 9.38M; SD2.1
    # 94.84M / 9.95M, LoRaD 94.43M / 9.51M: docs/analysis.md)
    orth_blocks: int = 4
    orth_blocks_fake: int = 32
    lr: float = 1e-4
    lr_fake: float = 1e-2
    batch_size: int = 16          # per process and micro-step (the paper: 16 x 8 GPUs)
    grad_accum: int = 1
    max_steps: int = 0            # 0: run `epochs` over the prompts
    epochs: float = 2.0
    resolution: int = None        # pixels; None: the backbone's native resolution
    mixed_precision: str = "no"   # the frozen weights' and activations' dtype (WEIGHT_DTYPES)
    grad_checkpointing: bool = False
    ema: float = 0.0              # EMA decay of the student adapter (0: off)
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 500
    validation_prompts: tuple = ("a photo of a cat",
                                 "a watercolor painting of a lighthouse at dawn",
                                 "an astronaut riding a horse", "a bowl of ramen, studio lighting")
    resume: str = None            # a checkpoint file, or `latest` in `out`
    cache_dir: str = None         # the prompt-embedding cache of a text encoder too large to keep
    log_to: str = "file"          # --log: train.log, or TensorBoard event files too (trainlog.LOGS)


# where a backbone departs from the defaults of TrainConfig and VSDConfig
BACKBONE_DEFAULTS = {
    # paper Sec. 4.1; orthogonal blocks: 59.28M / 19.35M stored against LoRaD's 81.22M / 20.13M (the
    # student's input widths, 1152 and 4096 among them, leave powers of two: 8 blocks 118.55M)
    "pixart": dict(rank=128, orth_blocks=16, orth_blocks_fake=48),
    # SDXL: the student near the paper's share of the U-Net (SD1.5 9.7%): rank 128, 265.30M of
    # 2567.46M (10.3%; rank 256: 20.7%); the fake score at the paper's rank 32 (docs/sdxl.md)
    "sdxl": dict(rank=128),
    # the toy: what distills its teacher on 2 CPU cores within minutes (docs/toy.md); orthogonal
    # blocks: 163,904 / 71,264 stored against LoRaD's 188,800 / 78,272
    "toy": dict(batch_size=4, max_steps=1200, lr=1e-3, rank=16, rank_fake=8, guidance=3.0,
                ema=0.99, checkpoint_every=300, validate_every=300, orth_blocks=4,
                orth_blocks_fake=8),
}
# the toy DiT: the toy's recipe for twice the steps (docs/toy-dit.md)
BACKBONE_DEFAULTS["toy-dit"] = {**BACKBONE_DEFAULTS["toy"], "max_steps": 2400,
                                "checkpoint_every": 600, "validate_every": 600}


def run_config(backbone, **given):
    """(TrainConfig, VSDConfig) of a run on `backbone`: the defaults, the backbone's departures
    (BACKBONE_DEFAULTS), then the `given` values (None: not given); `out` defaults to
    runs/BACKBONE. A --log the environment cannot write, or --official-prompts on SDXL, is a
    LoadError here, before anything loads."""
    chosen = {"out": os.path.join("runs", backbone), **BACKBONE_DEFAULTS.get(backbone, {}),
              **{k: v for k, v in given.items() if v is not None}}
    names = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (TrainConfig, VSDConfig)}
    unknown = chosen.keys() - names[TrainConfig] - names[VSDConfig]
    if unknown:
        raise TypeError(f"not a training option: {', '.join(sorted(unknown))}")
    run, method = (cls(**{k: v for k, v in chosen.items() if k in names[cls]}) for cls in names)
    if method.official_prompts and backbone == "sdxl":
        raise LoadError("--official-prompts is the official SD code's CLIP mask; SDXL's text is "
                        "encoded as diffusers' StableDiffusionXLPipeline encodes it, with no mask")
    check_log(run.log_to)
    return run, method


def run_options(meta, run: TrainConfig, method: VSDConfig, prompts_sha256, processes):
    """Everything a run is made with, as its checkpoints store it (checkpoint.check_resume compares
    a resume's with them): `meta` (backbone, base model, adapter), both configs, the prompt list's
    hash and the number of processes."""
    return {**meta, **dataclasses.asdict(run), **dataclasses.asdict(method),
            "prompts_sha256": prompts_sha256, "processes": processes}


# TrainConfig.mixed_precision: the dtype of the frozen weights and activations (adapters stay fp32)
WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# both optimizers; fused: one kernel over all adapter tensors (toy CPU step: 17 -> 4 ms)
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)


@functools.lru_cache(maxsize=2)
def epoch_permutation(n_prompts, seed, epoch):
    return torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def micro_batch(prompts, run: TrainConfig, seen, step, micro, rank, world):
    """The prompts of one micro-step, from the endless stream of per-epoch permutations after the
    `seen` images of the steps before, and the seed of its draws: pure functions of (seed, images
    seen, rank, step, micro), so a resume goes on exactly."""
    n, start = len(prompts), seen + (micro * world + rank) * run.batch_size
    batch = [prompts[epoch_permutation(n, run.seed, i // n)[i % n]]
             for i in range(start, start + run.batch_size)]
    return batch, int(np.random.SeedSequence([run.seed, rank, step, micro]).generate_state(1)[0])


def networks_for(teacher, run: TrainConfig, device, world):
    """The student and fake score network on `teacher`, their optimizers, loss scalers, EMA and
    (under torchrun) DDP wrappers."""
    torch.manual_seed(run.seed)  # identical adapter initialisation on every rank
    student, fake = build_networks(teacher, run.rank, run.rank_fake, run.adapter,
                                   (run.orth_blocks, run.orth_blocks_fake))
    for net in (student, fake):
        net.train()
        net.gradient_checkpointing = run.grad_checkpointing
    params = {"student": [p for p in student.parameters() if p.requires_grad],
              "fake": [p for p in fake.parameters() if p.requires_grad]}
    opts = {"student": torch.optim.AdamW(params["student"], lr=run.lr, **ADAMW),
            "fake": torch.optim.AdamW(params["fake"], lr=run.lr_fake, **ADAMW)}
    fp16 = run.mixed_precision == "fp16"
    scalers = {k: torch.amp.GradScaler(device.type, enabled=fp16) for k in opts}
    ema = None
    if run.ema:
        ema = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()}
    ids = [device.index] if device.type == "cuda" else None
    wrapped = [torch.nn.parallel.DistributedDataParallel(net, device_ids=ids) if world > 1 else net
               for net in (student, fake)]
    return Networks(teacher, student, fake, *wrapped, params, opts, scalers, ema)


def train(pipe, prompts, run: TrainConfig, method: VSDConfig, device, meta=None, options=None,
          log=print):
    """Distill `pipe.denoiser` into a one-step student on `prompts`; returns (student, fake). Under
    torchrun, ddp.process_device() first. A text encoder too large to keep beside training (PixArt's
    T5) encodes the prompts once into the cache in `run.cache_dir` and is freed. `meta` goes with
    the checkpoints and the exported student, `options` (run_options) with the checkpoints."""
    rank, world = ranks()
    # the networks: one frozen denoiser in the weights' dtype under two adapted copies
    dtype = WEIGHT_DTYPES[run.mixed_precision]
    teacher = pipe.denoiser.to(device, dtype).eval().requires_grad_(False)
    if pipe.text_encoder is not None:
        pipe.text_encoder.to(device, dtype)
    pipe.prepare_prompts([*prompts, "", *run.validation_prompts], run.cache_dir, rank, world)
    nets = networks_for(teacher, run, device, world)
    # where the run starts, how long it goes, what every step shares
    per_step = run.batch_size * run.grad_accum * world
    os.makedirs(run.out, exist_ok=True)
    step, seen, last_ckpt = resume(run, nets, per_step, log if rank == 0 else lambda _: None)
    failed = None  # rank 0's write to a full disk
    max_steps = run.max_steps or step + math.ceil((run.epochs * len(prompts) - seen) / per_step)
    c_null = pipe.null_text(run.resolution).to(device, dtype)
    shape, n_timesteps = pipe.latent_shape(run.resolution), len(pipe.schedule.alphas_cumprod)
    meta = {**(meta or {}), "a_T": method.a_T, "prediction_type": pipe.schedule.prediction_type}
    if rank == 0:
        log(f"student: {count_trainable(nets.student) / 1e6:.2f}M trainable, fake score: "
            f"{count_trainable(nets.fake) / 1e6:.2f}M trainable; {len(prompts)} prompts, {world} "
            f"process(es), {per_step} images per step, {max_steps} steps")
    autocast = torch.autocast(device.type, dtype=dtype, enabled=run.mixed_precision != "no")
    bar = tqdm(total=max_steps, initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)
    with bar, interruptible() as stop, \
            open_writer(run.out, run.log_to if rank == 0 else "file", step) as writer:
        while step < max_steps:
            start = time.perf_counter()
            # forward and backward, micro-step by micro-step
            totals = torch.zeros(4, device=device)  # loss_G, loss_fake, interrupted, rank 0 failed
            for micro in range(run.grad_accum):
                batch, seed = micro_batch(prompts, run, seen, step, micro, rank, world)
                generator = torch.Generator(device).manual_seed(seed)
                draws = draw(generator, run.batch_size, shape, method, n_timesteps)
                c = pipe.encode_prompts(batch, method.official_prompts, run.resolution)
                c = c.to(device, dtype)
                sync = world == 1 or micro == run.grad_accum - 1
                totals[:2] += micro_step(nets, pipe.schedule, c, c_null.expand(len(batch)), draws,
                                         method, autocast, sync, run.grad_accum) / run.grad_accum
            totals[2:] = torch.tensor([stop["requested"], failed is not None], dtype=torch.float)
            totals = all_mean(totals, world)  # every rank learns of an interrupt at the same step
            check_step(totals, step, rank, failed, last_ckpt)
            # the update
            grad_norms = update(nets, method.max_grad_norm, run.ema)
            step, seen = step + 1, seen + per_step
            # log, checkpoint, validate
            interrupted = totals[2].item() > 0
            if rank == 0:
                try:
                    log_step(bar, run.out, step, totals, grad_norms,
                             per_step / (time.perf_counter() - start), writer,
                             [nets.opts[k].param_groups[0]["lr"] for k in ("student", "fake")])
                    last_ckpt = save_and_validate(pipe, nets, run, method.a_T,
                                                  {**meta, "images_seen": seen,
                                                   "options": options}, step, max_steps,
                                                  interrupted, writer) or last_ckpt
                except DiskFull as e:  # the other ranks learn of it at the next step
                    failed = e
            if failed and (world == 1 or step == max_steps or interrupted):  # no step left to tell
                raise TrainingError(stopped_by_full_disk(failed, last_ckpt))
            if interrupted:
                raise TrainingInterrupted(f"interrupted at step {step} of {max_steps}: saved "
                                          f"{checkpoint_path(run.out, step)}; continue with the "
                                          f"same command and --resume latest")
    if rank == 0:  # the run's own student: its EMA when it keeps one
        path = os.path.join(run.out, "student.safetensors")
        export_student(nets.student, path, meta, last_ckpt, nets.ema)
        log(f"wrote {path} (merged one-step denoiser)")
    return nets.student, nets.fake
