"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks"): PGD with momentum and a step size that halves
when progress stalls, under linf and l2 budgets.

One run of N steps, per sample:
- start at x + eps * t / ||t|| (linf: t uniform in [-1, 1]^D, so one coordinate sits on the
  cube's face; l2: t Gaussian, on the sphere), clamped to [0, 1];
- step size eta = 2 * eps; z = P(x_k + eta * d(g)) with d = sign (linf) or g / ||g||_2
  (l2); x_{k+1} = P(x_k + a (z - x_k) + (1 - a)(x_k - x_{k-1})) with a = 0.75 (a = 1 on
  the first step); P projects onto the ball and clamps to [0, 1];
- checkpoints w_j = ceil(p_j N) with p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1}
  - 0.03, 0.06) (`checkpoints`). At w_j the step halves, and the run restarts from the point
  of highest loss so far (with its gradient), when
  1. fewer than rho = 0.75 of the steps since w_{j-1} increased the loss, or
  2. the step did not halve at w_{j-1} and the best loss did not grow since w_{j-1}
     (never at the first checkpoint);
- the first iterate that the model misclassifies is kept (per-sample worst case, as `pgd`).

Where the paper and the official code (fra31/auto-attack, pyautoattack) differ, this
follows the paper: the checkpoints are ceil(p_j N) (the official code shortens its check
interval in integer steps of int(0.03 N): the same at multiples of 100 steps, not e.g. at
N = 20 or 50); condition 1 is a strict "<" and compares the first step's loss with the
start's (the official code compares it with 0); after a restart from the best point the
next step is compared with the best loss. tests/test_apgd.py checks the trajectory against
a plain reference of these rules and the robust accuracy against pyautoattack's APGDAttack.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from .pgd import LOSSES, WorstCase, check_seeds, draw_starts, logits_and_grad, project

APGD_NORMS = ("linf", "l2")
RHO = 0.75
MOMENTUM = 0.75


def checkpoints(steps: int) -> list[int]:
    """The iterations w_j = ceil(p_j * steps) at which APGD may halve its step (increasing, <= steps).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), kept while p_j <= 1;
    computed in hundredths so that no rounding moves a checkpoint (0.41 * 100 is 41.000000000000004
    in floating point). Checkpoints that round to the same iteration count once.
    """
    steps = checks.integer("steps", steps, 0)
    out = []
    prev, p = 0, 22
    while p <= 100:
        w = -(-p * steps // 100)
        if w > 0 and (not out or w > out[-1]):
            out.append(w)
        prev, p = p, p + max(p - prev - 3, 6)
    return out


def halve(increases: torch.Tensor, interval: int, halved_before: torch.Tensor, best: torch.Tensor,
          best_before: torch.Tensor, rho: float = RHO) -> torch.Tensor:
    """APGD's per-sample decision at a checkpoint: True where the step size halves.

    Args:
        increases: (B,) number of steps since the previous checkpoint that increased the loss.
        interval: steps since the previous checkpoint.
        halved_before: (B,) whether the step halved at the previous checkpoint (True at the first).
        best, best_before: (B,) best loss now and at the previous checkpoint.
        rho: condition 1's fraction of successful steps.

    Returns:
        (B,) bool.
    """
    return (increases < rho * interval) | (~halved_before & (best <= best_before))


def _unit_start(norm: str, eps: float):
    def draw(gen: torch.Generator, shape: torch.Size) -> torch.Tensor:
        if norm == "linf":
            t = torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1
            return t / t.abs().max().clamp_min(1e-12) * eps
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        return t / torch.linalg.vector_norm(t).clamp_min(1e-12) * eps
    return draw


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.sign(g)
    n = torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, *([1] * (g.ndim - 1)))
    return g / n.clamp_min(1e-12)


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    norm: str,
    eps: float,
    steps: int,
    loss: str = "ce",
    restarts: int = 1,
    seed: int | Sequence[int] = 0,
    eot: int = 1,
    return_history: bool = False,
):
    """Untargeted APGD (APGD-CE with loss "ce", APGD-DLR with loss "dlr"); per-sample worst case.

    Args:
        model: nn.Module from (B, C, H, W) images in [0, 1] to logits (B, classes), in eval mode.
        x: clean images (B, C, H, W) in [0, 1].
        y: integer labels (B,).
        norm: "linf" or "l2" (for l1 use `pgd` with norm "l1").
        eps: budget (radius of the norm ball), >= 0.
        steps: iterations per restart, >= 0.
        loss: "ce", "dlr" (>= 3 classes) or "cw"; see `pgd.attack_loss`.
        restarts: runs per sample, >= 1, each from its own random start; restart r > 0 attacks
            only the samples that no earlier iterate fooled.
        seed: seed of the random starts: an int (one start per restart, shared by the batch)
            or a list or tuple of B ints (one per sample); restart r draws from a local CPU
            generator seeded from (seed, r).
        eot: model calls averaged per iterate (EoT), >= 1: mean gradient, and the verdict on
            the iterate from the mean logits.
        return_history: also return the index of the first fooling iterate per sample.

    Returns:
        Adversarial images, detached, with x's shape, dtype and device: per sample the first
        iterate the model misclassified, else the iterate of highest loss. With
        return_history, (images, first_broken) with first_broken as in `pgd`: the int64 (B,)
        index r * (steps + 1) + s of the first fooling iterate (s steps into restart r,
        s = 0 the start point), -1 if none.

    Raises:
        ValueError: on a bad argument (named in the message).
    """
    checks.function("model", model)
    if norm == "l1":
        raise ValueError("norm must be 'linf' or 'l2' for apgd, got 'l1': use pgd with norm 'l1' (sparse l1 descent)")
    checks.choice("norm", norm, APGD_NORMS)
    eps = checks.real("eps", eps, 0.0)
    steps = checks.integer("steps", steps, 0)
    checks.choice("loss", loss, LOSSES)
    restarts = checks.integer("restarts", restarts, 1)
    eot = checks.integer("eot", eot, 1)
    return_history = checks.flag("return_history", return_history)
    checks.images("x", x, allow_empty=True)
    checks.labels("y", y, x.shape[0])
    seeds = check_seeds(seed, x.shape[0])

    # Autograd must work under a caller's torch.inference_mode(): copy out of it.
    with torch.inference_mode(False):
        x = x.detach().clone()
        y = y.detach().to(device=x.device, dtype=torch.int64).clone()
        worst = WorstCase(x)
        if eps == 0:
            if x.shape[0]:
                worst.update(worst.unbroken(), x, logits_and_grad(model, x, y, loss, eot, grad=False)[0], y, loss, 0)
        else:
            for r in range(restarts):
                idx = worst.unbroken()
                if idx.numel() == 0:
                    break
                _run(model, x, y, idx, norm, eps, steps, loss, eot, seeds, r, worst)
    return (worst.x, worst.first) if return_history else worst.x


def _run(model, x, y, idx, norm, eps, steps, loss, eot, seeds, r, worst: WorstCase) -> None:
    xs, ys = x[idx], y[idx]
    cur = project(xs, draw_starts(xs, seeds, idx, r, _unit_start(norm, eps)), norm, eps)
    z, g = logits_and_grad(model, cur, ys, loss, eot, grad=steps > 0)
    wrong, value = worst.update(idx, cur, z, ys, loss, r * (steps + 1))
    if steps == 0:
        return
    m = idx.numel()
    # Per-sample state, compacted together when samples break (they need no more steps).
    st = {"idx": idx, "xs": xs, "ys": ys, "cur": cur, "prev": cur, "g": g,
          "eta": torch.full((m,), 2 * eps, dtype=x.dtype, device=x.device),
          "best_x": cur, "best_g": g, "best": value, "last": value, "best_at_check": value,
          "increases": torch.zeros(m, dtype=torch.int64, device=x.device),
          "halved": torch.ones(m, dtype=torch.bool, device=x.device)}
    marks, last_mark = set(checkpoints(steps)), 0
    for k in range(1, steps + 1):
        if bool(wrong.any()):
            st = {key: v[~wrong] for key, v in st.items()}
            if st["idx"].numel() == 0:
                return
        xs, cur, eta = st["xs"], st["cur"], st["eta"].view(-1, *([1] * (x.ndim - 1)))
        z_k = project(xs, cur - xs + eta * _direction(st["g"], norm), norm, eps)
        a = 1.0 if k == 1 else MOMENTUM
        nxt = project(xs, cur - xs + a * (z_k - cur) + (1 - a) * (cur - st["prev"]), norm, eps)
        z, g = logits_and_grad(model, nxt, st["ys"], loss, eot, grad=k < steps)
        wrong, value = worst.update(st["idx"], nxt, z, st["ys"], loss, r * (steps + 1) + k)
        if k == steps:
            return
        st["prev"], st["cur"], st["g"] = cur, nxt, g
        st["increases"] += value > st["last"]
        st["last"] = value
        up = value > st["best"]
        st["best"] = torch.where(up, value, st["best"])
        st["best_x"] = torch.where(_b(up, x), nxt, st["best_x"])
        st["best_g"] = torch.where(_b(up, x), g, st["best_g"])
        if k in marks:
            h = halve(st["increases"], k - last_mark, st["halved"], st["best"], st["best_at_check"])
            st["eta"] = torch.where(h, st["eta"] / 2, st["eta"])
            st["cur"] = torch.where(_b(h, x), st["best_x"], st["cur"])
            st["g"] = torch.where(_b(h, x), st["best_g"], st["g"])
            st["last"] = torch.where(h, st["best"], st["last"])
            st["halved"], st["best_at_check"] = h, st["best"]
            st["increases"] = torch.zeros_like(st["increases"])
            last_mark = k


def _b(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (x.ndim - 1)))
