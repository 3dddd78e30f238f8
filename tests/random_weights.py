"""Reference networks with every parameter random, so that no weight sits at its (often zero) initialisation
and a parity test exercises all of them. Shared by the U-Net, ControlNet and PixArt parity tests."""
import torch


def randomize(model, weight_std, vector_std=0.5):
    """Overwrite `model`'s parameters in place with N(0, weight_std^2) for matrices and kernels and
    N(0, vector_std^2) for biases and norm scales (from the global RNG, in parameter order); returns it."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (weight_std if p.dim() > 1 else vector_std))
    return model
