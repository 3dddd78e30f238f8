"""The weight analysis of the paper's Fig. 2 (`wadi.py analyze`): how a one-step student's weights
differ from its teacher's, row by row, split into norm and direction.

For every weight of two or more dimensions (a convolution as its (out, in*kh*kw) matrix), per output row i
with m_i = ||W_i|| (teacher W, student W'):
- norm change |m'_i - m_i| / m_i and direction change 1 - cos(W'_i, W_i), in percent (Fig. 2(a)); per
  layer their mean and (population) std over rows; over layers, the "all-layer mean" `norm_mean` /
  `direction_mean` (the mean of the per-layer means, Table 2's NM / DM) and the std of the per-layer
  means, for all such weights and for the layers the student's adapter changes;
- the low-rank test (Fig. 2(b)): the singular values s of the direction residual V' - V (unit rows) and the
  energy sum(s_k^2, k < K) / sum(s^2) in percent at K = floor(0.3 * min(rows, cols));
- the swaps (Fig. 2(c)): the student with the teacher's norms and its own directions (`norm`), or with
  the teacher's directions and its own norms (`direction`); every other tensor stays the student's.
The paper does not give these formulas (its Suppl. E could not be read); docs/analysis.md says why
these readings were chosen, and the JSON carries the other plausible readings too:
the absolute norm change, the unit-vector distance ||V'_i - V_i||, the energy of the unsquared s, the
mean of the per-layer stds and the statistics pooled over all rows.

Files are read one tensor at a time (`LazyTensors`), each layer in float64, so a full SD1.5 or
PixArt pair fits a 24 GB CPU.
"""
import json
import math
import os
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dit import CLASS_NAMES as PIXART_CLASSES, PixArt
from loading import (LoadError, fetch, fetch_file, file_metadata, key_listing, read_json, read_tensors, weight_files,
                     weight_format)
from lorad import ADAPTERS, selected_layers
from pipeline import BACKBONES, DENOISERS
from unet import UNet

RANK_FRACTION = 0.3  # Fig. 2(b): the energy kept by 30% of the full rank
SWAPS = ("norm", "direction")
FIELDS = ("norm", "direction")  # the two changes, "<field>_change_mean" / "_std" per layer


def as_rows(w):
    """A weight (out, ...) as its float64 (out, in*kh*kw) matrix."""
    return w.detach().to(torch.float64).flatten(1)


def residual_energy(R, fraction=RANK_FRACTION):
    """(energy of s^2, energy of s, K): the share in percent of the top K = floor(fraction * min(R.shape))
    singular values of R (rows, cols), squared and not; (None, None, K) when R is zero. The s^2 are the
    eigenvalues of the smaller Gram matrix, in float64: the same numbers as an SVD, about 10x faster on
    the wide convolution matrices (SD1.5's 1280 x 11520)."""
    K = math.floor(fraction * min(R.shape))
    if not R.any():  # an untouched layer
        return None, None, K
    gram = R @ R.T if R.shape[0] <= R.shape[1] else R.T @ R  # (min, min)
    s2 = torch.linalg.eigvalsh(gram).clamp(min=0).flip(0)  # descending
    s = s2.sqrt()
    return (100 * s2[:K].sum() / s2.sum()).item(), (100 * s[:K].sum() / s.sum()).item(), K


def compare_layer(W, W2, swap=None):
    """The statistics of one layer, teacher W and student W2 (out, ...), and the student's swapped weight
    (W2's shape and dtype) when `swap` is "norm" or "direction". Rows with a zero norm in either have no
    direction: they are left out of the statistics (`rows` counts the others) and stay zero in a swap."""
    T, S = as_rows(W), as_rows(W2)  # (out, n)
    m, m2 = T.norm(dim=1), S.norm(dim=1)  # (out,)
    ok = (m > 0) & (m2 > 0)
    V = torch.where(ok[:, None], T / m.clamp(min=1e-300)[:, None], 0)  # unit rows
    V2 = torch.where(ok[:, None], S / m2.clamp(min=1e-300)[:, None], 0)
    residual = V2 - V  # (out, n), the direction residual
    distance = residual.norm(dim=1)[ok]
    changes = {"norm": 100 * (m2 - m).abs()[ok] / m[ok],
               "direction": 100 * 0.5 * distance ** 2}  # 1 - cos = ||V' - V||^2 / 2 for unit rows
    energy, energy_sigma, K = residual_energy(residual)
    stats = {"shape": list(W.shape), "rows": int(ok.sum())}
    for field, values in changes.items():
        stats[f"{field}_change_mean"] = values.mean().item() if len(values) else None
        stats[f"{field}_change_std"] = values.std(correction=0).item() if len(values) else None
    stats.update(svd_energy_30=energy, svd_rank_30=K, svd_energy_30_sigma=energy_sigma,
                 norm_abs_change_mean=(m2 - m).abs()[ok].mean().item() if ok.any() else None,
                 unit_distance_mean=100 * distance.mean().item() if ok.any() else None)
    if swap is None:
        return stats, None
    rows = m[:, None] * V2 if swap == "norm" else m2[:, None] * V  # (out, n)
    return stats, rows.view(W2.shape).to(W2.dtype)


def mean_std(values):
    values = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
    return (values.mean().item(), values.std(correction=0).item()) if len(values) else (None, None)


def summarize(layers):
    """The summary over `layers` (their statistics dicts): for each change the mean over layers of the
    per-layer means (`<field>_mean`, the paper's all-layer mean) and their std over layers (`<field>_std`),
    the mean of the per-layer stds, and the mean and std pooled over all rows; the mean energy."""
    layers = [s for s in layers if s["rows"]]
    if not layers:
        return None
    out = {"layers": len(layers)}
    n = torch.tensor([s["rows"] for s in layers], dtype=torch.float64)
    for field in FIELDS:
        mu = torch.tensor([s[f"{field}_change_mean"] for s in layers], dtype=torch.float64)
        sd = torch.tensor([s[f"{field}_change_std"] for s in layers], dtype=torch.float64)
        out[f"{field}_mean"], out[f"{field}_std"] = mu.mean().item(), mu.std(correction=0).item()
        out[f"{field}_layer_std_mean"] = sd.mean().item()
        pooled = (n * mu).sum() / n.sum()
        out[f"{field}_pooled_mean"] = pooled.item()
        second_moment = (n * (sd ** 2 + mu ** 2)).sum() / n.sum()
        out[f"{field}_pooled_std"] = (second_moment - pooled ** 2).clamp(min=0).sqrt().item()
    out["svd_energy_30_mean"] = mean_std(s["svd_energy_30"] for s in layers)[0]
    out["svd_energy_30_sigma_mean"] = mean_std(s["svd_energy_30_sigma"] for s in layers)[0]
    out["norm_abs_change_mean"] = mean_std(s["norm_abs_change_mean"] for s in layers)[0]
    out["unit_distance_mean"] = mean_std(s["unit_distance_mean"] for s in layers)[0]
    return out


def analyze(teacher, student, adapted=frozenset(), swap=None, progress=True):
    """(report, swapped): the analysis of `student` against `teacher` (mappings of key -> tensor with the
    same keys and shapes, e.g. LazyTensors or state dicts), its `adapted` keys summarised apart, and with
    `swap` ("norm" / "direction") the swapped student as a state dict (else None).
    Raises LoadError when the keys or shapes differ."""
    if swap not in (None, *SWAPS):
        raise ValueError(f"swap must be one of {SWAPS}, got {swap!r}")
    keys = sorted(student.keys())  # one order whatever the file format (safetensors files sort their keys)
    missing, unexpected = set(teacher.keys()) - set(keys), set(keys) - set(teacher.keys())
    if missing or unexpected:
        raise LoadError(f"the student's keys differ from the teacher's: {len(missing)} missing "
                        f"({key_listing(missing, 3)}), {len(unexpected)} unexpected ({key_listing(unexpected, 3)})")
    layers, swapped = [], {} if swap else None
    for key in tqdm(keys, desc="analyze", unit="tensor", disable=not progress, leave=False):
        W2 = student[key]
        if W2.dim() < 2:
            if swap:
                swapped[key] = W2
            continue
        W = teacher[key]
        if W.shape != W2.shape:
            raise LoadError(f"{key}: the student's shape {tuple(W2.shape)} differs from the teacher's {tuple(W.shape)}")
        stats, new = compare_layer(W, W2, swap)
        layers.append({"name": key, **stats, "adapted": key in adapted})
        if swap:
            swapped[key] = new
    summary = summarize(layers) or {}
    summary["adapted"] = summarize([s for s in layers if s["adapted"]])
    return {"layers": layers, "summary": summary}, swapped


def summary_table(report):
    """The summary as a printed table (percent)."""
    def cell(v, digits=4):
        return f"{v:.{digits}f}" if v is not None else "-"

    rows = [("all >=2-D weights", report["summary"]), (f"adapted ({report.get('adapter', '?')})",
                                                        report["summary"]["adapted"] or {})]
    lines = [f"{'layers':<24} {'count':>5} {'NM mean':>9} {'NM std':>9} {'DM mean':>9} {'DM std':>9} {'E@30%':>7}"]
    for name, s in rows:
        lines.append(f"{name:<24} {s.get('layers', 0):>5} {cell(s.get('norm_mean')):>9} {cell(s.get('norm_std')):>9} "
                     f"{cell(s.get('direction_mean')):>9} {cell(s.get('direction_std')):>9} "
                     f"{cell(s.get('svd_energy_30_mean'), 1):>7}")
    return "\n".join(lines)


def plot_figures(report, out_dir, title=""):
    """fig2a.png (per layer: mean vs std of the norm and direction changes, the all-layer means marked)
    and fig2b.png (per layer: energy at 30% rank against K, the mean as a dashed line) in `out_dir`."""
    import matplotlib  # the plots only: a plain analysis need not import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, summary = [s for s in report["layers"] if s["rows"]], report["summary"]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for field, colour in zip(FIELDS, ("tab:blue", "tab:orange")):
        ax.scatter([s[f"{field}_change_mean"] for s in layers], [s[f"{field}_change_std"] for s in layers], s=10,
                   alpha=0.6, color=colour, label=field.capitalize())
        if summary.get(f"{field}_mean") is not None:
            ax.scatter([summary[f"{field}_mean"]], [summary[f"{field}_std"]], marker="*", s=250, color=colour,
                       edgecolor="black", label=f"{field} all-layer mean ({summary[f'{field}_mean']:.2f}%)")
    ax.set(xlabel="Mean (%)", ylabel="Std (%)", title=f"(a) norm vs direction change {title}".strip())
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2a.png"), dpi=120)
    plt.close(fig)

    points = [(s["svd_rank_30"], s["svd_energy_30"]) for s in layers if s["svd_energy_30"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    if points:
        ax.scatter(*zip(*points), s=12, alpha=0.7)
        mean = sum(e for _, e in points) / len(points)
        ax.axhline(mean, linestyle="--", color="tab:red", label=f"Mean Energy {mean:.1f}%")
        ax.legend()
    ax.set(xlabel="30% of Full Rank", ylabel="Cumulative Energy (%)",
           title=f"(b) SVD of the direction residual {title}".strip())
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fig2b.png"), dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------
# `wadi.py analyze`: where the weights come from

class LazyTensors(Mapping):
    """The tensors of weight files (safetensors, or torch pickles memory-mapped by `read_tensors`)
    by key, each read only when asked for: a whole network can be walked layer by layer without
    holding it."""

    def __init__(self, paths):
        self.files, self.pickled = {}, {}
        for path in paths:
            if not os.path.isfile(path):
                raise LoadError(f"weight file not found: {path}")
            if weight_format(path) == "safetensors":
                try:
                    handle = safe_open(path, framework="pt")
                    self.files.update({k: (handle, path) for k in handle.keys()})
                except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                    raise LoadError(f"cannot read {path} (corrupt or truncated safetensors "
                                    f"file?): {e}") from None
            else:
                self.pickled.update(read_tensors(path, mmap=True))

    def __getitem__(self, key):
        if key in self.pickled:
            return self.pickled[key]
        handle, path = self.files[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise LoadError(f"cannot read {key} from {path}: {e}") from None

    def shape(self, key):
        """The shape of one tensor, without reading it."""
        if key in self.pickled:
            return tuple(self.pickled[key].shape)
        return tuple(self.files[key][0].get_slice(key).get_shape())

    def __iter__(self):
        return iter([*self.files, *self.pickled])

    def __len__(self):
        return len(self.files) + len(self.pickled)



def weight_source(spec, option):
    """(files, info) of a denoiser given on the command line: a `train` run directory (its merged
    student.safetensors; info is its run.json), a directory in the Hugging Face layout (its unet/ or
    transformer/), or
    one file (a local path or owner/repo/file on the Hub: safetensors, or a .bin/.pth/.pt state dict;
    info is a safetensors file's metadata: backbone, base_model, adapter when we wrote it). `option` is the
    command-line option that named it, for the messages."""
    run = os.path.join(spec, "run.json")
    if os.path.isdir(spec) and not os.path.isfile(run):
        folder = next((f for f in DENOISERS if os.path.isfile(os.path.join(spec, f, "config.json"))), "unet")
        return weight_files(spec, folder), {}
    path = fetch_file(spec, option)  # a run directory: its student.safetensors
    return [path], read_json(run) if os.path.isdir(spec) else file_metadata(path)


def denoiser_config(backbone, model=None):
    """The denoiser config: the backbone's built-in copy, or `model`'s unet/ or transformer/config.json."""
    spec = BACKBONES[backbone]
    if model in (None, spec.repo):
        return read_json(os.path.join(spec.configs, spec.denoiser, "config.json"))
    return read_json(fetch(model, f"{spec.denoiser}/config.json"))


def adapted_weights(config, kind):
    """The >=2-D weight keys that an adapter of `kind` changes in a student built from `config` (a U-Net or
    PixArt; lorad.selected_layers on the meta device, by lorad.LAYERS), or None for a
    network this module cannot build."""
    name = config.get("_class_name")
    cls = UNet if name == "UNet2DConditionModel" else PixArt if name in PIXART_CLASSES else None
    if cls is None:
        return None
    with torch.device("meta"):
        net = cls.from_config(config)
    return {f"{name}.{p}" for name, layer in selected_layers(net, "student", kind)
            for p, t in layer.named_parameters(recurse=False) if t.dim() >= 2}


def analyze_command(student, out, teacher=None, json_path=None, swap=None, swap_out=None, backbone=None,
                    model=None, adapter=None, log=print):
    """`wadi.py analyze`: compare `student` with `teacher` (default: the backbone's base denoiser), write
    analysis.json (or `json_path`), fig2a.png and fig2b.png into `out`, print the summary, and with `swap`
    write the swapped student to `swap_out` (safetensors, the student's keys, dtypes and metadata).
    backbone, model and adapter default to what the student says of itself (run.json or file metadata),
    else sd15, its repo and lorad. Returns the report; a LoadError for what the user can fix."""
    if (swap is None) != (swap_out is None):
        raise LoadError("--swap and --swap-out go together")
    if swap_out is not None and not swap_out.endswith(".safetensors"):
        raise LoadError(f"--swap-out writes a safetensors file: {swap_out} does not end in .safetensors")
    student_files, info = weight_source(student, "--student")
    backbone = backbone or info.get("backbone", "sd15")
    if backbone not in BACKBONES:
        raise LoadError(f"unknown backbone {backbone!r} (known: {', '.join(sorted(BACKBONES))})")
    model = model or (info.get("base_model") if info.get("backbone", backbone) == backbone else None)
    adapter = adapter or info.get("adapter", "lorad")
    if adapter not in ADAPTERS:
        raise LoadError(f"unknown adapter {adapter!r} (known: {', '.join(ADAPTERS)})")
    base, folder = model or BACKBONES[backbone].repo, BACKBONES[backbone].denoiser
    teacher_files = weight_source(teacher, "--teacher")[0] if teacher else weight_files(base, folder)
    adapted = adapted_weights(denoiser_config(backbone, model), adapter)
    report, swapped = analyze(LazyTensors(teacher_files), LazyTensors(student_files), adapted or frozenset(), swap)
    report = {"teacher": teacher or f"{base}/{folder}", "student": student,
              "adapter": adapter, **report}
    os.makedirs(out, exist_ok=True)
    json_path = json_path or os.path.join(out, "analysis.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot_figures(report, out)
    log(summary_table(report))
    if adapted is None:
        log(f"(no adapted-layer summary: {backbone}'s denoiser is not one this analysis can build)")
    log(f"wrote {json_path}, {os.path.join(out, 'fig2a.png')}, {os.path.join(out, 'fig2b.png')}")
    if swap:
        metadata = {**file_metadata(student_files[0]),
                    "swap": f"{swap} from the teacher {report['teacher']}"}
        save_file({k: v.contiguous() for k, v in swapped.items()}, swap_out, metadata=metadata)
        log(f"wrote {swap_out} (the student with the teacher's {swap}s)")
    return report
