"""Modules that put a purifier in front of a classifier, and the stochastic-purifier wrapper.

`PurifiedClassifier` is what every adaptive attack differentiates: [0, 1] images ->
purifier -> (x - mean) / std -> classifier -> logits. How the gradient passes the purifier
is the purifier's business (grad_mode "bpda": identity; "full": exact unrolled gradient).
`VotingClassifier` is the same for a defence that predicts by majority vote over several
purification runs (the heterogeneous-noise purifier's R runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks


class IdentityPurifier(nn.Module):
    """The "no defence" purifier: returns its input (exact identity gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class StraightThrough(nn.Module):
    """BPDA wrapper for any purifier: forward value of `purifier`, identity backward.

    Args:
        purifier: module from images to purified images.
    """

    def __init__(self, purifier: nn.Module):
        super().__init__()
        self.purifier = purifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.purifier(x.detach())
        # Value exactly `out` (x - x is 0), gradient exactly the identity.
        return out + (x - x.detach())


def _as_channel_buffer(name: str, value, channels: int | None) -> torch.Tensor | None:
    if value is None:
        return None
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be a non-empty finite sequence, got {value!r}")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {value!r}")
    if channels is not None and t.numel() not in (1, channels):
        raise ValueError(f"{name} must have 1 or {channels} entries, got {t.numel()}")
    return t.view(1, -1, 1, 1)


class PurifiedClassifier(nn.Module):
    """classifier(normalise(purifier(x))) as one module from [0, 1] images to logits.

    Args:
        purifier: module from (B, C, H, W) images to purified images of the same shape.
        classifier: module from normalised images to logits.
        mean: per-channel mean subtracted before the classifier (None: no normalisation).
        std: per-channel std divided by before the classifier (None: 1).

    Raises:
        ValueError: on a non-finite mean/std, a non-positive std, or a length mismatch.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module,
                 mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier
        m = _as_channel_buffer("mean", mean, None)
        s = _as_channel_buffer("std", std, None)
        if m is not None and s is not None and m.numel() != s.numel() and 1 not in (m.numel(), s.numel()):
            raise ValueError(f"mean and std lengths differ: {m.numel()} vs {s.numel()}")
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Apply (x - mean) / std with the stored statistics (identity when both are None).

        Raises:
            ValueError: mean or std has as many entries as neither 1 nor x's channels.
        """
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t is not None and t.numel() not in (1, x.shape[1]):
                raise ValueError(f"{name} must have 1 or {x.shape[1]} entries (the images' channels), got {t.numel()}")
        if self.mean is not None:
            x = x - self.mean.to(x.dtype)
        if self.std is not None:
            x = x / self.std.to(x.dtype)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        purified = self.normalise(self.purifier(x))
        # A classifier that cannot take the images (channels, size, dtype, device) is named.
        with checks.model_errors("classifier", purified, images="the purified x"):
            return self.classifier(purified)


class VotingClassifier(PurifiedClassifier):
    """Majority vote of the classifier over `runs` purification runs, as one module.

    The purifier's `purify_runs(x, runs)` gives the runs (runs, B, C, H, W) (seeds seed ..
    seed + runs - 1, one batched pass). The output's value is votes + p_bar / 2 per class
    (votes: how many runs predict the class; p_bar: the runs' mean softmax, in [0, 1], so it
    breaks ties and never outweighs a vote): its argmax is the majority vote, which is the
    defence's prediction and what decides whether an attack iterate fools it. Its gradient
    is that of log p_bar, the soft vote, because the vote itself is piecewise constant:
    an attack follows the runs' averaged gradient (EoT over the fixed runs) and is judged by
    the vote.

    Args:
        purifier: module with `purify_runs(x, runs)`.
        classifier, mean, std: as `PurifiedClassifier`.
        runs: number of runs, >= 1.

    Raises:
        ValueError: runs < 1, a purifier without `purify_runs`, or as `PurifiedClassifier`.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module, runs: int,
                 mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None):
        super().__init__(purifier, classifier, mean, std)
        self.runs = checks.integer("runs", runs, 1)
        if not callable(getattr(purifier, "purify_runs", None)):
            raise ValueError(f"purifier must have purify_runs(x, runs) to vote, got {type(purifier).__name__}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.purifier.purify_runs(x, self.runs)
        logits = self.classifier(self.normalise(xs.flatten(0, 1))).unflatten(0, xs.shape[:2])
        log_p = torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(self.runs)
        votes = F.one_hot(logits.detach().argmax(-1), logits.shape[-1]).sum(0).to(log_p.dtype)
        value = votes + 0.5 * log_p.detach().exp()
        # Value exactly `value` (log_p - log_p is 0), gradient exactly that of log_p.
        return value + (log_p - log_p.detach())


class FreshNoisePurifier(nn.Module):
    """A stochastic purifier: every call builds the purifier with a new seed (fresh noise).

    The seed sequence is deterministic: call i uses `seed * 1_000_003 + i` (reset with
    `reset`), so an EoT evaluation is reproducible while every call sees new noise.

    Args:
        build: callable seed -> purifier module (e.g. ``lambda s: Purifier(score, cfg,
            grad_mode="bpda", seed=s)``).
        seed: base seed, >= 0.

    Raises:
        ValueError: when build is not callable or seed is negative.
    """

    def __init__(self, build: Callable[[int], nn.Module], seed: int = 0):
        super().__init__()
        checks.function("build", build)
        self.build = build
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """Restart the seed sequence at `seed`."""
        checks.seed("seed", seed)
        self.seed = seed
        self.calls = 0

    def _next(self) -> nn.Module:
        seed = self.seed * 1_000_003 + self.calls
        self.calls += 1
        return self.build(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._next()(x)

    def purify_runs(self, x: torch.Tensor, runs: int) -> torch.Tensor:
        """`runs` purifications of x from one fresh draw's `purify_runs` (for `VotingClassifier`)."""
        return self._next().purify_runs(x, runs)
