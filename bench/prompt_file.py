"""Reading a JourneyDB-sized prompt file (`wadi.py train --prompts`): time and peak memory of
`cli.read_prompts` in a fresh process. BENCHMARKS.md quotes

    python bench/prompt_file.py write /tmp/train_anno.jsonl --rows 1400000 --wide 0.001
    python bench/prompt_file.py read /tmp/train_anno.jsonl
    git show main:cli.py > /tmp/cli_before.py && python bench/prompt_file.py read /tmp/train_anno.jsonl \
        --cli /tmp/cli_before.py                     # the same file through another version of cli.py

`write` makes an annotation file in JourneyDB's row layout (one JSON object per line: "img_path", "Task1"
with the Midjourney prompt and its style / content / atmosphere / other tags, "Task2" with the caption
and the visual questions with options and answers), about 1 KB a row as the real 1.4M-row file
(1.34 GiB). A `--wide` share of the rows holds an emoji and CJK characters in its caption, written as
UTF-8, not as \\u escapes (as JourneyDB's files are); every other row is ASCII. Captions are distinct
except for every tenth row, which repeats an earlier one (the loader de-duplicates).

`read` runs `read_prompts` in a new process (after importing torch, as `wadi.py` has) and prints one
line: the prompts read, the seconds, the peak growth of the resident set during the read (VmHWM after
minus VmRSS before, the peak reset through /proc/self/clear_refs), what stays resident after it, the
bytes of the list itself (its strings and slots, sys.getsizeof) and of its pickle, which is what
`ddp.from_first_rank` sends each rank under torchrun, with the seconds to pickle and to unpickle it.
"""
import argparse
import gc
import importlib.util
import json
import os
import pickle
import random
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a an the of in on with at under above cat dog fox owl castle forest city river mountain lighthouse "
         "portrait astronaut robot dragon garden street market ocean desert temple bridge train ship cloud "
         "neon golden misty ancient futuristic cozy dramatic vibrant dark bright soft glowing ornate tiny "
         "giant watercolor oil painting photograph illustration render sketch cinematic lighting sunset "
         "dawn night rain snow fog detailed intricate highly realistic surreal minimalist colorful").split()
STYLES = ("photorealistic", "watercolor", "oil painting", "digital art", "anime", "cinematic", "baroque",
          "art nouveau", "cyberpunk", "impressionism", "ukiyo-e", "low poly", "studio lighting")
WIDE = " \U0001f431\U0001f338 猫と桜、夜の東京"  # an emoji pair and CJK text


def words(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def row(i, rng, caption):
    prompt = f"{words(rng, rng.randint(20, 44))}, {rng.choice(STYLES)} --ar 16:9 --v 5"
    questions = [f"What is the {rng.choice(['style', 'mood', 'setting', 'main object'])} of the image?"
                 for _ in range(2)]
    return {"img_path": f"./{i % 200:03d}/{i:08x}{rng.getrandbits(64):016x}.jpg",
            "Task1": {"Prompt": prompt, "Style": rng.sample(STYLES, 3), "Content": words(rng, 4).split(),
                      "Atmosphere": words(rng, 3).split(), "Other": [words(rng, 2)]},
            "Task2": {"Caption": caption, "Question": questions,
                      "Options": [{k: words(rng, 2) for k in "ABCD"} for _ in questions],
                      "Answer": [rng.choice("ABCD") for _ in questions]}}


def write(path, rows, wide, seed=0):
    rng, captions = random.Random(seed), []
    every = round(1 / wide) if wide else 0
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if i % 10 == 9:  # a caption seen before
                caption = captions[rng.randrange(len(captions))]
            else:
                caption = f"{words(rng, rng.randint(18, 40))} #{i}" + (WIDE if every and i % every == 0 else "")
                captions.append(caption)
            f.write(json.dumps(row(i, rng, caption), ensure_ascii=False) + "\n")
    print(f"wrote {path}: {rows:,} rows, {os.path.getsize(path) / 2**30:.2f} GiB, "
          f"{len(set(captions)):,} distinct captions, {wide:.1%} of the rows with emoji / CJK")


def kib(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+) kB", f.read()).group(1))


def measure(path, cli_file):
    import torch  # noqa: F401  (resident before the read, as in wadi.py)
    sys.path.insert(0, ROOT)
    spec = importlib.util.spec_from_file_location("cli_under_test", cli_file)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    gc.collect()
    before = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    start = time.perf_counter()
    prompts = cli.read_prompts(path, log=lambda line: print(line, file=sys.stderr))
    seconds = time.perf_counter() - start
    peak = kib("VmHWM") - before
    gc.collect()
    held = kib("VmRSS") - before
    size = sys.getsizeof(prompts) + sum(sys.getsizeof(p) for p in prompts)
    start = time.perf_counter()
    blob = pickle.dumps(prompts)
    pickled = time.perf_counter() - start
    start = time.perf_counter()
    pickle.loads(blob)
    unpickled = time.perf_counter() - start
    return dict(prompts=len(prompts), seconds=seconds, peak_gib=peak / 2**20, held_gib=held / 2**20,
                list_gib=size / 2**30, pickle_gib=len(blob) / 2**30, pickle_s=pickled, unpickle_s=unpickled)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a JourneyDB-layout annotation file")
    w.add_argument("path")
    w.add_argument("--rows", type=int, default=1_400_000)
    w.add_argument("--wide", type=float, default=0.001, help="share of rows with emoji / CJK in the caption")
    r = sub.add_parser("read", help="time and memory of read_prompts on a file, in a fresh process")
    r.add_argument("path")
    r.add_argument("--cli", default=os.path.join(ROOT, "cli.py"), help="the cli.py whose read_prompts to run")
    r.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.command == "write":
        return write(args.path, args.rows, args.wide)
    if args.worker:
        return print(json.dumps(measure(args.path, args.cli)))
    out = subprocess.run([sys.executable, __file__, "read", args.path, "--cli", args.cli, "--worker"],
                         stdout=subprocess.PIPE, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{os.path.relpath(args.cli, ROOT) if args.cli.startswith(ROOT) else args.cli} on {args.path} "
          f"({os.path.getsize(args.path) / 2**30:.2f} GiB): {m['prompts']:,} prompts in {m['seconds']:.1f} s; "
          f"memory: peak +{m['peak_gib']:.2f} GiB, held after +{m['held_gib']:.2f} GiB (the list itself "
          f"{m['list_gib']:.2f} GiB); pickled for the other ranks {m['pickle_gib']:.2f} GiB, "
          f"{m['pickle_s']:.1f} s to pickle, {m['unpickle_s']:.1f} s to unpickle")


if __name__ == "__main__":
    main()
