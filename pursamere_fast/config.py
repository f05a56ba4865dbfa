"""PurifyConfig: every knob of the PurSAMERE loop, validated once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from . import checks


def geometric_sigmas(sigma_max: float, sigma_min: float, n: int) -> tuple[float, ...]:
    """`n` geometrically spaced noise levels from `sigma_max` down to `sigma_min` (NCSN ladder)."""
    sigma_max = checks.real("sigma_max", sigma_max, positive=True)
    sigma_min = checks.real("sigma_min", sigma_min, positive=True)
    n = checks.integer("n", n, 1)
    if n == 1:
        return (float(sigma_max),)
    ratio = math.log(sigma_min / sigma_max) / (n - 1)
    return tuple(float(sigma_max * math.exp(ratio * i)) for i in range(n))


@dataclass(frozen=True)
class PurifyConfig:
    """Configuration of the PurSAMERE purification loop (SPEC section 2).

    Attributes:
        sigmas: annealed noise levels, strictly decreasing and positive.
        steps_per_sigma: Adam steps at each sigma; K = len(sigmas) * steps_per_sigma.
        n_samples: Monte Carlo noise samples N per step.
        rho: radius of the purification ball around the input (in `norm`).
        norm: "linf" or "l2"; governs both the purification ball and the SAM ball.
        sam_radius: SAM ascent radius r; 0 switches SAM off.
        lr_max, lr_min: Adam step size, falling linearly from lr_max (k=0) to lr_min (k=K-1).
        betas: Adam (beta1, beta2).
        adam_eps: Adam epsilon.
        seed: seed of the fixed Monte Carlo noise (generated on the CPU).
        max_batch: images purified together at most (bounds memory; results do not depend on it).
    """

    sigmas: tuple[float, ...] = field(default_factory=lambda: geometric_sigmas(0.25, 0.02, 5))
    steps_per_sigma: int = 4
    n_samples: int = 8
    rho: float = 16 / 255
    norm: str = "linf"
    sam_radius: float = 4 / 255
    lr_max: float = 0.01
    lr_min: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    seed: int = 0
    max_batch: int = 64

    def __post_init__(self):
        sigmas = checks.reals("sigmas", self.sigmas)
        if not all(s > 0 for s in sigmas) or any(a <= b for a, b in zip(sigmas, sigmas[1:])):
            raise ValueError(f"sigmas must be positive and strictly decreasing, got {sigmas}")
        object.__setattr__(self, "sigmas", sigmas)
        betas = checks.reals("betas", self.betas, length=2)
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        object.__setattr__(self, "betas", betas)
        for name in ("steps_per_sigma", "n_samples", "max_batch"):
            object.__setattr__(self, name, checks.integer(name, getattr(self, name), 1))
        object.__setattr__(self, "seed", checks.seed("seed", self.seed))
        for name in ("rho", "sam_radius", "lr_min"):
            object.__setattr__(self, name, checks.real(name, getattr(self, name), 0.0))
        # lr_max = 0 would return the input unchanged: a purifier that silently does nothing.
        object.__setattr__(self, "lr_max", checks.real("lr_max", self.lr_max, positive=True))
        # adam_eps = 0 divides 0 by 0 wherever the gradient has been exactly zero so far.
        object.__setattr__(self, "adam_eps", checks.real("adam_eps", self.adam_eps, positive=True))
        if self.lr_min > self.lr_max:
            raise ValueError(f"lr_min must be <= lr_max (the step size falls from lr_max to lr_min), "
                             f"got lr_min={self.lr_min!r}, lr_max={self.lr_max!r}")
        checks.choice("norm", self.norm, ("linf", "l2"))
        # Images are in [0, 1]: an linf ball of radius 1 already holds the whole cube (the
        # unconstrained search, which stays legal), so a larger radius (of the purification ball
        # or of SAM's ascent) is a budget in pixel units.
        for name in ("rho", "sam_radius"):
            value = getattr(self, name)
            if self.norm == "linf" and value > 1:
                raise ValueError(f"{name} must be <= 1 for norm='linf' (images are in [0, 1]), got {value!r}: a "
                                 f"budget in [0, 255] pixel units needs /255 ({name}={value:g}/255)")

    @property
    def num_steps(self) -> int:
        """K, the total number of Adam steps."""
        return len(self.sigmas) * self.steps_per_sigma

    @property
    def score_evaluations(self) -> int:
        """Score forward+backward passes per image of one purification: K * N * (2 with SAM, else 1).

        The one statement of a purification's cost: the sweep's and the protocol's selection
        rules compare configs by it.
        """
        return self.num_steps * self.n_samples * self.ere_evaluations_per_step

    @property
    def ere_evaluations_per_step(self) -> int:
        """ERE gradients per Adam step: 2 with SAM (at x and at x + d), else 1."""
        return 2 if self.sam_radius > 0 else 1

    def step_sigmas(self) -> list[float]:
        """sigma_k for k = 0..K-1."""
        return [s for s in self.sigmas for _ in range(self.steps_per_sigma)]

    def step_lrs(self) -> list[float]:
        """lr_k for k = 0..K-1: linear from lr_max to lr_min (lr_max alone when K = 1)."""
        k_total = self.num_steps
        if k_total == 1:
            return [self.lr_max]
        return [self.lr_max + (self.lr_min - self.lr_max) * k / (k_total - 1) for k in range(k_total)]

    def with_overrides(self, **overrides) -> PurifyConfig:
        """A copy with the given fields replaced (validated again)."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown PurifyConfig field(s) {unknown}; valid: {sorted(names)}")
        return replace(self, **overrides) if overrides else self

