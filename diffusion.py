"""The diffusion process in one place: the noise schedule read from a diffusers scheduler config
(DDPM, Ho et al. 2020), forward noising, conversions between eps / v / x0 predictions, the one call
of a denoiser (`predict`, with a batch's text conditioning `Text`), classifier-free guidance (Ho &
Salimans 2022), WaDi's one-step generator (paper Sec. 3.3) and the DDIM sampler (Song et al. 2021)
used for the multi-step teacher.
"""
from dataclasses import dataclass

import numpy as np
import torch

# SD's alphas_cumprod[999]: the one-step generator's noise level (the official constant, PixArt too)
A_T = 0.0047
T_MAX = 999


# scheduler_config.json keys that select behaviour not implemented here, and the values that are
UNSUPPORTED = {"rescale_betas_zero_snr": (False,), "thresholding": (False,),
               "trained_betas": (None,), "timestep_spacing": ("leading", "trailing", "linspace")}


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (T,) float32, a_t of x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    prediction_type: str = "epsilon"
    final_alpha_cumprod: float = 1.0  # a_t after the last DDIM step (set_alpha_to_one, else a_0)
    timestep_spacing: str = "leading"  # how DDIM picks its timesteps (DDIMScheduler.set_timesteps)
    steps_offset: int = 0              # added to "leading" timesteps (SD: 1)
    clip_sample: bool = False          # clamp DDIM's x0 predictions to +-clip_sample_range
    clip_sample_range: float = 1.0

    @classmethod
    def from_config(cls, cfg: dict):
        """From a diffusers `scheduler/scheduler_config.json` dict (betas computed as diffusers
        does; the DDIM keys as DDIMScheduler reads them, with its defaults). A ValueError names a
        key whose value is not implemented: nothing is silently different from diffusers."""
        for key, supported in UNSUPPORTED.items():
            if cfg.get(key, supported[0]) not in supported:
                raise ValueError(f"unsupported scheduler config: {key}={cfg[key]!r} (supported: "
                                 f"{', '.join(map(repr, supported))})")
        n = cfg.get("num_train_timesteps", 1000)
        b0, b1 = cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
        kind = cfg.get("beta_schedule", "linear")
        if kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unsupported scheduler config: beta_schedule={kind!r} (supported: "
                             f"linear, scaled_linear)")
        prediction = cfg.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported scheduler config: prediction_type={prediction!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if cfg.get("set_alpha_to_one", True) else alphas_cumprod[0].item()
        return cls(alphas_cumprod, prediction, final, cfg.get("timestep_spacing", "leading"),
                   cfg.get("steps_offset", 0), cfg.get("clip_sample", True),
                   cfg.get("clip_sample_range", 1.0))

    def ddim_timesteps(self, steps):
        """The `steps` timesteps of a DDIM run, first to last, as diffusers'
        DDIMScheduler.set_timesteps picks them for this config's timestep_spacing and steps_offset.
        A ValueError (saying what to use instead) for fewer than 1 step, more than the schedule
        has, or a first timestep past its end."""
        n = len(self.alphas_cumprod)
        if not 1 <= steps <= n:
            raise ValueError(f"DDIM takes 1 to {n} steps (the schedule's num_train_timesteps), "
                             f"got {steps}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, n - 1, steps).round()[::-1]
        elif self.timestep_spacing == "leading":
            timesteps = np.arange(steps)[::-1] * (n // steps) + self.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(n, 0, -n / steps)) - 1
        timesteps = [int(t) for t in timesteps]
        if timesteps[0] >= n:
            raise ValueError(f"{steps} DDIM steps with this scheduler's {self.timestep_spacing!r} "
                             f"spacing and steps_offset {self.steps_offset} would start at t = "
                             f"{timesteps[0]}, past the last "
                             f"trained timestep {n - 1}; use at most {n - 1} steps")
        return timesteps

    def alpha(self, t, like):
        """a_t for integer timesteps t (B,), shaped to broadcast against `like` (B, ...)."""
        a = self.alphas_cumprod.to(like.device)[t].to(torch.float32)
        return a.view(-1, *[1] * (like.dim() - 1))

    def add_noise(self, x0, eps, t):
        a = self.alpha(t, x0)
        return (a.sqrt() * x0 + (1 - a).sqrt() * eps).to(x0.dtype)

    def target(self, x0, eps, t):
        """What the denoiser learns to predict at x_t = add_noise(x0, eps, t): eps, or the velocity
        v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022)."""
        if self.prediction_type == "epsilon":
            return eps
        a = self.alpha(t, x0)
        return a.sqrt() * eps - (1 - a).sqrt() * x0


@dataclass
class Text:
    """A batch's text conditioning: `embeds` (B, L, D) and `mask` (B, L), 1 on tokens and 0 on
    padding (T5: PixArt's cross-attention skips the padding), or None when every position counts
    (CLIP); SDXL's U-Net also takes `pooled` (B, P), the second encoder's projected pooled text,
    and `time_ids` (B, 6), the image's original size, crop corner and target size (docs/sdxl.md),
    None elsewhere."""
    embeds: torch.Tensor
    mask: torch.Tensor = None
    pooled: torch.Tensor = None
    time_ids: torch.Tensor = None

    def map(self, f, *others):
        """A Text of f(name, field, the others' same field) for every field that is set."""
        return Text(**{k: None if v is None else f(k, v, *(getattr(o, k) for o in others))
                       for k, v in vars(self).items()})

    def to(self, device=None, dtype=None):
        """Moved to `device`; the embeddings cast to `dtype` (the mask stays integer, the time ids
        float32)."""
        return self.map(lambda k, v: v.to(device=device,
                                          dtype=dtype if k in ("embeds", "pooled") else None))

    def expand(self, n):
        """One prompt's conditioning (1, ...) as a batch of n (a view, nothing copied)."""
        return self.map(lambda k, v: v.expand(n, *v.shape[1:]))

    def cat(self, other):
        """This batch, then `other` (same L): (B + B', ...)."""
        return self.map(lambda k, v, w: torch.cat([v, w]), other)

    def where(self, condition, other):
        """Per sample, this batch's row where `condition` (B,) is True, else `other`'s."""
        return self.map(lambda k, v, w: torch.where(condition.view(-1, *[1] * (v.dim() - 1)), v, w),
                        other)


def predict(net, x, t, text: Text):
    """The denoiser's prediction (B, C, H, W) for x (B, C, H, W) at timesteps t (scalar or (B,))
    under `text`: the first C output channels of net(x, t, embeds, mask) (PixArt's learned-variance
    channels follow them and are dropped here, as diffusers' PixArtAlphaPipeline keeps
    `chunk(2)[0]`), SDXL's pooled text and time ids passed as `text_embeds=` and `time_ids=`."""
    extra = {} if text.pooled is None else {"text_embeds": text.pooled, "time_ids": text.time_ids}
    return net(x, t, text.embeds, text.mask, **extra)[:, :x.shape[1]]


def to_eps(pred, x_t, a, prediction_type):
    """The noise prediction from a network output at noise level a (tensor broadcasting to x_t)."""
    if prediction_type == "epsilon":
        return pred
    return a.sqrt() * pred + (1 - a).sqrt() * x_t  # v = sqrt(a) eps - sqrt(1 - a) x0


def to_x0(eps, x_t, a):
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def guided(net, x, t, text: Text, null: Text, scale, damped=None):
    """Classifier-free guidance: net(x, t, c0) + s * (net(x, t, c) - net(x, t, c0)), both in one
    batch. With a `damped` network the base is damped(x, t, c0) instead (ScaleCrafter's noise-damped
    CFG, redilate.py)."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    uncond, cond = predict(net, torch.cat([x, x]), torch.cat([t, t]), null.cat(text)).chunk(2)
    base = uncond if damped is None else predict(damped, x, t, null)
    return base + scale * (cond - uncond)


def one_step(net, z, text: Text, prediction_type="epsilon", a_T=A_T):
    """WaDi's generator: x0 = (z - sqrt(1 - a_T) eps(z, T, c)) / sqrt(a_T), z ~ N(0, I), T = 999."""
    a = torch.tensor(a_T, device=z.device, dtype=torch.float32)
    eps = to_eps(predict(net, z, T_MAX, text).float(), z.float(), a, prediction_type)
    return to_x0(eps, z.float(), a)


@torch.no_grad()
def ddim_sample(net, schedule: NoiseSchedule, z, text: Text, null: Text, steps=25, guidance=7.5,
                progress=None, damped=None, damped_steps=0):
    """Deterministic DDIM (eta = 0) with CFG, step for step diffusers' DDIMScheduler under this
    schedule's config: its timesteps (`NoiseSchedule.ddim_timesteps`), the previous timestep
    t - T // steps whatever the spacing, a_prev = final_alpha_cumprod past the start, x0 clamped
    when clip_sample is set (the
    noise kept as predicted). The first `damped_steps` take CFG's base from `damped` (`guided`).
    Returns x0 (float32)."""
    timesteps = schedule.ddim_timesteps(steps)
    ratio = len(schedule.alphas_cumprod) // steps
    x = z.float()
    for i, t in enumerate(progress(timesteps) if progress else timesteps):
        base = damped if i < damped_steps else None
        pred = guided(net, x.to(z.dtype), t, text, null, guidance, base).float()
        a = schedule.alphas_cumprod[t]
        a_prev = (schedule.alphas_cumprod[t - ratio] if t >= ratio
                  else torch.tensor(schedule.final_alpha_cumprod))
        eps = to_eps(pred, x, a, schedule.prediction_type)
        x0 = to_x0(eps, x, a)
        if schedule.clip_sample:
            x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x
