"""Run by tests/test_vsd.py under `torchrun --nproc_per_node 2`: a short distillation through `wadi.py train`
with DDP on gloo; each rank then writes its student adapters, its own first fake-score loss (before
averaging), how often it read the prompt file, the prompts it trained on, and the one-line error that a
missing prompt file gives it."""
import json
import os
import sys

import torch.distributed as dist
from safetensors.torch import save_file

import cli
import vsd
import wadi
from ddp import from_first_rank
from loading import LoadError
from lorad import adapter_state_dict

repo, out = sys.argv[1:3]
local_losses, reads, trained = [], [], {}
real_fake_loss, real_read, real_train = vsd.fake_loss, cli.read_prompts, wadi.train


def recording_loss(*args, **kwargs):
    loss = real_fake_loss(*args, **kwargs)
    local_losses.append(loss.item())
    return loss


def counting_read(*args, **kwargs):
    reads.append(args[0])
    return real_read(*args, **kwargs)


def keeping_train(pipe, prompts, *args, **kwargs):
    trained["prompts"] = prompts
    trained["student"], fake = real_train(pipe, prompts, *args, **kwargs)
    return trained["student"], fake


vsd.fake_loss, cli.read_prompts, wadi.train = recording_loss, counting_read, keeping_train
code = wadi.main(["train", "--model", repo, "--prompts", os.path.join(repo, "prompts.txt"), "--out", out,
                  "--batch-size", "1", "--max-steps", "2", "--resolution", "16", "--rank", "4", "--rank-fake", "2",
                  "--checkpoint-every", "100", "--validate-every", "100", "--device", "cpu"])
assert code == 0, code
rank, train_reads = dist.get_rank(), len(reads)
try:
    from_first_rank(cli.read_prompts, os.path.join(repo, "no-such-prompts.txt"))
    error = None
except LoadError as e:
    error = str(e)
save_file({k: v.detach().contiguous() for k, v in adapter_state_dict(trained["student"]).items()},
          os.path.join(out, f"adapters-rank{rank}.safetensors"))
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"loss": local_losses[0], "reads": train_reads, "prompts": trained["prompts"], "error": error}, f)
dist.destroy_process_group()
