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

Per-sample worst case: a sample is broken as soon as any iterate (a random start, any step
of any restart) fools the model, and the attack returns that first fooling iterate; otherwise
the iterate of highest loss. The verdict on an iterate comes from the forward that computes
its gradient, so only the last iterate of a restart costs an extra (no-grad) forward.
Broken samples leave the batch, so later steps and restarts attack only the others.

The losses are summed over the batch, so a sample's gradient does not depend on the batch.
All randomness (random starts) comes from local CPU torch.Generators seeded from (seed,
restart): the global RNG is never touched, the result is identical on every device, and a
sample's start does not depend on the other samples of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks

NORMS = ("linf", "l2", "l1")
LOSSES = ("ce", "cw", "dlr")
# Restart r of seed s draws from seed (s + r * GOLDEN) mod 2**64: restart 0 keeps the seed
# itself, and the odd multiplier (2**64 / golden ratio) keeps restarts of nearby seeds (the
# runner seeds consecutive batches seed * 1_000_003 + first index) from colliding.
GOLDEN = 0x9E3779B97F4A7C15


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


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss an untargeted attack maximises (computed in at least float32).

    - "ce":  cross-entropy.
    - "cw":  logit margin max_{j != y} z_j - z_y (Carlini & Wagner 2017); > 0 iff misclassified.
    - "dlr": Difference of Logits Ratio (Croce & Hein 2020),
             -(z_y - max_{j != y} z_j) / (z_(1) - z_(3) + 1e-12) with z_(k) the k-th largest
             logit: the margin made invariant to shifting and scaling the logits.

    Args:
        logits: (B, K) logits.
        y: (B,) labels.
        loss: "ce", "cw" or "dlr".

    Returns:
        (B,) losses.

    Raises:
        ValueError: on an unknown loss, or fewer classes than it needs (cw: 2, dlr: 3).
    """
    checks.choice("loss", loss, LOSSES)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if loss == "ce":
        return F.cross_entropy(z, y, reduction="none")
    need = 3 if loss == "dlr" else 2
    if z.shape[1] < need:
        raise ValueError(f"loss {loss!r} needs logits of >= {need} classes, got {z.shape[1]}")
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    other = z.scatter(1, y.unsqueeze(1), -math.inf).amax(dim=1)
    if loss == "cw":
        return other - z_y
    top = z.topk(3, dim=1).values
    return (other - z_y) / (top[:, 0] - top[:, 2] + 1e-12)


def check_seeds(seed, batch: int) -> int | tuple[int, ...]:
    """A seed for the whole batch (int) or one per sample (a list or tuple of `batch` ints)."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed must be an integer or a sequence of {batch} integers (one per sample), "
                             f"got {len(seed)} values")
        return tuple(checks.seed(f"seed[{i}]", s) for i, s in enumerate(seed))
    return checks.seed("seed", seed)


def restart_generator(seed: int, restart: int) -> torch.Generator:
    """The local CPU generator of `restart` under `seed` (restart 0 is seeded with seed itself)."""
    return torch.Generator("cpu").manual_seed((seed + restart * GOLDEN) % 2**64)


def draw_starts(x: torch.Tensor, seeds, idx: torch.Tensor, restart: int,
                draw: Callable[[torch.Generator, torch.Size], torch.Tensor]) -> torch.Tensor:
    """Random-start perturbations of the samples `idx` of the batch, on x's device and dtype.

    `draw(gen, shape)` returns one float64 perturbation of the given (C, H, W) shape. A single
    seed draws one perturbation shared by the whole batch (as the purifiers share their
    noise); per-sample seeds draw one each. Either way a sample's start depends only on its
    seed and the restart, never on the other samples.
    """
    shape = x.shape[1:]
    if isinstance(seeds, tuple):
        d = torch.stack([draw(restart_generator(seeds[i], restart), shape) for i in idx.tolist()])
    else:
        d = draw(restart_generator(seeds, restart), shape).expand(idx.numel(), *shape)
    return d.to(device=x.device, dtype=x.dtype)


def logits_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str, eot: int, grad: bool):
    """Mean logits over `eot` calls and, if `grad`, the mean gradient of the summed loss w.r.t. x."""
    z_sum = g_sum = None
    for _ in range(eot):
        if grad:
            leaf = x.detach().requires_grad_(True)
            with torch.enable_grad():
                z = model(leaf)
                (g,) = torch.autograd.grad(attack_loss(z, y, loss).sum(), leaf)
            z = z.detach()
            g_sum = g if g_sum is None else g_sum + g
        else:
            with torch.no_grad():
                z = model(x)
        z_sum = z if z_sum is None else z_sum + z
    return z_sum / eot, (g_sum / eot if grad else None)


class WorstCase:
    """Per-sample record of an attack: the first iterate that fooled the model, else the one
    of highest loss, and the index of that first fooling iterate (-1: none).

    Args:
        x: clean images (B, C, H, W); the record starts from them with loss -inf.
    """

    def __init__(self, x: torch.Tensor):
        n = x.shape[0]
        self.x = x.clone()
        self.loss = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
        self.first = torch.full((n,), -1, dtype=torch.int64, device=x.device)

    def unbroken(self) -> torch.Tensor:
        """Indices of the samples no iterate has fooled yet."""
        return (self.first < 0).nonzero().squeeze(1)

    def update(self, idx: torch.Tensor, x_it: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
               loss: str, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Record iterate `index` of the unbroken samples `idx`.

        Returns:
            (wrong, value): which of them the iterate fooled, and its float64 loss.
        """
        wrong = logits.argmax(dim=1) != y
        value = attack_loss(logits, y, loss).double()
        better = wrong | (value > self.loss[idx])
        sel = idx[better]
        self.x[sel] = x_it[better]
        self.loss[sel] = value[better]
        self.first[idx[wrong]] = index
        return wrong, value


def _norm_per_sample(t: torch.Tensor, p: float) -> torch.Tensor:
    return torch.linalg.vector_norm(t.flatten(1), ord=p, dim=1).view(-1, *([1] * (t.ndim - 1)))


def project(x: torch.Tensor, delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """The image x + delta with delta projected onto the eps-ball of `norm`, clamped to [0, 1]."""
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        n = _norm_per_sample(delta, 2)
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-12), torch.ones_like(n))
    else:
        delta = project_l1(delta, eps)
    return (x + delta).clamp(0, 1)


def _uniform_in_ball(norm: str, eps: float):
    def draw(gen: torch.Generator, shape: torch.Size) -> torch.Tensor:
        if norm == "linf":
            return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * eps
        # Direction uniform on the sphere (l2) / l1-sphere (Laplace), radius uniform in [0, eps].
        if norm == "l2":
            d = torch.randn(shape, generator=gen, dtype=torch.float64)
        else:
            d = -torch.log(torch.rand(shape, generator=gen, dtype=torch.float64).clamp_min(1e-300))
            d = d * (torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) * 2 - 1)
        r = torch.rand((), generator=gen, dtype=torch.float64)
        return d / torch.linalg.vector_norm(d, ord=2 if norm == "l2" else 1).clamp_min(1e-12) * r * eps
    return draw


def _step(x_it: torch.Tensor, x: torch.Tensor, g: torch.Tensor, norm: str, alpha: float,
          l1_sparsity: float) -> torch.Tensor:
    delta = x_it - x
    if norm == "linf":
        return delta + alpha * torch.sign(g)
    if norm == "l2":
        return delta + alpha * g / _norm_per_sample(g, 2).clamp_min(1e-12)
    # Coordinates at the box boundary whose step points outward cannot move: give them to others.
    blocked = ((x_it <= 0) & (g < 0)) | ((x_it >= 1) & (g > 0))
    score = torch.where(blocked, torch.zeros_like(g), g.abs()).flatten(1)
    k = max(1, math.ceil(l1_sparsity * score.shape[1]))
    idx = torch.topk(score, k, dim=1, sorted=False).indices
    mask = torch.zeros_like(score).scatter_(1, idx, 1.0).view_as(g)
    return delta + alpha * torch.sign(g) * mask / k


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
    seed: int | Sequence[int] = 0,
    restarts: int = 1,
    eot: int = 1,
    l1_sparsity: float = 0.05,
    loss: str = "ce",
    return_history: bool = False,
):
    """Untargeted PGD; returns the per-sample worst iterate over all steps and restarts.

    Args:
        model: nn.Module from (B, C, H, W) images in [0, 1] to logits (B, classes). Its
            train/eval mode is left as it is: put it in eval mode first.
        x: clean images (B, C, H, W) in [0, 1].
        y: integer labels (B,).
        norm: "linf", "l2" or "l1".
        eps: budget (radius of the norm ball), >= 0.
        alpha: step size, > 0 (for l1 the l1 length of one step).
        steps: iterations per restart, >= 0.
        random_start: start each restart at a point drawn uniformly from the ball (linf: the
            cube; l2, l1: uniform direction, radius uniform in [0, eps]); else at x.
        seed: seed of the random starts: an int (one start per restart, shared by the batch)
            or a list or tuple of B ints (one per sample). Restart r draws from a local CPU
            generator seeded from (seed, r), so restarts start independently.
        restarts: runs per sample, >= 1; more than one needs random_start. Restart r > 0
            attacks only the samples that no earlier iterate fooled.
        eot: model calls averaged per iterate (Expectation over Transformation, for
            stochastic models), >= 1: the gradient is the mean of the calls' gradients and
            the verdict on the iterate uses the mean of their logits.
        l1_sparsity: fraction of coordinates the l1 step moves, in (0, 1].
        loss: "ce" (cross-entropy), "cw" (logit margin) or "dlr" (Croce & Hein's Difference
            of Logits Ratio, >= 3 classes); see `attack_loss`. Summed over the batch for the
            gradient; it also ranks the iterates of a sample no iterate fooled.
        return_history: also return, per sample, the index of the first iterate that fooled
            the model.

    Returns:
        Adversarial images, detached, with x's shape, dtype and device: per sample the first
        iterate that the model misclassified (argmax of the logits != y), else the iterate of
        highest loss. With return_history, the pair (images, first_broken): first_broken is
        an int64 (B,) tensor on x's device holding r * (steps + 1) + s for the first fooling
        iterate, found after s steps of restart r (s = 0: the restart's start point), or -1
        if no iterate fooled the model. So restart 0 of a run of `steps` contains every
        shorter run at the same alpha and seed: a sample is broken by its first k steps iff
        0 <= first_broken <= k.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    checks.function("model", model)
    checks.choice("norm", norm, NORMS)
    eps = checks.real("eps", eps, 0.0)
    alpha = checks.real("alpha", alpha, positive=True)
    steps = checks.integer("steps", steps, 0)
    random_start = checks.flag("random_start", random_start)
    restarts = checks.integer("restarts", restarts, 1)
    if restarts > 1 and not random_start:
        raise ValueError(f"restarts > 1 needs random_start=True (each restart would repeat the same path), "
                         f"got restarts={restarts}, random_start=False")
    eot = checks.integer("eot", eot, 1)
    l1_sparsity = checks.real("l1_sparsity", l1_sparsity, maximum=1.0, positive=True)
    checks.choice("loss", loss, LOSSES)
    return_history = checks.flag("return_history", return_history)
    checks.images("x", x, allow_empty=True)
    checks.labels("y", y, x.shape[0])
    seeds = check_seeds(seed, x.shape[0])

    # Autograd must work even when the caller runs under torch.inference_mode(); an
    # inference tensor cannot enter the graph, hence the copies.
    with torch.inference_mode(False):
        x = x.detach().clone()
        y = y.detach().to(device=x.device, dtype=torch.int64).clone()
        worst = _pgd(model, x, y, norm, eps, alpha, steps, random_start, seeds, restarts, eot, l1_sparsity, loss)
    return (worst.x, worst.first) if return_history else worst.x


def _pgd(model, x, y, norm, eps, alpha, steps, random_start, seeds, restarts, eot, l1_sparsity, loss) -> WorstCase:
    worst = WorstCase(x)
    if eps == 0:
        # Every iterate is x itself: one verdict, no gradients.
        if x.shape[0]:
            idx = worst.unbroken()
            worst.update(idx, x, logits_and_grad(model, x, y, loss, eot, grad=False)[0], y, loss, 0)
        return worst
    for r in range(restarts):
        idx = worst.unbroken()
        if idx.numel() == 0:
            break
        xs, ys = x[idx], y[idx]
        x_it = project(xs, draw_starts(xs, seeds, idx, r, _uniform_in_ball(norm, eps)), norm, eps) \
            if random_start else xs
        for s in range(steps + 1):
            z, g = logits_and_grad(model, x_it, ys, loss, eot, grad=s < steps)
            keep = ~worst.update(idx, x_it, z, ys, loss, r * (steps + 1) + s)[0]
            if s == steps:
                break
            if not bool(keep.all()):
                idx, xs, ys, x_it, g = idx[keep], xs[keep], ys[keep], x_it[keep], g[keep]
                if idx.numel() == 0:
                    break
            x_it = project(xs, _step(x_it, xs, g, norm, alpha, l1_sparsity), norm, eps)
    return worst
