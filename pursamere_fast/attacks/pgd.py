"""Projected gradient descent (Madry et al. 2018) under linf, l2 and l1 budgets.

Step rules (stated with every result, see docs/evaluation.md):
- linf: delta <- clip_eps(delta + alpha * sign(g))
- l2:   delta <- proj_l2(delta + alpha * g / ||g||_2)
- l1:   sparse l1 descent (Tramer & Boneh 2019, SLIDE): step alpha * sign(g) / k on the k
        coordinates of largest |g| (k = ceil(l1_sparsity * D)), coordinates whose step would
        leave [0, 1] excluded (Croce & Hein 2021), then the sort-based l1-ball projection of
        Duchi et al. (2008).
Every iterate is clamped to [0, 1]; clamping only shrinks |delta| coordinate-wise, so it
keeps the iterate inside the ball.

The loss is the summed cross-entropy, so a sample's gradient does not depend on the batch.
All randomness (random start) comes from a local CPU torch.Generator seeded with `seed`:
the global RNG is never touched and the result is identical on every device.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks

NORMS = ("linf", "l2", "l1")


def project_l1(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Euclidean projection of each row of `delta` onto the l1 ball of radius eps.

    Sort-based algorithm of Duchi, Shalev-Shwartz, Singer, Chandra (ICML 2008), O(D log D).

    Args:
        delta: (B, ...) perturbations.
        eps: l1 radius, >= 0.

    Returns:
        Tensor of delta's shape; rows already inside the ball are returned unchanged.
    """
    eps = checks.real("eps", eps, 0.0)
    flat = delta.flatten(1)
    a = flat.abs()
    inside = a.sum(dim=1) <= eps
    u, _ = torch.sort(a, dim=1, descending=True)
    css = u.cumsum(dim=1)
    j = torch.arange(1, flat.shape[1] + 1, device=flat.device, dtype=flat.dtype)
    # rho = the last j with u_j > (css_j - eps) / j; the condition holds on a prefix of j.
    cond = u * j > css - eps
    rho = cond.to(torch.int64).sum(dim=1).clamp_min(1)
    theta = (css.gather(1, (rho - 1).unsqueeze(1)) - eps) / rho.unsqueeze(1).to(flat.dtype)
    proj = torch.sign(flat) * (a - theta).clamp_min(0)
    out = torch.where(inside.unsqueeze(1), flat, proj)
    return out.view_as(delta)


def _norm_per_sample(t: torch.Tensor, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), ord=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def _project(delta: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = _norm_per_sample(delta, 2)
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    else:
        delta = project_l1(delta, eps)
    return (x + delta).clamp(0, 1) - x


def _random_start(x: torch.Tensor, norm: str, eps: float, gen: torch.Generator) -> torch.Tensor:
    shape, b = x.shape, x.shape[0]
    if norm == "linf":
        delta = (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
    else:
        # Direction uniform on the sphere (l2) / l1-sphere (Laplace), radius uniform in [0, eps].
        if norm == "l2":
            d = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            d = -torch.log(torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300))
            d = d * (torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1)
        r = torch.rand((b,), generator=gen, dtype=torch.float64).view(-1, 1, 1, 1)
        n = _norm_per_sample(d, 2 if norm == "l2" else 1).clamp_min(1e-12)
        delta = d / n * r * eps
    delta = delta.to(device=x.device, dtype=x.dtype)
    return _project(delta, x, norm, eps)


def _loss_grad(model: nn.Module, x: torch.Tensor, delta: torch.Tensor, y: torch.Tensor, eot: int) -> torch.Tensor:
    grad = torch.zeros_like(delta)
    for _ in range(eot):
        d = delta.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x + d), y, reduction="sum")
            (g,) = torch.autograd.grad(loss, d)
        grad = grad + g
    return grad / eot


def _step(delta: torch.Tensor, g: torch.Tensor, x: torch.Tensor, norm: str, alpha: float, l1_sparsity: float):
    if norm == "linf":
        return delta + alpha * torch.sign(g)
    if norm == "l2":
        return delta + alpha * g / _norm_per_sample(g, 2).clamp_min(1e-12)
    xa = x + delta
    # Coordinates at the box boundary whose step points outward cannot move: give them to others.
    blocked = ((xa <= 0) & (g < 0)) | ((xa >= 1) & (g > 0))
    score = torch.where(blocked, torch.zeros_like(g), g.abs()).flatten(1)
    k = max(1, math.ceil(l1_sparsity * score.shape[1]))
    idx = torch.topk(score, k, dim=1, sorted=False).indices
    mask = torch.zeros_like(score).scatter_(1, idx, 1.0).view_as(g)
    return delta + alpha * torch.sign(g) * mask / k


def _final_loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor):
    with torch.no_grad():
        logits = model(x_adv)
    loss = F.cross_entropy(logits.float(), y, reduction="none")
    return loss, logits.argmax(dim=1) != y


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    seed: int = 0,
    restarts: int = 1,
    eot: int = 1,
    l1_sparsity: float = 0.05,
) -> torch.Tensor:
    """Untargeted PGD on the summed cross-entropy; returns the per-sample worst case over restarts.

    Args:
        model: nn.Module from (B, C, H, W) images in [0, 1] to logits (B, classes). Its
            train/eval mode is left as it is: put it in eval mode first.
        x: clean images (B, C, H, W) in [0, 1].
        y: integer labels (B,).
        norm: "linf", "l2" or "l1".
        eps: budget (radius of the norm ball), >= 0.
        alpha: step size, > 0 (for l1 the l1 length of one step).
        steps: iterations, >= 0.
        random_start: start each restart at a random point of the ball.
        seed: seed of the local CPU generator of the random starts.
        restarts: runs per sample, >= 1. Restart r > 0 attacks only samples that are still
            classified correctly; per sample the result is the first misclassified
            adversarial, else the one with the highest loss.
        eot: model calls averaged per gradient (Expectation over Transformation, for
            stochastic models), >= 1.
        l1_sparsity: fraction of coordinates the l1 step moves, in (0, 1].

    Returns:
        Adversarial images, detached, with x's shape, dtype and device.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    checks.function("model", model)
    checks.choice("norm", norm, NORMS)
    eps = checks.real("eps", eps, 0.0)
    alpha = checks.real("alpha", alpha, positive=True)
    steps = checks.integer("steps", steps, 0)
    restarts = checks.integer("restarts", restarts, 1)
    eot = checks.integer("eot", eot, 1)
    seed = checks.seed("seed", seed)
    l1_sparsity = checks.real("l1_sparsity", l1_sparsity, maximum=1.0, positive=True)
    checks.images("x", x, allow_empty=True)
    checks.labels("y", y, x.shape[0])

    # Autograd must work even when the caller runs under torch.inference_mode(); an
    # inference tensor cannot enter the graph, hence the copies.
    with torch.inference_mode(False):
        x = x.detach().clone()
        y = y.detach().to(device=x.device, dtype=torch.int64).clone()
        return _pgd(model, x, y, norm, eps, alpha, steps, random_start, seed, restarts, eot, l1_sparsity)


def _pgd(model, x, y, norm, eps, alpha, steps, random_start, seed, restarts, eot, l1_sparsity):
    gen = torch.Generator("cpu").manual_seed(seed)
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, device=x.device)
    best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in range(restarts):
        # Drawn for the full batch so a sample's start does not depend on who is still active.
        delta_all = _random_start(x, norm, eps, gen) if random_start and eps > 0 else torch.zeros_like(x)
        active = torch.arange(x.shape[0], device=x.device) if r == 0 else (~best_wrong).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        xs, ys, delta = x[active], y[active], delta_all[active]
        if eps > 0:
            for _ in range(steps):
                g = _loss_grad(model, xs, delta, ys, eot)
                delta = _project(_step(delta, g, xs, norm, alpha, l1_sparsity), xs, norm, eps).detach()
        x_adv = (xs + delta).clamp(0, 1)
        if restarts == 1:  # nothing to compare: skip a model call (a purification under attack)
            return x_adv
        loss, wrong = _final_loss(model, x_adv, ys)
        better = wrong | (loss > best_loss[active])
        sel = active[better]
        best[sel] = x_adv[better]
        best_loss[sel] = loss[better]
        best_wrong[sel] = wrong[better]
    return best
