"""How many CPU threads `wadi.py train --backbone toy` should use (its --threads): the toy's VSD step
timed at each thread count, on the machine as it is and beside K busy processes.

Each case is a fresh `python wadi.py train --backbone toy --max-steps S --threads T` in a temporary
run directory; its seconds per step are the median of train.log's per-step throughput after the
first --warmup steps. A busy process is one more torch process computing 512x512 matmuls on one
thread (another user's training, a test suite), started before the case and stopped after it.
The cores `--threads auto` would take at the case's start (cli.set_threads) are printed beside it. Each case
runs under both OpenMP wait policies: ACTIVE (threads spin at a barrier, OpenMP's default for torch
on Linux) and PASSIVE (they sleep: what wadi.py and evaluate.py set unless OMP_WAIT_POLICY is set).

    python bench/threads.py --threads 1 2 --load 0 1 --steps 60 --policy ACTIVE PASSIVE
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import busy_cores  # noqa: E402
from trainlog import read_log  # noqa: E402
BUSY = ("import torch; torch.set_num_threads(1); a = torch.randn(512, 512)\n"
        "while True: a = torch.tanh(a @ a)")


def seconds_per_step(threads, steps, warmup, env):
    """The median seconds per VSD step of a short toy run with `threads` threads."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, os.path.join(ROOT, "wadi.py"), "train", "--backbone", "toy", "--out", out,
                "--max-steps", str(steps), "--checkpoint-every", str(steps), "--validate-every", str(steps),
                "--eval-samples", "2", "--threads", str(threads)]
        subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rates = read_log(out)["images/s"][warmup:]
    return 4 / statistics.median(rates)  # the toy's batch: 4 images per step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--load", type=int, nargs="+", default=[0, 1], help="busy processes beside the run")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--policy", nargs="+", default=["ACTIVE", "PASSIVE"], help="OMP_WAIT_POLICY values")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    print(f"{os.cpu_count()} cores; {args.steps} toy VSD steps per case, median after {args.warmup}")
    print(f"{'busy':>4} {'policy':>7} {'threads':>7} {'auto':>4} {'s/step':>7} {'1,200 steps':>11}")
    for load in args.load:
        busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(load)]
        try:
            time.sleep(5 if load else 0)
            for policy in args.policy:
                for threads in args.threads:
                    auto = max(1, os.cpu_count() - busy_cores())
                    s = seconds_per_step(threads, args.steps, args.warmup, {**env, "OMP_WAIT_POLICY": policy})
                    print(f"{load:>4} {policy:>7} {threads:>7} {auto:>4} {s:7.3f} "
                          f"{s * 1200 / 60:9.1f} min", flush=True)
        finally:
            for b in busy:
                b.kill()


if __name__ == "__main__":
    main()
