"""SDXL's conditioning as its diffusers pipeline builds it (docs/sdxl.md), for pipeline.py: the two
text encoders and the two tokenizers as one encoder and one tokenizer (`TextEncoders`,
`Tokenizers`), the size / crop numbers of the image (`with_time_ids`) and zeros as the
unconditional text (`null_text`), all carried by diffusion.Text to the one denoiser call,
diffusion.predict.
"""
import dataclasses

import torch
from torch import nn

from clip import sdxl_null_text, sdxl_text
from diffusion import Text
from loading import LoadError

# the repo's folders: CLIP ViT-L (tokenizer/ pads with EOS) and OpenCLIP ViT-bigG with its
# projection (tokenizer_2/ pads with "!")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")


def check_family(config, sdxl_backbone, where):
    """A one-line LoadError unless the denoiser config (`where`) takes SDXL's pooled text and time
    ids (addition_embed_type text_time) exactly when the backbone is SDXL."""
    if (config.get("addition_embed_type") == "text_time") != sdxl_backbone:
        raise LoadError(f"{where} is not SDXL's (no addition_embed_type text_time): it goes with "
                        f"--backbone sd15 or sd21" if sdxl_backbone else
                        f"{where} is SDXL's (addition_embed_type text_time): give --backbone sdxl")


class TextEncoders(nn.Module):
    """text_encoder/ (clip.CLIPTextModel) and text_encoder_2/ (clip.CLIPTextModelWithProjection)
    as one module: the token ids of both tokenizers -> Text with the concatenated penultimate
    states (B, L, D + D2) and the pooled projection (B, P) (clip.sdxl_text)."""

    def __init__(self, encoder, encoder_2):
        super().__init__()
        self.encoder, self.encoder_2 = encoder, encoder_2

    def forward(self, ids, ids_2):
        embeds, pooled = sdxl_text(self.encoder, self.encoder_2, ids, ids_2)
        return Text(embeds, pooled=pooled)


@dataclasses.dataclass
class Tokenizers:
    """tokenizer/ and tokenizer_2/ (bpe.CLIPTokenizer): prompts -> (ids, ids_2), each (B, L)."""
    tokenizer: object
    tokenizer_2: object

    def __call__(self, prompts):
        return self.tokenizer(prompts), self.tokenizer_2(prompts)


def with_time_ids(text: Text, height, width):
    """`text` with SDXL's time ids for an image of height x width pixels: (height, width, 0, 0,
    height, width) per sample, float32: the original size, the crop's top-left corner and the
    target size, as StableDiffusionXLPipeline sets them by default (`_get_add_time_ids` with
    original_size = target_size = (height, width), crops_coords_top_left = (0, 0))."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    ids = ids.to(text.embeds.device).expand(len(text.embeds), -1)
    return dataclasses.replace(text, time_ids=ids)


def null_text(text: Text):
    """SDXL's unconditional text with `text`'s shapes and time ids: zeros, the sequence and the
    pooled vector alike (clip.sdxl_null_text: the base model's force_zeros_for_empty_prompt)."""
    embeds, pooled = sdxl_null_text(text.embeds, text.pooled)
    return dataclasses.replace(text, embeds=embeds, pooled=pooled)
