"""The toy figures of docs/export.md: how much a LoRA of the student's rotation keeps, and the demo's times.

1. For each --ranks R: `wadi.py export --format lora --rank R` of the --run, applied to the toy teacher
   (`kohya.apply_lora`, as a LoRA loader adds it), then scored by `evaluate.py --toy` (FD, prompt accuracy),
   beside the merged student (`export --format diffusers`). The relative weight error is the one `export`
   prints.
2. The demo's callback (`demo.make_generate`, what the page's Generate button runs): --images one-step images
   and the 25-step teacher's, --repeats times, median seconds.

    python bench/export_toy.py --run runs/toy --out runs/export-toy
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402
import kohya  # noqa: E402
from loading import file_metadata, read_tensors, read_weights, save_tensors  # noqa: E402
from pipeline import BACKBONES, load_pipeline, student_a_T  # noqa: E402


def wadi(*args):
    """A wadi.py or evaluate.py command in a fresh process; its stdout."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def toy_scores(student, out):
    """(FD, accuracy) of a student file under `evaluate.py --toy`."""
    path = os.path.join(out, os.path.basename(student) + ".json")
    wadi("evaluate.py", "--toy", "--student", student, "--json", path, "--threads", "1")
    scores = json.load(open(path))["student_1"]
    return scores["fd"], scores["accuracy"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a toy train run directory")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=os.path.join("runs", "export-toy"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    merged = os.path.join(args.out, "student.safetensors")
    wadi("wadi.py", "export", "--run", args.run, "--out", merged, "--overwrite", "--threads", "1")
    rows = [{"student": "merged", "error": 0.0, **dict(zip(("fd", "accuracy"), toy_scores(merged, args.out)))}]
    base = read_weights(BACKBONES["toy"].repo, "unet")
    for rank in args.ranks:
        lora = os.path.join(args.out, f"lora-{rank}.safetensors")
        printed = wadi("wadi.py", "export", "--run", args.run, "--format", "lora", "--rank", str(rank),
                       "--out", lora, "--overwrite", "--threads", "1")
        error = float(printed.split("relative weight error ")[1].split()[0])
        applied = os.path.join(args.out, f"lora-{rank}-applied.safetensors")
        save_tensors(kohya.apply_lora(base, read_tensors(lora)), applied, file_metadata(merged))
        rows.append({"student": f"lora rank {rank}", "error": error,
                     **dict(zip(("fd", "accuracy"), toy_scores(applied, args.out)))})
        print(rows[-1], flush=True)
    pipe = load_pipeline("toy", unet_file=merged)
    generate = demo.make_generate(pipe, student_a_T(merged), load_pipeline("toy"), BACKBONES["toy"].guidance, "toy")
    times = {"student": [], "teacher": []}
    for _ in range(args.repeats):
        out = generate("a large red circle at the top left", 0, args.images)
        for name, line in zip(times, out[1::2]):
            times[name].append(float(line.split(" in ")[1].split()[0]))
    demo_row = {name: statistics.median(t) for name, t in times.items()}
    with open(os.path.join(args.out, "export_toy.json"), "w") as f:
        json.dump({"command": " ".join(sys.argv), "lora": rows, "demo_seconds": demo_row,
                   "images": args.images}, f, indent=2)
    for row in rows:
        print(f"{row['student']:<14} weight error {row['error']:.4f}  FD {row['fd']:.2f}  accuracy {row['accuracy']:.3f}")
    print(f"demo, {args.images} images: one step {demo_row['student']:.2f} s, teacher 25 steps "
          f"{demo_row['teacher']:.2f} s (medians of {args.repeats})")


if __name__ == "__main__":
    main()
