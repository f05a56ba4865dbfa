"""ERE residual of one step, plainly: the semantics of `pursamere_fast.kernels.ere_residual`."""


def ere_residual(s, eps, sigma, n_samples):
    """Residual norms and gradient of the ERE w.r.t. the score.

    Args:
        s: [B*N, D] score at the perturbed batch, row b*N + n.
        eps: [N, D] this step's noise (the same for every image).
        sigma: noise level, a float or a 0-dim tensor.
        n_samples: N.

    Returns:
        (grad, sqnorm): grad [B*N, D] = 2*sigma*r/N and sqnorm [B*N] = sum over D of r^2,
        with r = eps[n] + sigma*s.
    """
    b = s.shape[0] // n_samples
    r = eps.repeat(b, 1) + sigma * s
    grad = 2 * sigma * r / n_samples
    sqnorm = (r * r).sum(dim=1)
    return grad, sqnorm
