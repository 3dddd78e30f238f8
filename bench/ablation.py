"""The paper's ablations on the toy backbone: the adapters of Table 2 and Table R4 (LoRaD, LoRA, DoRA, DoRA with
frozen norms, full fine-tuning, the three orthogonal maps at equal VSD steps), the rank table (rows A-F: student and fake score ranks) and the
swap of Fig. 2(c) (a student, its norm swap and its direction swap). Each subcommand trains its runs with
`wadi.py train` (in this process, one after the other, each logging to RUN/console.log; finished runs are
skipped, interrupted ones resumed from their last checkpoint), scores every checkpoint with the toy protocol
(toyeval.evaluate_toy, the exported student's EMA adapters), analyzes every student against the teacher
(analysis.py: NM / DM), and writes OUT/<table>.md, OUT/<table>.json and OUT/<table>-fd.png (FD against step,
one line per row: the mean over seeds, the band from the lowest to the highest). The adapter table also gives each
row's time per step (the median over a run's steps in its train.log: wall clock, as noisy as the machine's load)
and the peak memory of one toy VSD step (bench/memory.py in a fresh process, cached in OUT/memory-<adapter>.json).

    python bench/ablation.py adapters     # 8 adapters x seeds 0 1 2: 24 runs
    python bench/ablation.py ranks        # rows A-F x seeds 0 1: 12 runs, 2 of them shared with `adapters`
    python bench/ablation.py swap         # the full and LoRaD students of seed 0 (shared with `adapters`)
    nohup python bench/ablation.py adapters > runs/ablation/adapters.log 2>&1 &     (in the background)
    python bench/ablation.py adapters --kinds lorad full --seeds 0 --steps 2 --every 1 --n 16   (a smoke test)
    python bench/ablation.py adapters --backbone toy-dit   (the same on the toy DiT, in runs/ablation-toy-dit)

Runs take 6 to 7 min each on 2 free cores with their scoring (1,200 steps of batch 4, the toy defaults; measured on
the rank table's last 6 runs); all runs share OUT/runs/<adapter>-r<rank>-f<fake rank>-s<seed> (orthogonal maps:
-b<blocks>-f<fake blocks>-, the toy's), so the three tables reuse them.
Learning rates per adapter (LR below) are the ones the toy probes found stable (README, "The toy backbone").
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import analysis  # noqa: E402
import cli  # noqa: E402
import toy  # noqa: E402
import toyeval  # noqa: E402
import wadi  # noqa: E402
from loading import load_weights, read_json, read_safetensors  # noqa: E402
from lorad import ADAPTERS, ORTHOGONAL_MAPS, count_trainable, load_adapters, merge_adapters  # noqa: E402
from checkpoint import list_checkpoints  # noqa: E402
from trainlog import read_log  # noqa: E402
from pipeline import BACKBONES, DENOISERS  # noqa: E402
from vsd import BACKBONE_DEFAULTS, build_networks  # noqa: E402

TOY = BACKBONE_DEFAULTS["toy"]  # the toy recipe
# (student lr, fake score lr) per adapter: LoRA at LoRaD's 1e-3 / 1e-2 diverges on the toy, 3e-4 / 3e-3 does
# not; full fine-tuning of the whole denoiser at 1e-4 / 1e-3 (the README's probes)
LR = {"lorad": (1e-3, 1e-2), "lora": (3e-4, 3e-3), "dora": (3e-4, 3e-3), "dora-frozen-norm": (3e-4, 3e-3),
      "full": (1e-4, 1e-3), **dict.fromkeys(ORTHOGONAL_MAPS, (1e-3, 1e-2))}  # orthogonal maps: LoRaD's, untuned
# paper Table 2 (SD1.5, COCO 2017 5k): #Params, FID, CLIP, NM (%), DM (%); Table R4 (SD1.5, COCO 2017): FID and
# training cost in A100-days of the orthogonal maps and LoRaD (householder's "104.4 (2.1)" as printed)
PAPER_TABLE2 = {"lora": ("120.9M", 25.27, 0.29, 0.06, 0.83), "dora": ("121.2M", 26.56, 0.30, 0.03, 0.55),
                "dora-frozen-norm": ("120.9M", 24.52, 0.30, None, 0.92), "full": ("860.0M", 23.30, 0.30, 0.10, 2.21),
                "lorad": ("83.8M", 20.86, 0.31, None, 2.89), "orth-matrix-exp": (None, 33.43, None, None, None),
                "orth-cayley": (None, 26.72, None, None, None), "orth-householder": (None, 121.15, None, None, None)}
PAPER_DAYS = {"lorad": "2.1", "orth-matrix-exp": "12.1", "orth-cayley": "10.4", "orth-householder": "104.4 (2.1)"}
# the rank table (SD1.5, COCO 2014 30k): setting -> (student rank, fake rank, FID, CLIP); on the toy, C is
# the default (16 / 8): student ranks x 1/16, fake ranks x 1/4
PAPER_RANKS = {"A": (64, 32, 13.64, 0.30), "B": (128, 32, 13.16, 0.29), "C": (256, 32, 10.79, 0.31),
               "D": (512, 32, 12.75, 0.30), "E": (256, 16, 17.53, 0.29), "F": (256, 64, 16.98, 0.31)}
TOY_RANKS = {k: (s * TOY["rank"] // 256, f * TOY["rank_fake"] // 32) for k, (s, f, _, _) in PAPER_RANKS.items()}
# paper Fig. 2(c), DMD2 on SD1.5: variant -> (FID, CLIP)
PAPER_SWAP = {"student": (9.4, 0.30), "norm": (10.1, 0.30), "direction": (250.7, 0.12)}


def sizes(kind, rank, rank_fake):
    """The train options that size a run's adapters: the ranks, or for an orthogonal map the toy's blocks (the
    counts closest to LoRaD's: 163,904 / 71,264 against 188,800 / 78,272)."""
    if kind in ORTHOGONAL_MAPS:
        return {"orth_blocks": TOY["orth_blocks"], "orth_blocks_fake": TOY["orth_blocks_fake"]}
    return {"rank": rank, "rank_fake": rank_fake}


def run_dir(args, kind, rank, rank_fake, seed):
    size, fake = sizes(kind, rank, rank_fake).values()
    return os.path.join(args.out, "runs", f"{kind}-{'b' if kind in ORTHOGONAL_MAPS else 'r'}{size}-f{fake}-s{seed}")


def train_run(args, kind, rank, rank_fake, seed):
    """Train one run with `wadi.py train` unless it is finished (resuming an interrupted one); returns its
    directory, or raises RuntimeError with the end of its log when training failed."""
    out = run_dir(args, kind, rank, rank_fake, seed)
    lr, lr_fake = LR[kind]
    options = {"adapter": kind, **sizes(kind, rank, rank_fake), "seed": seed, "max_steps": args.steps,
               "checkpoint_every": args.every, "lr": lr, "lr_fake": lr_fake}
    if os.path.isfile(os.path.join(out, "run.json")):
        run = read_json(os.path.join(out, "run.json"))
        differ = {k: (run.get(k), v) for k, v in options.items() if run.get(k) != v}
        if differ:
            raise RuntimeError(f"{out} was trained with other options {differ}; remove it or pick another --out")
        if os.path.isfile(os.path.join(out, "student.safetensors")):
            return out
    size = [x for k, v in sizes(kind, rank, rank_fake).items() for x in (f"--{k.replace('_', '-')}", str(v))]
    argv = ["train", "--backbone", args.backbone, "--model", args.model, "--out", out, "--adapter", kind, *size,
            "--seed", str(seed), "--max-steps", str(args.steps), "--checkpoint-every",
            str(args.every), "--validate-every", str(args.every), "--keep-checkpoints", "0", "--lr", str(lr),
            "--lr-fake", str(lr_fake), "--eval-samples", str(args.n)]
    if list_checkpoints(out):
        argv += ["--resume", "latest"]
    os.makedirs(out, exist_ok=True)
    print(f"train {out} ({' '.join(argv)})", flush=True)
    log = os.path.join(out, "console.log")
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = wadi.main(argv)
    if code == 130:  # Ctrl-C or SIGTERM: train saved its step; stop the sweep (running it again resumes)
        raise KeyboardInterrupt(f"{out} interrupted")
    if code != 0:
        raise RuntimeError(f"{out}: train failed: {open(log).read().strip().splitlines()[-1]}")
    return out


def checkpoint_student(out, checkpoint):
    """(pipe, merged student) of one checkpoint of a run, with the EMA adapters when the run kept them
    (what `train` exports at the end)."""
    _, path, pipe, student, _ = cli.load_run(out, os.path.join(out, checkpoint))
    ema = {k[4:]: v for k, v in read_safetensors(path).items() if k.startswith("ema.")}
    if ema:
        load_adapters(student, ema)
    return pipe, merge_adapters(student).eval()


def step_of(checkpoint):
    return int(checkpoint[len("checkpoint-"):-len(".safetensors")])


def scored_curve(out, args, reference, variants=("student",)):
    """{variant: [(step, fd, accuracy), ...]} over the run's checkpoints, cached in OUT/curve.json; a variant
    is the student or its `analysis.SWAPS` swap against the teacher."""
    cache_path = os.path.join(out, "curve.json")
    cache = read_json(cache_path) if os.path.isfile(cache_path) else {}
    classifier = toyeval.load_classifier(os.path.join(args.model, "classifier"))
    for checkpoint in list_checkpoints(out):
        todo = [v for v in variants if str(step_of(checkpoint)) not in cache.get(v, {})]
        if not todo:
            continue
        pipe, student = checkpoint_student(out, checkpoint)
        for variant in todo:
            net = student
            if variant != "student":
                teacher_state, student_state = pipe.denoiser.state_dict(), student.state_dict()
                swapped = analysis.analyze(teacher_state, student_state, swap=variant, progress=False)[1]
                with torch.device("meta"):
                    net = denoiser(args)
                net = load_weights(net, swapped, what=f"{variant} swap").eval()
            results, _ = toyeval.evaluate_toy(pipe, net, classifier, args.n, toyeval.PROTOCOL["seed"], toyeval.PROTOCOL["guidance"],
                                          names=("student_1",), reference=reference)
            cache.setdefault(variant, {})[str(step_of(checkpoint))] = results["student_1"]
        with open(cache_path, "w") as f:
            json.dump(cache, f, indent=1)
    return {v: sorted((int(s), r["fd"], r["accuracy"]) for s, r in cache[v].items()) for v in variants}


def analyzed(out, args):
    """The summary of `wadi.py analyze` of the run's student against the teacher (cached in OUT/analysis/)."""
    path = os.path.join(out, "analysis", "analysis.json")
    if not os.path.isfile(path) or os.path.getmtime(path) < os.path.getmtime(os.path.join(out, "student.safetensors")):
        with open(os.path.join(out, "console.log"), "a") as f, contextlib.redirect_stdout(f), \
                contextlib.redirect_stderr(f):
            analysis.analyze_command(out, os.path.join(out, "analysis"))
    return read_json(path)["summary"]


def denoiser(args):
    """The toy's denoiser (U-Net or DiT) built from its config, on the current device."""
    folder = BACKBONES[args.backbone].denoiser
    return DENOISERS[folder].from_config(read_json(os.path.join(args.model, folder, "config.json")))


def trainable(args, kind, rank, rank_fake):
    """(student, fake score) trainable parameters, counted on the meta device."""
    with torch.device("meta"):
        teacher = denoiser(args)
        nets = build_networks(teacher, rank, rank_fake, kind, (TOY["orth_blocks"], TOY["orth_blocks_fake"]))
        return tuple(count_trainable(net) for net in nets)


def seed_runs(args, kind, rank, rank_fake, reference, variants=("student",)):
    """One row's runs: per seed its final metrics, curve and analysis (or the error that stopped it)."""
    runs = []
    for seed in args.seeds:
        if args.finished and not os.path.isfile(os.path.join(run_dir(args, kind, rank, rank_fake, seed),
                                                             "student.safetensors")):
            runs.append({"seed": seed, "error": "not run"})
            continue
        try:
            out = train_run(args, kind, rank, rank_fake, seed)
        except RuntimeError as e:
            print(f"  {e}", flush=True)
            runs.append({"seed": seed, "error": str(e)})
            continue
        metrics = read_json(os.path.join(out, "metrics.json"))
        curve = scored_curve(out, args, reference, variants)
        runs.append({"seed": seed, "dir": out, "metrics": metrics, "curve": curve, "analysis": analyzed(out, args),
                     "ms_per_step": ms_per_step(out)})
    return runs


def ms_per_step(out):
    """The median wall-clock time of a run's steps in ms, from its train.log (images per step / images per s)."""
    run = read_json(os.path.join(out, "run.json"))
    return statistics.median(run["batch_size"] * run["grad_accum"] / r * 1e3 for r in read_log(out)["images/s"])


def step_memory(args, kind):
    """bench/memory.py's row for `kind` on the backbone (one VSD step in a fresh process: peak memory over the frozen
    weights, ms/step), cached in OUT/memory-<kind>.json; None when it failed, or is not cached under --finished."""
    path = os.path.join(args.out, f"memory-{kind}.json")
    if not os.path.isfile(path) and not args.finished:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.py")
        subprocess.run([sys.executable, script, "--backbone", args.backbone, "--kinds", kind, "--steps", "3",
                        "--threads", "1", "--json", path], stdout=subprocess.DEVNULL, check=False)
    rows = read_json(path)["rows"] if os.path.isfile(path) else []
    return rows[0] if rows and "note" not in rows[0] else None


def mean_spread(values):
    """(mean, sample std over seeds or None for one value) of the values that are not None."""
    values = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    if not len(values):
        return None, None
    return values.mean().item(), values.std().item() if len(values) > 1 else None


def cell(mean_std, digits=2):
    mean, std = mean_std
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def paper_cell(v, digits=2):
    return "-" if v is None else v if isinstance(v, str) else f"{v:.{digits}f}"


def row_figures(runs, variant="student"):
    """The row's FD, accuracy, NM and DM (all layers) as (mean, spread) over its finished seeds; the final FD and
    accuracy are the last checkpoint's (the exported student's)."""
    done = [r for r in runs if "error" not in r]
    final = [r["curve"][variant][-1] for r in done if r["curve"][variant]]
    return {"fd": mean_spread([f[1] for f in final]), "accuracy": mean_spread([f[2] for f in final]),
            "ms_per_step": mean_spread([r.get("ms_per_step") for r in done]),
            "nm": mean_spread([r["analysis"]["norm_mean"] for r in done]),
            "dm": mean_spread([r["analysis"]["direction_mean"] for r in done]),
            "seeds": len(done), "failed": [r["seed"] for r in runs if "error" in r and r["error"] != "not run"],
            "not_run": [r["seed"] for r in runs if r.get("error") == "not run"]}


def seeds_cell(fig):
    """How many seeds a row's figures average, and which failed or were not run (--finished)."""
    notes = [f"{what}: {', '.join(map(str, fig[key]))}" for key, what in (("failed", "failed"), ("not_run", "not run"))
             if fig[key]]
    return f"{fig['seeds']}" + (f" ({'; '.join(notes)})" if notes else "")


def plot_curves(rows, path, title):
    """FD against step: one line per row (mean over seeds, band from min to max); the teacher's FDs dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    teacher = None
    for label, runs, variant in rows:
        curves = [dict((s, fd) for s, fd, _ in r["curve"][variant]) for r in runs if "error" not in r]
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        fds = torch.tensor([[c[s] for s in steps] for c in curves])  # (seeds, steps)
        ax.plot(steps, fds.mean(0), marker="o", markersize=3, label=label)
        ax.fill_between(steps, fds.min(0).values, fds.max(0).values, alpha=0.15)
        teacher = teacher or next(r["metrics"] for r in runs if "error" not in r)
    if teacher:
        for name, style in (("teacher_25", "--"), ("teacher_1", ":")):
            ax.axhline(teacher[name]["fd"], color="gray", linestyle=style, label=f"{name} ({teacher[name]['fd']:.1f})")
    ax.set(xlabel="VSD step", ylabel="FD (toy classifier features)")
    ax.set_title(title, fontsize=9)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(args, name, header, lines, rows, payload, title):
    """OUT/<name>.md (the table and the command), OUT/<name>.json and OUT/<name>-fd.png."""
    command = "python bench/ablation.py " + " ".join(sys.argv[1:] if args.argv is None else args.argv)
    md = [f"# {title}", "", f"`{command}`", "", "| " + " | ".join(header) + " |",
          "|" + "---|" * len(header), *("| " + " | ".join(map(str, line)) + " |" for line in lines), ""]
    with open(os.path.join(args.out, f"{name}.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"command": command, "options": {k: v for k, v in vars(args).items() if k not in ("argv", "func")},
                   "rows": payload}, f, indent=1)
    plot_curves(rows, os.path.join(args.out, f"{name}-fd.png"), title)
    print("\n".join(md[4:]))
    print(f"wrote {os.path.join(args.out, name)}.md, .json, -fd.png")


def cmd_adapters(args, reference):
    header = ["adapter", "student params", "FD", "accuracy", "NM (%)", "DM (%)", "ms/step (runs)",
              "one step alone: ms, peak MiB", "seeds", "paper #Params", "paper FID", "paper CLIP", "paper NM",
              "paper DM", "paper A100-days"]
    lines, rows, payload = [], [], []
    for kind in args.kinds:
        rank, rank_fake = TOY["rank"], TOY["rank_fake"]
        runs = seed_runs(args, kind, rank, rank_fake, reference)
        fig, params = row_figures(runs), trainable(args, kind, rank, rank_fake)[0]
        paper, memory = PAPER_TABLE2[kind], step_memory(args, kind)
        alone = f"{memory['ms']:.0f}, {memory['peak_over_frozen'] / 2**20:.1f}" if memory else "-"
        lines.append([kind, f"{params:,}", cell(fig["fd"]), cell(fig["accuracy"], 3), cell(fig["nm"], 4),
                      cell(fig["dm"], 4), cell(fig["ms_per_step"], 0), alone, seeds_cell(fig),
                      paper_cell(paper[0]), *(paper_cell(v) for v in paper[1:]), PAPER_DAYS.get(kind, "-")])
        rows.append((kind, runs, "student"))
        payload.append({"adapter": kind, **sizes(kind, rank, rank_fake), "student_params": params, **fig,
                        "step_alone": memory, "runs": runs, "paper": dict(zip(
                            ("params", "fid", "clip", "nm", "dm", "a100_days"), (*paper, PAPER_DAYS.get(kind))))})
    write_table(args, "adapters", header, lines, rows, payload,
                f"Tables 2 and R4 on the toy: adapters at {args.steps} VSD steps, seeds {args.seeds}")


def cmd_ranks(args, reference):
    header = ["setting", "student rank", "student params", "fake rank", "fake params", "FD", "accuracy", "seeds",
              "paper ranks", "paper FID", "paper CLIP"]
    lines, rows, payload = [], [], []
    for setting in args.rows:
        rank, rank_fake = TOY_RANKS[setting]
        runs = seed_runs(args, "lorad", rank, rank_fake, reference)
        fig, (params, fake_params) = row_figures(runs), trainable(args, "lorad", rank, rank_fake)
        s, f, fid, clip = PAPER_RANKS[setting]
        lines.append([setting, rank, f"{params:,}", rank_fake, f"{fake_params:,}", cell(fig["fd"]),
                      cell(fig["accuracy"], 3), seeds_cell(fig), f"{s} / {f}", fid, clip])
        rows.append((f"{setting} ({rank} / {rank_fake})", runs, "student"))
        payload.append({"setting": setting, "rank": rank, "rank_fake": rank_fake, "student_params": params,
                        "fake_params": fake_params, **fig,
                        "paper": {"rank": s, "rank_fake": f, "fid": fid, "clip": clip}, "runs": runs})
    write_table(args, "ranks", header, lines, rows, payload,
                f"Rank table on the toy (LoRaD, student / fake score ranks), seeds {args.seeds}")


def cmd_swap(args, reference):
    header = ["student", "variant", "FD", "accuracy", "seeds", "paper FID (DMD2)", "paper CLIP (DMD2)"]
    lines, rows, payload = [], [], []
    variants = ("student", *analysis.SWAPS)
    names = {"student": "the student", "norm": "norm from the teacher", "direction": "direction from the teacher"}
    for kind in args.kinds:
        runs = seed_runs(args, kind, TOY["rank"], TOY["rank_fake"], reference, variants)
        figures = {}
        for variant in variants:
            fig = figures[variant] = row_figures(runs, variant)
            lines.append([kind, names[variant], cell(fig["fd"]), cell(fig["accuracy"], 3), seeds_cell(fig),
                          *PAPER_SWAP[variant]])
            rows.append((f"{kind}: {names[variant]}", runs, variant))
        payload.append({"adapter": kind, "variants": {v: {"fd": f["fd"], "accuracy": f["accuracy"]} for v, f in
                                                      figures.items()}, "paper": PAPER_SWAP, "runs": runs})
    write_table(args, "swap", header, lines, rows, payload,
                f"Fig. 2(c) on the toy: students, their norm swap and direction swap, seeds {args.seeds}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="table", required=True)
    tables = {"adapters": (cmd_adapters, [0, 1, 2]), "ranks": (cmd_ranks, [0, 1]), "swap": (cmd_swap, [0])}
    for name, (func, seeds) in tables.items():
        q = sub.add_parser(name)
        q.add_argument("--backbone", choices=list(toy.BACKBONES), default="toy",
                       help="the toy U-Net (toy) or the toy DiT (toy-dit)")
        q.add_argument("--out", help="tables here, runs in OUT/runs/ (default: runs/ablation, "
                                     "runs/ablation-toy-dit)")
        q.add_argument("--seeds", type=int, nargs="+", default=seeds)
        q.add_argument("--steps", type=int, default=TOY["max_steps"], help="VSD steps of every run")
        q.add_argument("--every", type=int, default=TOY["checkpoint_every"],
                       help="checkpoint (and score) every N steps")
        q.add_argument("--n", type=int, default=toyeval.REPORT_SAMPLES, help="samples per score (toy protocol)")
        q.add_argument("--model", help="the toy repo, teacher and classifier (default: the backbone's)")
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--finished", action="store_true", help="tabulate the finished runs only: train nothing, "
                                                               "list the others as not run")
        if name == "ranks":
            q.add_argument("--rows", nargs="+", choices=sorted(PAPER_RANKS), default=sorted(PAPER_RANKS))
        else:
            q.add_argument("--kinds", nargs="+", choices=list(ADAPTERS),
                           default=list(ADAPTERS) if name == "adapters" else ["full", "lorad"])
        q.set_defaults(func=func)
    args = p.parse_args(argv)
    args.argv = argv
    args.out = args.out or os.path.join("runs", "ablation" if args.backbone == "toy" else f"ablation-{args.backbone}")
    args.model = args.model or BACKBONES[args.backbone].repo
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    reference = toyeval.data_statistics(toyeval.load_classifier(os.path.join(args.model, "classifier")))
    args.func(args, reference)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt as e:
        print(f"interrupted: {e or 'stopped'}; the same command resumes", file=sys.stderr)
        sys.exit(130)
