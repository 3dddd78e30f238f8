"""The diffusion process in one place: the noise schedule read from a diffusers scheduler config
(DDPM, Ho et al. 2020), forward noising, conversions between eps / v / x0 predictions, classifier-free
guidance (Ho & Salimans 2022), WaDi's one-step generator (SPEC 1.3) and the DDIM sampler
(Song et al. 2021) used for the multi-step teacher.
"""
from dataclasses import dataclass

import torch

A_T = 0.0047  # SD's alphas_cumprod[999]: the one-step generator's noise level (official constant, SPEC 1.3)
T_MAX = 999


@dataclass
class NoiseSchedule:
    alphas_cumprod: torch.Tensor  # (1000,) float32, a_t of x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
    prediction_type: str = "epsilon"
    final_alpha_cumprod: float = 1.0  # a_t after the last DDIM step (set_alpha_to_one, else a_0)

    @classmethod
    def from_config(cls, cfg: dict):
        """From a diffusers `scheduler/scheduler_config.json` dict (betas computed as diffusers does)."""
        n, b0, b1 = cfg.get("num_train_timesteps", 1000), cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02)
        kind = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            raise ValueError("unsupported scheduler config: trained_betas")
        if kind == "linear":
            betas = torch.linspace(b0, b1, n, dtype=torch.float32)
        elif kind == "scaled_linear":
            betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, n, dtype=torch.float32) ** 2
        else:
            raise ValueError(f"unsupported scheduler config: beta_schedule={kind!r} (supported: linear, scaled_linear)")
        prediction = cfg.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported scheduler config: prediction_type={prediction!r}")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        final = 1.0 if cfg.get("set_alpha_to_one", True) else alphas_cumprod[0].item()
        return cls(alphas_cumprod, prediction, final)

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


def to_eps(pred, x_t, a, prediction_type):
    """The noise prediction from a network output at noise level a (tensor broadcasting to x_t)."""
    if prediction_type == "epsilon":
        return pred
    return a.sqrt() * pred + (1 - a).sqrt() * x_t  # v = sqrt(a) eps - sqrt(1 - a) x0


def to_x0(eps, x_t, a):
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def guided(net, x, t, context, null_context, scale):
    """Classifier-free guidance: net(x, t, c0) + s * (net(x, t, c) - net(x, t, c0)), both in one batch."""
    t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    uncond, cond = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([null_context, context])).chunk(2)
    return uncond + scale * (cond - uncond)


def one_step(net, z, context, prediction_type="epsilon", a_T=A_T):
    """WaDi's generator: x0 = (z - sqrt(1 - a_T) eps(z, T, c)) / sqrt(a_T), z ~ N(0, I), T = 999."""
    a = torch.tensor(a_T, device=z.device, dtype=torch.float32)
    eps = to_eps(net(z, T_MAX, context).float(), z.float(), a, prediction_type)
    return to_x0(eps, z.float(), a)


@torch.no_grad()
def ddim_sample(net, schedule: NoiseSchedule, z, context, null_context, steps=25, guidance=7.5, offset=1,
                progress=None):
    """Deterministic DDIM (eta = 0) with CFG over `steps` evenly spaced ("leading") timesteps plus the
    scheduler's steps_offset, as diffusers' DDIMScheduler for SD. Returns x0 (float32)."""
    n = len(schedule.alphas_cumprod)
    ratio = n // steps
    timesteps = [i * ratio + offset for i in reversed(range(steps))]
    x = z.float()
    for t in (progress(timesteps) if progress else timesteps):
        pred = guided(net, x.to(z.dtype), t, context, null_context, guidance).float()
        a = schedule.alphas_cumprod[t]
        a_prev = schedule.alphas_cumprod[t - ratio] if t >= ratio else torch.tensor(schedule.final_alpha_cumprod)
        eps = to_eps(pred, x, a, schedule.prediction_type)
        x = a_prev.sqrt() * to_x0(eps, x, a) + (1 - a_prev).sqrt() * eps
    return x
