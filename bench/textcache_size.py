"""The T5 prompt cache's size (textcache.py), measured on a prompt file with the real T5
tokenizer: the valid tokens per prompt (eos included, cut at 120, as `encode_text` gives them) that
the cache stores, against the 120 padded positions, in bytes at T5 XXL's D = 4096 in a 2-byte
dtype (bf16 or fp16; fp32 doubles every figure), and the size of `--count` prompts at the measured
mean and at `--tokens`. docs/pixart.md quotes

    python bench/textcache_size.py captions_coco14_30k.txt --tokenizer DIR

where DIR holds T5's `spiece.model` (the PixArt repo's `tokenizer/`). The prompt file is read as
`wadi.py train --prompts` reads it (text, a JSON list, or the JourneyDB `.jsonl` annotations).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import read_prompts  # noqa: E402
from t5 import MAX_LENGTH, T5Tokenizer  # noqa: E402

DIM, BYTES = 4096, 2  # T5 v1.1 XXL's d_model; bf16 / fp16
TOKEN = DIM * BYTES   # bytes per stored token
OFFSET = 8            # bytes per prompt in offsets-N.npy


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prompts", help="prompt file")
    p.add_argument("--tokenizer", required=True, help="directory holding T5's spiece.model")
    p.add_argument("--count", type=int, default=1_400_000, help="prompts to estimate for")
    p.add_argument("--tokens", type=float, default=40.0, help="an assumed mean for --count")
    args = p.parse_args()
    prompts = read_prompts(args.prompts)
    tokenizer = T5Tokenizer(args.tokenizer)
    tokens = np.array([min(len(tokenizer.encode(q)) + 1, MAX_LENGTH) for q in prompts])
    words = np.array([len(q.split()) for q in prompts])
    stored, padded = tokens.mean() * TOKEN + OFFSET, MAX_LENGTH * TOKEN
    print(f"{args.prompts}: {len(prompts):,} prompts, {words.mean():.2f} words each; T5 tokens "
          f"per prompt: mean {tokens.mean():.2f}, median {np.median(tokens):.0f}, 99th percentile "
          f"{np.percentile(tokens, 99):.0f}, max {tokens.max()}, "
          f"{(tokens == MAX_LENGTH).sum()} at {MAX_LENGTH}; "
          f"{tokens.sum() / words.sum():.2f} tokens per word")
    print(f"per prompt: {stored:,.0f} bytes stored against {padded:,} padded to {MAX_LENGTH} "
          f"({padded / stored:.1f}x); this file {tokens.sum() * TOKEN + len(prompts) * OFFSET:,} "
          f"bytes against {len(prompts) * padded:,}")
    for what, mean in (("the measured mean", tokens.mean()), ("--tokens", args.tokens),
                       (f"{MAX_LENGTH}, every prompt full", MAX_LENGTH)):
        print(f"{args.count:,} prompts at {mean:.1f} tokens ({what}): "
              f"{args.count * (mean * TOKEN + OFFSET) / 1e9:,.0f} GB")


if __name__ == "__main__":
    main()
