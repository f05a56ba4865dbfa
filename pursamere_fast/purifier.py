"""Purifier: PurSAMERE as an nn.Module, with a choice of backward for attacks; and what every
purifier of `pursamere_fast.purifiers` shares at its entry and around its score calls.

The shared part (`purifier_forward`, `score_call`, `check_output_finite`) makes every purifier
refuse the same inputs with the same words (`checks.images`), compute in the same precision,
give the same grad modes, and name a score that fails or returns NaN/Inf:
- images: (B, C, H, W), floating, finite, in [0, 1]; anything else is a ValueError with the fix.
- precision: float16/bfloat16 images are purified in float32 and returned in their dtype; a
  score module runs in its parameters' dtype (the score-call boundary casts its input and
  output), so float64 images with a float32 score give float64 images.
- grad modes: "none" has no gradient, and differentiating its output raises a RuntimeError
  naming grad_mode="bpda" / "full" (instead of torch's "appears to not have been used in the
  graph"); "bpda" is the identity backward; "full*" differentiate the purifier itself.
- score calls: through the boundary (`scores.boundary.ScoreCall`); a RuntimeError that says why
  the model cannot take the images (channels, device, dtype) becomes a ValueError naming it
  (`checks.model_errors`); NaN/Inf raises NonFiniteScoreError naming the step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import checks
from .purify import purify, resolve_config
from .scores.boundary import NonFiniteScoreError, ScoreCall

# Every purifier (Purifier and those of pursamere_fast.purifiers) accepts these names.
GRAD_MODES = ("none", "bpda", "full", "full_st", "full_st_proj")
# The exact-gradient modes and the straight-through estimator each passes to purify_unrolled.
_STRAIGHT_THROUGH = {"full": None, "full_st": "adam", "full_st_proj": "adam_proj"}
# The purify options that hold under double backward (see exact.purify_unrolled).
FULL_OPTIONS = {"score_dtype", "channels_last", "chunk_rows"}


class Purifier(nn.Module):
    """A score model and a config, purifying whatever passes through `forward`.

    Args:
        score: callable score(y, sigma); registered as a submodule when it is an nn.Module.
        config: PurifyConfig (default PurifyConfig()); `**overrides` replace its fields.
        grad_mode: "none" (output carries no gradient), "bpda" (straight-through identity
            backward), "full" (exact gradient through the unrolled loop), "full_st" (as
            "full" with Adam's normaliser 1 / (sqrt(v_hat) + eps) held constant in the
            backward), "full_st_proj" (as "full_st", and the projection and [0, 1] clamp
            passed straight through); see `pursamere_fast.exact`. Every mode has the same
            forward value.
        backend: backend of `purify` for grad_mode "none" and "bpda".
        purify_options: further keyword arguments of `purify` (cuda_graph, score_dtype,
            channels_last, compile_score, chunk_rows); the "full*" modes take score_dtype,
            channels_last and chunk_rows.

    Raises:
        ValueError: unknown grad_mode, a score that is not callable, a bad config field, or
            a purify option that the "full*" modes cannot honour (compile_score, cuda_graph).
    """

    def __init__(self, score, config=None, *, grad_mode="none", backend="auto", purify_options=None, **overrides):
        super().__init__()
        self.grad_mode = checks.choice("grad_mode", grad_mode, GRAD_MODES)
        checks.function("score", score)
        self.score = score
        self.config = resolve_config(config, overrides)
        self.backend = backend
        if purify_options is not None and not isinstance(purify_options, dict):
            raise ValueError(f"purify_options must be a dict of purify keyword arguments, got {purify_options!r}")
        self.purify_options = dict(purify_options or {})
        extra = sorted(set(self.purify_options) - FULL_OPTIONS)
        if grad_mode in _STRAIGHT_THROUGH and extra:
            raise ValueError(f"purify_options {extra} do not apply to grad_mode={grad_mode!r}, which differentiates "
                             f"the reference loop; it takes {sorted(FULL_OPTIONS)}")

    def forward(self, x, noise=None):
        """Purify x (B, C, H, W) in [0, 1]; `noise` overrides the config's fixed noise.

        Raises:
            ValueError: bad images or noise, or a score that cannot take them (as `purify`).
            NonFiniteScoreError: the score returned NaN/Inf (the message names the step).
            RuntimeError: in a backward pass through the output of grad_mode="none".
        """
        if self.grad_mode in _STRAIGHT_THROUGH:
            from .exact import purify_unrolled

            return purify_unrolled(x, self.score, self.config, noise=noise,
                                   straight_through=_STRAIGHT_THROUGH[self.grad_mode], **self.purify_options)

        if not isinstance(x, torch.Tensor):
            checks.images("x_adv", x)  # the ValueError purify would give, before x.detach() fails
        # purify validates x itself ("x_adv"), computes in float32/64 and returns x's dtype.
        out = purify(x.detach(), self.score, self.config, noise=noise, backend=self.backend, **self.purify_options)
        return attach_gradient(out, x, self.grad_mode, who="Purifier")

    def extra_repr(self):
        return f"grad_mode={self.grad_mode!r}, backend={self.backend!r}, config={self.config}"


class _NoGradient(torch.autograd.Function):
    """The output of a purifier in grad_mode "none": its value, and a backward that says which
    grad mode to use instead of torch's "appears to not have been used in the graph"."""

    @staticmethod
    def forward(ctx, x, out, who):
        ctx.who = who
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.who} with grad_mode='none' has no gradient: an attack (or any backward pass) "
                           f"through it needs {ctx.who}(..., grad_mode='bpda') (identity backward) or "
                           f"grad_mode='full' (the exact gradient)")


def attach_gradient(out: torch.Tensor, x: torch.Tensor, grad_mode: str, *, who: str) -> torch.Tensor:
    """The output of a "none" or "bpda" purifier, computed without a graph, given its backward.

    When x needs a gradient (and grad mode is on): "bpda" returns out + (x - x.detach()), the
    value exactly `out` and the gradient exactly the identity; "none" returns `out` with a
    backward that raises a RuntimeError naming the grad modes that have a gradient. Otherwise
    `out` itself.

    Args:
        out: the purified images, without a graph (any leading dimensions broadcastable to x).
        x: the input images.
        grad_mode: "none" or "bpda".
        who: the purifier's name in the error message.
    """
    if not (torch.is_grad_enabled() and x.requires_grad):
        return out
    if grad_mode == "bpda":
        return out + (x - x.detach())
    return _NoGradient.apply(x, out, who)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a purifier computes in for images of `dtype`: float64 stays, every other
    floating dtype (float16, bfloat16, float32) computes in float32: a half-precision diffusion
    step loses the image under its rounding."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def purifier_forward(run: Callable[[torch.Tensor], torch.Tensor], x, grad_mode: str, *, who: str,
                     name: str = "x") -> torch.Tensor:
    """A purifier's forward pass with the rules every purifier shares (module docstring).

    Validates x (`checks.images`), runs `run` on x in `compute_dtype` (differentiably in the
    "full*" modes, else without a graph, then `attach_gradient`), and returns the result in x's
    dtype.

    Args:
        run: the purification, from (B, C, H, W) images in the compute dtype to purified images
            (any leading dimensions, e.g. runs); it calls its score through `score_call` and
            checks its output with `check_output_finite`.
        x: the images.
        grad_mode: one of GRAD_MODES.
        who: the purifier's name, for messages.
        name: the images' argument name, for messages.

    Returns:
        run's output in x's dtype.

    Raises:
        ValueError: bad images (named with the fix), or whatever `run` raises.
    """
    checks.images(name, x)
    compute = compute_dtype(x.dtype)
    if grad_mode.startswith("full"):
        return run(x.to(compute)).to(x.dtype)
    with torch.no_grad():
        out = run(x.detach().to(compute)).to(x.dtype)
    return attach_gradient(out, x, grad_mode, who=who)


class _NamedScoreCall(ScoreCall):
    """`ScoreCall` whose model errors that `checks.score_error` can name become ValueErrors."""

    def __init__(self, score, *, double_backward: bool, name: str, images: str):
        super().__init__(score, double_backward=double_backward, name=name)
        self.images = images

    def __call__(self, y, sigma, step=None):
        with checks.model_errors(self.name, y, images=self.images):
            return super().__call__(y, sigma, step)


def score_call(score, *, double_backward: bool = False, name: str = "score", images: str = "x") -> ScoreCall:
    """The score as a purifier calls it: the score-call boundary (`ScoreCall`: output unwrapped,
    cast and checked, NaN/Inf recorded without a host sync), and a model error about the images
    (channels, device, dtype) raised as a ValueError naming both. Make one per forward pass and
    call `check_output_finite` at its end.

    Args:
        score: callable score(y, sigma).
        double_backward: the "full*" grad modes (attention then runs on the math kernel).
        name: how errors name the score.
        images: how errors name the purifier's images.
    """
    return _NamedScoreCall(score, double_backward=double_backward, name=name, images=images)


def check_output_finite(call: ScoreCall, out: torch.Tensor, *, who: str) -> torch.Tensor:
    """Raise NonFiniteScoreError if a score output was NaN/Inf (naming the first step), or if the
    purified images are not finite although every output was (an overflow in the purifier's own
    arithmetic); two host syncs, once per forward pass. Returns out."""
    call.raise_if_nonfinite()
    if not bool(torch.isfinite(out.detach()).all()):
        raise NonFiniteScoreError(f"{who} produced NaN/Inf images although every score output was finite: the "
                                  "iteration overflowed; check the score's scale at these noise levels")
    return out
