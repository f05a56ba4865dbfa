"""DiffPure of SPEC section 12, written plainly. This is the oracle.

Diffuse to t* with the VP SDE, then S Euler-Maruyama steps of the reverse SDE (or Euler steps
of the probability-flow ODE) back to t = 0, with the VP score in [-1, 1]-space converted from
a VE score in [0, 1]-space at every step. All the noise is passed in. Works in float64.
"""

from __future__ import annotations

import math

import torch


def diffpure_reference(x, score, noise, *, t_star=0.1, steps=100, method="sde", beta_min=0.1, beta_max=20.0,
                       clamp=True, vp_score=None):
    """One DiffPure purification.

    Args:
        x: (B, C, H, W) images in [0, 1].
        score: VE score score(y, sigma), y (B, C, H, W) in [0, 1]-space, sigma (B,).
        noise: (S + 1, C, H, W): z_0 for the diffusion, z_(i+1) for reverse step i (the ODE
            uses z_0 only); the same for every image of the batch.
        t_star: diffusion time t* in (0, 1].
        steps: S, the number of reverse steps.
        method: "sde" or "ode".
        beta_min, beta_max: beta(t) = beta_min + t (beta_max - beta_min).
        clamp: clamp the output to [0, 1] (False returns (x + 1) / 2 unclamped, for tests of
            the sampler's distribution).
        vp_score: if given, s_b(x, t) itself (x in [-1, 1]-space, t a float) replaces the
            conversion of `score` (e.g. score_sde's -f(x, 999 t) / sqrt(1 - ab(t))).

    Returns:
        (B, C, H, W) purified images.
    """
    def alpha_bar(t):
        return math.exp(-t * t * (beta_max - beta_min) / 2 - t * beta_min)

    def beta(t):
        return beta_min + t * (beta_max - beta_min)

    def converted(xt, t):
        ab = alpha_bar(t)
        y = (xt / math.sqrt(ab) + 1) / 2
        sigma = torch.full((xt.shape[0],), math.sqrt((1 - ab) / ab) / 2, dtype=xt.dtype, device=xt.device)
        return score(y, sigma) / (2 * math.sqrt(ab))

    vp_score = vp_score or converted
    xb = 2 * x - 1
    ab_star = alpha_bar(t_star)
    xt = math.sqrt(ab_star) * xb + math.sqrt(1 - ab_star) * noise[0]
    h = t_star / steps
    for i in range(steps):
        t = t_star - i * h
        b = beta(t)
        if method == "sde":
            xt = xt + h * (b / 2 * xt + b * vp_score(xt, t)) + math.sqrt(b * h) * noise[i + 1]
        else:
            xt = xt + h * (b / 2 * xt + b / 2 * vp_score(xt, t))
    out = (xt + 1) / 2
    return out.clamp(0, 1) if clamp else out
