"""Input-gradient regularisers and adversarial examples for classifier training (SPEC 10).

Local flatness (Xu, Li, Jiang, Xia, ICIP 2020, "Adversarial Defense via Local Flatness
Regularization") of sample i is the largest l1 norm of the input gradient of its
cross-entropy over the linf ball of radius eps around it (l1 is the dual norm of linf, so
it bounds how fast the loss can rise inside the ball):

    LF_i = max_{||x' - x_i||_inf <= eps, x' in [0, 1]} ||grad_x' CE(f(x'), y_i)||_1

- `lfr_penalty`: the inner maximisation by signed-gradient ascent, and the penalty at its
  end point, differentiable w.r.t. the weights (double backprop).
- `gradient_penalty`: the same norm at the clean point (no inner max): the control that
  tells what the maximisation adds.
- `pgd_examples`: Madry et al.'s PGD examples for adversarial training, with the same
  (eps, alpha, steps) so that budgets compare.

Gradients come from the cross-entropy summed over the batch, so sample i's input gradient
is its own, independent of the batch size. The random starts are drawn on the CPU from the
generator given (then moved), so they are the same on every device. Every iterate is
projected onto the ball and [0, 1].

Cost in network passes over the batch (F forward, B backward): an inner step of
`lfr_penalty` is 1F, 1B with create_graph and a double backward (about 2B more); the final
penalty is 1F + 1B with create_graph, and the trainer's backward through it is a double
backward. A PGD step is 1F + 1B.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from pursamere_fast import checks

# The official code's random start, x + 0.001 * N(0, 1), inherited from TRADES (whose KL
# term has a zero gradient at x' = x); SPEC 10 keeps it.
START_SCALE = 1e-3


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    # Each module's own flag comes back, so a model with some submodules frozen in eval mode
    # is left as it was, also when the block raises.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    # Onto the linf ball around x, then onto [0, 1]; x is in [0, 1], so the clamp only
    # shrinks |x_adv - x| and the result lies in both sets.
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def _input_gradient_l1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) ||grad_x' sum_j CE(f(x')_j, y_j)||_1 per sample with its graph kept, and the leaf x'."""
    leaf = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(leaf), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, leaf, create_graph=True)
    return grad.abs().flatten(1).sum(1), leaf


def _batch(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = checks.images("x", x).detach()
    y = checks.labels("y", y, x.shape[0]).long()
    return x, y


def _budget(eps, alpha, steps) -> tuple[float, float, int]:
    return checks.real("eps", eps, 0), checks.real("alpha", alpha, 0), checks.integer("steps", steps, 0)


def _cpu_generator(generator) -> torch.Generator | None:
    if generator is not None and not (isinstance(generator, torch.Generator) and generator.device.type == "cpu"):
        raise ValueError(f"generator must be a CPU torch.Generator or None, got {generator!r}")
    return generator


def lfr_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                start: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The local-flatness penalty of each sample (SPEC 10).

    x' starts at clip(x + 0.001 * N(0, 1)) (or at `start`), projected onto the ball and
    [0, 1] (a no-op unless eps is below the noise, ~0.004); then `steps` times
    x' <- proj(x' + alpha * sign(grad_x' sum_i ||grad_x' CE(f(x'_i), y_i)||_1)) with the
    model in eval mode. The penalty is the norm at the final x', computed in the model's own
    mode (restored by then) with create_graph, so that backward reaches the weights.

    Args:
        model: classifier from [0, 1] images to logits.
        x: float (B, C, H, W) images in [0, 1]; y: integer labels (B,).
        eps: linf radius, >= 0 (0: the penalty at x, as `gradient_penalty`).
        alpha: ascent step size, >= 0.
        steps: ascent steps, >= 0 (0: the penalty at the start).
        start: the start of x' (shape of x) instead of the random one.
        generator: CPU generator of the random start (None: torch's global one).

    Returns:
        (penalty, x'): the (B,) penalty, differentiable w.r.t. the model's parameters, and
        the final x', detached.

    Raises:
        ValueError: a bad argument, naming it.
    """
    x, y = _batch(x, y)
    eps, alpha, steps = _budget(eps, alpha, steps)
    generator = _cpu_generator(generator)
    if start is None:
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        start = x + START_SCALE * noise
    else:
        start = checks.tensor("start", start, tuple(x.shape)).detach().to(x)
    x_adv = _project(start, x, eps)
    with torch.enable_grad():
        with _eval_mode(model):
            for _ in range(steps):
                norm, leaf = _input_gradient_l1(model, x_adv, y)
                # Per-sample norms are independent (eval mode), so the gradient of their sum
                # is each sample's own ascent direction.
                (ascent,) = torch.autograd.grad(norm.sum(), leaf)
                x_adv = _project(x_adv + alpha * ascent.sign(), x, eps)
        penalty, _ = _input_gradient_l1(model, x_adv, y)
    return penalty, x_adv


def gradient_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The l1 input-gradient norm of each sample at the clean point (no inner maximisation).

    Args:
        model: classifier from [0, 1] images to logits (used in its own mode).
        x: float (B, C, H, W) images in [0, 1]; y: integer labels (B,).

    Returns:
        (B,) ||grad_x CE(f(x), y)||_1 per sample (gradient of the summed CE), differentiable
        w.r.t. the model's parameters.

    Raises:
        ValueError: bad x or y.
    """
    x, y = _batch(x, y)
    with torch.enable_grad():
        return _input_gradient_l1(model, x, y)[0]


def pgd_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Linf PGD examples for adversarial training (Madry et al. 2018).

    A uniform random start in the ball, then `steps` times x' <- proj(x' + alpha *
    sign(grad_x' CE(f(x'), y))), with the model in eval mode (its modes restored after). The
    last iterate is returned: training wants the ball's high-loss points, not the first one
    that fools the model, as an evaluation attack (`pursamere_fast.attacks.pgd`) does.

    Args:
        model: classifier from [0, 1] images to logits.
        x: float (B, C, H, W) images in [0, 1]; y: integer labels (B,).
        eps: linf radius, >= 0; alpha: step size, >= 0; steps: ascent steps, >= 0.
        generator: CPU generator of the random start (None: torch's global one).

    Returns:
        The adversarial images, detached, within eps of x and in [0, 1].

    Raises:
        ValueError: a bad argument, naming it.
    """
    x, y = _batch(x, y)
    eps, alpha, steps = _budget(eps, alpha, steps)
    generator = _cpu_generator(generator)
    delta = (2 * torch.rand(x.shape, generator=generator, dtype=x.dtype) - 1) * eps
    x_adv = _project(x + delta.to(x.device), x, eps)
    with torch.enable_grad(), _eval_mode(model):
        for _ in range(steps):
            leaf = x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(leaf), y, reduction="sum"), leaf)
            x_adv = _project(leaf.detach() + alpha * grad.sign(), x, eps)
    return x_adv.detach()
