"""The PurSAMERE loop of SPEC section 2, written plainly. This is the oracle.

No fusion, no preallocation, no cleverness: build the perturbed batch, score it, reduce the
squared residual per image, differentiate with autograd. Works in float64.
"""

from __future__ import annotations

import torch


def ere(x, score, sigma, eps):
    """Expected reconstruction error per image.

    Args:
        x: (B, C, H, W) images.
        score: callable score(y, sigma) with y (M, C, H, W), sigma (M,).
        sigma: noise level (float).
        eps: (N, C, H, W) fixed noise samples.

    Returns:
        (B,) e_sigma(x) = (1/N) sum_n ||eps_n + sigma * s(x + sigma eps_n, sigma)||^2.
    """
    b, n = x.shape[0], eps.shape[0]
    y = (x[:, None] + sigma * eps[None]).reshape(b * n, *x.shape[1:])
    s = score(y, torch.full((b * n,), sigma, dtype=x.dtype, device=x.device))
    r = eps[None] + sigma * s.reshape(b, n, *x.shape[1:])
    return r.pow(2).flatten(2).sum(2).mean(1)


def ere_grad(x, score, sigma, eps):
    """(grad_x e_sigma(x), e_sigma(x)), each image's gradient of its own ERE."""
    x = x.detach().requires_grad_(True)
    e = ere(x, score, sigma, eps)
    (g,) = torch.autograd.grad(e.sum(), x)
    return g, e.detach()


def project(x, x_adv, rho, norm):
    """Project x onto the `norm` ball of radius rho around x_adv, per image."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x, x_adv - rho), x_adv + rho)
    delta = x - x_adv
    dist = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    factor = (rho / dist).clamp(max=1.0)
    return x_adv + delta * factor.view(-1, *[1] * (x.dim() - 1))


def sam_perturbation(g, radius, norm):
    """SAM ascent direction d with ||d|| = radius in `norm` (per image)."""
    if norm == "linf":
        return radius * torch.sign(g)
    gnorm = g.flatten(1).norm(dim=1).clamp_min(1e-12)
    return radius * g / gnorm.view(-1, *[1] * (g.dim() - 1))


def purify_reference(x_adv, score, config, noise):
    """Purify with the plain loop.

    Args:
        x_adv: (B, C, H, W) inputs in [0, 1].
        score: callable score(y, sigma).
        config: PurifyConfig.
        noise: (K, N, C, H, W) Monte Carlo noise, one slice per step.

    Returns:
        (x_pur, ere) with ere of shape (B, K): e_sigma_k at x before step k.
    """
    b1, b2 = config.betas
    x = x_adv.clone()
    m = torch.zeros_like(x)
    v = torch.zeros_like(x)
    trace = []
    for k, (sigma, lr) in enumerate(zip(config.step_sigmas(), config.step_lrs())):
        g, e = ere_grad(x, score, sigma, noise[k])
        trace.append(e)
        if config.sam_radius > 0:
            d = sam_perturbation(g, config.sam_radius, config.norm)
            g, _ = ere_grad(x + d, score, sigma, noise[k])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
        x = x - lr * (m / bc1) / ((v / bc2).sqrt() + config.adam_eps)
        x = project(x, x_adv, config.rho, config.norm).clamp(0.0, 1.0)
    return x, torch.stack(trace, dim=1)
