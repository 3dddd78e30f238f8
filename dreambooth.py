"""DreamBooth (Ruiz et al., CVPR 2023) on the teacher with any adapter of lorad.py, LoRaD as a general
adapter outside distillation (the paper's Fig. 7), and the learned subject carried to the one-step
student without distilling again (docs/dreambooth.md).

- The loss, with prior preservation: the teacher's own denoising loss on the subject's 3-5 images
  under the instance prompt ("a photo of sks cat"), plus lambda (1) times the same loss on images the
  frozen teacher drew for the class prompt ("a photo of a cat"): in one batch [instance, class],
  `prior_preservation_loss`. The class images are drawn once (DDIM with CFG, the backbone's scale)
  and cached on disk, keyed by the teacher's weights, the prompts, the count, the seed and the
  sampler (`class_images`); the images' VAE latents are computed once (the posterior mean).
- Only the adapter trains (the teacher's layer rule `lorad.LAYERS[..., "student"]`; `full` trains
  every weight); the text encoder stays frozen, as in diffusers' DreamBooth examples by default.
- One-step personalisation (`add_run`, `wadi.py sample --adapter-add RUN`): LoRaD rotates the same
  column pairs in every adapter of a layer, and plane rotations of the same planes add their angles,
  R(a) R(b) = R(a + b). A LoRaD student W_s = R(W, a) with the DreamBooth angles b is exactly the
  teacher rotated by a + b. Any student works (the angles rotate its merged weights); for a LoRA run
  the low-rank difference B A is added instead, the usual LoRA arithmetic, which is exact only as a
  sum of weights. Full fine-tuning, DoRA (whose learned norms belong to the teacher's rows) and the
  orthogonal maps are refused there.
"""
import contextlib
import functools
import hashlib
import json
import os
import shutil
import time

import torch
from PIL import Image
from tqdm import tqdm

import cli
import ddp
import trainlog
from checkpoint import (TrainingInterrupted, checkpoint_path, find_checkpoint, interruptible,
                        load_optimizer, optimizer_tensors, prune_checkpoints)
from diffusion import Text, predict
from loading import LoadError, file_metadata, read_tensors, save_tensors, write_json
from lorad import (ADAPTERS, adapter_state_dict, add_adapters, count_trainable, load_adapters,
                   merge_adapters, shared_copy)
from metrics import read_image_folder, weights_hash
from pipeline import BACKBONES, CACHE_DIR, DTYPES, load_pipeline, pick_backbone

ADDABLE = ("lorad", "lora")  # the runs `add_run` adds: angles, or B A (DoRA's norms, full weights: not)
RUN_FILES = ("dreambooth.json", "dreambooth.log", "adapter.safetensors", "unet.safetensors",
             "tensorboard")  # besides checkpoints
LR = {"full": 5e-6, "lora": 1e-4}  # diffusers' DreamBooth examples; every other adapter 1e-4


def prior_preservation_loss(pred, target, instance, n_instance, n_class, prior_weight=1.0):
    """DreamBooth's loss, MSE over the instance rows plus `prior_weight` times MSE over the class
    rows of a batch of n_instance + n_class (diffusers' `train_dreambooth.py` splits its batch
    [instance, class] the same way), as a sum over the rows at hand, `instance` (B,) bool saying
    which are which: under torchrun each process holds some rows and the sums add up to the whole
    batch's loss. Returns (loss, its instance part, its prior part)."""
    per_row = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    parts = per_row[instance].sum() / max(n_instance, 1), per_row[~instance].sum() / max(n_class, 1)
    return parts[0] + prior_weight * parts[1], *parts


def class_key(pipe, prompts, n, seed, steps, guidance, resolution):
    """What the class images depend on, and its hash: the cache folder's name. The weights: the
    denoiser's and the text encoder's (a T5, never resident, by its repo or folder)."""
    text = weights_hash(pipe.text_encoder) if pipe.text_encoder is not None else pipe.text_model  # T5: its repo
    fields = {"weights": weights_hash(pipe.denoiser) + text,
              "prompts": list(prompts), "n": n, "seed": seed, "steps": steps, "guidance": guidance,
              "resolution": resolution}
    return fields, hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def class_images(pipe, prompts, n, seed, steps, guidance, resolution, cache_dir, batch_size=8, log=print):
    """n images (n, 3, S, S) in [-1, 1] of the frozen teacher for the class `prompts` (image i from
    prompts[i % len] and seed seed + i), read from `cache_dir`/dreambooth-class/KEY/ when drawn
    before with the same teacher and settings (`class_key`), else drawn and stored there (PNGs and
    class.json, in a temporary folder renamed when whole)."""
    fields, key = class_key(pipe, prompts, n, seed, steps, guidance, resolution)
    folder = os.path.join(cache_dir, "dreambooth-class", key)
    if os.path.isfile(os.path.join(folder, "class.json")):
        log(f"class images: {n} cached in {folder}")
    else:
        jobs = [(prompts[i % len(prompts)], seed + i) for i in range(n)]
        partial = f"{folder}.tmp-{os.getpid()}"
        os.makedirs(partial, exist_ok=True)
        for start in tqdm(range(0, n, batch_size), desc="class images", unit="batch"):
            batch = jobs[start:start + batch_size]
            images = pipe.generate([p for p, _ in batch], [s for _, s in batch], steps, guidance,
                                   resolution=resolution)  # (b, S, S, 3) uint8
            for i, image in enumerate(images, start):
                Image.fromarray(image).save(os.path.join(partial, f"{i:05d}.png"))
        write_json(os.path.join(partial, "class.json"), fields)
        if os.path.exists(folder):  # drawn meanwhile by another run
            shutil.rmtree(partial)
        else:
            os.replace(partial, folder)
        log(f"class images: {n} drawn by the teacher, cached in {folder}")
    return read_image_folder(folder, resolution, "the class-image cache")[0]  # the same tensor either way


def encode_once(pipe, images, batch_size=16):
    """The denoiser's inputs of images (N, 3, S, S) in [-1, 1]: VAE latents (the posterior mean),
    or the pixels themselves for a pixel-space toy."""
    param = next(pipe.denoiser.parameters())
    if pipe.vae is None:
        return images.to(param.device, param.dtype).contiguous()
    with torch.no_grad():
        return torch.cat([pipe.vae.encode(b.to(param.device, torch.float32).contiguous()).to(param.dtype)
                          for b in images.split(batch_size)])


def instance_prompts(directory, names, prompt):
    """Each instance image's prompt: its caption in the folder's metadata.jsonl (Hugging Face's
    imagefolder layout, {"file_name": ..., "text": ...} per line, as diffusers' advanced DreamBooth
    scripts read it) when there is one, else `prompt` for all."""
    path = os.path.join(directory, "metadata.jsonl")
    if not os.path.isfile(path):
        return [prompt] * len(names)
    try:
        captions = {row["file_name"]: row["text"] for row in map(json.loads, filter(str.strip, open(path)))}
    except (ValueError, KeyError, TypeError) as e:
        raise LoadError(f"{path}: not imagefolder metadata ({{\"file_name\": ..., \"text\": ...}} per line): "
                        f"{type(e).__name__}: {e}") from None
    missing = [n for n in names if n not in captions]
    if missing:
        raise LoadError(f"{path} has no caption for {', '.join(missing[:3])}")
    return [captions[n] for n in names]


def dreambooth(pipe, instances, instance_prompt, classes, class_prompts, out, adapter="lorad",
               rank=4, steps=800, batch_size=1, lr=None, prior_weight=1.0, seed=0,
               checkpoint_every=200, keep_checkpoints=2, resume=None, metadata=None, log=print,
               log_to="file"):
    """Fine-tune `pipe`'s teacher on `instances` (N, 3, S, S) under `instance_prompt` (one prompt,
    or a list with one per image) with prior preservation on `classes` (M, 3, S, S; image i from
    class_prompts[i % len]; None or a zero `prior_weight`: DreamBooth without it), the adapter
    `adapter` of rank `rank` (module docstring). Each step takes `batch_size` instance and as many
    class images (with replacement); under torchrun every process draws the same picks, takes its
    share of the rows, and the gradients are summed. Rank 0 writes `out`/adapter.safetensors (the
    adapter, with its kind and rank), unet.safetensors (the merged denoiser, diffusers keys, with
    `metadata`: backbone and base model, which `sample --unet` reads), dreambooth.log and
    checkpoints. Returns the adapted denoiser."""
    rank_id, world = ddp.ranks()
    with torch.random.fork_rng(devices=[]):  # the adapter's initial weights from `seed` too
        torch.manual_seed(seed)
        net = add_adapters(shared_copy(pipe.denoiser), "student", rank, adapter)
    params = [p for p in net.parameters() if p.requires_grad]
    x_inst = encode_once(pipe, instances)
    x_class = x_inst[:0] if classes is None else encode_once(pipe, classes)  # (M, C, h, w)
    n_class = batch_size if len(x_class) and prior_weight else 0  # class rows per step
    size = instances.shape[-1]  # SDXL's time ids are those of this image size
    prompts = [instance_prompt] * len(instances) if isinstance(instance_prompt, str) else instance_prompt
    c_inst = [pipe.encode_prompts([p], resolution=size) for p in prompts]
    c_class = [pipe.encode_prompts([p], resolution=size) for p in class_prompts]
    opt = torch.optim.AdamW(params, lr=lr or LR.get(adapter, 1e-4), weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed)
    start = 0
    if resume:
        tensors, start = read_tensors(resume), int(file_metadata(resume)["step"])
        load_adapters(net, {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")},
                      f"checkpoint {resume}")
        load_optimizer(opt, tensors, "opt")
        gen.set_state(tensors["rng"])
        log(f"resumed {resume} at step {start}")
    log(f"{adapter} rank {rank}: {count_trainable(net):,} trainable parameters")
    log_path = os.path.join(out, "dreambooth.log")
    if rank_id == 0:
        trainlog.keep_log(log_path, start)
    n_t = len(pipe.schedule.alphas_cumprod)
    bar = tqdm(range(start, steps), desc="dreambooth", initial=start, total=steps, dynamic_ncols=True,
               disable=rank_id > 0)
    with interruptible() as stop, open(log_path, "a") if rank_id == 0 else contextlib.nullcontext() as logfile, \
            trainlog.open_writer(out, log_to if rank_id == 0 else "file", start) as writer:
        for step in bar:
            pick = torch.cat([torch.randint(len(x_inst), (batch_size,), generator=gen),
                              torch.randint(len(x_class), (n_class,), generator=gen)])
            t = torch.randint(n_t, (len(pick),), generator=gen)
            eps = torch.randn((len(pick), *x_inst.shape[1:]), generator=gen)
            mine = torch.arange(len(pick))[rank_id::world]  # this process's rows of [instance, class]
            x0 = torch.cat([x_inst[pick[:batch_size]], x_class[pick[batch_size:]]])[mine]
            rows = [c_inst[int(pick[i])] if i < batch_size else c_class[int(pick[i]) % len(c_class)]
                    for i in mine.tolist()]  # each image's prompt
            text = functools.reduce(Text.cat, rows)
            e, tt = eps[mine].to(x0), t[mine].to(x0.device)
            xt = pipe.schedule.add_noise(x0, e, tt)
            loss, inst, prior = prior_preservation_loss(predict(net, xt, tt, text), pipe.schedule.target(
                x0, e, tt), (mine < batch_size).to(xt.device), batch_size, n_class, prior_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in params if world > 1 else ():  # the processes' rows add up to the batch
                p.grad = ddp.all_mean(p.grad, world) * world
            opt.step()
            loss, inst, prior = (ddp.all_mean(x.detach(), world).item() * world for x in (loss, inst, prior))
            if rank_id == 0:
                logfile.write(f"{step + 1} {loss:.6f} {inst:.6f} {prior:.6f}\n")
                trainlog.log_scalars(writer, step + 1, {"loss/total": loss, "loss/instance": inst,
                                                        "loss/prior": prior})
            bar.set_postfix(loss=f"{loss:.4f}")
            last = step + 1 == steps
            if rank_id == 0 and (last or stop["requested"] or (step + 1) % checkpoint_every == 0):
                save_tensors({**{f"adapter.{k}": v for k, v in adapter_state_dict(net).items()},
                              "rng": gen.get_state(), **optimizer_tensors(opt, "opt")[0]},
                             checkpoint_path(out, step + 1), {"step": step + 1})
                prune_checkpoints(out, keep_checkpoints)
            if stop["requested"] and not last:
                raise TrainingInterrupted(f"stopped after step {step + 1}; continue with --resume latest")
    if rank_id == 0:
        save_tensors(adapter_state_dict(net), os.path.join(out, "adapter.safetensors"),
                     {"adapter": adapter, "rank": rank, "role": "student"})
        save_tensors(merge_adapters(shared_copy(net)).state_dict(), os.path.join(out, "unet.safetensors"),
                     metadata or {})
    return net


def add_run(denoiser, run_dir, backbone=None):
    """Add a DreamBooth run's adapter (its adapter.safetensors) to `denoiser` in place: a LoRaD run
    rotates the denoiser's weights by its angles (a LoRaD student's become R(W, a + b)), a LoRA run
    adds its B A (module docstring). `backbone`: the denoiser's, checked against the run's."""
    path = os.path.join(run_dir, "adapter.safetensors")
    if not os.path.isfile(path):
        raise LoadError(f"--adapter-add {run_dir}: no adapter.safetensors (a `wadi.py dreambooth` run's "
                        f"folder)")
    meta, options = file_metadata(path), read_run(run_dir)
    if backbone and options.get("backbone") not in (None, backbone):
        raise LoadError(f"--adapter-add {run_dir} was trained on {options['backbone']}, not {backbone}")
    if meta.get("adapter") not in ADDABLE:
        raise LoadError(f"--adapter-add {run_dir}: a {meta.get('adapter')} run has no angles or low-rank "
                        f"difference to add (lorad and lora runs have); sample its unet.safetensors with --unet")
    add_adapters(denoiser, meta.get("role", "student"), int(meta["rank"]), meta["adapter"])
    load_adapters(denoiser, read_tensors(path), f"--adapter-add {run_dir}")
    return merge_adapters(denoiser)


def read_run(run_dir):
    """The options of a DreamBooth run (its dreambooth.json), {} when there is none."""
    path = os.path.join(run_dir, "dreambooth.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


def add_parser(sub):
    """Register the `dreambooth` command on wadi.py's subcommands `sub`."""
    p = sub.add_parser("dreambooth", help="DreamBooth with prior preservation on the teacher, with LoRaD or "
                                          "another adapter (paper Fig. 7); sample --adapter-add carries it "
                                          "to a one-step student", description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="sd15", help="default: %(default)s")
    p.add_argument("--model", help="base model repo or directory (default: the backbone's)")
    p.add_argument("--instance-dir", required=True, help="a folder of 3-5 images of the subject")
    p.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks cat" (an image captioned in '
                   'the folder\'s metadata.jsonl, Hugging Face\'s imagefolder layout, takes its caption)')
    p.add_argument("--class-prompt", action="append", required=True,
                   help='e.g. "a photo of a cat" (repeatable: the class images are split among them)')
    p.add_argument("--num-class-images", type=cli.POSITIVE, default=200, help="default: 200 (DreamBooth's "
                                                                             "README)")
    p.add_argument("--class-steps", type=cli.integer(2), default=25, help="DDIM steps of the class images")
    p.add_argument("--class-guidance", type=cli.number(0), help="their CFG scale (default: the backbone's)")
    p.add_argument("--out", required=True, help="run directory: adapter.safetensors, unet.safetensors, "
                                                "dreambooth.log, checkpoints")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), default="lorad", help="default: %(default)s")
    p.add_argument("--rank", type=cli.POSITIVE, default=4, help="adapter rank (default: 4, diffusers' LoRA)")
    p.add_argument("--steps", type=cli.POSITIVE, default=800, help="default: 800 (diffusers' README, with "
                                                                  "prior preservation)")
    p.add_argument("--batch-size", type=cli.POSITIVE, default=1, help="instance images per step, and as many "
                                                                     "class images (default: 1)")
    p.add_argument("--lr", type=cli.RATE, help="AdamW learning rate (default: full 5e-6, others 1e-4)")
    p.add_argument("--prior-weight", type=cli.number(0), default=1.0, help="lambda (default: 1)")
    p.add_argument("--resolution", type=cli.POSITIVE, help="default: the backbone's native resolution")
    p.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="data, noise and class-image seed")
    p.add_argument("--checkpoint-every", type=cli.POSITIVE, default=200, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=cli.NON_NEGATIVE, default=2, help="latest kept (0: all)")
    p.add_argument("--resume", help="a checkpoint file, or latest in --out")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--log", dest="log_to", choices=trainlog.LOGS, default="file",
                   help="file: dreambooth.log; tensorboard: also event files in --out/tensorboard")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="where the class images are kept (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the frozen weights' dtype (the "
                                                                          "adapter trains in fp32)")
    p.set_defaults(func=command)


def command(args):
    """`wadi.py dreambooth` (under torchrun too)."""
    trainlog.check_log(args.log_to)
    rank_id, world, device = ddp.process_device()
    found = cli.check_run_out(args.out, args.resume, args.overwrite, RUN_FILES)
    resume = find_checkpoint(args.out, args.resume) if args.resume else None
    resolution = cli.check_resolution(args.backbone, args.model, args.resolution)
    pipe = load_pipeline(args.backbone, args.model, dtype=DTYPES[args.dtype], device=device,
                         resolution=resolution)
    size = resolution or pipe.resolution
    instances, names = read_image_folder(args.instance_dir, size, "--instance-dir", at_least=2,
                                         hint="DreamBooth: 3 to 5 images of the subject")
    prompts = instance_prompts(args.instance_dir, names, args.instance_prompt)
    pipe.prepare_prompts([*dict.fromkeys(prompts), *args.class_prompt, ""])
    guidance = args.class_guidance
    guidance = pick_backbone(args.backbone, resolution, args.model).guidance if guidance is None else guidance
    classes = ddp.from_first_rank(class_images, pipe, args.class_prompt, args.num_class_images, args.seed,
                                  args.class_steps, guidance, size, args.cache_dir) if args.prior_weight \
        else None
    if rank_id == 0:
        cli.remove_run(args.out, found)
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "dreambooth.json"), {
            "backbone": args.backbone, "model": args.model, "instance_dir": args.instance_dir,
            "instance_prompt": args.instance_prompt, "instance_prompts": prompts, "class_prompts": args.class_prompt,
            "num_class_images": args.num_class_images, "class_steps": args.class_steps,
            "class_guidance": guidance, "adapter": args.adapter, "rank": args.rank, "steps": args.steps,
            "batch_size": args.batch_size, "lr": args.lr or LR.get(args.adapter, 1e-4),
            "prior_weight": args.prior_weight, "resolution": size, "seed": args.seed, "processes": world})
    start = time.perf_counter()
    dreambooth(pipe, instances, prompts, classes, args.class_prompt, args.out, args.adapter,
               args.rank, args.steps, args.batch_size, args.lr, args.prior_weight, args.seed,
               args.checkpoint_every, args.keep_checkpoints, resume, log_to=args.log_to,
               metadata={"backbone": args.backbone, "base_model": args.model or pick_backbone(
                   args.backbone, resolution).repo, "dreambooth": args.instance_prompt})
    if rank_id == 0:
        print(f"trained in {time.perf_counter() - start:.0f} s; sample the teacher with it: python wadi.py sample "
              f"--backbone {args.backbone} --unet {args.out}/unet.safetensors --steps 25 --prompt "
              f"\"{args.instance_prompt}\"; or a one-step student: --unet STUDENT --adapter-add {args.out}")
