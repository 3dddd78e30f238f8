import json

import pytest
import torch

from diffusion import A_T, NoiseSchedule, Text, ddim_sample, guided, one_step, to_eps, to_x0


def schedule_config(backbone="sd15", **overrides):
    with open(f"configs/{backbone}/scheduler/scheduler_config.json") as f:
        return {**json.load(f), **overrides}


def toy_net(x, t, c, mask=None):
    """A deterministic stand-in denoiser that depends on x, t and the context."""
    return 0.3 * x + c.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 1e-3 * torch.as_tensor(t).float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("cfg", [schedule_config(), schedule_config(beta_schedule="linear", beta_start=1e-4,
                                                                     beta_end=0.02)], ids=["sd", "pixart"])
def test_schedule_matches_diffusers(cfg):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler.from_config(cfg)
    ours = NoiseSchedule.from_config(cfg)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.allclose(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_training_target_matches_diffusers(prediction):
    from diffusers import DDPMScheduler
    cfg = schedule_config(prediction_type=prediction)
    ref, ours = DDPMScheduler.from_config(cfg), NoiseSchedule.from_config(cfg)
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    expected = eps if prediction == "epsilon" else ref.get_velocity(x0, eps, t)
    assert torch.allclose(ours.target(x0, eps, t), expected, atol=1e-6)
    a = ours.alpha(t, x0)  # the target converts back to the noise that made x_t
    assert torch.allclose(to_eps(ours.target(x0, eps, t), ours.add_noise(x0, eps, t), a, prediction), eps, atol=1e-5)


def test_sd_a_T_constant():
    assert abs(NoiseSchedule.from_config(schedule_config()).alphas_cumprod[999].item() - A_T) < 1e-4


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(prediction):
    from diffusers import DDIMScheduler
    cfg = schedule_config(prediction_type=prediction)
    ref = DDIMScheduler.from_config(cfg)
    torch.manual_seed(0)
    z, c, c0 = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 5), torch.zeros(2, 3, 5)
    ours = ddim_sample(toy_net, NoiseSchedule.from_config(cfg), z, Text(c), Text(c0), steps=10, guidance=3.0)
    x = diffusers_ddim(ref, z, c, c0, 10, 3.0)
    assert (ours - x).abs().max() / x.abs().max() < 1e-5


def diffusers_ddim(scheduler, z, c, c0, steps, guidance):
    scheduler.set_timesteps(steps)
    x = z.clone()
    for t in scheduler.timesteps:
        t2 = t.expand(len(z))
        pred = toy_net(x, t2, c0) + guidance * (toy_net(x, t2, c) - toy_net(x, t2, c0))
        x = scheduler.step(pred, t, x).prev_sample
    return x


# every scheduler_config key our DDIM reads, each value, on SD2.1's config (v-prediction, leading, offset 1)
DDIM_KEYS = [("timestep_spacing", "leading"), ("timestep_spacing", "trailing"), ("timestep_spacing", "linspace"),
             ("steps_offset", 0), ("steps_offset", 1), ("clip_sample", True), ("clip_sample", False),
             ("clip_sample_range", 0.5), ("set_alpha_to_one", True), ("set_alpha_to_one", False)]


@pytest.mark.parametrize("key, value", DDIM_KEYS)
@pytest.mark.parametrize("steps", [4, 1])
def test_ddim_follows_every_scheduler_key_as_diffusers(key, value, steps):
    from diffusers import DDIMScheduler
    cfg = schedule_config("sd21", **{key: value}, **({"clip_sample": True} if key == "clip_sample_range" else {}))
    torch.manual_seed(0)
    z, c, c0 = 3 * torch.randn(2, 4, 8, 8), torch.randn(2, 3, 5), torch.zeros(2, 3, 5)
    schedule = NoiseSchedule.from_config(cfg)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    assert schedule.ddim_timesteps(steps) == ref.timesteps.tolist()
    ours = ddim_sample(toy_net, schedule, z, Text(c), Text(c0), steps=steps, guidance=3.0)
    want = diffusers_ddim(ref, z, c, c0, steps, 3.0)
    assert (ours - want).abs().max() / want.abs().max() < 1e-5


@pytest.mark.parametrize("spacing, offset", [("trailing", 1), ("linspace", 0), ("leading", 0)])
def test_ddim_takes_every_step_count_up_to_the_schedule(spacing, offset):
    from diffusers import DDIMScheduler
    cfg = schedule_config("sd15", timestep_spacing=spacing, steps_offset=offset)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(1000)
    assert NoiseSchedule.from_config(cfg).ddim_timesteps(1000) == ref.timesteps.tolist()


@pytest.mark.parametrize("steps, message", [(0, "1 to 1000 steps"), (-1, "1 to 1000 steps"), (1001, "1 to 1000 steps"),
                                            (2000, "1 to 1000 steps"), (1000, "use at most 999 steps")])
def test_ddim_step_counts_out_of_range_are_clear_errors(steps, message):
    schedule = NoiseSchedule.from_config(schedule_config("sd15"))  # leading, steps_offset 1
    with pytest.raises(ValueError, match=message):
        schedule.ddim_timesteps(steps)
    assert schedule.ddim_timesteps(999)[0] == 999


@pytest.mark.parametrize("key, value", [("rescale_betas_zero_snr", True), ("thresholding", True),
                                        ("timestep_spacing", "karras"), ("trained_betas", [0.1] * 1000)])
def test_unimplemented_scheduler_keys_are_clear_errors(key, value):
    with pytest.raises(ValueError, match=f"unsupported scheduler config: {key}="):
        NoiseSchedule.from_config(schedule_config("sd21", **{key: value}))


def test_v_prediction_roundtrip():
    a = torch.tensor(0.3)
    x0, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    assert torch.allclose(to_eps(v, x_t, a, "v_prediction"), eps, atol=1e-5)
    assert torch.allclose(to_x0(eps, x_t, a), x0, atol=1e-5)


def test_one_step_formula_and_guidance():
    z, c = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 5)
    expected = (z - (1 - A_T) ** 0.5 * toy_net(z, 999, c)) / A_T ** 0.5
    assert torch.allclose(one_step(toy_net, z, Text(c)), expected, atol=1e-4)
    c0 = torch.zeros_like(c)
    g = guided(toy_net, z, 10, Text(c), Text(c0), 1.5)
    manual = toy_net(z, 10, c0) + 1.5 * (toy_net(z, 10, c) - toy_net(z, 10, c0))
    assert torch.allclose(g, manual, atol=1e-6)


def test_unsupported_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="beta_schedule='squaredcos_cap_v2'"):
        NoiseSchedule.from_config(schedule_config(beta_schedule="squaredcos_cap_v2"))
