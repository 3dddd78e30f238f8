"""t5.py against transformers (a test-only reference): the encoder on random weights at a small T5
v1.1 config with a padded mask, loaded from a sharded `save_pretrained` directory; in float16, with
block 0's `wo` writing float16-overflowing outliers as T5 XXL's does, against transformers' float16
load (`wo` kept float32) on every path that makes it float16; the full XXL config's shapes and count
on the meta device; the tokenizer on the real T5 `spiece.model` (tests/data/t5) with real COCO
captions (tests/data/coco) and edge cases."""
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import save_file

from loading import LoadError, load_component, load_weights, read_json, read_safetensors
from t5 import MAX_LENGTH, T5Encoder, T5LayerNorm, T5Tokenizer, convert_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
# T5 v1.1 layout, small: inner width 4 x 12 = 48 != d_model; 8 buckets up to distance 20, so a
# 40-token input uses exact, logarithmic and clamped buckets in both directions
SMALL = dict(vocab_size=300, d_model=64, d_kv=12, num_heads=4, d_ff=96, num_layers=3,
             feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
             relative_attention_max_distance=20, tie_word_embeddings=False)


def reference_model(seed=0):
    """transformers' T5EncoderModel at the small config, every weight (RMSNorm scales too)
    random."""
    torch.manual_seed(seed)
    ref = transformers.T5EncoderModel(transformers.T5Config(**SMALL)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return ref


def ids_and_mask(lengths=(40, 17, 1), L=40, vocab=300, seed=1):
    ids = torch.randint(3, vocab, (len(lengths), L), generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, 0), mask  # padded with the pad id, as the tokenizer does


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def shapes(model):
    return {k: v.shape for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def sharded_repo(tmp_path_factory):
    """A repo directory whose `text_encoder/` is written by transformers' save_pretrained in
    shards."""
    root = tmp_path_factory.mktemp("t5_repo")
    ref = reference_model()
    ref.save_pretrained(root / "text_encoder", max_shard_size="50KB")
    return root, ref


def test_encoder_matches_transformers_through_sharded_files(sharded_repo):
    root, ref = sharded_repo
    with open(root / "text_encoder" / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1
    assert "encoder.embed_tokens.weight" not in index["weight_map"]
    ours = load_component(T5Encoder, str(root), "text_encoder", rename=convert_state_dict)
    assert ours.shared is ours.encoder.embed_tokens
    ids, mask = ids_and_mask()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
        unmasked = ours(ids)
    assert got.shape == want.shape == (3, 40, 64)
    assert want.abs().max() > 0.1
    assert relative_error(got, want) < 1e-5
    assert relative_error(unmasked[1:], want[1:]) > 1e-2  # the padding mask matters
    with torch.no_grad():
        short = ref(input_ids=ids[:1, :9]).last_hidden_state
        assert relative_error(ours(ids[:1, :9]), short) < 1e-5


@pytest.mark.parametrize("names", [("shared.weight", "encoder.embed_tokens.weight"),
                                   ("encoder.embed_tokens.weight",)],
                         ids=["both_tied_names", "embed_tokens_only"])
def test_files_with_either_tied_name_load(names, sharded_repo, tmp_path):
    _, ref = sharded_repo
    state = {k: v.clone() for k, v in ref.state_dict().items()
             if not k.endswith("embed_tokens.weight")}
    embedding = state.pop("shared.weight")
    state.update({name: embedding.clone() for name in names})
    save_file(state, str(tmp_path / "model.safetensors"))
    with open(tmp_path / "config.json", "w") as f:
        json.dump(ref.config.to_dict(), f)
    ours = load_component(T5Encoder, str(tmp_path.parent), tmp_path.name, rename=convert_state_dict)
    assert torch.equal(ours.shared.weight, embedding) and ours.encoder.embed_tokens is ours.shared


OUTLIERS = [3, 17, 40]  # residual-stream channels that block 0's `wo` drives to OUTLIER
OUTLIER = 3e5  # T5 v1.1 XXL's feed-forward outliers; float16 ends at 65504
WO = {f"encoder.block.{i}.layer.1.DenseReluDense.wo.weight" for i in range(SMALL["num_layers"])}


@pytest.fixture(scope="module")
def outlier_repo(tmp_path_factory):
    """A repo whose `text_encoder/` (config.json + model.safetensors, by save_pretrained) holds
    reference_model() with the OUTLIERS rows of block 0's `wo` scaled so that, on ids_and_mask(),
    their largest output is OUTLIER: the activations that make transformers keep T5's `wo` in
    float32 (`T5PreTrainedModel._keep_in_fp32_modules`)."""
    ref = reference_model()
    wo = ref.encoder.block[0].layer[1].DenseReluDense.wo
    ids, mask = ids_and_mask()
    outputs = []  # wo's output (B, L, d_model), before and after the scaling
    hook = wo.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    with torch.no_grad():
        ref(input_ids=ids, attention_mask=mask)
        peaks = outputs[0].abs().amax((0, 1))  # (d_model,)
        wo.weight[OUTLIERS] *= (OUTLIER / peaks[OUTLIERS])[:, None]
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
    hook.remove()
    assert outputs[1].abs().max().item() == pytest.approx(OUTLIER, rel=1e-4)
    root = tmp_path_factory.mktemp("t5_outliers")
    ref.save_pretrained(root / "text_encoder")
    assert sorted(os.listdir(root / "text_encoder")) == ["config.json", "model.safetensors"]
    return str(root), want


def load_fp32(root):
    return load_component(T5Encoder, root, "text_encoder", rename=convert_state_dict)


def load_fp16(root):
    return load_component(T5Encoder, root, "text_encoder", dtype=torch.float16,
                          rename=convert_state_dict)


def load_weights_fp16(root):
    with torch.device("meta"):
        net = T5Encoder.from_config(read_json(os.path.join(root, "text_encoder", "config.json")))
    state = read_safetensors(os.path.join(root, "text_encoder", "model.safetensors"))
    return load_weights(net, convert_state_dict(state), dtype=torch.float16)


def max_error(x, want):
    return (x.float() - want).abs().max().item()


def test_fp16_keeps_wo_fp32_as_transformers(outlier_repo):
    root, want = outlier_repo
    ids, mask = ids_and_mask()
    theirs = transformers.T5EncoderModel.from_pretrained(os.path.join(root, "text_encoder"),
                                                         dtype=torch.float16).eval()
    ours = load_fp16(root)
    naive = load_fp32(root)
    for p in naive.parameters():  # the old float16 encoder: every weight float16
        p.data = p.data.half()
    for net in (ours, theirs):
        assert {n for n, p in net.named_parameters() if p.dtype == torch.float32} == WO
        assert {p.dtype for n, p in net.named_parameters() if n not in WO} == {torch.float16}
    with torch.no_grad():
        got, bad = ours(ids, mask), naive(ids, mask)
        reference = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    assert got.dtype == reference.dtype == bad.dtype == torch.float16
    # float32 output: max 9.42; transformers' float16 is off by 0.144 (cosine 0.99999), ours by as
    # much, the all-float16 cast by 3.94 (cosine 0.968)
    assert max_error(reference, want) < 0.2
    assert max_error(got, want) <= 1.05 * max_error(reference, want)
    assert max_error(bad, want) > 10 * max_error(reference, want)
    # ours against transformers' float16: 0.012 (1.6 float16 steps at the output's scale), only
    # from transformers' GELU being float16 arithmetic where ours is torch's fused kernel
    assert max_error(got, reference.float()) < 0.025
    assert max_error(bad, reference.float()) > 1.0


@pytest.mark.parametrize("make", [load_fp16, load_weights_fp16, lambda root: load_fp32(root).half(),
                                  lambda root: load_fp32(root).to(torch.float16),
                                  lambda root: load_fp32(root).to("cpu", torch.float16)],
                         ids=["load_component", "load_weights", "half", "to_dtype",
                              "to_device_dtype"])
def test_every_way_to_fp16_keeps_wo_fp32(make, outlier_repo):
    root, _ = outlier_repo
    ids, mask = ids_and_mask()
    fp32 = dict(load_fp32(root).named_parameters())
    net = make(root)
    for name, p in net.named_parameters():
        if name in WO:  # the float32 values, not rounded through float16
            assert p.dtype == torch.float32 and torch.equal(p, fp32[name])
        else:
            assert p.dtype == torch.float16 and torch.equal(p, fp32[name].half())
    with torch.no_grad():
        assert torch.equal(net(ids, mask), load_fp16(root)(ids, mask))
    assert {p.dtype for p in net.float().parameters()} == {torch.float32}


def test_fp16_autocast_runs_wo_in_fp32(outlier_repo):
    """Under float16 autocast the `wo` of a float32 encoder computes in float32 (transformers'
    T5EncoderModel gives NaN on this model there: its `wo` overflows in float16)."""
    root, want = outlier_repo
    ids, mask = ids_and_mask()
    net = load_fp32(root)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        got = net(ids, mask)
    assert torch.isfinite(got).all()
    assert max_error(got, want) < 0.2  # measured 0.084


def test_bf16_makes_wo_bf16_as_transformers(outlier_repo):
    """transformers 5 keeps `_keep_in_fp32_modules` in float32 for float16 only."""
    root, _ = outlier_repo
    theirs = transformers.T5EncoderModel.from_pretrained(os.path.join(root, "text_encoder"),
                                                         dtype=torch.bfloat16)
    for ours in (load_component(T5Encoder, root, "text_encoder", dtype=torch.bfloat16,
                                rename=convert_state_dict), load_fp32(root).to(torch.bfloat16)):
        assert {p.dtype for p in ours.parameters()} == {p.dtype for p in theirs.parameters()} \
            == {torch.bfloat16}


def test_state_dict_keys_are_transformers():
    with torch.device("meta"):
        ours = T5Encoder.from_config(SMALL)
        ref = transformers.T5EncoderModel(transformers.T5Config(**SMALL))
    assert shapes(ours) == shapes(ref)
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" \
        not in ours.state_dict()


def test_rms_norm_statistics_in_fp32_as_transformers():
    from transformers.models.t5.modeling_t5 import T5LayerNorm as Reference
    torch.manual_seed(0)
    x = torch.randn(2, 5, 64) * 30
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours, ref = T5LayerNorm(64, 1e-6), Reference(64, 1e-6)
        with torch.no_grad():
            ours.weight.normal_()
            ref.weight.copy_(ours.weight)
        ours, ref = ours.to(dtype), ref.to(dtype)
        assert torch.equal(ours(x.to(dtype)), ref(x.to(dtype)))


def test_full_xxl_config_on_meta():
    with open(os.path.join(ROOT, "configs", "pixart-512", "text_encoder", "config.json")) as f:
        cfg = json.load(f)
    with torch.device("meta"):
        ours = T5Encoder.from_config(cfg)
        ref = transformers.T5EncoderModel(transformers.T5Config.from_dict(cfg))
    assert (sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
            == 4_762_310_656)
    assert shapes(ours) == shapes(ref)


@pytest.mark.parametrize("change,message", [({"feed_forward_proj": "relu"},
                                             "feed_forward_proj='relu'"),
                                            ({"feed_forward_proj": "gated-silu"},
                                             "feed_forward_proj='gated-silu'"),
                                            ({"model_type": "mt5"}, "model_type='mt5'")])
def test_bad_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=f"unsupported T5 config: {message}"):
        T5Encoder.from_config(dict(SMALL, **change))


def test_missing_or_bad_spiece_model_names_the_file(tmp_path):
    with pytest.raises(LoadError, match=f"T5 tokenizer model not found: {tmp_path}/spiece.model"):
        T5Tokenizer(str(tmp_path))
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(LoadError, match="cannot read the SentencePiece model .*spiece.model"):
        T5Tokenizer(str(tmp_path))


TOKENIZER_DIR = os.path.join(DATA, "t5")
EDGE_CASES = [
    "", " ", "   ", "\n", "Hello world", "Hello World", "A Majestic LION, standing on a ROCK!!!",
    "  lead  and   mid  spaces ", "tab\there\nnewline\r\n", "trailing spaces   ",
    "café naïve ＦＵＬＬＷＩＤＴＨ ﬁne", "cafe\u0301 e\u0301le\u0301phant", "東京タワーの夜景, 北京",
    "emoji 🐱🚀👍🏽 ❤️", "ΟΔΟΣ Σ σς İstanbul ẞ straße", "\u3000wide\u00a0nbsp\u200bzero\u2028line",
    "\x00\x07 control \x7f", "numbers 1,000,000 3.14159 2nd 007", "it’s “curly” — dashes…",
    "x</s>y", "a <extra_id_0> b <extra_id_99>", "<pad> <unk> q",
    "<extra_id_100> </s > <EXTRA_ID_0>",
    "cat " * 119, "cat " * 120, " ".join(["antidisestablishmentarianism"] * 60),
]


def coco_captions():
    with open(os.path.join(DATA, "coco", "captions_coco14_first256.txt")) as f:
        return f.read().splitlines()


def test_tokenizer_matches_transformers_on_coco_and_edge_cases():
    captions = coco_captions()
    assert len(captions) == 256
    prompts = captions + EDGE_CASES
    ref = transformers.T5Tokenizer.from_pretrained(TOKENIZER_DIR)
    want = ref(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
               add_special_tokens=True, return_tensors="pt")
    ours = T5Tokenizer(TOKENIZER_DIR)
    ids, mask = ours(prompts)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape == (len(prompts), MAX_LENGTH)
    for prompt, i, m, wi, wm in zip(prompts, ids, mask, want.input_ids, want.attention_mask):
        assert i.tolist() == wi.tolist(), repr(prompt)
        assert m.tolist() == wm.tolist(), repr(prompt)
    full = ref(prompts, add_special_tokens=True).input_ids  # untruncated, with eos
    assert ours.truncated(prompts) == [k for k, row in enumerate(full) if len(row) > MAX_LENGTH]
    assert len(ours) == len(ref) == 32_100


def test_tokenizer_layout():
    tok = T5Tokenizer(TOKENIZER_DIR)
    ids, mask = tok(["Hello world", "", "cat " * 119, "cat " * 120])
    assert ids[0, :4].tolist() == [8774, 296, 1, 0] and mask[0].sum() == 3
    # the empty prompt: eos, one valid token
    assert ids[1, :2].tolist() == [1, 0] and mask[1].sum() == 1
    assert mask[2].sum() == mask[3].sum() == MAX_LENGTH and ids[3, -1] == 1  # 119 pieces + eos
    assert tok.truncated(["Hello world", "", "cat " * 119, "cat " * 120]) == [3]
    assert tok.encode("a <extra_id_0>") == [3, 9, 32099]
