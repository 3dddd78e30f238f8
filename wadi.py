"""WaDi's command line.

    python wadi.py train --backbone sd15 --prompts journeydb.jsonl --out runs/sd15   (paper Sec. 3.3)
    python wadi.py train --backbone sd15 --dry-run                  (counts and memory, no download)
    python wadi.py export --run runs/sd15 --out wadi-sd15.safetensors
    python wadi.py sample --unet STUDENT.safetensors --prompt "a cat" --out cat.png
    python wadi.py sample --backbone sd15 --steps 25 --guidance 7.5 --prompt "a cat" --out teacher.png
    python wadi.py train --backbone pixart --prompts journeydb.jsonl --out runs/pixart  (256 px)
    python wadi.py pretrain --backbone toy --out runs/pretrain-toy
    python wadi.py sample --backbone sd15 --unet STUDENT.safetensors \
        --controlnet lllyasviel/sd-controlnet-canny --control-image edges.png --prompt "a bird" --out bird.png
    python wadi.py analyze --student runs/sd15 --out analysis/sd15     (paper Fig. 2)
    python wadi.py plot runs/toy runs/toy-seed1 --out runs/losses.png   (loss curves, overlaid)
    python wadi.py invert --exemplars painted_on/ --out runs/painted_on  (ReVersion: a relation token)
    python wadi.py dreambooth --instance-dir cat/ --instance-prompt "a photo of sks cat" \
        --class-prompt "a photo of a cat" --out runs/sks-cat                  (paper Fig. 7)
    python wadi.py sample --unet STUDENT.safetensors --adapter-add runs/sks-cat --prompt "..." --out sks.png

`train` distills the backbone's teacher into a one-step student (under torchrun: DDP over all
processes); `export` writes a run's merged student as one denoiser file in diffusers keys; `sample`
draws one-step images from a student (x0 = (z - sqrt(1 - a_T) eps(z, 999)) / sqrt(a_T)) or DDIM
images with classifier-free guidance from the teacher; `pretrain` trains a toy backbone from
scratch; `analyze` compares a student's weights with its teacher's (analysis.py); `plot` draws
train runs' loss curves (trainlog.py); `invert` learns a token on the teacher that the student
uses (invert.py); `dreambooth` fine-tunes the teacher on a subject, and its LoRaD angles add to a
student's (dreambooth.py). Every failure the
user can fix (a bad option value, missing or unreachable weights, a corrupt checkpoint, a bad prompt
file, a non-finite loss) is one line on stderr and exit code 2; Ctrl-C during `train` saves the
step and exits with 130.
"""
import dataclasses
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

import analysis
import cli
import demo
import dreambooth
import dryrun
import export
import invert
import pretrain
import redilate
import toy
import toyeval
import trainlog
from checkpoint import TrainingError, TrainingInterrupted, check_resume, find_checkpoint
from cli import UsageError
from ddp import from_first_rank, process_device
from loading import LoadError, disk_space, fetch_file, write_json
from lorad import ADAPTERS
from pipeline import BACKBONES, CACHE_DIR, DTYPES, load_pipeline, pick_backbone, student_a_T
from protocol import caption_hash
from vsd import BACKBONE_DEFAULTS, WEIGHT_DTYPES, TrainConfig, VSDConfig, run_config, run_options, train


def cmd_sample(args):
    prompts = list(args.prompt or []) + (cli.read_prompts(args.prompts) if args.prompts else [])
    if not prompts:
        raise UsageError("give --prompt TEXT (repeatable) or --prompts FILE")
    cli.check_out_file(args.out, (".png",), "--out", directory_ok=True)
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    unet = fetch_file(args.unet, "--unet") if args.unet else None
    cli.check_control(args.controlnet, args.control_image, len(prompts))
    backbone, model = cli.student_backbone(args.backbone, args.model, unet, "--unet", args.resolution)
    cli.check_steps(model, args.steps)
    resolution, height, width = (cli.check_resolution(backbone, model, getattr(args, o), f"--{o}")
                                 for o in ("resolution", "height", "width"))
    if args.controlnet and height != width:
        raise UsageError("--controlnet draws square images: give --resolution, not --height and --width")
    guidance = pick_backbone(backbone, resolution, model).guidance if args.guidance is None else args.guidance
    pipe = load_pipeline(backbone, model, unet, dtype, device, resolution=resolution)
    for run in args.adapter_add or []:
        dreambooth.add_run(pipe.denoiser, run, backbone)
    tokens = pipe.add_embeddings(args.embedding or [])
    if backbone in toy.BACKBONES:
        toy.warn_unknown_words(prompts, backbone, known=tokens)
    pipe.prepare_prompts(prompts + ([""] if args.steps > 1 else []), args.cache_dir)
    a_T = student_a_T(unet)
    size = (height or resolution or pipe.resolution, width or resolution or pipe.resolution)
    timesteps = pipe.schedule.ddim_timesteps(args.steps) if args.steps > 1 else [999]
    recipe, line = redilate.plan(args.redilate, backbone, pipe.denoiser, size, pipe.resolution, timesteps)
    if recipe or max(size) > pipe.resolution or args.redilate != "auto" or args.freeu:
        print(line + redilate.set_freeu(pipe.denoiser, backbone, args.freeu))
    jobs = [(p, args.seed + i) for i, p in enumerate(p for p in prompts for _ in range(args.num_per_prompt))]
    controlnet, control = None, None
    if args.controlnet:
        controlnet, control = cli.load_control(pipe, args.controlnet, args.control_image, resolution)
        if len(control) > 1:  # one per job
            control = control.repeat_interleave(args.num_per_prompt, 0)
    images = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="sample", unit="batch"):
        batch = jobs[start:start + args.batch_size]
        image = control[start:start + args.batch_size] if control is not None and len(control) > 1 \
            else control
        images.append(pipe.generate([p for p, _ in batch], [s for _, s in batch], args.steps, guidance,
                                    a_T, size, controlnet, image, args.control_scale, recipe))
    cli.save_images(np.concatenate(images), args.out, args.grid, [p for p, _ in jobs])
    print(f"wrote {len(jobs)} image(s) to {args.out}")


def cmd_train(args):
    fields = {f.name for cls in (TrainConfig, VSDConfig) for f in dataclasses.fields(cls)}
    run, method = run_config(args.backbone, **{k: v for k, v in vars(args).items() if k in fields})
    if args.dry_run:
        return dryrun.dry_run(args.backbone, run, args.model)
    rank, world, device = process_device()
    if args.prompts:  # read by rank 0 alone, sent to the others (ddp.from_first_rank)
        prompts = from_first_rank(cli.read_prompts, args.prompts)
    elif args.backbone in toy.BACKBONES:
        prompts = [toy.prompt(a) for a in toy.all_attributes()]
    else:
        raise UsageError("give --prompts FILE (text, JSON list, or the JourneyDB .jsonl annotations)")
    spec = pick_backbone(args.backbone, run.resolution, args.model)
    model = args.model or spec.repo
    run = dataclasses.replace(run, resolution=run.resolution or spec.resolution)
    if args.backbone in toy.BACKBONES:
        run = dataclasses.replace(run, validation_prompts=tuple(
            toy.prompt(a) for a in toy.balanced_attributes(8)))
    meta = {"backbone": args.backbone, "base_model": model, "adapter": run.adapter}
    options = run_options(meta, run, method, caption_hash(prompts), world)
    # before anything is written to --out: a run there is resumed, replaced (--overwrite) or kept
    old_files = from_first_rank(cli.check_run_out, run.out, run.resume, args.overwrite)
    if run.resume:
        check_resume(find_checkpoint(run.out, run.resume), options,
                     print if rank == 0 else lambda _: None)
    cli.check_resolution(args.backbone, model, run.resolution)
    pipe = load_pipeline(args.backbone, model, dtype=WEIGHT_DTYPES[run.mixed_precision], device=device,
                         vae=rank == 0, resolution=run.resolution)
    if rank == 0:
        if old_files:
            cli.remove_run(run.out, old_files)
            print(f"--overwrite: removed the run that was in {run.out} ({len(old_files)} files)")
        with disk_space(run.out):
            write_json(os.path.join(run.out, "run.json"),
                       {**options, "environment": cli.environment(device, torch.get_num_threads())})
    student, _ = train(pipe, prompts, run, method, device, meta, options)
    if args.backbone in toy.BACKBONES and rank == 0:
        toyeval.report(pipe, student, model, run.out, args.eval_samples, run.cache_dir)


def cmd_analyze(args):
    analysis.analyze_command(args.student, args.out, args.teacher, args.json, args.swap, args.swap_out,
                             args.backbone, args.model, args.adapter)


def cmd_plot(args):
    cli.check_out_file(args.out, (".png",), "--out")
    trainlog.plot_losses(args.runs, args.out)
    print(f"wrote {args.out}: both losses and both gradient norms of {len(args.runs)} run(s) against the step")


def default_help(name):
    """The paper's default of a training option and each backbone's own (vsd.BACKBONE_DEFAULTS)."""
    paper = next(f.default for cls in (TrainConfig, VSDConfig) for f in dataclasses.fields(cls)
                 if f.name == name)
    own = [f"{b} {d[name]:g}" for b, d in BACKBONE_DEFAULTS.items() if name in d]
    return f"(backbone default: {paper:g}" + "".join(f"; {o}" for o in own) + ")"


def add_common(p, backbone_help="the model family (default: sd15)", default="sd15"):
    g = p.add_argument_group("model")
    g.add_argument("--backbone", choices=sorted(BACKBONES), default=default, help=backbone_help)
    g.add_argument("--model", help="base model: a Hugging Face repo id or a local directory in the same layout "
                   "(default: the backbone's: " + ", ".join(f"{name} {os.path.relpath(b.repo, os.path.dirname(os.path.abspath(__file__))) if os.path.isdir(b.repo) else b.repo}"
                                                         for name, b in BACKBONES.items()) + ")")
    g.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", choices=sorted(DTYPES),
                   help="weights dtype (default: fp16 on a GPU, fp32 on the CPU)")
    g.add_argument("--cache-dir", default=CACHE_DIR, help="pixart: where the T5 prompt embeddings are cached")
    return g


def build_parser():
    parser = cli.Parser(prog="wadi.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)

    p = sub.add_parser("sample", help="one-step (student) or DDIM (teacher) text-to-image sampling",
                       description="One-step images from a distilled student, or DDIM + CFG images from the teacher.")
    add_common(p, "the model family (default: the one recorded in --unet's metadata, else sd15)", None)
    g = p.add_argument_group("what to draw")
    g.add_argument("--unet", "--transformer", dest="unet",
                   help="one-step student: a full U-Net (or PixArt transformer) in diffusers keys, safetensors or a "
                        "PyTorch state dict (our export, the official gudaochangsheng/WaDi/"
                        "rotated_unet-sdv1-5.safetensors, DMD2's pytorch_model.bin): a local path or "
                        "owner/repo/file on the Hub (default: the base model's own denoiser, the teacher)")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="prompt file: text (one per line), JSON list, or JourneyDB .jsonl")
    g.add_argument("--num-per-prompt", type=cli.POSITIVE, default=1, help="images per prompt")
    g.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="image i uses seed + i, whatever the batch")
    g.add_argument("--out", required=True, help="FILE.png, or a directory (00000.png, ...)")
    g.add_argument("--grid", action="store_true", help="also write grid.png (directory output)")
    g.add_argument("--embedding", action="append", help="learned tokens for the prompts (repeatable): `invert`'s "
                   "or diffusers' learned_embeds.safetensors / .bin, A1111 / ComfyUI textual-inversion .pt / .safetensors")
    g.add_argument("--adapter-add", action="append", metavar="RUN", help="a `dreambooth` run's adapter added to "
                   "the denoiser (repeatable): LoRaD angles add to a LoRaD student's, a one-step personalised "
                   "generator without distilling again (dreambooth.py)")
    g = p.add_argument_group("sampler")
    g.add_argument("--steps", type=cli.POSITIVE, default=1,
                   help="1: one-step generation; 2 up to the schedule's 1000: DDIM with CFG")
    g.add_argument("--guidance", type=cli.SCALE, help="CFG scale for DDIM (default: the backbone's: sd15 and "
                   "sd21 7.5, sdxl 5, pixart 4.5, toy and toy-dit 3)")
    g.add_argument("--resolution", type=cli.POSITIVE, help="pixels (default: the backbone's native resolution; "
                                                          "pixart: 256, 512 or 1024 picks that model)")
    g.add_argument("--height", type=cli.POSITIVE, help="pixels (default: --resolution's)")
    g.add_argument("--width", type=cli.POSITIVE, help="pixels (default: --resolution's)")
    g.add_argument("--batch-size", type=cli.POSITIVE, default=4, help="images per forward pass")
    g.add_argument("--redilate", type=redilate.parse_option, default="auto", help="above the training resolution, "
                   "run the U-Net's convolutions dilated (ScaleCrafter; docs/highres.md): auto (factor = resolution / "
                   "training resolution), off, or a factor")
    g.add_argument("--freeu", action="store_true", help="FreeU with the backbone's published settings (ScaleCrafter's "
                   "default, off here: untested on a one-step student)")
    g = p.add_argument_group("ControlNet")
    g.add_argument("--controlnet", help="a ControlNet in diffusers' layout: Hub repo (lllyasviel/sd-controlnet-canny), "
                                        "local directory, or one safetensors file (config.json beside it, else the "
                                        "U-Net's); the student and the DDIM teacher both take it")
    g.add_argument("--control-image", action="append", help="--controlnet's condition image (repeatable: one for all "
                                                            "prompts, or one per prompt)")
    g.add_argument("--control-scale", type=cli.SCALE, default=1.0, help="scale of the ControlNet's residuals")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="VSD distillation into a one-step student (paper defaults)",
                       description="Variational score distillation with LoRaD adapters (paper Sec. 3). "
                                   "Defaults are the paper's; where a backbone has its own (vsd.py, "
                                   "BACKBONE_DEFAULTS), the help says so.")
    add_common(p)
    g = p.add_argument_group("data and run")
    g.add_argument("--prompts", help="training prompts: text (one per line), JSON list, or JourneyDB "
                                     ".jsonl (required except for the toys, which use their 128 prompts)")
    g.add_argument("--out", help="run directory: log, checkpoints, samples, student "
                                 "(default: runs/BACKBONE)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --out (without it, "
                   "train refuses to mix two runs in one directory)")
    g.add_argument("--resume", help="a checkpoint file, or `latest` in --out: continue exactly where it "
                                    "stopped")
    g.add_argument("--seed", type=cli.NON_NEGATIVE,
                   help="adapter initialisation, noise and data order " + default_help("seed"))
    g.add_argument("--dry-run", action="store_true", help="build the networks on the meta device from "
                                                         "the built-in configs: counts and memory")
    g = p.add_argument_group("method")
    g.add_argument("--adapter", choices=sorted(ADAPTERS),
                   help="the paper's LoRaD, or a baseline of its Table 2 or R4 (orth-*; default: lorad)")
    g.add_argument("--rank", type=cli.POSITIVE, help="student adapter rank " + default_help("rank"))
    g.add_argument("--rank-fake", type=cli.POSITIVE,
                   help="fake score adapter rank " + default_help("rank_fake"))
    g.add_argument("--orth-blocks", type=cli.POSITIVE, help="orth-*: diagonal blocks per student layer "
                   + default_help("orth_blocks"))
    g.add_argument("--orth-blocks-fake", type=cli.POSITIVE, help="fake score's blocks " + default_help("orth_blocks_fake"))
    g.add_argument("--guidance", type=cli.SCALE,
                   help="CFG scale of teacher and fake score " + default_help("guidance"))
    g.add_argument("--official-prompts", action="store_true", default=None, help="as the official SD "
                   "code: CLIP's attention mask on the training prompts only, the fake score's empty "
                   "prompt per batch (default: no mask, per sample; docs/training.md)")
    g.add_argument("--ema", type=cli.number(0, 1, high_open=True), nargs="?", const=0.999,
                   help="EMA decay of the student adapter, 0.999 when given bare, 0 off "
                        + default_help("ema"))
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=cli.POSITIVE,
                   help="prompts per process and micro-step " + default_help("batch_size"))
    g.add_argument("--grad-accum", type=cli.POSITIVE,
                   help="micro-steps per optimizer step " + default_help("grad_accum"))
    g.add_argument("--max-steps", type=cli.NON_NEGATIVE,
                   help="optimizer steps; 0: run --epochs " + default_help("max_steps"))
    g.add_argument("--epochs", type=cli.number(0, low_open=True),
                   help="passes over the prompts when --max-steps is 0 " + default_help("epochs"))
    g.add_argument("--lr", type=cli.RATE, help="student learning rate " + default_help("lr"))
    g.add_argument("--lr-fake", type=cli.RATE, help="fake score learning rate " + default_help("lr_fake"))
    g.add_argument("--resolution", type=cli.POSITIVE, help="pixels (default: the backbone's native "
                                                          "resolution; pixart: 256, 512 or 1024 picks "
                                                          "that model)")
    g.add_argument("--mixed-precision", choices=list(WEIGHT_DTYPES), help="frozen weights and "
                   "activations in half precision; adapters stay fp32 (default: no)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the "
                   "backward pass: less memory, about a quarter more time")
    g = p.add_argument_group("checkpoints and validation")
    g.add_argument("--checkpoint-every", type=cli.POSITIVE,
                   help="steps between checkpoints " + default_help("checkpoint_every"))
    g.add_argument("--validate-every", type=cli.POSITIVE,
                   help="steps between sample grids " + default_help("validate_every"))
    g.add_argument("--eval-samples", type=cli.integer(2), default=toyeval.REPORT_SAMPLES,
                   help=f"toy: samples per generator in the final table (evaluate.py --toy: "
                        f"{toyeval.PROTOCOL['n']}; the shipped teacher's figures are cached for "
                        f"{toyeval.REPORT_SAMPLES}, default: %(default)s)")
    g.add_argument("--keep-checkpoints", type=cli.NON_NEGATIVE, help="how many of the latest "
                   "checkpoints to keep (0: all) " + default_help("keep_checkpoints"))
    g.add_argument("--log", dest="log_to", choices=trainlog.LOGS, help="file: train.log; tensorboard: also "
                   "TensorBoard event files in --out/tensorboard (pip install -r requirements-tensorboard.txt; "
                   "default: file)")
    p.set_defaults(func=cmd_train)


    pretrain.add_parser(sub)
    invert.add_parser(sub)
    dreambooth.add_parser(sub)
    demo.add_parser(sub)

    export.add_parser(sub)

    p = sub.add_parser("analyze", help="paper Fig. 2: a student's weights against its teacher's, norm vs direction",
                       description="Per output row of every weight: the norm change and the direction change of the "
                                   "student against its teacher, their SVD energy, the paper's Fig. 2 (a) and (b); "
                                   "optionally the norm or direction swap of Fig. 2 (c).")
    p.add_argument("--student", required=True, help="a denoiser file (safetensors, or a .bin/.pth state dict), "
                                                    "owner/repo/file on the Hub, or a `train` run directory")
    p.add_argument("--teacher", help="the same kinds (default: the backbone's base denoiser, unet/ or transformer/ "
                                     "of --model)")
    p.add_argument("--out", required=True, help="directory for analysis.json, fig2a.png, fig2b.png")
    p.add_argument("--json", help="write the JSON here (default: OUT/analysis.json)")
    p.add_argument("--swap", choices=analysis.SWAPS, help="also write the student with the teacher's norms "
                                                          "(its own directions) or the teacher's directions")
    p.add_argument("--swap-out", help="FILE.safetensors for --swap")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="the model family (default: the student's own, "
                                                                 "else sd15)")
    p.add_argument("--model", help="base model repo or directory (default: the student's own, else the backbone's)")
    p.add_argument("--adapter", choices=sorted(ADAPTERS), help="which layers the student adapted, for the "
                                                               "adapted-layer summary (default: its own, else lorad)")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("plot", help="the loss curves of train runs, overlaid in one figure",
                       description="Both losses and both gradient norms against the step, one line per run, from the "
                                   "runs' train.log (a run also writes its own losses.png with its sample grids).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="train run directories")
    p.add_argument("--out", default=os.path.join("runs", "losses.png"), help="the figure, a .png")
    p.set_defaults(func=cmd_plot)
    for p in sub.choices.values():
        cli.add_threads(p)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    line = cli.set_threads(args.threads)[1]
    if args.command in ("train", "pretrain") and os.environ.get("RANK", "0") == "0":
        print(line)
    try:
        args.func(args)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    except (LoadError, UsageError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside the training loop, which saves its step and returns 130 itself
        print("interrupted", file=sys.stderr)
        sys.exit(130)
