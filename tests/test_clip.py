"""clip.py against transformers (a test-only reference): the text encoders on random weights at small
configs and at the real configs' shapes (SD1.5, SD2.1, SDXL's two), SDXL's conditioning against diffusers'
`StableDiffusionXLPipeline.encode_prompt`, and bpe.py's tokenizer on the real CLIP vocabulary (the BPE merges
that open_clip_torch ships) with the real SD1.5 and SD2.1 special-token files."""
import json
import os
import shutil

import diffusers
import pytest
import torch
import transformers

from bpe import CLIPTokenizer
from clip import (CLIPTextModel, CLIPTextModelWithProjection, convert_text_state_dict, sdxl_null_text,
                  sdxl_text)
from loading import load_weights, read_safetensors
from tests.conftest import ROOT, relative_error, write_clip_vocab

SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=77, bos_token_id=0, pad_token_id=1, eos_token_id=2)


def real_config(backbone, folder="text_encoder"):
    with open(os.path.join(ROOT, "configs", backbone, folder, "config.json")) as f:
        return json.load(f)


def reference_model(hidden_act, cls=transformers.CLIPTextModel, **changes):
    """transformers' `cls` at a small config (SMALL with `changes`), every weight (LayerNorms too) randomised."""
    torch.manual_seed(0)
    ref = cls(transformers.CLIPTextConfig(hidden_act=hidden_act, **dict(SMALL, **changes))).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return ref


def load_ours(ref, path, cls=CLIPTextModel):
    """Ours, built on meta from the config.json that transformers writes for `ref`, with the weights of its
    model.safetensors."""
    ref.save_pretrained(path)
    with open(path / "config.json") as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours = cls.from_config(cfg)
    return load_weights(ours, convert_text_state_dict(read_safetensors(str(path / "model.safetensors")))).eval()


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])  # SD1.5 style, SD2.1 style
def test_text_model_matches_transformers(hidden_act, tmp_path):
    ref = reference_model(hidden_act)
    ours = load_ours(ref, tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 77), generator=torch.Generator().manual_seed(1))
    for length in (77, 9):
        with torch.no_grad():
            want = ref(ids[:, :length]).last_hidden_state
            got = ours(ids[:, :length])
        assert got.shape == want.shape == (3, length, 64)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


def test_convert_text_state_dict_layouts():
    with torch.device("meta"):
        model = CLIPTextModel.from_config(dict(SMALL, hidden_act="gelu"))
    ours = model.state_dict()
    assert "text_model.encoder.layers.2.self_attn.q_proj.weight" in ours and len(ours) == 4 + 3 * 16
    legacy = dict(ours, **{"text_model.embeddings.position_ids": torch.arange(77)[None]})  # transformers < 4.31
    stripped = {k.removeprefix("text_model."): v for k, v in ours.items()}  # transformers 5
    for state in (ours, legacy, stripped):
        assert convert_text_state_dict(state).keys() == ours.keys()


@pytest.mark.parametrize("backbone,folder,count", [
    ("sd15", "text_encoder", 123_060_480), ("sd21", "text_encoder", 340_387_840),
    ("sdxl", "text_encoder", 123_060_480), ("sdxl", "text_encoder_2", 694_659_840)])  # CLIP-L; bigG + projection
def test_real_configs_build_on_meta(backbone, folder, count):
    cfg = real_config(backbone, folder)
    projected = cfg["architectures"] == ["CLIPTextModelWithProjection"]
    ours_cls = CLIPTextModelWithProjection if projected else CLIPTextModel
    ref_cls = transformers.CLIPTextModelWithProjection if projected else transformers.CLIPTextModel
    with torch.device("meta"):
        ours = ours_cls.from_config(cfg)
        ref = ref_cls(transformers.CLIPTextConfig.from_dict(cfg))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
    want = {k: v.shape for k, v in convert_text_state_dict(ref.state_dict()).items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == want
    assert ("text_projection.weight" in want) == projected


def test_sdxl_text_encoders_fit_the_sdxl_unet():
    """SDXL's U-Net (configs/sdxl/unet) takes the two penultimate states side by side (768 + 1280) as its
    cross-attention context, and the pooled 1280 beside six 256-wide size embeddings as its added embedding."""
    first, second, unet = (real_config("sdxl", folder) for folder in ("text_encoder", "text_encoder_2", "unet"))
    assert first["hidden_size"] + second["hidden_size"] == unet["cross_attention_dim"] == 2048
    added = second["projection_dim"] + 6 * unet["addition_time_embed_dim"]
    assert added == unet["projection_class_embeddings_input_dim"] == 2816
    assert first["eos_token_id"] == second["eos_token_id"] == 2  # pooled at the largest id (CLIPTextTransformer.pool)


@pytest.mark.parametrize("eos_token_id", [2, 998])  # the legacy value of SD's and SDXL's configs; a real EOS id
def test_text_model_with_projection_matches_transformers(eos_token_id, tmp_path):
    """Every hidden state (SDXL reads [-2]: the penultimate layer's output, no final LayerNorm), the last hidden
    state and `text_embeds` equal transformers' CLIPTextModelWithProjection. The EOS row is found as there: with
    eos_token_id 2 at the first largest id, else at the first eos_token_id; they differ where an id above the
    EOS's (998 here; an added token, 999) comes before it."""
    ref = reference_model("gelu", transformers.CLIPTextModelWithProjection, projection_dim=48,
                          eos_token_id=eos_token_id)
    ours = load_ours(ref, tmp_path, CLIPTextModelWithProjection)
    assert ours.text_projection.bias is None and ours.text_projection.weight.shape == (48, 64)
    ids = torch.randint(3, 998, (4, 77), generator=torch.Generator().manual_seed(3))
    for row, end in enumerate((76, 20, 1, 30)):
        ids[row, end], ids[row, end + 1:] = 998, 0  # EOS, then "!" padding as SDXL's tokenizer_2 pads
    ids[3, 10] = 999
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        states, last = ours.text_model.hidden_states(ids), ours(ids)
        embeds = ours.text_embeds(ids, last)
        positions = ours.text_model.pool(ids, torch.arange(77.0)[None, :, None].expand(4, 77, 1))[:, 0]
    assert positions.tolist() == [76, 20, 1, 10 if eos_token_id == 2 else 30]
    assert len(states) == len(want.hidden_states) == 1 + 3
    for got, expected in zip(states, want.hidden_states):
        assert relative_error(got, expected) < 1e-5
    assert relative_error(last, want.last_hidden_state) < 1e-5
    assert embeds.shape == want.text_embeds.shape == (4, 48) and relative_error(embeds, want.text_embeds) < 1e-5
    assert torch.equal(ours.text_embeds(ids), embeds)


def sdxl_tokenizers(tmp_path):
    """SDXL's two tokenizer folders on the toy vocabulary (16 tokens, EOS the largest id, 572): tokenizer/ is
    the toy's, padding with EOS as SDXL's tokenizer/ does; tokenizer_2/ pads with "!" (id 0) as SDXL's does."""
    first = os.path.join(ROOT, "assets", "toy", "tokenizer")
    second = tmp_path / "tokenizer_2"
    shutil.copytree(first, second)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        with open(second / name) as f:
            settings = json.load(f)
        with open(second / name, "w") as f:
            json.dump(dict(settings, pad_token="!"), f)
    return first, str(second)


def test_sdxl_text_matches_diffusers_encode_prompt(tmp_path):
    """sdxl_text on our tokenizers' ids equals diffusers' StableDiffusionXLPipeline.encode_prompt (a pipeline
    of the two text encoders and tokenizers only: encode_prompt needs no U-Net, VAE or scheduler) with
    classifier-free guidance: the (B, 16, 64 + 80) sequence and the pooled (B, 80); with no negative prompt
    its negatives are sdxl_null_text's zeros, and a negative prompt "" is encoded as text."""
    first, second = sdxl_tokenizers(tmp_path)
    toy = dict(vocab_size=573, max_position_embeddings=16, bos_token_id=571, eos_token_id=2)  # SDXL's legacy 2
    ref = reference_model("quick_gelu", **toy)
    ref_2 = reference_model("gelu", transformers.CLIPTextModelWithProjection, hidden_size=80, num_attention_heads=5,
                            intermediate_size=200, num_hidden_layers=4, projection_dim=80, **toy)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, text_encoder=ref, text_encoder_2=ref_2, tokenizer=transformers.CLIPTokenizer.from_pretrained(first),
        tokenizer_2=transformers.CLIPTokenizer.from_pretrained(second), unet=None, scheduler=None,
        add_watermarker=False)
    assert pipe.config.force_zeros_for_empty_prompt
    encoder = load_ours(ref, tmp_path / "text_encoder")
    encoder_2 = load_ours(ref_2, tmp_path / "text_encoder_2", CLIPTextModelWithProjection)
    prompts = ["a small red circle at the top left", "", "a large green square at the bottom right " * 3]
    ids, ids_2 = CLIPTokenizer(first)(prompts), CLIPTokenizer(second)(prompts)
    assert ids_2.tolist() == pipe.tokenizer_2(prompts, padding="max_length", max_length=16, truncation=True).input_ids
    assert ids[1, 2:].eq(572).all() and ids_2[1, 2:].eq(0).all()  # "": BOS, EOS, then EOS / "!" padding
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, device="cpu",
                                                                       do_classifier_free_guidance=True)
        got, got_pooled = sdxl_text(encoder, encoder_2, ids, ids_2)
        _, negative_text, _, negative_text_pooled = pipe.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=True, negative_prompt="")
        empty, empty_pooled = sdxl_text(encoder, encoder_2, CLIPTokenizer(first)([""] * 3),
                                        CLIPTokenizer(second)([""] * 3))
    assert got.shape == embeds.shape == (3, 16, 64 + 80) and got_pooled.shape == pooled.shape == (3, 80)
    assert relative_error(got, embeds) < 1e-5 and relative_error(got_pooled, pooled) < 1e-5
    null, null_pooled = sdxl_null_text(got, got_pooled)
    assert null.shape == negative.shape and null_pooled.shape == negative_pooled.shape
    assert torch.equal(null, negative) and torch.equal(null_pooled, negative_pooled) and not negative.any()
    assert relative_error(empty, negative_text) < 1e-5 and relative_error(empty_pooled, negative_text_pooled) < 1e-5
    assert negative_text.abs().amin(-1).gt(0).all()  # "" as text: not zeros


@pytest.mark.parametrize("change,message", [({"hidden_act": "relu6"}, "hidden_act 'relu6'"),
                                            ({"num_attention_heads": 7}, "not divisible"),
                                            ({"model_type": "t5"}, "model_type")])
def test_bad_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        CLIPTextModel.from_config(dict(real_config("sd15"), **change))


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """{"sd15": dir, "sd21": dir}: the real vocabulary with each backbone's special-token files."""
    vocab_dir = tmp_path_factory.mktemp("clip_vocab")
    vocab = write_clip_vocab(vocab_dir)
    assert len(vocab) == 49408 and vocab[0] == "!" and vocab[320] == "a</w>" and vocab[49407] == "<|endoftext|>"
    dirs = {}
    for backbone in ("sd15", "sd21"):
        dirs[backbone] = tmp_path_factory.mktemp(backbone)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(vocab_dir / name, dirs[backbone])
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(ROOT, "configs", backbone, "tokenizer", name), dirs[backbone])
    return dirs


PROMPTS = [
    "a photo of a cat",
    "",
    "A Majestic LION, standing on a ROCK at sunset; 4k, ultra-detailed, trending on ArtStation!!!",
    "portrait of a woman, oil painting by John Singer Sargent (1890), highly detailed --ar 16:9 --v 5",
    "it's a dog's life, isn't it? we're here, they've gone, I'm ok, you'll see, he'd go",
    "IT'S THE 'SUN' 'S 'sun ''s",
    "café naïve Ångström crème brûlée",
    "cafe\u0301 e\u0301le\u0301phant q\u0303",  # decomposed accents: NFC composes the first two only
    "emoji 🐱🚀👍🏽 ❤️ 🇯🇵",
    "東京タワーの夜景, 北京的天安门",
    "한국어 텍스트 and русский текст, مرحبا שלום नमस्ते สวัสดี",
    "ΟΔΟΣ Σ σς İstanbul ẞ straße",  # final sigma, dotted capital I, capital sharp s
    "tabs\tand\nnewlines\r\n  many    spaces   ",
    "\x1c\x1d\x1e\x1f odd \x85 \xa0 \u2028 \u3000 \u200b \ufeff \u180e whitespace",
    "\x00\x07 control characters \x7f",
    "numbers 1234 3.14159 1,000,000 2nd 21st 007",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &quot;x&quot; &nbsp;",
    "it’s “curly” ‘quotes’ — and – dashes…",
    "ﬁne ﬂow ligatures, ＦＵＬＬＷＩＤＴＨ letters",
    "hello!!!world??! wow! ?! !? a!b",
    "x!<|startoftext|>y a<|endoftext|>b <|endoftext|>",
    "<|ENDOFTEXT|> <|StartOfText|>",
    "snake_case-and-kebab-case/with\\slashes@and#hash$dollar%percent^caret*star",
    "(parentheses) [brackets] {braces} <angles> \"double\" 'single'",
    "masterpiece, best quality, (extremely detailed:1.2), [[blurry]], ((sharp focus))",
    "https://example.com/path?query=1&x=2 user@mail.com",
    "DALL·E, Midjourney v5.2 & Stable-Diffusion 2.1 © 2023 ™ °C ½",
    " ".join(["long"] * 100),
    "a " * 80,
    "the quick brown fox jumps over the lazy dog " * 10,
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "Pneumonoultramicroscopicsilicovolcanoconiosis antidisestablishmentarianism",
]


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_tokenizer_matches_transformers(backbone, tokenizer_dirs):
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs[backbone])
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = CLIPTokenizer(tokenizer_dirs[backbone])(PROMPTS)
    assert got.dtype == torch.long and got.shape == want.shape == (len(PROMPTS), 77)
    for prompt, g, w in zip(PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_tokenizer_reads_the_tokenizer_json_of_transformers_5(backbone, tokenizer_dirs, tmp_path):
    """transformers 5's save_pretrained writes tokenizer.json + tokenizer_config.json only (no vocab.json,
    merges.txt): the same vocabulary read from there gives the same ids on the real-world prompts."""
    transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs[backbone]).save_pretrained(tmp_path)
    assert not (tmp_path / "vocab.json").exists() and (tmp_path / "tokenizer.json").exists()
    want = CLIPTokenizer(tokenizer_dirs[backbone])(PROMPTS)
    got = CLIPTokenizer(str(tmp_path))(PROMPTS)
    assert got.tolist() == want.tolist()
    assert (want[:, 0] == 49406).all() and (want != want[0, -1]).sum() > 10 * len(PROMPTS)


def test_tokenizer_layout(tokenizer_dirs):
    sd15, sd21 = CLIPTokenizer(tokenizer_dirs["sd15"]), CLIPTokenizer(tokenizer_dirs["sd21"])
    cat = [49406, 320, 1125, 539, 320, 2368, 49407]  # <|startoftext|> a photo of a cat <|endoftext|>
    assert sd15(["a photo of a cat"])[0].tolist() == cat + [49407] * 70
    assert sd21(["a photo of a cat"])[0].tolist() == cat + [0] * 70  # SD2.1 pads with "!" (id 0)
    assert sd15([""])[0, :3].tolist() == [49406, 49407, 49407]
    long = sd15([" ".join(["long"] * 100)])[0]
    assert long[0] == 49406 and long[76] == 49407 and (long[1:76] == long[1]).all()  # cut to 75, EOS kept
    assert sd15.encode("wow!!!") == [2781, 995]  # "wow</w>", "!!!</w>"
    assert sd21.encode("wow!!!") == [2781, 0, 0, 0]  # "!" is SD2.1's pad, a special token of its own


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_attention_mask_matches_transformers(hidden_act, tmp_path):
    """With the tokenizer's attention mask (the official WaDi training code encodes its training prompts so),
    ours equals transformers' CLIPTextModel(ids, attention_mask=mask): the same at the tokens as without a mask
    (they never see the padding, which comes after them), different at every padding position."""
    ref = reference_model(hidden_act)
    ref.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        ours = CLIPTextModel.from_config(json.load(f))
    load_weights(ours, convert_text_state_dict(read_safetensors(str(tmp_path / "model.safetensors"))))
    ours.eval()
    ids = torch.randint(3, SMALL["vocab_size"], (3, 77), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([77, 12, 2])  # no padding; a prompt; "" (BOS, EOS)
    mask = (torch.arange(77) < lengths[:, None]).long()
    ids[mask == 0] = SMALL["pad_token_id"]
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).last_hidden_state
        got, unmasked = ours(ids, mask), ours(ids)
    assert relative_error(got, want) < 1e-5
    tokens, padding = mask.bool(), ~mask.bool()
    assert relative_error(got[tokens], unmasked[tokens]) < 1e-5
    change = (got - unmasked).abs().amax(-1)[padding]
    assert len(change) == 65 + 75 and change.min() > 1e-2


@pytest.mark.parametrize("backbone", ["sd15", "sd21"])
def test_tokenizer_attention_mask_matches_transformers(backbone, tokenizer_dirs):
    ref = transformers.CLIPTokenizer.from_pretrained(tokenizer_dirs[backbone])
    prompts = [*PROMPTS, ""]
    want = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ids, mask = CLIPTokenizer(tokenizer_dirs[backbone])(prompts, return_mask=True)
    assert ids.tolist() == want.input_ids.tolist() and mask.tolist() == want.attention_mask.tolist()
    assert mask[-1].sum() == 2 and mask.sum(1).max() == 77 and mask.dtype == torch.long
