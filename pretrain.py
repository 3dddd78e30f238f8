"""Pretraining of the toy teacher: a small text-to-image diffusion model trained from scratch on the
procedural data of toy.py with the denoising objective of DDPM (Ho et al. 2020) in SD 2.1's v-prediction form
(Salimans & Ho 2022; `prediction_type="epsilon"` gives SD 1.5's noise prediction) and 10% prompt dropout (so
classifier-free guidance works, Ho & Salimans 2022). The U-Net comes from unet.py, the text transformer from
clip.py, both trained jointly; the schedule is SD's.

Why v: a model this small predicts eps at t = 999 with an error of about 0.05 RMS, which the one-step image
x0 = (z - sqrt(1 - a_T) eps) / sqrt(a_T) multiplies by 14.6 into pixel noise that VSD did not remove; with v,
x0 = sqrt(a_T) z - sqrt(1 - a_T) v, and the error passes through unamplified (README, "The toy backbone").

`pretrain_toy` writes a model repository in the Stable Diffusion layout (`unet/`, `text_encoder/`,
`tokenizer/`, `scheduler/`; pixel space, so no `vae/`) plus the toy classifier (`classifier/`), which
`pipeline.load_pipeline("toy")` reads like any SD repo, and the teacher's own figures under the toy
protocol (`teacher_metrics.json`, so that `train` need not regenerate them). `python wadi.py pretrain
--backbone toy` reproduces the shipped `assets/toy`.
"""
import json
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import toy
from clip import CLIPTextModel, CLIPTokenizer
from controlnet import ControlledUNet, ControlNet
from diffusion import NoiseSchedule, Text, predict
from loading import read_json, save_tensors
from pipeline import load_pipeline
from unet import UNet

HERE = os.path.dirname(os.path.abspath(__file__))

# the toy denoiser: SD's U-Net family, three levels on 32 x 32 RGB, text cross-attention at every level (at 32 x 32
# text-only, `only_cross_attention`, as a 1024-token self-attention would dominate the CPU cost), linear projections
# (as SD 2.1), so LoRaD reaches every resolution; v-prediction (as SD 2.1), see README "The toy backbone"
UNET_CONFIG = {"_class_name": "UNet2DConditionModel", "in_channels": 3, "out_channels": 3, "sample_size": 32,
               "block_out_channels": [16, 32, 64], "layers_per_block": 1, "attention_head_dim": [1, 2, 4],
               "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3,
               "only_cross_attention": [True, False, False], "use_linear_projection": True,
               "cross_attention_dim": 64, "norm_num_groups": 8, "flip_sin_to_cos": True, "freq_shift": 0}
TEXT_CONFIG = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_act": "quick_gelu",
               "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": toy.MAX_TOKENS, "layer_norm_eps": 1e-5}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def denoising_batch(x0, prompts, schedule, generator, drop=0.1):
    """The draws of one step of the denoising objective on clean images x0 (B, C, H, W): each prompt replaced by ""
    with probability `drop`, t ~ U{0, ..., 999}, eps ~ N(0, I). Returns (x_t, t, prompts, the network's target)."""
    keep = torch.rand(len(prompts), generator=generator) >= drop
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    t = torch.randint(0, len(schedule.alphas_cumprod), (len(prompts),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return schedule.add_noise(x0, eps, t), t, prompts, schedule.target(x0, eps, t)


def pretrain_toy(out, steps=1500, batch_size=32, lr=1e-3, ema=0.99, classifier_steps=500,
                 eval_samples=toy.REPORT_SAMPLES, prediction_type="v_prediction", seed=0, log=print):
    """Train the toy classifier and teacher; write the repository to `out`."""
    torch.manual_seed(seed)
    log(f"training the toy classifier ({classifier_steps} steps)")
    classifier = toy.train_classifier(steps=classifier_steps, seed=seed, progress=False)
    toy.save_classifier(classifier, os.path.join(out, "classifier"))

    toy.write_tokenizer(os.path.join(out, "tokenizer"))
    tokenizer = CLIPTokenizer(os.path.join(out, "tokenizer"))
    text_config = {**TEXT_CONFIG, "vocab_size": len(tokenizer.vocab), "bos_token_id": tokenizer.bos_id,
                   "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    with open(os.path.join(HERE, "configs", "sd15", "scheduler", "scheduler_config.json")) as f:
        scheduler_config = {**json.load(f), "prediction_type": prediction_type}
    schedule = NoiseSchedule.from_config(scheduler_config)
    unet, text = UNet.from_config(UNET_CONFIG), CLIPTextModel.from_config(text_config)
    params = [*unet.parameters(), *text.parameters()]
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(seed)
    log(f"training the toy teacher: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text "
        f"encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M, {steps} steps of {batch_size}")
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        x0, prompts, _ = toy.sample(batch_size, generator)  # (B, 3, 32, 32)
        xt, t, prompts, target = denoising_batch(x0, prompts, schedule, generator)
        loss = F.mse_loss(predict(unet, xt, t, Text(text(tokenizer(prompts)))), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for a, p in zip(averaged, params):
                a.lerp_(p, 1 - ema)
        images_per_s = batch_size * (step + 1) / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_s:.0f}")
    with torch.no_grad():
        for a, p in zip(averaged, params):
            p.copy_(a)  # ship the exponential moving average

    write_json(os.path.join(out, "unet", "config.json"), UNET_CONFIG)
    save_tensors(unet.state_dict(), os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    write_json(os.path.join(out, "text_encoder", "config.json"), text_config)
    save_tensors(text.state_dict(), os.path.join(out, "text_encoder", "model.safetensors"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), scheduler_config)
    log(f"wrote the toy repository to {out}; measuring the teacher (toy protocol, cached for `train`)")
    pipe = load_pipeline("toy", out)
    protocol = {**toy.PROTOCOL, "n": eval_samples}
    results, _ = toy.evaluate_toy(pipe, pipe.unet, classifier, names=("teacher_25", "teacher_1"), **protocol)
    toy.store_teacher_metrics(os.path.join(out, toy.TEACHER_METRICS), protocol, toy.teacher_fingerprint(pipe), results)
    log(toy.metrics_table(results))


# the toy ControlNet's conditioning embedding: one level, so the mask stays 32 x 32 (pixel space: no VAE to match)
CONTROLNET_EMBEDDING = (16,)


def pretrain_toy_controlnet(out, model, steps=400, batch_size=16, lr=1e-3, seed=0, log=print):
    """Train a ControlNet for the frozen toy teacher in `model` (Zhang et al. 2023: a trainable copy of the
    U-Net's encoder half, zero convolutions, `ControlNet.from_unet`) with the teacher's denoising loss on fresh
    toy data: the condition is the object's silhouette (`toy.control_sample`), the prompt names size, colour and
    shape but not the position, and is dropped 10% of the time (so that CFG keeps working). Writes `out` in
    diffusers' ControlNetModel layout (config.json, diffusion_pytorch_model.safetensors in fp16)."""
    torch.manual_seed(seed)
    pipe = load_pipeline("toy", model)
    unet, schedule = pipe.unet, pipe.schedule  # frozen: gradients pass through it to the residuals
    controlnet = ControlNet.from_unet(unet, conditioning_embedding_out_channels=CONTROLNET_EMBEDDING).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    log(f"training a toy ControlNet: {sum(p.numel() for p in controlnet.parameters()) / 1e6:.2f}M parameters, "
        f"{steps} steps of {batch_size}")
    bar = tqdm(range(steps), desc="pretrain controlnet", dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        x0, prompts, masks = toy.control_sample(batch_size, generator)  # (B, 3, 32, 32) each
        xt, t, prompts, target = denoising_batch(x0, prompts, schedule, generator)
        prediction = predict(ControlledUNet(unet, controlnet, masks), xt, t, pipe.encode_prompts(prompts))
        loss = F.mse_loss(prediction, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        images_per_s = batch_size * (step + 1) / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_s:.0f}")

    unet_config = read_json(os.path.join(model, "unet", "config.json"))
    config = {**{k: v for k, v in unet_config.items() if k not in ("_class_name", "up_block_types", "out_channels")},
              "_class_name": "ControlNetModel", "conditioning_channels": 3,
              "conditioning_embedding_out_channels": list(CONTROLNET_EMBEDDING)}
    write_json(os.path.join(out, "config.json"), config)
    save_tensors({k: v.half() for k, v in controlnet.state_dict().items()},
                 os.path.join(out, "diffusion_pytorch_model.safetensors"))
    log(f"wrote the toy ControlNet to {out}")
