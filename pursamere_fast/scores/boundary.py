"""The score-call boundary: how every purifier calls a score model, and what it checks.

A score (or the network inside an adapter) may come from anywhere: a diffusers UNet returns
a `UNet2DOutput`, some models return tuples, a half or bf16 model refuses float32 input, and
PyTorch's CPU flash-attention kernel has no double backward, which the exact-gradient attacks
need. Every purifier calls its score through `ScoreCall`, and every adapter calls its network
through `call_model`, so these rules are written once:

- outputs are unwrapped (`.sample`, else the first element of a tuple or list);
- a module whose floating parameters have another dtype than the input gets the input in its
  own dtype and its output is cast back to the input's dtype;
- while a loop differentiates through the score (`double_backward=True`), scaled-dot-product
  attention runs on the math kernel, which every device can differentiate twice;
- the output is checked: a floating tensor of the input's shape, on its device, attached to the
  input's graph when the input requires a gradient; NaN/Inf is recorded without a host sync and
  raised once, naming the step and the noise level (`ScoreCall.raise_if_nonfinite`).
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import nn

__all__ = ["NonFiniteScoreError", "ScoreCall", "call_score", "call_model", "check_output", "model_dtype", "unwrap",
           "differentiable_attention"]

# Set by `call_score` for the networks that adapters call inside it: whether the caller will
# differentiate twice. None outside a purifier's call (then: whenever the input needs a gradient).
_DOUBLE_BACKWARD: contextvars.ContextVar[bool | None] = contextvars.ContextVar("double_backward", default=None)


class NonFiniteScoreError(FloatingPointError):
    """The score model produced NaN or Inf inside the loop (its output or its input-gradient)."""


def unwrap(out):
    """A model's output as a tensor: `.sample` (diffusers' `UNet2DOutput`), else the first
    element of a tuple or list, else the output itself."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    return out


def model_dtype(model) -> torch.dtype | None:
    """The dtype of a module's first floating parameter; None for a plain function or a module
    without floating parameters (buffers do not count: noise ladders are often float64)."""
    if not isinstance(model, nn.Module):
        return None
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


def differentiable_attention(enabled: bool = True):
    """A context in which scaled-dot-product attention runs on the math kernel (twice
    differentiable on every device) when `enabled`; a null context otherwise."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def call_model(model, x: torch.Tensor, *args, double_backward: bool | None = None):
    """`model(x, *args)` with the boundary's rules: x cast to the model's dtype (the other
    arguments, time labels among them, keep theirs: a half-precision timestep would round),
    the output unwrapped and cast back to x's dtype.

    Args:
        model: an nn.Module or a plain callable.
        x: the model's input sample.
        *args: further arguments, passed as they are.
        double_backward: run attention on the math kernel; None: as the enclosing `call_score`
            says, else whenever x requires a gradient and grad mode is on (the only case in which
            a double backward can follow).

    Returns:
        The model's output (unwrapped) in x's dtype; a non-tensor output is returned as it is
        for the caller's check to name.
    """
    if double_backward is None:
        double_backward = _DOUBLE_BACKWARD.get()
    if double_backward is None:
        double_backward = x.requires_grad and torch.is_grad_enabled()
    dtype = model_dtype(model)
    xin = x if dtype is None or dtype == x.dtype or not x.is_floating_point() else x.to(dtype)
    with differentiable_attention(double_backward):
        out = unwrap(model(xin, *args))
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out


def check_output(s, y: torch.Tensor, *, name: str = "score") -> torch.Tensor:
    """The score's output for input y, cast to y's dtype, or a ValueError saying what is wrong."""
    if not isinstance(s, torch.Tensor) or not s.is_floating_point():
        raise ValueError(f"{name} must return a floating torch.Tensor, got {getattr(s, 'dtype', type(s).__name__)}")
    if s.shape != y.shape:
        raise ValueError(f"{name} returned shape {tuple(s.shape)}, expected {tuple(y.shape)}")
    if s.device != y.device:
        raise ValueError(f"{name} returned a tensor on {s.device}, expected {y.device} (the input's device)")
    if y.requires_grad and torch.is_grad_enabled() and not s.requires_grad:
        raise ValueError(f"{name} returned a tensor that does not depend on its input y through autograd (detached, "
                         "computed under torch.no_grad(), or constant): purification needs the score's gradient "
                         "with respect to y")
    return s.to(y.dtype)


def call_score(score, y: torch.Tensor, sigma: torch.Tensor, *, double_backward: bool = False,
               name: str = "score") -> torch.Tensor:
    """score(y, sigma) under the boundary's rules (module docstring), checked by `check_output`.

    Args:
        score: callable score(y, sigma); an adapter (`ScoreAdapter`, `casts_own_input = True`)
            casts for its own network, any other module gets y and sigma in its parameters' dtype.
        y: (M, C, H, W); sigma: (M,).
        double_backward: the caller will differentiate through the score twice.
        name: how errors name the callable.

    Returns:
        The score in y's dtype.

    Raises:
        ValueError: the output is not a floating tensor of y's shape on y's device, or is
            detached from a y that requires a gradient.
    """
    # An adapter casts for its own network (its conversions run in the loop's dtype).
    dtype = None if getattr(score, "casts_own_input", False) else model_dtype(score)
    if dtype is not None and dtype != y.dtype:
        yin, sin = y.to(dtype), sigma.to(dtype)
    else:
        yin, sin = y, sigma
    token = _DOUBLE_BACKWARD.set(double_backward)
    try:
        with differentiable_attention(double_backward):
            s = unwrap(score(yin, sin))
    finally:
        _DOUBLE_BACKWARD.reset(token)
    return check_output(s, y, name=name)


class ScoreCall:
    """A score as a purifier calls it: `call(y, sigma, step=None)`, checked (module docstring).

    NaN/Inf in an output is recorded per call in a device tensor (no host sync); call
    `raise_if_nonfinite()` once at the end of a forward pass. Make one per forward pass.

    Args:
        score: callable score(y, sigma), y (M, C, H, W), sigma (M,).
        double_backward: the caller differentiates through the score's input-gradient or its
            output inside an autograd graph that will be differentiated again ("full" grad
            modes): attention runs on the math kernel.
        name: how errors name the callable.
    """

    def __init__(self, score, *, double_backward: bool = False, name: str = "score"):
        self.score, self.double_backward, self.name = score, double_backward, name
        self._records: list[tuple[torch.Tensor, object, torch.Tensor]] = []

    def __call__(self, y: torch.Tensor, sigma: torch.Tensor, step=None) -> torch.Tensor:
        s = call_score(self.score, y, sigma, double_backward=self.double_backward, name=self.name)
        # The sum is NaN/Inf exactly when an element is (a float32 or wider sum of a score cannot
        # overflow), and one reduction is cheaper than isfinite's full-size mask: 16 of ~200 us
        # per call on a tiny network (docs/diffpure.md).
        total = s.detach().sum(dtype=torch.promote_types(s.dtype, torch.float32))
        self._records.append((total, step, sigma.detach()[:1]))
        return s

    def raise_if_nonfinite(self) -> None:
        """Raise NonFiniteScoreError naming the first call (its step and sigma) whose output had
        NaN/Inf; one host sync. Clears the record."""
        records, self._records = self._records, []
        if not records:
            return
        flags = ~torch.isfinite(torch.stack([r[0] for r in records]))
        if not bool(flags.any()):
            return
        i = int(flags.nonzero()[0])
        _, step, sigma = records[i]
        where = f"step {step}" if step is not None else f"call {i}"
        raise NonFiniteScoreError(f"{self.name} produced NaN/Inf at {where} (sigma={float(sigma[0]):.6g}); "
                                  "check the score model at this noise level")
