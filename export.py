"""`wadi.py export`: a train run's merged one-step student in the files other tools load
(docs/export.md).

- `diffusers` (default): the denoiser alone, one safetensors file in diffusers keys with the run's
  metadata (backbone, base model, a_T), which `wadi.py sample --unet` and diffusers
  (`load_state_dict(strict=True)`) read.
- `pipeline`: a complete diffusers pipeline folder (StableDiffusionPipeline, StableDiffusionXLPipeline
  or PixArtAlphaPipeline):
  the merged denoiser, the base model's VAE, text encoder and tokenizer, and a scheduler chosen so
  that `pipe(prompt, num_inference_steps=1, guidance_scale=0)` computes exactly our one-step image:
  DDIM with "trailing" spacing (its one timestep is 999), `set_alpha_to_one` (the step's previous
  alpha is 1, so the step returns x0 itself), and the base schedule's betas with the last one set
  so that alphas_cumprod[999] is the student's a_T (0.0047, the official constant, where SD's own
  schedule has 0.00466).
- `single-file`: one safetensors in the original Stable Diffusion (LDM) layout that ComfyUI's
  CheckpointLoaderSimple and AUTOMATIC1111 load (ldm.py), SD1.5, SD2.1 and SDXL.
- `lora`: the difference of the merged student from its base as a kohya-layout LoRA (kohya.py) of
  `--rank`, for ComfyUI's and A1111's LoRA loaders; a rotation is not exactly low-rank, so the
  relative weight error it leaves is printed.

`--base OTHER` applies the run's rotation to another fine-tune of the same base model (a diffusers
folder or file, or a single-file checkpoint): LoRaD's angles rotate whatever weight of that shape
they are merged into, giving rotate(W_other, theta).
"""
import os
import shutil

import torch

import cli
import kohya
import ldm
from checkpoint import export_student
from cli import UsageError
from diffusion import NoiseSchedule
from loading import MissingFile, check_state_dict, fetch, fetch_file, file_metadata, read_json, \
    read_tensors, read_weights, save_tensors, weight_files, write_json
from lorad import merge_adapters
from pipeline import has_vae, parts_of
from vsd import VSDConfig, shared_copy

FORMATS = ("diffusers", "pipeline", "single-file", "lora")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json",
                   "tokenizer.json", "spiece.model", "added_tokens.json")
PIPELINES = {  # model_index.json of each layout
    "unet": {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False},
    "transformer": {"_class_name": "PixArtAlphaPipeline",
                    "transformer": ["diffusers", "PixArtTransformer2DModel"],
                    "text_encoder": ["transformers", "T5EncoderModel"],
                    "tokenizer": ["transformers", "T5Tokenizer"]},
    "sdxl": {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True},
}
SINGLE_FILE = ("sd15", "sd21", "sdxl")  # the backbones of ldm.py's layouts


def one_step_scheduler(schedule_config, a_T):
    """A diffusers DDIMScheduler config whose single step at t = 999 is WaDi's generator with `a_T`
    (module docstring), on the base `schedule_config`'s betas."""
    ac = NoiseSchedule.from_config(schedule_config).alphas_cumprod.double()  # (T,)
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    betas[-1] = 1 - a_T / ac[-2]
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": len(ac), "trained_betas": betas.tolist(),
            "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0, "timestep_spacing": "trailing",
            "prediction_type": schedule_config.get("prediction_type", "epsilon")}


def link_or_copy(src, dst):
    """A hard link where the file system allows (weights are large), else a copy."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def copy_component(model, component, out):
    """The config, weights (with a shard index) and tokenizer files of `component` in `model`."""
    tokenizer = component.startswith("tokenizer")  # SDXL: tokenizer_2 too
    names = ["config.json", *TOKENIZER_FILES] if tokenizer else ["config.json"]
    names += [f"{s}.safetensors.index.json" for s in ("diffusion_pytorch_model", "model")]
    found = [fetch(model, f"{component}/{n}") for n in names if has_file(model, f"{component}/{n}")]
    if not tokenizer:
        found += weight_files(model, component)
    for path in found:
        link_or_copy(path, os.path.join(out, component, os.path.basename(path)))


def has_file(model, path):
    try:
        fetch(model, path)
        return True
    except MissingFile:
        return False


def write_pipeline(out, run, pipe, merged, a_T):
    """A diffusers pipeline folder at `out` (module docstring)."""
    folder = "transformer" if "pixart" in run["backbone"] else "unet"
    parts = parts_of(run["base_model"])
    if not has_vae(parts):
        raise UsageError(f"--format pipeline: {run['backbone']} has no VAE; diffusers' pipelines need one")
    layout = PIPELINES.get(run["backbone"], PIPELINES[folder])
    write_json(os.path.join(out, "model_index.json"),
               {**layout, "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]})
    link_or_copy(fetch(run["base_model"], f"{folder}/config.json"), os.path.join(out, folder, "config.json"))
    save_tensors(merged, os.path.join(out, folder, "diffusion_pytorch_model.safetensors"))
    for component in ("vae", *(k for k in layout if k.startswith(("text_encoder", "tokenizer")))):
        copy_component(parts, component, out)
    config = read_json(fetch(parts, "scheduler/scheduler_config.json"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), one_step_scheduler(config, a_T))


def read_base(spec, config):
    """The denoiser state dict of another fine-tune: a diffusers folder (unet/ inside), a file in
    diffusers keys, or a single-file (LDM) checkpoint."""
    if os.path.isdir(spec):
        return read_weights(spec, "unet" if os.path.isdir(os.path.join(spec, "unet")) else "")
    state = read_tensors(fetch_file(spec, "--base"))
    return ldm.unet_from_ldm(state, config) if any(k.startswith("model.diffusion_model.") for k in state) \
        else state


def command(args):
    """`wadi.py export`."""
    want_dir = args.format == "pipeline"
    if want_dir and os.path.isfile(args.out) or not want_dir and not args.out.endswith(".safetensors"):
        raise UsageError(f"--out {args.out}: give " + ("a directory" if want_dir else "a file name ending in "
                                                         ".safetensors"))
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"--out {args.out} already exists; pass --overwrite to replace it")
    run, checkpoint, pipe, student, _ = cli.load_run(args.run, args.checkpoint or "latest", ema=not args.raw)
    if args.format == "single-file" and run["backbone"] not in SINGLE_FILE:
        raise UsageError(f"--format single-file is Stable Diffusion's layout ({', '.join(SINGLE_FILE)}), not "
                         f"{run['backbone']}'s")
    if args.format == "lora" and "pixart" in run["backbone"]:
        raise UsageError("--format lora: kohya's layout is for U-Nets (sd15, sd21, toy), not PixArt")
    base = pipe.denoiser.state_dict()
    config = None if "pixart" in run["backbone"] else read_json(fetch(run["base_model"], "unet/config.json"))
    if args.base:
        other = read_base(args.base, config)
        check_state_dict(pipe.denoiser, other, f"--base {args.base}")
        pipe.denoiser.load_state_dict(other)  # copied into the tensors the student shares
        base = {k: v.clone() for k, v in pipe.denoiser.state_dict().items()}
    a_T = run.get("a_T", VSDConfig.a_T)
    meta = {"backbone": run["backbone"], "base_model": args.base or run["base_model"], "adapter": run["adapter"],
            "a_T": a_T, "prediction_type": pipe.schedule.prediction_type,
            "checkpoint": os.path.basename(checkpoint)}
    if args.overwrite and os.path.exists(args.out):
        shutil.rmtree(args.out) if os.path.isdir(args.out) else os.remove(args.out)
    os.makedirs(args.out if want_dir else os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "diffusers":
        export_student(student, args.out, meta)
    else:
        merged = merge_adapters(shared_copy(student)).state_dict()
        if args.format == "pipeline":
            write_pipeline(args.out, run, pipe, merged, a_T)
        elif args.format == "lora":
            lora, error = kohya.extract_lora(base, merged, args.rank)
            save_tensors(lora, args.out, meta)
            print(f"LoRA of rank {args.rank} on {len(lora) // 3} layers: relative weight error {error:.4f} "
                  f"(||dW - up down|| / ||dW||, all layers; a rotation is not exactly low-rank)")
        else:
            parts = parts_of(run["base_model"])
            vae = read_weights(parts, "vae")
            text, text_2 = (read_weights(parts, folder) if has_file(parts, f"{folder}/config.json") else None
                            for folder in ("text_encoder", "text_encoder_2"))
            save_tensors(ldm.to_single_file(merged, config, vae, text, run["backbone"], text_2),
                         args.out, meta)
    weights = "raw adapters" if args.raw or not run.get("ema") else "EMA adapters"
    unfinished = "" if os.path.isfile(os.path.join(args.run, "student.safetensors")) else (
        f"; the run is unfinished (no student.safetensors yet): this is its state at step "
        f"{file_metadata(checkpoint)['step']}")
    print(f"wrote {args.out} ({args.format}: the merged one-step student from {checkpoint}, {weights}"
          f"{', rotating ' + args.base if args.base else ''}{unfinished})")


def add_parser(sub):
    """Register the `export` command on wadi.py's subcommands `sub`."""
    p = sub.add_parser("export", help="a run's merged one-step student for diffusers, ComfyUI and A1111",
                       description=__doc__.split("\n\n")[0] + " Formats: " + ", ".join(FORMATS) + ".")
    p.add_argument("--run", required=True, help="the run directory of `train`")
    p.add_argument("--out", required=True, help="FILE.safetensors, or a directory for --format pipeline")
    p.add_argument("--format", choices=FORMATS, default="diffusers",
                   help="diffusers: the denoiser file (default); pipeline: a diffusers pipeline folder that "
                        "samples in one step; single-file: the LDM checkpoint ComfyUI and A1111 load; lora: "
                        "a kohya LoRA of the difference from the base")
    p.add_argument("--rank", type=cli.POSITIVE, default=64, help="--format lora: its rank (default: 64)")
    p.add_argument("--base", help="apply the run's rotation to another fine-tune of the same base model: a "
                                  "diffusers folder or file, or a single-file checkpoint")
    p.add_argument("--checkpoint", help="a checkpoint file (default: the latest in --run)")
    p.add_argument("--raw", action="store_true", help="merge the raw student adapters even when the run kept an EMA")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=command)
