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

`pretrain_toy_dit` does the same in PixArt-alpha's layout (`transformer/` from dit.py, a T5 v1.1 encoder from
t5.py in `text_encoder/`, a SentencePiece `tokenizer/spiece.model`), read by the loader that reads PixArt:
`python wadi.py pretrain --backbone toy-dit` rebuilds `assets/toy-dit` by the same recipe (the shipped one ran on one
thread; on two, sums in another order give other weights and another teacher: docs/toy-dit.md). Same objective,
v-prediction on SD's schedule for the same reason. `pretrain_toy_controlnet` trains the toy ControlNet.
"""
import io
import json
import os
import shutil
import time

import sentencepiece
import torch
import torch.nn.functional as F
from tqdm import tqdm

import toy
import toyeval
from bpe import CLIPTokenizer
from clip import CLIPTextModel
from controlnet import ControlledUNet, ControlNet
from diffusion import NoiseSchedule, Text, predict
from dit import PixArt
from loading import read_json, save_tensors, write_json
import cli
from cli import UsageError
from pipeline import BACKBONES, CACHE_DIR, load_pipeline
from t5 import EXTRA_IDS, T5Encoder, T5Tokenizer
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

# the toy DiT (`--backbone toy-dit`): PixArt-alpha's layout (adaLN-single, cross-attention on T5 with its mask,
# out_channels 2 x in_channels: the learned-variance channels stay in the layout, untrained, and diffusion.predict
# drops them as for PixArt) over 2 x 2 pixel patches: 256 tokens (PixArt-256's count) of width 64 (2 heads of 32),
# 6 blocks; 4 x 4 patches drew blobs and blocky students (docs/toy-dit.md)
DIT_CONFIG = {"_class_name": "PixArtTransformer2DModel", "in_channels": 3, "out_channels": 6, "sample_size": 32,
              "patch_size": 2, "num_layers": 6, "num_attention_heads": 2, "attention_head_dim": 32,
              "cross_attention_dim": 64, "caption_channels": 64, "attention_bias": True,
              "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
              "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": 1,
              "use_additional_conditions": False}
# its text encoder: a T5 v1.1 encoder as wide as the toy's CLIP (vocab_size: the SentencePiece pieces + T5's 100
# sentinels, set by `pretrain_toy_dit`)
T5_CONFIG = {"architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": 64, "d_kv": 16, "num_heads": 4,
             "d_ff": 128, "num_layers": 2, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
             "is_gated_act": True, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
             "layer_norm_epsilon": 1e-6, "dropout_rate": 0.0, "initializer_factor": 1.0, "tie_word_embeddings": False,
             "is_encoder_decoder": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
DIT_STEPS, DIT_LR, DIT_EMA = 3000, 1e-3, 0.99  # `pretrain --backbone toy-dit`'s defaults, batch 32


def denoising_batch(x0, prompts, schedule, generator, drop=0.1):
    """The draws of one step of the denoising objective on clean images x0 (B, C, H, W): each prompt replaced by ""
    with probability `drop`, t ~ U{0, ..., 999}, eps ~ N(0, I). Returns (x_t, t, prompts, the network's target)."""
    keep = torch.rand(len(prompts), generator=generator) >= drop
    prompts = [p if k else "" for p, k in zip(prompts, keep.tolist())]
    t = torch.randint(0, len(schedule.alphas_cumprod), (len(prompts),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    return schedule.add_noise(x0, eps, t), t, prompts, schedule.target(x0, eps, t)


def fit(denoiser, encode, params, schedule, steps, batch_size, lr, ema, generator, log=print):
    """Train `params` (the denoiser's and the text encoder's) on fresh toy data with the denoising objective:
    `steps` AdamW steps (no weight decay, linear warm-up over the first 5%, gradient norm clipped at 1) of
    `batch_size` images (`denoising_batch`, drawn with `generator`), the text conditioning from
    `encode(prompts) -> Text`; the parameters end holding their exponential moving average (decay `ema`)."""
    averaged = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    bar = tqdm(range(steps), desc="pretrain", dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        x0, prompts, _ = toy.sample(batch_size, generator)  # (B, 3, 32, 32)
        xt, t, prompts, target = denoising_batch(x0, prompts, schedule, generator)
        loss = F.mse_loss(predict(denoiser, xt, t, encode(prompts)), target)
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
    log(f"trained in {time.perf_counter() - start:.0f} s ({time.process_time():.0f} CPU s in this process so far)")


def scheduler_config(prediction_type):
    """SD's schedule (scaled_linear, alphas_cumprod[999] = 0.0047 = the one-step generator's a_T) with
    `prediction_type`."""
    with open(os.path.join(HERE, "configs", "sd15", "scheduler", "scheduler_config.json")) as f:
        return {**json.load(f), "prediction_type": prediction_type}


def measure_teacher(out, backbone, eval_samples, cache_dir=None, log=print):
    """The teacher's figures under the toy protocol on `eval_samples` samples, stored with its weights'
    hash in OUT/teacher_metrics.json (what `train`'s table reuses) and printed; a T5's prompt embeddings
    are cached in `cache_dir` (pipeline.Pipeline.prepare_prompts)."""
    log(f"wrote the {backbone} repository to {out}; measuring the teacher (toy protocol, cached for `train`)")
    pipe = load_pipeline(backbone, out)
    protocol = {**toyeval.PROTOCOL, "n": eval_samples}
    classifier = toyeval.load_classifier(os.path.join(out, "classifier"))
    results, _ = toyeval.evaluate_toy(pipe, pipe.denoiser, classifier, names=("teacher_25", "teacher_1"),
                                  cache_dir=cache_dir, **protocol)
    toyeval.store_teacher_metrics(os.path.join(out, toyeval.TEACHER_METRICS), protocol, toyeval.teacher_fingerprint(pipe), results)
    log(toyeval.metrics_table(results))
    log(f"{time.process_time():.0f} CPU s in all")


def pretrain_toy(out, steps=1500, batch_size=32, lr=1e-3, ema=0.99, classifier_steps=500,
                 eval_samples=toyeval.REPORT_SAMPLES, prediction_type="v_prediction", seed=0, log=print):
    """Train the toy classifier and teacher; write the repository to `out`."""
    torch.manual_seed(seed)
    log(f"training the toy classifier ({classifier_steps} steps)")
    classifier = toyeval.train_classifier(steps=classifier_steps, seed=seed, progress=False)
    toyeval.save_classifier(classifier, os.path.join(out, "classifier"))

    toy.write_tokenizer(os.path.join(out, "tokenizer"))
    tokenizer = CLIPTokenizer(os.path.join(out, "tokenizer"))
    text_config = {**TEXT_CONFIG, "vocab_size": len(tokenizer.vocab), "bos_token_id": tokenizer.bos_id,
                   "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    schedule_config = scheduler_config(prediction_type)
    unet, text = UNet.from_config(UNET_CONFIG), CLIPTextModel.from_config(text_config)
    generator = torch.Generator().manual_seed(seed)
    log(f"training the toy teacher: U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text "
        f"encoder {sum(p.numel() for p in text.parameters()) / 1e6:.2f}M, {steps} steps of {batch_size}")
    fit(unet, lambda prompts: Text(text(tokenizer(prompts))), [*unet.parameters(), *text.parameters()],
        NoiseSchedule.from_config(schedule_config), steps, batch_size, lr, ema, generator, log)

    write_json(os.path.join(out, "unet", "config.json"), UNET_CONFIG)
    save_tensors(unet.state_dict(), os.path.join(out, "unet", "diffusion_pytorch_model.safetensors"))
    write_json(os.path.join(out, "text_encoder", "config.json"), text_config)
    save_tensors(text.state_dict(), os.path.join(out, "text_encoder", "model.safetensors"))
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), schedule_config)
    measure_teacher(out, "toy", eval_samples, log=log)


def write_spiece(directory):
    """Train T5's kind of tokenizer on the toy prompts with the `sentencepiece` package and write it as
    `directory/spiece.model`: T5's special ids (pad 0, eos 1, unk 2, no bos), then one piece per word of
    toy.WORDS ("▁red"), so every toy prompt is 8 pieces; any other word is unk. A word-level model: on 128
    prompts sentencepiece's unigram and BPE trainers split the words. Returns the number of pieces."""
    prompts = [toy.prompt(a) for a in toy.all_attributes()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(prompts), model_writer=model, model_type="word", vocab_size=len(toy.WORDS) + 3,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(model.getvalue())
    return len(toy.WORDS) + 3


def init_pixart(net):
    """PixArt-alpha's initialisation (diffusion/model/nets/PixArt.py, `initialize_weights`): Xavier-uniform
    linears with zero biases, the patch embedding as a linear, N(0, 0.02) timestep and caption MLPs, and zero
    cross-attention output projections and final layer, so that training starts from a network that predicts 0.
    (The scale-shift tables keep their N(0, 1 / D) start, as there.)"""
    for module in net.modules():
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
    w = net.pos_embed.proj.weight
    torch.nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for linear in (net.adaln_single.emb.timestep_embedder.linear_1, net.adaln_single.emb.timestep_embedder.linear_2,
                   net.adaln_single.linear, net.caption_projection.linear_1, net.caption_projection.linear_2):
        torch.nn.init.normal_(linear.weight, std=0.02)
    for linear in (*(block.attn2.to_out[0] for block in net.transformer_blocks), net.proj_out):
        torch.nn.init.zeros_(linear.weight)
        torch.nn.init.zeros_(linear.bias)


def init_t5(net):
    """transformers' T5 initialisation (`T5PreTrainedModel._init_weights`, initializer_factor 1): embeddings
    N(0, 1); q N(0, (d_model d_kv)^-1/2) (T5 does not scale its scores), k, v and the position bias
    N(0, d_model^-1/2), o N(0, (heads d_kv)^-1/2); wi_0, wi_1 N(0, d_model^-1/2), wo N(0, d_ff^-1/2); norms 1."""
    c = net.config
    torch.nn.init.normal_(net.shared.weight, std=1.0)
    for name, p in net.named_parameters():
        std = {"q": (c.d_model * c.d_kv) ** -0.5, "k": c.d_model ** -0.5, "v": c.d_model ** -0.5,
               "o": (c.num_heads * c.d_kv) ** -0.5, "relative_attention_bias": c.d_model ** -0.5,
               "wi_0": c.d_model ** -0.5, "wi_1": c.d_model ** -0.5, "wo": c.d_ff ** -0.5}.get(name.split(".")[-2])
        if std is not None:
            torch.nn.init.normal_(p, std=std)


def pretrain_toy_dit(out, steps=DIT_STEPS, batch_size=32, lr=DIT_LR, ema=DIT_EMA, eval_samples=toyeval.REPORT_SAMPLES,
                     seed=0, cache_dir=None, log=print):
    """The toy in PixArt-alpha's layout: a DiT from dit.py (DIT_CONFIG) and a T5 v1.1 encoder from t5.py
    (T5_CONFIG) with a SentencePiece tokenizer (`write_spiece`), trained jointly from PixArt's and T5's
    initialisations on the toy data (`fit`, v-prediction on SD's schedule, as the toy U-Net); the classifier is
    a copy of the toy's (assets/toy/classifier: the same measuring stick for both toys). Writes `out`
    (transformer/, text_encoder/, tokenizer/spiece.model, scheduler/, classifier/, teacher_metrics.json)."""
    torch.manual_seed(seed)
    shutil.copytree(os.path.join(BACKBONES["toy"].repo, "classifier"), os.path.join(out, "classifier"),
                    dirs_exist_ok=True)
    pieces = write_spiece(os.path.join(out, "tokenizer"))
    tokenizer = T5Tokenizer(os.path.join(out, "tokenizer"))
    text_config = {**T5_CONFIG, "vocab_size": pieces + EXTRA_IDS}  # T5's sentinels follow the pieces
    schedule_config = scheduler_config("v_prediction")
    dit, text = PixArt.from_config(DIT_CONFIG), T5Encoder.from_config(text_config)
    init_pixart(dit)
    init_t5(text)
    generator = torch.Generator().manual_seed(seed)
    log(f"training the toy DiT: {sum(p.numel() for p in dit.parameters()) / 1e6:.2f}M, T5 encoder "
        f"{sum(p.numel() for p in text.parameters()) / 1e6:.2f}M, {steps} steps of {batch_size}")

    def encode(prompts):
        ids, mask = tokenizer(prompts)  # (B, 120) each
        return Text(text(ids, mask), mask)

    fit(dit, encode, [*dit.parameters(), *text.parameters()], NoiseSchedule.from_config(schedule_config), steps,
        batch_size, lr, ema, generator, log)

    write_json(os.path.join(out, "transformer", "config.json"), DIT_CONFIG)
    save_tensors(dit.state_dict(), os.path.join(out, "transformer", "diffusion_pytorch_model.safetensors"))
    write_json(os.path.join(out, "text_encoder", "config.json"), text_config)
    tied = {k: v for k, v in text.state_dict().items() if k != "encoder.embed_tokens.weight"}  # = shared.weight
    save_tensors(tied, os.path.join(out, "text_encoder", "model.safetensors"))  # as transformers writes T5
    write_json(os.path.join(out, "scheduler", "scheduler_config.json"), schedule_config)
    measure_teacher(out, "toy-dit", eval_samples, cache_dir, log)


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
    unet, schedule = pipe.denoiser, pipe.schedule  # frozen: gradients pass through it to the residuals
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


def add_parser(sub):
    """Register the `pretrain` command on wadi.py's subcommands `sub`."""
    p = sub.add_parser("pretrain", help="train a toy teacher from scratch, or with --controlnet a ControlNet for "
                                        "the toy teacher",
                       description="Train a toy backbone (teacher, text encoder, tokenizer; toy: also the classifier) "
                                   "and measure the teacher; writes a model directory in the SD layout (toy: U-Net, "
                                   "CLIP) or PixArt's (toy-dit: DiT, T5). With --controlnet, train a ControlNet for "
                                   "the frozen toy teacher instead (diffusers' layout).")
    p.add_argument("--backbone", choices=list(toy.BACKBONES), default="toy", help="which toy (default: %(default)s)")
    p.add_argument("--controlnet", action="store_true", help="train a ControlNet (condition: the object's mask) for "
                                                             "the frozen teacher of --model")
    p.add_argument("--model", help="--controlnet: the toy repo whose teacher it steers (default: assets/toy)")
    p.add_argument("--out", help="the directory to write (default: runs/pretrain-BACKBONE, with --controlnet "
                                 "runs/pretrain-toy-controlnet; the shipped ones are assets/toy, assets/toy-dit and "
                                 "assets/toy/controlnet)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="toy-dit: where the T5 prompt embeddings are cached")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out (e.g. assets/toy)")
    p.add_argument("--steps", type=cli.POSITIVE,
                   help=f"training steps (default: toy 1500, toy-dit {DIT_STEPS}, --controlnet 400)")
    p.add_argument("--batch-size", type=cli.POSITIVE, help="images per step (default: 32, --controlnet 16)")
    p.add_argument("--lr", type=cli.RATE, default=1e-3, help="learning rate (AdamW)")
    p.add_argument("--seed", type=cli.NON_NEGATIVE, default=0, help="data, initialisation and classifier seed")
    p.set_defaults(func=command)


def command(args):
    """`wadi.py pretrain`."""
    if args.controlnet:
        out = args.out or os.path.join("runs", "pretrain-toy-controlnet")
        defaults, existing = dict(steps=400, batch_size=16), os.path.join(out, "config.json")
        if args.backbone != "toy":
            raise UsageError(f"--controlnet is for --backbone toy (the U-Net teacher), not {args.backbone}")
    else:
        out = args.out or os.path.join("runs", f"pretrain-{args.backbone}")
        defaults = dict(steps=DIT_STEPS if args.backbone == "toy-dit" else 1500, batch_size=32)
        existing = os.path.join(out, BACKBONES[args.backbone].denoiser, "config.json")
    if os.path.isfile(existing) and not args.overwrite:
        raise UsageError(f"--out {out} already holds a model ({os.path.relpath(existing, out)}); pass "
                         f"--overwrite to replace it (the shipped assets/{args.backbone} too), or give "
                         f"another --out")
    given = {k: getattr(args, k) for k in ("steps", "batch_size") if getattr(args, k) is not None}
    options = {**defaults, **given, "lr": args.lr, "seed": args.seed}
    if args.controlnet:
        pretrain_toy_controlnet(out, args.model or BACKBONES["toy"].repo, **options)
    elif args.backbone == "toy-dit":
        pretrain_toy_dit(out, cache_dir=args.cache_dir, **options)
    else:
        pretrain_toy(out, **options)
