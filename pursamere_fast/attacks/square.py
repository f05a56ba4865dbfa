"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): a score-based query
attack, the gradient-free check for gradient masking (SPEC section 7).

Runs pyautoattack's SquareAttack (one run; `pip install "pursamere_fast[autoattack]"`).
It draws all its randomness from the global CPU RNG; here that RNG is seeded inside
torch.random.fork_rng, so the result is deterministic given the seed and the caller's RNG
state is left as it was.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import checks

SQUARE_NORMS = {"linf": "Linf", "l2": "L2"}
# pyautoattack's names: "margin" is the logit margin z_y - max_{j != y} z_j it minimises.
SQUARE_LOSSES = {"cw": "margin", "ce": "ce"}


def square(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, norm: str, eps: float, queries: int,
           seed: int = 0, p_init: float = 0.8, loss: str = "cw") -> torch.Tensor:
    """Untargeted Square Attack; per sample the first point that fooled the model, else the best found.

    Args:
        model: nn.Module from (B, C, H, W) images in [0, 1] to logits, in eval mode. Only its
            outputs are used (no gradients).
        x: clean images (B, C, H, W) in [0, 1]; l2 needs H, W >= 5 (its initial tiling).
        y: integer labels (B,).
        norm: "linf" or "l2".
        eps: budget, >= 0.
        queries: iterations (one model query per unbroken sample each), >= 0; the random
            initial point costs one more.
        seed: seed of the attack's randomness.
        p_init: initial fraction of the image a square covers, in (0, 1]; the schedule
            shrinks it with the query count (rescaled to `queries`).
        loss: "cw" (the margin, the paper's choice) or "ce" (cross-entropy); every
            misclassified point is accepted whatever the loss.

    Returns:
        Adversarial images, detached, with x's shape, dtype and device: per sample the first
        misclassified point, else the one the loss rates worst for the model (highest cross-entropy,
        lowest margin).

    Raises:
        ValueError: on a bad argument (named in the message).
        ImportError: when pyautoattack is not installed.
    """
    checks.function("model", model)
    checks.choice("norm", norm, tuple(SQUARE_NORMS))
    eps = checks.real("eps", eps, 0.0)
    queries = checks.integer("queries", queries, 0)
    seed = checks.seed("seed", seed)
    p_init = checks.real("p_init", p_init, maximum=1.0, positive=True)
    checks.choice("loss", loss, tuple(SQUARE_LOSSES))
    checks.images("x", x, allow_empty=True)
    checks.labels("y", y, x.shape[0])
    if norm == "l2" and min(x.shape[2:]) < 5:
        raise ValueError(f"x must be at least 5x5 for norm 'l2' (Square tiles its start in 5x5 blocks), "
                         f"got shape {tuple(x.shape)}")
    try:
        from pyautoattack.square import SquareAttack
    except ImportError as e:
        raise ImportError('square needs pyautoattack: pip install "pursamere_fast[autoattack]"') from e

    with torch.inference_mode(False):
        x = x.detach().clone()
        y = y.detach().to(device=x.device, dtype=torch.int64).clone()
        if eps == 0 or x.shape[0] == 0:
            return x
        attack = SquareAttack(model, norm=SQUARE_NORMS[norm], n_queries=queries, eps=eps, p_init=p_init,
                              seed=seed, loss=SQUARE_LOSSES[loss], device=x.device)
        # attack_single_run rather than perturb: perturb also seeds the CUDA RNG (the attack
        # never uses it) and keeps the clean image of samples it did not break.
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.random.default_generator.manual_seed(seed)
            attack.init_hyperparam(x)
            _, x_adv = attack.attack_single_run(x, y)
    return x_adv.to(dtype=x.dtype)
