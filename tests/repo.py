"""Writes complete tiny Stable Diffusion, SDXL and PixArt-alpha repositories on disk, in the real Hugging Face
layout, with random weights saved by the reference libraries themselves (diffusers / transformers), so our
loader is tested on genuine files. The SD VAE attention keys are renamed to the legacy names (`query`, `key`,
`value`, `proj_attn`) that the real SD1.5 / SD2.1 VAE files still carry."""
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from bpe import bytes_to_unicode
from tests.conftest import SDXL_STYLE, small_dit_config, small_unet_config

TEXT_DIM = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def write_prompts(root, prompts):
    """A training prompt file, root/prompts.txt (one per line); returns root."""
    with open(os.path.join(root, "prompts.txt"), "w") as f:
        f.write("\n".join(prompts) + "\n")
    return root


def write_byte_tokenizer(directory, pad="<|endoftext|>", max_length=16):
    """A CLIP tokenizer with no merges: every byte is a token (514 ids in all)."""
    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    write_json(os.path.join(directory, "vocab.json"), vocab)
    with open(os.path.join(directory, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    write_json(os.path.join(directory, "special_tokens_map.json"),
               {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                "pad_token": pad})
    write_json(os.path.join(directory, "tokenizer_config.json"), {"model_max_length": max_length})
    return len(vocab)


def write_vae(root, **config):
    """A two-level SD-style VAE (x2 downsampling, 4 latent channels) in root/vae/."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
                        sample_size=16, **config)
    vae.save_pretrained(os.path.join(root, "vae"))


def write_tiny_sd_repo(root, seed=0, prediction_type="epsilon"):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**small_unet_config(cross_attention_dim=TEXT_DIM, sample_size=8))
    unet.save_pretrained(os.path.join(root, "unet"))

    write_vae(root)
    path = os.path.join(root, "vae", "diffusion_pytorch_model.safetensors")
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(path).items():
        for new, old in legacy.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        state[k] = v
    save_file(state, path)

    vocab = write_byte_tokenizer(os.path.join(root, "tokenizer"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    text.save_pretrained(os.path.join(root, "text_encoder"))

    with open("configs/sd15/scheduler/scheduler_config.json") as f:
        write_json(os.path.join(root, "scheduler", "scheduler_config.json"),
                   {**json.load(f), "prediction_type": prediction_type})
    return root


def write_tiny_sdxl_repo(root, seed=0):
    """An SDXL repo: a U-Net with every SDXL feature (conftest.SDXL_STYLE: no attention at the first level,
    transformer depths 1 / 2 / 3, the text_time embedding of a pooled text of 24 and 6 time ids; 8 x 8
    latents, 16 px images with the x2 VAE), text_encoder/ (CLIPTextModel, 16 wide) and text_encoder_2/
    (CLIPTextModelWithProjection, 24 wide, projection 24, SDXL's legacy eos_token_id 2), their 16 + 24 = 40
    wide states the U-Net's cross-attention width; byte tokenizers, tokenizer/ padding with EOS and
    tokenizer_2/ with "!" as SDXL's; the VAE at SDXL's scaling factor with force_upcast; SDXL's scheduler
    config and model_index.json (diffusers' StableDiffusionXLPipeline loads the folder)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    UNet2DConditionModel(**small_unet_config(**SDXL_STYLE, sample_size=8)).save_pretrained(os.path.join(root, "unet"))
    write_vae(root, scaling_factor=0.13025, force_upcast=True)
    vocab = write_byte_tokenizer(os.path.join(root, "tokenizer"))
    write_byte_tokenizer(os.path.join(root, "tokenizer_2"), pad="!")
    shared = dict(vocab_size=vocab, intermediate_size=64, num_attention_heads=2, max_position_embeddings=16,
                  bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    CLIPTextModel(CLIPTextConfig(hidden_size=16, num_hidden_layers=2, eos_token_id=vocab - 1, **shared)
                  ).save_pretrained(os.path.join(root, "text_encoder"))
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, num_hidden_layers=3, projection_dim=24, eos_token_id=2,
                                               hidden_act="gelu", **shared)).save_pretrained(os.path.join(root, "text_encoder_2"))
    shutil.copytree(os.path.join(ROOT, "configs", "sdxl", "scheduler"), os.path.join(root, "scheduler"))
    parts = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "EulerDiscreteScheduler"}
    write_json(os.path.join(root, "model_index.json"), {
        "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
        **{k: ["diffusers", v] for k, v in parts.items()},
        **{f"text_encoder{s}": ["transformers", "CLIPTextModel" + "WithProjection" * bool(s)] for s in ("", "_2")},
        **{f"tokenizer{s}": ["transformers", "CLIPTokenizer"] for s in ("", "_2")}})
    return root


def write_tiny_pixart_repo(root, seed=0):
    """A PixArt-alpha repo: a 2-block PixArtTransformer2DModel (8 x 8 latents, 16 px images with the x2 VAE),
    a 2-layer T5 v1.1 encoder saved by transformers in shards, the real T5 `spiece.model` (tests/data/t5),
    the VAE and PixArt's own DPM-Solver scheduler config."""
    from diffusers import PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    PixArtTransformer2DModel(**{k: v for k, v in small_dit_config(sample_size=8, caption_channels=TEXT_DIM).items()
                                if not k.startswith("_")}).save_pretrained(os.path.join(root, "transformer"))
    write_vae(root)
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=TEXT_DIM, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20))
    t5.save_pretrained(os.path.join(root, "text_encoder"), max_shard_size="2MB")
    os.makedirs(os.path.join(root, "tokenizer"))
    shutil.copy(os.path.join(ROOT, "tests", "data", "t5", "spiece.model"), os.path.join(root, "tokenizer"))
    shutil.copytree(os.path.join(ROOT, "configs", "pixart-256", "scheduler"), os.path.join(root, "scheduler"))
    return root
