"""Purifier: PurSAMERE as an nn.Module, with a choice of backward for attacks."""

from __future__ import annotations

import torch
from torch import nn

from . import checks
from .purify import purify, resolve_config

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
        """Purify x (B, C, H, W) in [0, 1]; `noise` overrides the config's fixed noise."""
        if self.grad_mode in _STRAIGHT_THROUGH:
            from .exact import purify_unrolled

            return purify_unrolled(x, self.score, self.config, noise=noise,
                                   straight_through=_STRAIGHT_THROUGH[self.grad_mode], **self.purify_options)

        out = purify(x.detach(), self.score, self.config, noise=noise, backend=self.backend, **self.purify_options)
        if self.grad_mode == "bpda" and torch.is_grad_enabled() and x.requires_grad:
            # BPDA: the value is exactly `out` (x - x is 0), the gradient exactly the identity.
            return out + (x - x.detach())
        return out

    def extra_repr(self):
        return f"grad_mode={self.grad_mode!r}, backend={self.backend!r}, config={self.config}"
