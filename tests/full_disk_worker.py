"""Run by tests/test_checkpoint.py under `torchrun --nproc_per_node 2`: `wadi.py train` with the
arguments given, where rank 0's disk is full from its second checkpoint on (every write of a
checkpoint file fails with ENOSPC after a few bytes). Exits with wadi.main's code."""
import errno
import os
import sys

import loading
import wadi

real_save_file, saved = loading.save_file, []


def full_after_one(tensors, path, metadata=None):
    if os.environ["RANK"] == "0" and "checkpoint-" in path and saved:
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)
    saved.append(path)
    return real_save_file(tensors, path, metadata=metadata)


loading.save_file = full_after_one
sys.exit(wadi.main(sys.argv[1:]))
