"""Monte-Carlo reduction and SAM batch, plainly: the semantics of
`pursamere_fast.kernels.mc_reduce_sam`."""

import torch


def mc_reduce_sam(gy, x, eps, sigma, radius, norm):
    """Sum dL/dy over the samples and build the perturbed batch at the SAM ascent point.

    Args:
        gy: [B, N, D] dL/dy per perturbed sample.
        x: [B, D] current iterate.
        eps: [N, D] this step's noise.
        sigma: noise level, a float or a 0-dim tensor.
        radius: SAM radius r >= 0.
        norm: "linf" or "l2".

    Returns:
        (g, y_sam): g [B, D] = sum over n of gy[:, n] in index order; y_sam [B, N, D] =
        x + d + sigma*eps[n] with d = r*sign(g) (linf) or r*g/max(||g_b||_2, 1e-12) (l2).
    """
    g = sum(gy[:, n] for n in range(gy.shape[1]))
    if norm == "linf":
        d = radius * torch.sign(g)
    else:
        d = radius * g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp_min(1e-12)
    y_sam = x[:, None] + d[:, None] + sigma * eps[None]
    return g, y_sam
