"""`python wadi.py demo`: a live Gradio page for the one-step student (Sec. 3.3's generator).

    python wadi.py demo --backbone toy                       (http://127.0.0.1:7860, the CPU toy)
    python wadi.py demo --unet runs/sd15 --teacher           (a student, beside its 25-step DDIM teacher)

A prompt, a seed and a number of images give one-step images (image i from seed + i, as `sample`), through
`Pipeline.generate` with `sample`'s defaults: without --unet the base model's own denoiser runs in one step.
Gradio is optional (requirements-demo.txt) and imported only here, when the page is built.
"""
import dataclasses
import os
import time

import cli
import toy
from cli import UsageError
from loading import fetch_file, load_component
from pipeline import BACKBONES, CACHE_DIR, DENOISERS, DTYPES, load_pipeline, pick_backbone, student_a_T

TEACHER_STEPS = 25
MAX_IMAGES = 8


def require_gradio():
    """The gradio module, or a UsageError naming the install command."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (offline CI, private prompts)
    try:
        import gradio
    except ImportError:
        raise UsageError("the demo needs gradio: pip install -r requirements-demo.txt") from None
    return gradio


def add_parser(sub):
    """Register the `demo` command on wadi.py's subcommands `sub`."""
    p = sub.add_parser("demo", help="a live web page (Gradio) drawing one-step images from a prompt",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--unet", "--transformer", dest="unet", help="the one-step student, as `sample --unet` takes it: "
                   "a file, a train run directory or owner/repo/file on the Hub (default: the base model's own "
                   "denoiser in one step, as `sample`)")
    p.add_argument("--backbone", choices=sorted(BACKBONES), help="the model family (default: the one recorded in "
                   "--unet's metadata, else sd15)")
    p.add_argument("--model", help="base model: a Hugging Face repo id or a local directory (default: the backbone's)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="pixart: where the T5 prompt embeddings are cached")
    p.add_argument("--teacher", action="store_true", help=f"also show the teacher's {TEACHER_STEPS}-step DDIM images "
                                                          "(CFG: the backbone's scale) and their time")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=cli.integer(1, 65535), default=7860, help="port to serve on")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.set_defaults(func=command)


def command(args):
    """`wadi.py demo`: load the student (and with --teacher the teacher), then serve the page until Ctrl-C."""
    require_gradio()
    device = cli.pick_device(args.device)
    dtype = cli.pick_dtype(args.dtype, device)
    unet = fetch_file(args.unet, "--unet") if args.unet else None
    backbone, model = cli.student_backbone(args.backbone, args.model, unet, "--unet")
    if args.teacher:
        cli.check_steps(model, TEACHER_STEPS, "--teacher's DDIM")
    pipe = load_pipeline(backbone, model, unet, dtype, device)
    teacher = None
    if args.teacher:  # the teacher's own denoiser beside the student's; the rest of the pipeline is shared
        spec = pick_backbone(backbone, None, model)
        teacher = pipe if unet is None else dataclasses.replace(
            pipe, denoiser=load_component(DENOISERS[spec.denoiser], model, spec.denoiser, dtype, device))
    app = build_app(pipe, student_a_T(unet), teacher, pick_backbone(backbone, None, model).guidance, backbone,
                    args.cache_dir, f"{backbone}: " + (f"student {args.unet}" if unet else "the base model's own "
                                                       "denoiser (not distilled)"))
    print(f"demo: http://{args.host}:{args.port} (Ctrl-C stops it)")
    app.launch(server_name=args.host, server_port=args.port, share=args.share)


def make_generate(pipe, a_T, teacher=None, guidance=7.5, backbone=None, cache_dir=None):
    """The page's callback: (prompt, seed, count) -> (images, time text) and, with a `teacher` pipeline,
    its DDIM images and time text too; images as a list of uint8 arrays (H, W, 3), image i from seed + i."""
    def run(p, prompts, seeds, steps):
        p.prepare_prompts(prompts + ([""] if steps > 1 else []), cache_dir)
        start = time.perf_counter()
        images = p.generate(prompts, seeds, steps, guidance, a_T)
        seconds = time.perf_counter() - start
        return list(images), f"{len(prompts)} image{'s' * (len(prompts) > 1)} in {seconds:.2f} s"

    def generate(prompt, seed, count):
        prompt = (prompt or "").strip()
        if not prompt:
            raise require_gradio().Error("type a prompt")
        count = min(max(int(count or 1), 1), MAX_IMAGES)
        seeds = [int(seed or 0) + i for i in range(count)]
        images, line = run(pipe, [prompt] * count, seeds, 1)
        unknown = toy.unknown_words([prompt]) if backbone in toy.BACKBONES else []
        if unknown:
            line += f" (the toy does not know: {' '.join(unknown)})"
        if teacher is None:
            return images, line
        return (images, line, *run(teacher, [prompt] * count, seeds, TEACHER_STEPS))
    return generate


def build_app(pipe, a_T, teacher=None, guidance=7.5, backbone=None, cache_dir=None, title="WaDi"):
    """The Gradio page (gr.Blocks, not launched): prompt, seed, number of images and Generate; a gallery of
    one-step images with their time, and with a `teacher` pipeline its DDIM gallery and time beside."""
    gr = require_gradio()
    example = "a large red circle at the top left" if backbone in toy.BACKBONES else "a photo of a cat wearing a scarf"
    with gr.Blocks(title="WaDi one-step demo", analytics_enabled=False) as app:
        gr.Markdown(f"## WaDi: one-step text-to-image\n{title}")
        with gr.Row():
            prompt = gr.Textbox(value=example, label="prompt", elem_id="prompt", scale=4)
            seed = gr.Number(value=0, precision=0, minimum=0, label="seed (image i: seed + i)", elem_id="seed")
            count = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images", elem_id="count")
        button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            with gr.Column():
                outputs = [gr.Gallery(label="one step", columns=4, format="png", interactive=False,
                                      elem_id="gallery"),
                           gr.Markdown(elem_id="time")]
            if teacher is not None:
                with gr.Column():
                    outputs += [gr.Gallery(label=f"teacher: {TEACHER_STEPS}-step DDIM, CFG {guidance:g}", columns=4,
                                           format="png", interactive=False, elem_id="teacher-gallery"), gr.Markdown(elem_id="teacher-time")]
        callback = make_generate(pipe, a_T, teacher, guidance, backbone, cache_dir)
        gr.on([button.click, prompt.submit], callback, [prompt, seed, count], outputs, api_name="generate")
    return app
