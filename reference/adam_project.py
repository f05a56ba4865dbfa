"""Adam step, projection and clamp, plainly: the semantics of
`pursamere_fast.kernels.adam_project`."""

import torch


def adam_project(x, x_adv, m, v, g, lr, bc1, bc2, *, beta1, beta2, adam_eps, rho, norm):
    """One Adam step followed by the projection onto the rho-ball around x_adv and [0, 1].

    Args:
        x, m, v: [B, D] iterate and Adam moments (not modified).
        x_adv: [B, D] centre of the ball.  g: [B, D] gradient.
        lr, bc1, bc2: floats or 0-dim tensors: lr_k, 1-beta1^(k+1), 1-beta2^(k+1).
        beta1, beta2, adam_eps, rho: floats.
        norm: "linf" or "l2".

    Returns:
        (x, m, v), new tensors. l2 leaves x as it is where ||x - x_adv||_2 <= rho (there the
        factor min(1, rho/||x - x_adv||) is 1) and scales x - x_adv down to rho elsewhere.
    """
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * (g * g)
    x = x - lr * (m / bc1) / (torch.sqrt(v / bc2) + adam_eps)
    if norm == "linf":
        x = torch.clamp(x, x_adv - rho, x_adv + rho)
    else:
        nrm = torch.linalg.vector_norm(x - x_adv, dim=1, keepdim=True)
        # A tensor numerator: `rho / tensor` would compute rho * (1 / tensor), rounding twice.
        factor = torch.full_like(nrm, rho) / nrm.clamp_min(1e-12)
        x = torch.where(nrm > rho, x_adv + (x - x_adv) * factor, x)
    return torch.clamp(x, 0.0, 1.0), m, v
