"""Toy brightness probe: why a distilled toy student's images come out darker than the data. At the latest
checkpoint of a `wadi.py train --backbone toy` run, it prints the mean pixel value of the x0-predictions of the
teacher (T) and of the fake score network (F), each unconditional (u), conditional (c) and CFG-guided (g, the
run's scale), on noised student samples and on noised data, per timestep t. The student moves along
(guided teacher - guided fake) (vsd.generator_loss), so where Tg and Fg agree, nothing pulls its brightness
back towards the data's. README ("The toy backbone") gives what it measured:

    python bench/toy_brightness.py runs/toy
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy  # noqa: E402
from diffusion import one_step, predict, to_eps, to_x0  # noqa: E402
from cli import load_run  # noqa: E402


def main(argv=None):
    """Prints the table; returns it as {"student" | "data": {"x0": mean, t: {"Tu": mean, ...}}}."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the run directory (run.json and checkpoint-*.safetensors)")
    p.add_argument("--n", type=int, default=128, help="images per row")
    p.add_argument("--timesteps", type=int, nargs="+", default=[50, 200, 400, 600, 800, 950])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run, checkpoint, pipe, student, fake = load_run(args.run)
    teacher = pipe.denoiser.eval()
    for net in (student, fake):
        net.eval()

    generator = torch.Generator().manual_seed(0)
    data, prompts, _ = toy.sample(args.n, generator)
    c = pipe.encode_prompts(prompts)
    c_null = pipe.encode_prompts([""]).expand(args.n)
    schedule, pt = pipe.schedule, pipe.schedule.prediction_type
    print(f"{checkpoint}: CFG {run['guidance']}, {args.n} images per row; mean pixel value of x0 / x0-predictions")
    scale, table = run["guidance"], {}
    with torch.no_grad():
        samples = one_step(student, torch.randn(data.shape, generator=generator), c, pt)  # (n, 3, 32, 32)
        for name, x0 in (("student", samples), ("data", data)):
            table[name] = {"x0": x0.mean().item()}
            print(f"{name}: x0 {table[name]['x0']:+.3f}")
            for t in args.timesteps:
                ts = torch.full((args.n,), t)
                xt = schedule.add_noise(x0, torch.randn(x0.shape, generator=generator), ts)
                a = schedule.alpha(ts, xt)
                row = table[name][t] = {}
                for net_name, net in (("T", teacher), ("F", fake)):
                    u, cond = (to_x0(to_eps(predict(net, xt, ts, context), xt, a, pt), xt, a).mean().item()
                               for context in (c_null, c))
                    # CFG is affine in the prediction, and so is its x0 and the mean of that
                    row.update({net_name + "u": u, net_name + "c": cond, net_name + "g": u + scale * (cond - u)})
                print(f"  t {t:3d}: " + "  ".join(f"{k} {v:+.3f}" for k, v in row.items()))
    return table


if __name__ == "__main__":
    main()
