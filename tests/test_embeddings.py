"""embeddings.py and CLIPTokenizer.add_tokens / expand against diffusers' textual-inversion loader
(a test-only reference) on the toy tokenizer and a random text encoder of the toy config: the same
ids and the same encoder output for every file layout; the round trip of save_embeddings; the
existing rows untouched; one-line errors."""
import json
import os

import pytest
import torch
import transformers
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import save_file

from bpe import CLIPTokenizer
from clip import CLIPTextModel, convert_text_state_dict
from embeddings import add_embeddings, read_embeddings, save_embeddings
from loading import LoadError, load_weights, read_safetensors
from tests.conftest import ROOT

TOY = os.path.join(ROOT, "assets", "toy")
TOKENIZER = os.path.join(TOY, "tokenizer")
BOS, EOS, A, SMALL, RED, CIRCLE = 571, 572, 320, 518, 524, 541  # toy ids: "a</w>", "small</w>", ...
VOCAB, WIDTH, LENGTH = 573, 64, 16  # the toy text encoder's


class Loader(TextualInversionLoaderMixin):
    """diffusers' loader as a pipeline holds it, with nothing offloaded."""
    hf_device_map = None
    components = {}


def reference_pair(seed=0):
    """transformers' CLIPTextModel at the toy config, every weight randomised, and its tokenizer."""
    with open(os.path.join(TOY, "text_encoder", "config.json")) as f:
        cfg = json.load(f)
    torch.manual_seed(seed)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig.from_dict(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref, transformers.CLIPTokenizer.from_pretrained(TOKENIZER)


def ours_from(ref):
    """Our CLIPTextModel with a copy of `ref`'s weights, and our toy tokenizer."""
    with open(os.path.join(TOY, "text_encoder", "config.json")) as f:
        ours = CLIPTextModel.from_config(json.load(f))
    state = {k: v.clone() for k, v in convert_text_state_dict(ref.state_dict()).items()}
    return load_weights(ours, state).eval(), CLIPTokenizer(TOKENIZER)


def reference_ids(tokenizer, prompts):
    """What a diffusers pipeline feeds its text encoder: the converted prompts, padded and cut."""
    prompts = Loader().maybe_convert_prompt(prompts, tokenizer)
    return tokenizer(prompts, padding="max_length", max_length=LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def write_diffusers_safetensors(folder, vectors):
    path = os.path.join(folder, "learned_embeds.safetensors")
    save_file({"<R>": vectors[0]}, path, metadata={"format": "pt"})  # textual_inversion.py's
    return path, "<R>"


def write_diffusers_bin(folder, vectors):
    path = os.path.join(folder, "learned_embeds.bin")
    torch.save({"<R>": vectors[0]}, path)  # ReVersion's layout: {'<R>': float32[768]}
    return path, "<R>"


def write_a1111_pt(folder, vectors):
    path = os.path.join(folder, "twovec.pt")  # the stem is the token, not "name"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                "name": "something-else", "step": 3000, "sd_checkpoint": "925997e9",
                "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)
    return path, "twovec"


def write_emb_params(folder, vectors):
    path = os.path.join(folder, "tri.safetensors")
    save_file({"emb_params": vectors}, path)
    return path, "tri"


@pytest.mark.parametrize("write,n", [(write_diffusers_safetensors, 1), (write_diffusers_bin, 1),
                                     (write_a1111_pt, 2), (write_emb_params, 3)])
def test_matches_diffusers_loader(write, n, tmp_path):
    """Each layout, loaded by diffusers' load_textual_inversion into transformers' encoder and by
    ours into ours: the same ids (upper / lower case, inside a word, multi-vector expansion) and the
    same encoder output."""
    vectors = torch.randn(n, WIDTH, generator=torch.Generator().manual_seed(n))
    path, token = write(str(tmp_path), vectors)
    ref, ref_tokenizer = reference_pair()
    ours, tokenizer = ours_from(ref)
    stem_named = token != "<R>"  # diffusers takes "name" / "emb_params" unless told the token
    Loader().load_textual_inversion(path, token=token if stem_named else None,
                                    tokenizer=ref_tokenizer, text_encoder=ref)
    embeddings = read_embeddings(path)
    assert list(embeddings) == [token] and torch.equal(embeddings[token], vectors)
    ids = add_embeddings(tokenizer, ours, embeddings)
    assert ids == {token: list(range(VOCAB, VOCAB + n))}
    assert torch.equal(ours.text_model.embeddings.token_embedding.weight[VOCAB:], vectors)
    prompts = [f"a small {token} red circle", f"A SMALL {token.upper()} RED CIRCLE",
               f"a {token.lower()} {token}x", f"{token}{token}"]
    got, want = tokenizer(prompts), reference_ids(ref_tokenizer, prompts)
    assert got.tolist() == want.tolist()
    assert got[0].tolist() == [BOS, A, SMALL, *ids[token], RED, CIRCLE, EOS] + [EOS] * (10 - n)
    with torch.no_grad():
        out, ref_out = ours(got), ref(want).last_hidden_state
    assert out.shape == (4, LENGTH, WIDTH) and (out - ref_out).abs().max().item() < 1e-5


def test_added_tokens_match_transformers():
    """add_tokens cuts tokens out as transformers' add_tokens does (case- and whitespace-blind,
    inside words, longest first), and expand rewrites prompts as diffusers' maybe_convert_prompt."""
    _, ref = reference_pair()
    ours = CLIPTokenizer(TOKENIZER)
    added = ["<R>", "red", "My Tok", "<R>x", "tok", "tok_1", "tok_2", "<V>", "<V>_1"]
    assert ours.add_tokens(added) == list(range(VOCAB, VOCAB + len(added)))
    assert ref.add_tokens(added) == len(added)
    prompts = ["a small <R> red circle", "A SMALL <r> RED", "tired", "my   tok MY TOK",
               "<r>x <R>X <R> x", "<|endoftext|>red", "a tok x", "a TOK x", "a Tok tok x", "tokyo",
               "a <V> x", "a <v> x", "tok_1 tok_2"]
    assert [ours.expand(p) for p in prompts] == Loader().maybe_convert_prompt(prompts, ref)
    assert ours.expand("a Tok tok x") == "a Tok tok tok_1 tok_2 x"
    assert ours(prompts).tolist() == reference_ids(ref, prompts).tolist()
    assert ours.encode("tired") == [83, 328, VOCAB + 1]  # "t", "i</w>", "red"
    with pytest.raises(ValueError, match="'red' is already"):
        ours.add_tokens(["red"])


def test_save_read_round_trip(tmp_path):
    single, multi = torch.randn(1, WIDTH), torch.randn(3, WIDTH)
    path = str(tmp_path / "learned_embeds.safetensors")
    save_embeddings(path, {"<R>": single, "multi": multi.half()})
    raw = read_safetensors(path)  # diffusers' layout: (D,) for a single vector
    assert {k: (tuple(v.shape), v.dtype) for k, v in raw.items()} == {
        "<R>": ((WIDTH,), torch.float32), "multi": ((3, WIDTH), torch.float32)}
    back = read_embeddings(path)
    assert list(back) == ["<R>", "multi"]
    assert torch.equal(back["<R>"], single) and torch.equal(back["multi"], multi.half().float())


def test_existing_rows_are_untouched():
    ours, tokenizer = ours_from(reference_pair()[0])
    ours.to(torch.bfloat16).requires_grad_(False)
    before = ours.text_model.embeddings.token_embedding.weight.clone()
    new = {"<R>": torch.randn(1, WIDTH), "tw": torch.randn(2, WIDTH)}
    assert add_embeddings(tokenizer, ours, new) == {"<R>": [573], "tw": [574, 575]}
    table = ours.text_model.embeddings.token_embedding
    assert table.weight.shape == (VOCAB + 3, WIDTH) and table.weight.dtype == torch.bfloat16
    assert not table.weight.requires_grad and ours.config.vocab_size == VOCAB + 3
    assert torch.equal(table.weight[:VOCAB], before)
    assert torch.equal(table.weight[VOCAB:], torch.cat([*new.values()]).bfloat16())
    assert tokenizer(["tw <r>"])[0, :5].tolist() == [BOS, 574, 575, 573, EOS]
    assert ours(tokenizer(["tw <r>"])).dtype == torch.bfloat16


def one_line_error(call, match):
    with pytest.raises(LoadError, match=match) as error:
        call()
    assert "\n" not in str(error.value)


def test_add_errors_are_one_line_and_change_nothing():
    ours, tokenizer = ours_from(reference_pair()[0])
    add_embeddings(tokenizer, ours, {"<b>_1": torch.randn(1, WIDTH), "<c>": torch.randn(WIDTH)})
    for embeddings, match in [({"<w>": torch.randn(1, 32)}, "'<w>' has width 32, .* is 64"),
                              ({"a": torch.randn(1, WIDTH)}, "'a': a already in"),
                              ({"<|endoftext|>": torch.randn(1, WIDTH)}, "endoftext"),
                              ({"<c>": torch.randn(1, WIDTH)}, "'<c>': <c> already"),
                              ({"<b>": torch.randn(2, WIDTH)}, "'<b>': <b>_1 already"),
                              ({"<d>": torch.randn(2, WIDTH), "<d>_1": torch.randn(1, WIDTH)},
                               "'<d>_1': <d>_1 already")]:
        one_line_error(lambda: add_embeddings(tokenizer, ours, embeddings), match)
        assert len(tokenizer.vocab) == ours.config.vocab_size == VOCAB + 2
        assert ours.text_model.embeddings.token_embedding.num_embeddings == VOCAB + 2
    # as in diffusers, the check is on the vocabulary's entries: the toy vocabulary has "red</w>"
    assert add_embeddings(tokenizer, ours, {"red": torch.randn(1, WIDTH)}) == {"red": [VOCAB + 2]}


def test_read_errors_are_one_line(tmp_path):
    torch.save({"<R>": torch.randn(WIDTH)}, tmp_path / "whole.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "whole.bin").read_bytes()[:300])
    (tmp_path / "empty.bin").write_bytes(b"")
    torch.save(torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(2, WIDTH))}),
               tmp_path / "old.pt")  # a class the weights-only loader refuses
    torch.save({"name": "x", "step": 3}, tmp_path / "meta.pt")
    torch.save(torch.randn(WIDTH), tmp_path / "bare.pt")
    save_file({"a.weight": torch.randn(2, 2, 2)}, str(tmp_path / "unet.safetensors"))
    for name, match in [("missing.pt", "cannot read embedding file .*missing.pt: No such file"),
                        ("cut.bin", "cannot read .*cut.bin: RuntimeError"),
                        ("empty.bin", "cannot read .*empty.bin: neither safetensors"),
                        ("old.pt", "cannot read .*old.pt: UnpicklingError"),
                        ("meta.pt", "meta.pt is not a learned-embedding file .* keys name, step$"),
                        ("bare.pt", "holds a Tensor$"),
                        ("unet.safetensors", "holds keys a.weight$")]:
        one_line_error(lambda: read_embeddings(str(tmp_path / name)), match)
