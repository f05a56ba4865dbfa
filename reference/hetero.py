"""The heterogeneous-noise sampler of SPEC section 8, written plainly. This is the oracle.

Every step as the paper states it, with the mask and all the noise passed in: forward
diffusion to t_l; per grid step the fresh copy of the input outside the mask and U single
forward steps (while the next grid time is >= t_s), then a DDIM step through x0_hat.
Timesteps are 1-based (t = 0 is the clean image). Works in float64.
"""

from __future__ import annotations

import torch


def hetero_reference(x, eps_model, mask, noise, *, t_l, t_s, stride, resample_steps, betas=None):
    """One heterogeneous-noise purification run.

    Args:
        x: (B, C, H, W) images in [0, 1].
        eps_model: callable eps_model(xb_t, t) -> eps_hat, t int64 (B,) in 1..T.
        mask: (B, 1, H, W), 1 (or True) where the strong noise stays.
        noise: (init, renoise, forward): the noise at t_l (C, H, W); per resampling step the
            noise of the fresh copy (n, C, H, W) and of the U forward steps (n, U, C, H, W).
        t_l, t_s: strong and weak noise levels, multiples of stride.
        stride: grid stride T / S.
        resample_steps: U.
        betas: (T,) float64, beta_1..beta_T; default linspace(1e-4, 0.02, 1000).

    Returns:
        (B, C, H, W) purified images in [0, 1].
    """
    if betas is None:
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas = 1 - betas
    alpha_bar = torch.cat([torch.ones(1, dtype=betas.dtype), torch.cumprod(alphas, 0)])  # alpha_bar[t]
    init, renoise, forward = noise
    m = mask.to(x.dtype)
    xb = 2 * x - 1
    x_t = alpha_bar[t_l].sqrt() * xb + (1 - alpha_bar[t_l]).sqrt() * init
    i = 0
    for t in range(t_l, 0, -stride):
        tau = t - stride
        if tau >= t_s:
            fresh = alpha_bar[t].sqrt() * xb + (1 - alpha_bar[t]).sqrt() * renoise[i]
            x_t = m * x_t + (1 - m) * fresh
            for j in range(resample_steps):
                t = t + 1
                x_t = alphas[t - 1].sqrt() * x_t + betas[t - 1].sqrt() * forward[i][j]
            i += 1
        eps = eps_model(x_t, torch.full((x.shape[0],), t, dtype=torch.int64, device=x.device))
        x0 = (x_t - (1 - alpha_bar[t]).sqrt() * eps) / alpha_bar[t].sqrt()
        x_t = alpha_bar[tau].sqrt() * x0 + (1 - alpha_bar[tau]).sqrt() * eps
    return ((x_t + 1) / 2).clamp(0, 1)
