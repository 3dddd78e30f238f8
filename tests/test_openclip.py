"""OpenCLIP (openclip.py) and metrics.clip_score against open_clip_torch (a test-only reference): both
towers on random weights at a small ViT-B-32-style config, loaded from an open_clip state dict
through our loader; the ViT-g-14 and ViT-H-14 configs and parameter counts; open_clip's tokenization and image
transform; the loader's errors."""
import json
import os
import re
import shutil

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from safetensors.torch import save_file

import metrics
from bpe import CLIPTokenizer
from openclip import (OPENAI_MEAN, OPENAI_STD, VIT_G_14, VIT_H_14, OpenCLIP, convert_open_clip_state_dict, load_open_clip,
                      open_clip_tokenize, preprocess_image)
from loading import LoadError
from tests.conftest import (OPENCLIP_SMALL, ROOT, openclip_reference, random_ids, relative_error,
                            write_clip_vocab, write_openclip_repo)


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """The real CLIP BPE as vocab.json + merges.txt alone, as open_clip's tokenizer has it."""
    directory = tmp_path_factory.mktemp("open_clip_bpe")
    write_clip_vocab(directory)
    return str(directory)


@pytest.mark.parametrize("quick_gelu", [False, True])  # ViT-g-14 LAION: GELU; OpenAI-trained weights: QuickGELU
def test_towers_match_open_clip(quick_gelu, tmp_path):
    cfg = dict(OPENCLIP_SMALL, quick_gelu=quick_gelu)
    ref = openclip_reference(cfg)
    ours = load_open_clip(write_openclip_repo(tmp_path, ref, cfg))
    assert ours.config.vision.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    assert ours.config.vision.intermediate_size == 279 and not ours.logit_scale.requires_grad
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    ids = random_ids(4, generator)
    with torch.no_grad():
        want_image, got_image = ref.encode_image(pixels), ours.encode_image(pixels)
        want_text, got_text = ref.encode_text(ids), ours.encode_text(ids)
    assert got_image.shape == want_image.shape == got_text.shape == want_text.shape == (4, 16)
    assert relative_error(got_image, want_image) < 1e-5
    assert relative_error(got_text, want_text) < 1e-5
    assert (ours.logit_scale == ref.logit_scale).item()


@pytest.mark.parametrize("name,config,count,shape", [
    ("ViT-g-14", VIT_G_14, 1_366_678_273, (16, 6144, "gelu", 4096)),  # the CLIP score's
    ("ViT-H-14", VIT_H_14, 986_109_441, (16, 5120, "gelu", 4096)),  # HPS v2's (hps.py)
])
def test_full_config_and_count_on_meta(name, config, count, shape):
    path = os.path.join(os.path.dirname(open_clip.__file__), "model_configs", f"{name}.json")
    with open(path) as f:
        assert json.load(f) == config
    with torch.device("meta"):
        ours = OpenCLIP.from_config(config)
        ref = open_clip.CLIP(**config)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
    v, t = ours.config.vision, ours.config.text
    assert (v.num_attention_heads, v.intermediate_size, v.hidden_act, t.intermediate_size) == shape
    converted = convert_open_clip_state_dict(ref.state_dict(), ours)  # every key maps, with the right shape
    assert {k: x.shape for k, x in converted.items()} == {k: x.shape for k, x in ours.state_dict().items()}


def test_key_layout_is_transformers_clip_model():
    v, t = OPENCLIP_SMALL["vision_cfg"], OPENCLIP_SMALL["text_cfg"]
    cfg = transformers.CLIPConfig(
        projection_dim=16, vision_config=dict(hidden_size=64, intermediate_size=int(v["width"] * v["mlp_ratio"]),
                                              num_hidden_layers=2,
                                              num_attention_heads=4, image_size=32, patch_size=8, hidden_act="gelu"),
        text_config=dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=t["vocab_size"], max_position_embeddings=77, hidden_act="gelu"))
    with torch.device("meta"):
        ref = transformers.CLIPModel(cfg)
        ours = OpenCLIP.from_config(OPENCLIP_SMALL)
    want = {k: x.shape for k, x in ref.state_dict().items() if not k.endswith("position_ids")}
    assert {k: x.shape for k, x in ours.state_dict().items()} == want


def test_clip_score_matches_open_clip(tmp_path, bpe_dir):
    ref = openclip_reference(OPENCLIP_SMALL)
    ours = load_open_clip(write_openclip_repo(tmp_path, ref, OPENCLIP_SMALL))
    rng = np.random.default_rng(0)
    sizes = [(50, 37), (37, 61), (32, 32), (64, 48), (33, 90)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    captions = ["a photo of a cat", "two dogs playing in the snow, 4k", "", "A RED car!!! on the road?",
                "the quick brown fox jumps over the lazy dog " * 10]
    pretrained = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")  # ViT-g-14's transform, at 32 px
    transform = open_clip.image_transform(32, is_train=False, mean=pretrained["mean"], std=pretrained["std"],
                                          resize_mode=pretrained["resize_mode"],
                                          interpolation=pretrained["interpolation"])
    with torch.no_grad():
        image_emb = F.normalize(ref.encode_image(torch.stack([transform(img) for img in images])), dim=-1)
        text_emb = F.normalize(ref.encode_text(open_clip.get_tokenizer("ViT-g-14")(captions)), dim=-1)
    per_pair = (image_emb * text_emb).sum(-1)
    got = metrics.clip_score(ours, CLIPTokenizer(bpe_dir), images, captions, batch_size=2)
    assert per_pair.abs().max() > 0.1  # a real test: the pairs' cosines are not all near zero
    assert got == pytest.approx(per_pair.mean().item(), abs=1e-6)
    with pytest.raises(ValueError, match="as many captions as images"):
        metrics.clip_score(ours, CLIPTokenizer(bpe_dir), images, captions[:2])


def test_preprocess_image_matches_open_clip():
    pretrained = open_clip.get_pretrained_cfg("ViT-g-14", "laion2b_s12b_b42k")
    assert (pretrained["mean"], pretrained["std"]) == (OPENAI_MEAN, OPENAI_STD)
    assert (pretrained["interpolation"], pretrained["resize_mode"]) == ("bicubic", "shortest")
    transform = open_clip.image_transform(224, is_train=False)  # its defaults are the same
    rng = np.random.default_rng(1)
    # odd margins (225: offset 0.5 rounds to 0; 227: 1.5 rounds to 2), up- and downscaling, both orientations
    for w, h in [(225, 300), (227, 224), (224, 224), (100, 61), (512, 383), (301, 640)]:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got, want = preprocess_image(img), transform(img)
        assert got.shape == want.shape == (3, 224, 224) and got.dtype == torch.float32
        assert (got - want).abs().max().item() < 1e-6, (w, h)


PLAIN_PROMPTS = [
    "a photo of a cat",
    "",
    "A Majestic LION, standing on a ROCK at sunset; 4k, ultra-detailed, trending on ArtStation!!!",
    "portrait of a woman, oil painting by John Singer Sargent (1890), highly detailed --ar 16:9 --v 5",
    "it's a dog's life, isn't it? we're here, they've gone, I'm ok, you'll see, he'd go",
    "numbers 1234 3.14159 1,000,000 2nd 21st 007 #1 $5 50% a+b=c",
    "snake_case-and-kebab-case/with\\slashes@and#hash^caret*star ~tilde `back` |pipe|",
    "(parentheses) [brackets] {braces} <angles> \"double\" 'single'",
    "  many    spaces\tand\ttabs\nand newlines  ",
    "café naïve crème brûlée, 東京タワー, emoji 🐱🚀",
    "the quick brown fox jumps over the lazy dog " * 10,  # cut to 75 tokens, end-of-text kept
]

# where open_clip's text cleaning (ftfy, html.unescape, str.lower, str.split) or its special tokens
# give other ids, as documented in openclip.open_clip_tokenize
DIFFERENT_PROMPTS = ["it’s “curly”", "&amp; &lt;b&gt;", "ﬁne ＦＵＬＬ", "ΟΔΟΣ", "tab\x1csep", "a\x07b",
                     "x <|endoftext|> y", "<start_of_text>"]


def test_tokenize_matches_open_clip(bpe_dir):
    ref = open_clip.get_tokenizer("ViT-g-14")
    tokenizer = CLIPTokenizer(bpe_dir)
    got, want = open_clip_tokenize(tokenizer, PLAIN_PROMPTS), ref(PLAIN_PROMPTS)
    assert got.dtype == torch.long and got.shape == want.shape == (len(PLAIN_PROMPTS), 77)
    for prompt, g, w in zip(PLAIN_PROMPTS, got, want):
        assert g.tolist() == w.tolist(), prompt
    assert got[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert got[-1, -1] == 49407 and (got.argmax(-1) == (got == 49407).int().argmax(-1)).all()
    for prompt in DIFFERENT_PROMPTS:
        assert open_clip_tokenize(tokenizer, [prompt]).tolist() != ref([prompt]).tolist(), prompt


def test_tokenize_refuses_a_special_pad_token(bpe_dir, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(bpe_dir, name), tmp_path)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # SD2.1's: pads with a special "!"
        shutil.copy(os.path.join(ROOT, "configs", "sd21", "tokenizer", name), tmp_path)
    with pytest.raises(ValueError, match="special pad token"):
        open_clip_tokenize(CLIPTokenizer(tmp_path), ["a cat"])


def test_loader_reads_the_pickle_and_checks_keys(tmp_path):
    ref = openclip_reference(OPENCLIP_SMALL)
    state = ref.state_dict()
    torch.save(state, tmp_path / "open_clip_pytorch_model.bin")  # the Hub repo's pickle, read weights_only
    ours = load_open_clip(str(tmp_path / "open_clip_pytorch_model.bin"), config=OPENCLIP_SMALL)
    assert torch.equal(ours.visual_projection.weight, state["visual.proj"].T)

    for drop in ("visual.ln_post.weight", "transformer.resblocks.1.attn.in_proj_weight"):
        save_file({k: v.contiguous() for k, v in state.items() if k != drop}, tmp_path / "missing.safetensors")
        with pytest.raises(LoadError, match=f"1 missing keys: {re.escape(drop)}$"):
            load_open_clip(str(tmp_path / "missing.safetensors"), config=OPENCLIP_SMALL)
    save_file({**{k: v.contiguous() for k, v in state.items()}, "logit_bias": torch.zeros(())},
              tmp_path / "extra.safetensors")
    with pytest.raises(LoadError, match="1 unexpected keys: logit_bias"):
        load_open_clip(str(tmp_path / "extra.safetensors"), config=OPENCLIP_SMALL)
    with pytest.raises(LoadError, match="shape mismatches"):  # a file of another config
        load_open_clip(str(tmp_path / "open_clip_pytorch_model.bin"), config=dict(OPENCLIP_SMALL, embed_dim=8))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no open_clip weights"):
        load_open_clip(str(tmp_path / "empty"), config=OPENCLIP_SMALL)


@pytest.mark.parametrize("change,message", [({"vision_cfg": {"layers": [3, 4, 6, 3]}}, "ResNet"),
                                            ({"vision_cfg": {"timm_model_name": "vit_base"}}, "timm_model_name"),
                                            ({"text_cfg": {"hf_model_name": "xlm-roberta"}}, "hf_model_name"),
                                            ({"custom_text": True}, "custom_text"),
                                            ({"text_cfg": {"width": 30, "heads": 4}}, "whole number of heads")])
def test_unsupported_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        OpenCLIP.from_config({**VIT_G_14, **change})
