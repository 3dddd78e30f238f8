"""Learned token embeddings: the new words that textual inversion (Gal et al. 2023) and ReVersion
(Huang et al. 2024) train into a frozen CLIP text encoder, one or more vectors of its width per
word, read from their files and added to bpe.py's tokenizer and clip.py's text encoder.

The files `read_embeddings` reads:
- diffusers' `learned_embeds.safetensors` and `learned_embeds.bin` (a torch pickle), as its
  textual-inversion script and ReVersion save them: {"<token>": (D,)}, or (1, D) / (n, D);
- A1111 / ComfyUI textual-inversion files: a `.pt` (torch pickle) {"string_to_param": {"*": (n, D)},
  "name": ..., "step": ...}, or a `.safetensors` {"emb_params": (n, D)}; the token is the file's
  stem, as in A1111, where the file name is the word used in prompts (diffusers would take the
  "name" entry, or the key "emb_params", unless given a token).
Pickles are read with torch's weights-only loader. `save_embeddings` writes diffusers' layout.

A token of n > 1 vectors is added as diffusers adds it, as the n tokens "tok", "tok_1", ...,
"tok_{n-1}"; the tokenizer writes a prompt's "tok" out as "tok tok_1 ... tok_{n-1}" before encoding
it (`bpe.CLIPTokenizer.expand`, diffusers' `maybe_convert_prompt`).
"""
import os

import torch
import torch.nn as nn

from loading import LoadError, key_listing, read_tensors, save_tensors, weight_format

LAYOUTS = ("diffusers' {token: (D,) or (n, D)}, A1111's {'string_to_param': {'*': (n, D)}, ...} "
           "or {'emb_params': (n, D)}")


def read_object(path):
    """What a file holds: a safetensors file's tensors, or the object in a torch pickle (a nested
    dict, which `loading.read_tensors` does not take)."""
    try:
        kind = weight_format(path)
    except OSError as e:
        raise LoadError(f"cannot read embedding file {path}: {e.strerror}") from None
    if kind != "pickle":
        return read_tensors(path)  # safetensors, or a LoadError naming the formats
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # a bad pickle surfaces as UnpicklingError, RuntimeError, EOFError, ...
        message = " ".join(str(e).split())
        raise LoadError(f"cannot read {path}: {type(e).__name__}: {message}") from None


def is_vectors(value):
    """Whether `value` can be a token's vectors: a non-empty floating (D,) or (n, D) tensor."""
    return (isinstance(value, torch.Tensor) and value.is_floating_point()
            and value.dim() in (1, 2) and value.numel() > 0)


def read_embeddings(path):
    """token -> its learned vectors, float32 (n, D) (n = 1 for the single-vector formats), from one
    file in any of the layouts above; anything else is a one-line LoadError."""
    state = read_object(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    if isinstance(state, dict) and "string_to_param" in state:  # A1111's .pt
        params = state["string_to_param"]
        if isinstance(params, dict) and len(params) == 1:
            state = {stem: next(iter(params.values()))}
    elif isinstance(state, dict) and set(state) == {"emb_params"}:  # A1111's .safetensors
        state = {stem: state["emb_params"]}
    if not (isinstance(state, dict) and state and all(map(is_vectors, state.values()))):
        if isinstance(state, dict):
            held = f"keys {key_listing(map(str, state))}" if state else "an empty dict"
        else:
            held = f"a {type(state).__name__}"
        raise LoadError(f"{path} is not a learned-embedding file ({LAYOUTS}): it holds {held}")
    return {token: v.detach().float().reshape(-1, v.shape[-1]).contiguous()
            for token, v in state.items()}


def save_embeddings(path, embeddings):
    """Write token -> (n, D) (or (D,)) as diffusers' `learned_embeds.safetensors`: {"<token>": (D,)}
    for a single vector, (n, D) otherwise, float32."""
    save_tensors({token: (v[0] if v.dim() == 2 and len(v) == 1 else v).float()
                  for token, v in embeddings.items()}, path)


def add_embeddings(tokenizer, text_encoder, embeddings):
    """Add each token of `embeddings` (token -> (n, D), as `read_embeddings` gives it) to
    `tokenizer` (a bpe.CLIPTokenizer), as "tok", "tok_1", ..., "tok_{n-1}" when n > 1, and its
    vectors as the new rows of `text_encoder`'s token embedding (a clip.CLIPTextModel): the
    nn.Embedding is replaced by a bigger one, the existing rows bit for bit, in the same dtype and
    on the same device, and `config.vocab_size` follows. Returns token -> its n ids.

    Everything is checked before anything changes; a one-line LoadError for a width other than the
    encoder's, or for a token that is in the vocabulary (after earlier ones of `embeddings`) or
    whose "tok_1", ... is (as in diffusers: a "tok_1" there would be taken into the prompts' "tok",
    `bpe.CLIPTokenizer.expand`). As there, the check is on the vocabulary's entries: "red" (the
    vocabulary holds "red</w>") can be added, and then takes "red", and "tired", for itself."""
    if not embeddings:
        return {}
    table = text_encoder.text_model.embeddings.token_embedding
    width, rows = table.embedding_dim, table.num_embeddings
    if rows != len(tokenizer.vocab):
        raise LoadError(f"the text encoder has {rows} token embeddings but the tokenizer "
                        f"{len(tokenizer.vocab)} tokens: new ids would not be new rows")
    embeddings = {token: torch.atleast_2d(v) for token, v in embeddings.items()}  # (n, D) each
    names, taken = {}, set(tokenizer.vocab)
    for token, vectors in embeddings.items():
        if vectors.shape[-1] != width:
            raise LoadError(f"learned embedding {token!r} has width {vectors.shape[-1]}, the text "
                            f"encoder's is {width}")
        names[token] = [token, *(f"{token}_{i}" for i in range(1, len(vectors)))]
        clash = [t for t in dict.fromkeys([*names[token], f"{token}_1"]) if t in taken]
        if clash:
            raise LoadError(f"cannot add learned embedding {token!r}: {', '.join(clash)} "
                            f"already in the tokenizer's vocabulary")
        taken.update(names[token])
    ids = {token: tokenizer.add_tokens(names[token]) for token in embeddings}
    new = torch.cat(list(embeddings.values())).to(table.weight)  # (sum of n, D)
    weight = torch.cat([table.weight.detach(), new])  # (rows + sum of n, D)
    text_encoder.text_model.embeddings.token_embedding = nn.Embedding.from_pretrained(
        weight, freeze=not table.weight.requires_grad)
    if hasattr(text_encoder.config, "vocab_size"):
        text_encoder.config.vocab_size = len(weight)
    return ids
