"""`wadi.py train --dry-run`: the three networks of a run (paper Sec. 3.3), its text encoder and VAE
built on the meta device from the built-in configs (configs/, no download), their parameter counts,
the trainable counts of every adapter kind (paper Tables 2 and R4), and a memory estimate per GPU.
"""
import os

import torch

from lorad import ADAPTERS, ORTHOGONAL_MAPS, count_effective, count_trainable
from loading import read_json
from pipeline import CACHED, DENOISERS, TEXT_ENCODERS, pick_backbone, text_encoder_kind
from vae import AutoencoderKL
from vsd import WEIGHT_DTYPES, TrainConfig, build_networks


def dry_run(backbone, run: TrainConfig, model=None):
    """Build the three networks, the text encoder and the VAE on the meta device from the built-in
    configs; print parameter counts and a memory estimate (a CACHED text encoder, T5, is freed
    before training starts and is not counted)."""
    spec = pick_backbone(backbone, run.resolution, model)
    config = lambda part: read_json(os.path.join(spec.configs, part, "config.json"))  # noqa: E731
    blocks = (run.orth_blocks, run.orth_blocks_fake)
    with torch.device("meta"):
        teacher = DENOISERS[spec.denoiser].from_config(config(spec.denoiser))
        student, fake = build_networks(teacher, run.rank, run.rank_fake, run.adapter, blocks)
        kinds = trainable_by_kind(teacher, run.rank, run.rank_fake, blocks)
        text_kind = text_encoder_kind(config("text_encoder"))
        texts = [TEXT_ENCODERS[text_encoder_kind(config(f))][0].from_config(config(f)) for f in spec.text_encoders]
        has_vae = os.path.isfile(os.path.join(spec.configs, "vae", "config.json"))
        vae = AutoencoderKL.from_config(config("vae")) if has_vae else None
    count = lambda net: sum(p.numel() for p in net.parameters()) if net else 0  # noqa: E731
    nbytes, gib, cached = WEIGHT_DTYPES[run.mixed_precision].itemsize, 2 ** 30, text_kind in CACHED
    text = sum(map(count, texts))  # SDXL: both encoders
    trainable = count_trainable(student) + count_trainable(fake)
    print(f"backbone {backbone}: adapter {run.adapter}, ranks {run.rank} / {run.rank_fake}")
    for name, net in (("teacher", teacher), ("student", student), ("fake score", fake)):
        share = f" ({count_trainable(net):,}, {100 * count_trainable(net) / count(teacher):.1f}% of the teacher)"
        print(f"  {name:<10} total {count(net) / 1e6:8.2f}M   trainable {count_trainable(net) / 1e6:.2f}M"
              + share * (name != "teacher"))
    weights = (count(teacher) + (0 if cached else text)) * nbytes + count(vae) * 4
    states = trainable * 16 + (count_trainable(student) * 4 if run.ema else 0)  # fp32 param, grad, 2 AdamW
    freed = (f" ({text * nbytes / gib:.2f} GiB: encodes the prompts once into the cache, freed "
             f"before training, not counted below)") if cached else ""
    both = " (both)" if len(texts) > 1 else ""
    print(f"  text encoder{both} {text / 1e6:.2f}M{freed}, VAE {count(vae) / 1e6:.2f}M")
    print(f"memory per GPU: frozen weights {weights / gib:.2f} GiB (one denoiser copy shared by the three "
          f"networks), adapters + grads + AdamW {states / gib:.2f} GiB, total {(weights + states) / gib:.2f} "
          f"GiB before activations (batch {run.batch_size} at {run.resolution or spec.resolution}px; "
          f"--grad-checkpointing trades compute for most of them)")
    print(kinds)


def trainable_by_kind(teacher, rank, rank_fake, blocks):
    """The dry run's table: the student's and the fake score network's trainable parameters for
    every adapter kind of lorad.ADAPTERS on `teacher`; for an orthogonal one the stored count and
    the effective one (lorad.count_effective)."""
    lines = [f"every adapter, student / fake score trainable (ranks {rank} / {rank_fake}; orth-*: "
             f"blocks {blocks[0]} / {blocks[1]}, stored and effective):"]
    for kind in ADAPTERS:
        nets = build_networks(teacher, rank, rank_fake, kind, blocks)
        stored, effective = ([count(n) / 1e6 for n in nets] for count in (count_trainable,
                                                                         count_effective))
        lines.append(f"  {kind:<17} {stored[0]:8.2f}M / {stored[1]:.2f}M" + (
            f"   (effective {effective[0]:.2f}M / {effective[1]:.2f}M)"
            if kind in ORTHOGONAL_MAPS else ""))
    return "\n".join(lines)
