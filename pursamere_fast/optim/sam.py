"""SAM, ImbSAM and SSE-SAM: sharpness-aware wrappers around a constructed base optimiser.

- SAM (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently
  Improving Generalization", ICLR 2021): the base steps with grad L(w + e),
  e = rho * g / ||g||_2, g = grad L(w), one L2 norm over all parameters.
- ImbSAM (Zhou, Qu, Xu, Li, "ImbSAM: A Closer Look at Sharpness-Aware Minimization in
  Class-Imbalanced Recognition", ICCV 2023): only the tail-class loss is perturbed,
  G = grad L_H(w) + grad L_T(w + rho u_T). The official code doubles L_T; SPEC 9 does not.
- SSE-SAM (Lyu et al., "Balancing Head and Tail Classes Gradually through Stage-Wise SAM",
  AAAI 2025): each group is perturbed along its own unit gradient,
  G = grad L_H(w + rho_H u_H) + grad L_T(w + rho_T u_T); from epoch gamma * T on rho_H = 0,
  which is ImbSAM (`stage_rho_head`).

The wrappers follow torch.optim (they are `Optimizer`s, so LR schedulers accept them) and the
split of the widely used SAM wrapper into "perturb" and "restore + base step": the base keeps
its own state (SGD momentum, Adam moments), and `param_groups`/`state` are the base's.

    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = SSESAM(base, rho_head=0.05, rho_tail=0.10)

    def closure():                      # forward only: step() does every backward
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        return per_sample[is_head].sum() / len(y), per_sample[~is_head].sum() / len(y)

    for epoch in range(epochs):
        opt.rho_head = stage_rho_head(epoch, epochs, 0.05, gamma=0.7)
        ...
        loss_head, loss_tail = opt.step(closure)

All parameters are assumed to live on one device (one norm, one scale tensor).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import checks

__all__ = ["SAM", "ImbSAM", "SSESAM", "stage_rho_head"]


def stage_rho_head(epoch: int, epochs: int, rho_head: float = 0.05, gamma: float = 0.7) -> float:
    """SSE-SAM's head radius for one epoch: `rho_head` before epoch gamma * epochs, 0 from then on.

    As in the official code (the switch happens once epoch >= gamma * epochs, with `epoch`
    counted from 0). Set it at the start of each epoch: `opt.rho_head = stage_rho_head(...)`.

    Args:
        epoch: the epoch about to run, 0-based.
        epochs: the total number of epochs T.
        rho_head: the phase-1 head radius.
        gamma: the fraction of training spent in phase 1, in [0, 1].

    Returns:
        The head radius to use for this epoch.

    Raises:
        ValueError: if an argument is out of range.
    """
    epochs = checks.integer("epochs", epochs, 1)
    epoch = checks.integer("epoch", epoch, 0)
    rho_head = checks.real("rho_head", rho_head, 0)
    gamma = checks.real("gamma", gamma, 0, 1)
    return 0.0 if epoch >= gamma * epochs else rho_head


class _Radius:
    """A radius attribute, checked when it is set so that a bad value fails where it is made."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, objtype=None):
        return self if obj is None else obj.__dict__["_" + self.name]

    def __set__(self, obj, value):
        obj.__dict__["_" + self.name] = checks.real(self.name, value, 0)


def _needs_grad(loss) -> bool:
    # A group with no samples comes back as a constant (or a Python 0): it has no gradient.
    return isinstance(loss, Tensor) and loss.requires_grad


def _backward(loss, params: list[Tensor], retain_graph: bool = False) -> list[Tensor | None]:
    """grad loss for each parameter (None where it has none), taken off the parameters so
    that the next backward starts from nothing."""
    if not _needs_grad(loss):
        return [None] * len(params)
    loss.backward(retain_graph=retain_graph)
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def _set_grads(params: list[Tensor], *grad_lists: list[Tensor | None]) -> None:
    """p.grad = the sum of the given gradients (None ignored; None if all are)."""
    total = list(grad_lists[0])
    for grads in grad_lists[1:]:
        both = [i for i, (a, b) in enumerate(zip(total, grads)) if a is not None and b is not None]
        if both:
            torch._foreach_add_([total[i] for i in both], [grads[i] for i in both])
        total = [b if a is None else a for a, b in zip(total, grads)]
    for p, g in zip(params, total):
        p.grad = g


class _SharpnessAware(torch.optim.Optimizer):
    """What the three wrappers share: the base optimiser, state_dict, the perturbed pass."""

    _radii: tuple[str, ...] = ()

    def __init__(self, base: torch.optim.Optimizer, **radii: float):
        if not isinstance(base, torch.optim.Optimizer) or isinstance(base, _SharpnessAware):
            raise ValueError(f"base must be a constructed torch.optim.Optimizer (not a SAM wrapper), "
                             f"got {type(base).__name__}")
        for name, value in radii.items():
            setattr(self, name, value)
        # Optimizer.__init__ installs the step hooks and profiling that LR schedulers and
        # hook users expect; the placeholder group is dropped for the base's own groups, so
        # that add_param_group, schedulers and the base all see one list.
        super().__init__([{"params": []}], {})
        self.base = base
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state

    def __getstate__(self):
        # Optimizer's keeps only defaults/state/param_groups; a copy also needs the base and radii.
        return {**super().__getstate__(), "base": self.base,
                **{"_" + name: getattr(self, name) for name in self._radii}}

    def __repr__(self) -> str:
        radii = ", ".join(f"{name}={getattr(self, name):g}" for name in self._radii)
        return f"{type(self).__name__}({radii}, base={self.base!r})"

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base's zero_grad."""
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The base's state_dict plus the radii under the key "sam"."""
        state = self.base.state_dict()
        state["sam"] = {name: getattr(self, name) for name in self._radii}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads what `state_dict()` returned: the base's state and the radii.

        Raises:
            ValueError: if the "sam" entry is missing, names other radii, or holds a bad value.
        """
        state = dict(state_dict)
        radii = state.pop("sam", None)
        if not isinstance(radii, dict) or set(radii) != set(self._radii):
            raise ValueError(f"state_dict must come from {type(self).__name__}.state_dict(), with a 'sam' entry "
                             f"holding {self._radii}, got {radii!r}")
        radii = {name: checks.real(name, value, 0) for name, value in radii.items()}  # before any change
        self.base.load_state_dict(state)
        for name, value in radii.items():
            setattr(self, name, value)

    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _forward_at_w(self, closure):
        closure = checks.function("closure", closure)
        self.base.zero_grad(set_to_none=True)  # every gradient of this step is computed here
        with torch.enable_grad():
            return closure, closure()

    def _grad_at_perturbed(self, params, grads, loss, rho, closure, pick) -> list[Tensor | None]:
        """grad pick(closure()) at w + rho * g / ||g||_2, g = `grads` (grad `loss` at w).

        `grads` is overwritten (it becomes the perturbation). No perturbation where `loss` or
        g is zero. The weights are restored from a copy: w + e - e is not w in floating point.
        """
        idx = [i for i, g in enumerate(grads) if g is not None]
        if not idx:  # the loss does not depend on any parameter
            return grads
        ps, e = [params[i] for i in idx], [grads[i] for i in idx]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(e)))
            perturb = (norm > 0) & (loss.detach() != 0)
            # Decided on the device (no host sync); clamping keeps rho / norm finite for a
            # subnormal norm, and the zero case never divides by zero.
            scale = torch.where(perturb, rho / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
            saved = [torch.empty_like(p) for p in ps]
            torch._foreach_copy_(saved, ps)
            torch._foreach_mul_(e, scale)
            torch._foreach_add_(ps, e)
        try:
            with torch.enable_grad():
                out = pick(closure())
            return _backward(out, params)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(ps, saved)


class SAM(_SharpnessAware):
    """Sharpness-aware minimisation (Foret et al., ICLR 2021) around a base optimiser.

    Args:
        base: a constructed torch.optim.Optimizer; its parameters, groups and state are used.
        rho: the ascent radius (>= 0; an attribute, may be changed between steps). rho = 0
            is the base optimiser with one pass.

    Raises:
        ValueError: if `base` is not an Optimizer or `rho` is negative or not finite.
    """

    rho = _Radius()
    _radii = ("rho",)

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05):
        super().__init__(base, rho=rho)

    def step(self, closure):
        """One SAM step: grad L at w, ascent to w + e, grad L there, restore w, base step.

        Args:
            closure: runs the forward pass and returns the loss, without calling backward.

        Returns:
            What the closure returned at w (the unperturbed weights).

        Raises:
            ValueError: if `closure` is not callable.
        """
        closure, loss = self._forward_at_w(closure)
        params = self._params()
        grads = _backward(loss, params)
        if self.rho > 0 and _needs_grad(loss):
            grads = self._grad_at_perturbed(params, grads, loss, self.rho, closure, lambda out: out)
        _set_grads(params, grads)
        self.base.step()
        return loss


def _pair(out):
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise ValueError(f"closure must return the pair (loss_head, loss_tail), got {type(out).__name__}")
    return out


class _HeadTail(_SharpnessAware):
    def _head_tail_step(self, closure, rho_head: float, rho_tail: float):
        """G = grad L_H(w + rho_head u_H) + grad L_T(w + rho_tail u_T); a group whose radius
        is 0 (or that has no gradient) contributes its gradient at w, with no extra pass."""
        closure, out = self._forward_at_w(closure)
        loss_head, loss_tail = _pair(out)
        params = self._params()
        # Two backwards through one forward: each group needs its own gradient at w.
        grads_head = _backward(loss_head, params, retain_graph=_needs_grad(loss_tail))
        grads_tail = _backward(loss_tail, params)
        if rho_head > 0 and _needs_grad(loss_head):
            grads_head = self._grad_at_perturbed(params, grads_head, loss_head, rho_head, closure,
                                                 lambda o: _pair(o)[0])
        if rho_tail > 0 and _needs_grad(loss_tail):
            grads_tail = self._grad_at_perturbed(params, grads_tail, loss_tail, rho_tail, closure,
                                                 lambda o: _pair(o)[1])
        _set_grads(params, grads_head, grads_tail)
        self.base.step()
        return out


class ImbSAM(_HeadTail):
    """ImbSAM (Zhou et al., ICCV 2023): SAM on the tail-class loss only.

    The update gradient is grad L_H(w) + grad L_T(w + rho grad L_T / ||grad L_T||), with L_T
    counted once (the official code doubles it).

    Args:
        base: a constructed torch.optim.Optimizer; its parameters, groups and state are used.
        rho: the tail ascent radius (>= 0; an attribute, may be changed between steps).

    Raises:
        ValueError: if `base` is not an Optimizer or `rho` is negative or not finite.
    """

    rho = _Radius()
    _radii = ("rho",)

    def __init__(self, base: torch.optim.Optimizer, rho: float = 0.05):
        super().__init__(base, rho=rho)

    def step(self, closure):
        """One ImbSAM step.

        Args:
            closure: runs the forward pass and returns (loss_head, loss_tail) without calling
                backward; a group with no samples may be a constant zero tensor.

        Returns:
            What the closure returned at w (the unperturbed weights).

        Raises:
            ValueError: if `closure` is not callable or does not return a pair.
        """
        return self._head_tail_step(closure, 0.0, self.rho)


class SSESAM(_HeadTail):
    """SSE-SAM (Lyu et al., AAAI 2025): head and tail losses each perturbed along their own
    unit gradient; with rho_head = 0 (phase 2, `stage_rho_head`) it is ImbSAM.

    Args:
        base: a constructed torch.optim.Optimizer; its parameters, groups and state are used.
        rho_head: the head ascent radius (>= 0; an attribute, may be changed between steps).
        rho_tail: the tail ascent radius (>= 0; an attribute, may be changed between steps).

    Raises:
        ValueError: if `base` is not an Optimizer or a radius is negative or not finite.
    """

    rho_head = _Radius()
    rho_tail = _Radius()
    _radii = ("rho_head", "rho_tail")

    def __init__(self, base: torch.optim.Optimizer, rho_head: float = 0.05, rho_tail: float = 0.10):
        super().__init__(base, rho_head=rho_head, rho_tail=rho_tail)

    def step(self, closure):
        """One SSE-SAM step (one forward at w, one per group with a non-zero radius).

        Args:
            closure: runs the forward pass and returns (loss_head, loss_tail) without calling
                backward; a group with no samples may be a constant zero tensor.

        Returns:
            What the closure returned at w (the unperturbed weights).

        Raises:
            ValueError: if `closure` is not callable or does not return a pair.
        """
        return self._head_tail_step(closure, self.rho_head, self.rho_tail)
