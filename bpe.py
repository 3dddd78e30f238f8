"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), written from scratch: the tokenizer that
feeds clip.py's text encoders (Stable Diffusion's, SDXL's two) and open_clip's (openclip.py).

- `CLIPTokenizer`: byte-level BPE with CLIP's pre-tokenizer, reading a `tokenizer/` directory
  (`vocab.json`, `merges.txt`, the special-token files); ids equal those of transformers 5's
  `CLIPTokenizer` with `padding="max_length", truncation=True`, as diffusers calls it, and so does
  its `attention_mask`; `add_tokens` adds words as transformers' `add_tokens` does, for learned
  embeddings (embeddings.py).
- `read_bpe_files` reads the vocabulary and merges (`vocab.json` + `merges.txt`, or transformers 5's
  `tokenizer.json`); `bytes_to_unicode` is GPT-2's byte-to-character map (the toy vocabulary,
  toy.py, is written with it).
"""
from __future__ import annotations

import json
import os
import unicodedata
from functools import lru_cache

import regex
import torch


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters: the printable
    Latin-1 bytes map to themselves, the others to chr(256 + n), so no token holds a space or a
    control character. The order is that of the first 256 vocabulary entries."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = (b for b in range(256) if b not in printable)
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


# CLIP's pre-tokenizer: contractions, letter runs, single digits, runs of anything else; whitespace
# only separates. (transformers' `CLIPTokenizer` also lists `<|startoftext|>` and `<|endoftext|>`
# in this pattern, but its byte-level step splits such a piece again into `<|`, the word, `|>`,
# which this pattern does in one go; the special tokens proper are split out before, see
# `CLIPTokenizer.encode`.)
PRETOKENIZE = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+""")
WHITESPACE = regex.compile(r"\s+")


def normalize(text):
    """CLIP's text normalization (transformers 5's tokenizer): NFC, each run of whitespace as one
    space (the pre-tokenizer ignores whitespace, but an added token holding a space matches so),
    lower case per character ("Σ" -> "σ" even word-final)."""
    return "".join(c.lower() for c in WHITESPACE.sub(" ", unicodedata.normalize("NFC", text)))


def _special_token(value):
    """A special token as written in `special_tokens_map.json` / `tokenizer_config.json`."""
    return value["content"] if isinstance(value, dict) else value


def read_bpe_files(path):
    """(vocab: token -> id, merges: [(a, b), ...] by rank, added tokens: content -> declaration) of
    a `tokenizer/` directory: `vocab.json` + `merges.txt` (transformers 4 and the Hub's SD repos),
    else the single `tokenizer.json` that transformers 5 writes (same vocabulary and merges, in its
    "model")."""
    if os.path.isfile(os.path.join(path, "vocab.json")):
        with open(os.path.join(path, "vocab.json"), encoding="utf-8-sig") as f:
            vocab = json.load(f)
        with open(os.path.join(path, "merges.txt"), encoding="utf-8-sig") as f:
            lines = [line for line in f.read().split("\n")
                     if line and not line.startswith("#version")]
        return vocab, [tuple(line.split()) for line in lines], {}
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8-sig") as f:
        data = json.load(f)
    model = data["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"{path}/tokenizer.json holds a {model.get('type')} model, not CLIP's BPE")
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges, {t["content"]: t for t in data.get("added_tokens", [])}


def _splitter(tokens):
    """A pattern whose `split` puts each of `tokens` in a piece of its own, at the odd positions
    (leftmost-longest match; a pattern that never matches when there are no tokens)."""
    alternatives = "|".join(regex.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return regex.compile(f"({alternatives or '(?!)'})")


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, from a Hugging Face `tokenizer/` directory (`vocab.json` +
    `merges.txt`, or `tokenizer.json`; see `read_bpe_files`).

    `tokenizer(prompts)` -> LongTensor (B, model_max_length): BOS, the prompt's tokens (cut to fit),
    EOS, then the pad token (SD1.5 pads with `<|endoftext|>`, SD2.1 with `!`).

    Text handling is that of transformers 5 (its `tokenizers` pipeline): the special tokens (BOS,
    EOS, UNK, PAD) are cut out of the text first, each becoming its own id (so with SD2.1's special
    `!`, every "!" in a prompt is the bare `!` token, never part of a punctuation run); the rest
    goes through NFC normalization, per-character lower-casing, the pre-tokenizer above, and BPE
    merges by rank on the UTF-8 bytes, with `</w>` marking the end of each word. There is no ftfy
    and no HTML unescaping (transformers 4's Python tokenizer used ftfy when installed; open_clip
    always does). Tokens added with `add_tokens` (learned embeddings, embeddings.py) are cut out of
    the normalized text, as the normalized special tokens are.
    """

    def __init__(self, path):
        self.vocab, merges, added = read_bpe_files(path)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        settings = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                    "model_max_length": 77}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the second one wins
            file = os.path.join(path, name)
            if os.path.isfile(file):
                with open(file, encoding="utf-8-sig") as f:
                    settings.update({k: v for k, v in json.load(f).items() if k in settings})
        keys = ("bos_token", "eos_token", "unk_token", "pad_token")
        specials = [_special_token(settings[k]) for k in keys]
        self.bos_id, self.eos_id, _, self.pad_id = (self.vocab[t] for t in specials)
        self.max_length = settings["model_max_length"]
        # A special token declared `"normalized": true` is matched in the normalized text, otherwise
        # in the raw text; a plain string is not normalized, and a later declaration of the same
        # token overrides an earlier one (as transformers adds them: bos, eos, unk, pad).
        declared = [settings[k] if isinstance(settings[k], dict) else added.get(t, {})
                    for t, k in zip(specials, keys)]
        normalized = {t: d.get("normalized", False) for t, d in zip(specials, declared)}
        self.raw_specials = _splitter([t for t in normalized if not normalized[t]])
        # what is cut out of the normalized text, normalized -> id: these specials, the added tokens
        self.normalized_tokens = {normalize(t): self.vocab[t] for t in normalized if normalized[t]}
        self.normalized_split = _splitter(self.normalized_tokens)
        self.added = {}  # token as added -> id (add_tokens)
        self.byte_encoder = bytes_to_unicode()
        self.bpe = lru_cache(maxsize=1 << 16)(self._bpe)

    def _bpe(self, word):
        """Ids of one pre-token (already mapped to byte characters): merge the lowest-ranked
        adjacent pair, all of its occurrences, until no pair has a rank."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.vocab[p] for p in parts)

    def encode(self, text):
        """The token ids of one prompt, without BOS/EOS, truncation or padding. Special tokens are
        cut out first (the odd pieces of each split), from the raw or from the normalized text, and
        added tokens from the normalized text."""
        ids = []
        for i, raw in enumerate(self.raw_specials.split(text)):
            if i % 2:
                ids.append(self.vocab[raw])
                continue
            for j, piece in enumerate(self.normalized_split.split(normalize(raw))):
                if j % 2:
                    ids.append(self.normalized_tokens[piece])
                    continue
                for word in PRETOKENIZE.findall(piece):
                    chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                    ids.extend(self.bpe(chars))
        return ids

    def add_tokens(self, tokens):
        """Add `tokens` to the vocabulary, with ids from its size upward, and return their ids (a
        token already in it is a ValueError). They behave as the tokens that transformers 5's
        `CLIPTokenizer.add_tokens` adds (non-special, `normalized`): each is cut out of the
        normalized text (`normalize`) before the pre-tokenizer and becomes its own id, so it matches
        whatever the case and the runs of whitespace ("<R>" in "a <r>", "My Tok" in "my  tok") and
        inside words too ("red" added would take "tired" apart as "t", "i", "red"); where several
        match, the leftmost, then the longest wins."""
        ids = []
        for token in tokens:
            if token in self.vocab:
                raise ValueError(f"{token!r} is already in the tokenizer's vocabulary")
            self.vocab[token] = self.added[token] = len(self.vocab)
            self.normalized_tokens.setdefault(normalize(token), self.vocab[token])
            ids.append(self.vocab[token])
        self.normalized_split = _splitter(self.normalized_tokens)
        return ids

    def expand(self, prompt):
        """`prompt` with each multi-vector token "tok" in it (added with "tok_1", ..., "tok_{n-1}",
        see embeddings.py) written out as "tok tok_1 ... tok_{n-1}", exactly as diffusers'
        `TextualInversionLoaderMixin.maybe_convert_prompt` (0.42, with transformers 5) rewrites a
        prompt before its pipelines tokenize it: a token is looked for among the prompt's tokens,
        which are normalized text, and replaced as written, case-sensitively, in the raw prompt. So
        "tok" and "TOK" both give the id of "tok" but only "tok" expands, "tokyo" becomes
        "tok tok_1yo", and a token with upper-case letters ("<V>") never expands (its first vector
        alone is used)."""
        multi = [t for t in self.added if f"{t}_1" in self.added and normalize(t) == t]
        found = set(self.encode(prompt)) if multi else ()
        for token in (t for t in multi if self.added[t] in found):
            parts, n = [token], 1
            while f"{token}_{n}" in self.added:
                parts.append(f"{token}_{n}")
                n += 1
            prompt = prompt.replace(token, " ".join(parts))
        return prompt

    def __call__(self, prompts, return_mask=False):
        """A list of prompts -> LongTensor (B, model_max_length); with `return_mask`, also the
        attention mask (B, model_max_length): 1 on BOS, the prompt's tokens and EOS, 0 on padding.
        Multi-vector tokens are written out first (`expand`), as diffusers' pipelines do."""
        rows, lengths = [], []
        for prompt in prompts:
            tokens = self.encode(self.expand(prompt))[:self.max_length - 2]
            ids = [self.bos_id, *tokens, self.eos_id]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
            lengths.append(len(ids))
        ids = torch.tensor(rows, dtype=torch.long)  # (B, max_length)
        if not return_mask:
            return ids
        return ids, (torch.arange(self.max_length) < torch.tensor(lengths)[:, None]).long()
