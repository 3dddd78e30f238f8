"""Toy VSD probe: the distillation step of vsd.py (same losses) with the knobs the toy tuning needs, printing
the student's FD and prompt accuracy (toy.py protocol, first --n balanced prompts and seeds) every --every
steps, so that a run shows its trajectory rather than only its end. Its defaults are those of `wadi.py train
--backbone toy`. README ("The toy backbone") lists what it measured, e.g.

    python bench/toy_probe.py --every 300                                  # the toy defaults (batch 4, 1200 steps)
    python bench/toy_probe.py --batch-size 16 --steps 450 --every 150      # batch 16: fewer, larger steps
    python bench/toy_probe.py --adapter full --lr 1e-4 --lr-fake 1e-3 --batch-size 16 --steps 450 --every 150
    python bench/toy_probe.py --model DIR --fake-steps 2     # another teacher; 2 fake steps per student step
    python bench/toy_probe.py --drop-prob 0.5                # the fake score sees the empty prompt half the time
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
import toyeval  # noqa: E402
import vsd  # noqa: E402
from lorad import ADAPTERS, adapter_state_dict, load_adapters  # noqa: E402
from pipeline import BACKBONES, load_pipeline  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    run, method = vsd.run_config("toy")
    toy_defaults = {**vars(method), **vars(run)}
    p.add_argument("--model", default=BACKBONES["toy"].repo)
    p.add_argument("--adapter", choices=sorted(ADAPTERS), default="lorad")
    p.add_argument("--rank", type=int, default=toy_defaults["rank"])
    p.add_argument("--rank-fake", type=int, default=toy_defaults["rank_fake"])
    p.add_argument("--lr", type=float, default=toy_defaults["lr"])
    p.add_argument("--lr-fake", type=float, default=toy_defaults["lr_fake"])
    p.add_argument("--guidance", type=float, default=toy_defaults["guidance"])
    p.add_argument("--drop-prob", type=float, default=vsd.VSDConfig.drop_prob,
                   help="probability of the empty prompt in the fake score network's own loss")
    p.add_argument("--fake-steps", type=int, default=1, help="fake score steps per student step")
    p.add_argument("--ema", type=float, default=toy_defaults["ema"],
                   help="EMA decay of the student's adapters (scored with it; 0: off)")
    p.add_argument("--decay", choices=["constant", "cosine"], default="constant",
                   help="the student's learning rate over --steps: constant, or cosine to zero")
    p.add_argument("--steps", type=int, default=toy_defaults["max_steps"])
    p.add_argument("--batch-size", type=int, default=toy_defaults["batch_size"])
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--n", type=int, default=256, help="samples per evaluation")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline("toy", args.model)
    classifier = toyeval.load_classifier(os.path.join(args.model, "classifier"))
    reference = toyeval.data_statistics(classifier)
    attributes = toy.balanced_attributes(args.n)
    prompts = [toy.prompt(a) for a in attributes]

    def evaluate(student):
        live = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()}
        if ema:  # score the averaged adapters, as `train --ema` exports them
            load_adapters(student, ema)
        student.eval()
        images = toyeval.toy_images(pipe, student, prompts, list(range(args.n)), 1, toyeval.TEACHER_GUIDANCE)
        student.train()
        load_adapters(student, live)
        return {**toyeval.toy_metrics(images, attributes, classifier, reference), "pixel_mean": images.mean().item()}

    torch.manual_seed(0)
    teacher = pipe.denoiser.eval()
    student, fake = vsd.build_networks(teacher, args.rank, args.rank_fake, args.adapter)
    student_params = [q for q in student.parameters() if q.requires_grad]
    fake_params = [q for q in fake.parameters() if q.requires_grad]
    ema = {k: v.detach().clone() for k, v in adapter_state_dict(student).items()} if args.ema else None
    opt = torch.optim.AdamW(student_params, lr=args.lr, **vsd.ADAMW)
    opt_fake = torch.optim.AdamW(fake_params, lr=args.lr_fake, **vsd.ADAMW)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps) if args.decay == "cosine" else None
    cfg = vsd.VSDConfig(guidance=args.guidance, drop_prob=args.drop_prob)
    all_prompts = [toy.prompt(a) for a in toy.all_attributes()]
    nulls = pipe.encode_prompts([""]).expand(args.batch_size)
    shape, pt = pipe.latent_shape(32), pipe.schedule.prediction_type
    print(f"{vars(args)}\nstep 0: {evaluate(student)}", flush=True)
    generator, start = torch.Generator().manual_seed(0), time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(all_prompts), (args.batch_size,), generator=generator).tolist()
        c = pipe.encode_prompts([all_prompts[i] for i in batch])
        d = vsd.draw(generator, args.batch_size, shape, cfg)
        loss_g, x0 = vsd.generator_loss(student, teacher, fake, pipe.schedule, c, nulls, d, cfg)
        loss_g.backward()
        torch.nn.utils.clip_grad_norm_(student_params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched:
            sched.step()
        if ema:
            vsd.update_ema(ema, student, args.ema)
        for k in range(args.fake_steps):
            if k > 0:  # fresh student samples and noise for each further fake step
                d = vsd.draw(generator, args.batch_size, shape, cfg)
                with torch.no_grad():
                    x0 = vsd.one_step(student, d["z"], c, pt, cfg.a_T).float()
            vsd.fake_loss(fake, pipe.schedule, x0, c, nulls, d).backward()
            torch.nn.utils.clip_grad_norm_(fake_params, cfg.max_grad_norm)
            opt_fake.step()
            opt_fake.zero_grad(set_to_none=True)
        if step % args.every == 0:
            print(f"step {step} ({time.perf_counter() - start:.0f} s): {evaluate(student)}", flush=True)


if __name__ == "__main__":
    main()
