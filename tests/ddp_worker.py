"""Run by tests/test_vsd.py under `torchrun --nproc_per_node 2`: a short distillation with DDP on gloo,
then each rank writes its student adapters and its own first fake-score loss (before averaging)."""
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import vsd
from cli import read_prompts
from ddp import process_device
from lorad import adapter_state_dict
from pipeline import load_pipeline

repo, out = sys.argv[1:3]
local_losses = []
real_fake_loss = vsd.fake_loss


def recording(*args, **kwargs):
    loss = real_fake_loss(*args, **kwargs)
    local_losses.append(loss.item())
    return loss


vsd.fake_loss = recording
process_device()
pipe = load_pipeline("sd15", repo, vae=int(os.environ["RANK"]) == 0)
config = vsd.TrainConfig(out=out, batch_size=1, max_steps=2, resolution=16, rank=4, rank_fake=2,
                         checkpoint_every=100, validate_every=100)
student, _ = vsd.train(pipe, read_prompts(os.path.join(repo, "prompts.txt")), config, vsd.VSDConfig(),
                       torch.device("cpu"), log=lambda *a: None)
rank = dist.get_rank()
save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(student).items()},
          os.path.join(out, f"adapters-rank{rank}.safetensors"))
with open(os.path.join(out, f"loss-rank{rank}.txt"), "w") as f:
    f.write(repr(local_losses[0]))
dist.destroy_process_group()
