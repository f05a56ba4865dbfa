"""The score protocol `score(y, sigma)` and the adapters that turn every model kind into it.

A score is any callable `score(y, sigma) -> Tensor` with y of shape (M, C, H, W) in [0, 1]-space
and sigma a float tensor of shape (M,) (one VE noise level per row, y = x + sigma * eps),
returning grad_y log p_sigma(y) of y's shape. `purify`, `Purifier` and every purifier of
`pursamere_fast.purifiers` take any such callable.

Models trained elsewhere (SPEC 11; `docs/scores.md` says which adapter to call):
- `VPScore`: a discrete-time VP model (DDPM/DDIM, diffusers) predicting epsilon, v or x_0;
- `ContinuousVPScore`: score_sde's continuous VP models (DDPM++, DiffPure's);
- `VEScore`: VE models (score_sde NCSN++, EDM-style denoisers) predicting the score, epsilon
  or x_0; `NoisePredictionScore` is its epsilon form on [0, 1] data;
- `LabelIndexedScore`: NCSN-style models on a sigma ladder (NCSNv2: `scores.ncsnv2`).
Each converts exactly through the model's data range [a, b] (c = b - a: the model sees
ym = a + c * y at noise c * sigma) and, for VP models, its schedule (`schedules.py`).

The other way, for VP diffusion purifiers (`HeteroPurifier`): `ScoreAsVPModel` turns any score
into a noise predictor eps_hat(x_t, t) on a discrete schedule; `VPNoisePredictor` is its form
on SPEC 8's linear schedule with 1-based t, `NativeNoisePredictor` marks a model that predicts
the noise itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from .. import checks
from .boundary import call_model, check_output
from .schedules import ContinuousVPSchedule, DiscreteVPSchedule

__all__ = ["ScoreFn", "ScoreAdapter", "VPScore", "ContinuousVPScore", "VEScore", "NoisePredictionScore",
           "LabelIndexedScore", "ScoreAsVPModel", "vp_alpha_bar", "NoisePredictor", "VPNoisePredictor",
           "NativeNoisePredictor", "VP_PREDICTIONS", "VE_PREDICTIONS"]

# diffusers' names; "v" and "x0" are accepted as aliases.
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
VE_PREDICTIONS = ("score", "epsilon", "sample")
_ALIASES = {"v": "v_prediction", "x0": "sample", "x_0": "sample", "eps": "epsilon"}


@runtime_checkable
class ScoreFn(Protocol):
    """s(y, sigma) ~ grad_y log p_sigma(y): y (M, C, H, W), sigma (M,) -> (M, C, H, W)."""

    def __call__(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def _check_sigma(y: torch.Tensor, sigma: torch.Tensor) -> None:
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"y must have shape (M, C, H, W), got {tuple(getattr(y, 'shape', ()))}")
    if not isinstance(sigma, torch.Tensor) or sigma.shape != (y.shape[0],):
        raise ValueError(f"sigma must have shape ({y.shape[0]},), got {tuple(getattr(sigma, 'shape', ()))}")


def _prediction(value, options) -> str:
    value = _ALIASES.get(value, value) if isinstance(value, str) else value
    return checks.choice("prediction", value, options)


def _data_range(value) -> tuple[float, float]:
    low, high = checks.reals("data_range", value, length=2)
    if not high > low:
        raise ValueError(f"data_range must be (low, high) with low < high, got {value!r}")
    return low, high


def _time_dtype(y: torch.Tensor) -> torch.dtype:
    # Time labels stay at least float32: a half-precision timestep of ~500 rounds to 0.25.
    return torch.promote_types(y.dtype, torch.float32)


class ScoreAdapter(nn.Module):
    """Base of the adapters: a network `model` trained on data in `data_range`, exposed as this
    library's score. Adapters call their network through the score-call boundary
    (`boundary.call_model`): outputs unwrapped, half/bf16 networks fed in their dtype."""

    # The score-call boundary leaves y in the loop's dtype for an adapter: it casts for its network.
    casts_own_input = True

    def __init__(self, model, data_range):
        super().__init__()
        self.model = checks.function("model", model)
        self.data_range = _data_range(data_range)

    @property
    def scale(self) -> float:
        """c = b - a: the model sees ym = a + c * y at noise c * sigma."""
        return self.data_range[1] - self.data_range[0]

    def to_model_space(self, y: torch.Tensor) -> torch.Tensor:
        a, c = self.data_range[0], self.scale
        return y * c + a if (a, c) != (0.0, 1.0) else y

    def _model(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return check_output(call_model(self.model, x, label), x, name="model")


def _eps_from_prediction(f, x_t, sqrt_ab, sqrt_1mab, prediction):
    if prediction == "epsilon":
        return f
    if prediction == "v_prediction":
        return sqrt_ab * f + sqrt_1mab * x_t
    return (x_t - sqrt_ab * f) / sqrt_1mab


class _VPAdapter(ScoreAdapter):
    """The VP conversion of SPEC 11, shared by the discrete and the continuous schedule."""

    def __init__(self, model, prediction, data_range):
        super().__init__(model, data_range)
        self.prediction = _prediction(prediction, VP_PREDICTIONS)

    def _label(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _check_sigma(y, sigma)
        sig_m = sigma.to(y.dtype) * self.scale
        t = self.schedule.sigma_to_t(sig_m, scale=self.scale)
        # ab = 1 / (1 + sig_m^2); sqrt(1 - ab) = sig_m sqrt(ab) has no cancellation at small sigma.
        sqrt_ab = torch.rsqrt(1 + sig_m**2).view(-1, 1, 1, 1)
        sqrt_1mab = sig_m.view(-1, 1, 1, 1) * sqrt_ab
        x_t = sqrt_ab * self.to_model_space(y)
        f = self._model(x_t, self._label(t, y))
        eps = _eps_from_prediction(f, x_t, sqrt_ab, sqrt_1mab, self.prediction)
        return -eps / sigma.to(y.dtype).view(-1, 1, 1, 1)

    def noise_prediction(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat of the network at model-space x_t and model time t (its own convention),
        converted from its prediction type."""
        ab = self.schedule.alpha_bar(t).to(x_t.dtype).view(-1, 1, 1, 1)
        f = self._model(x_t, self._label(t, x_t) if t.is_floating_point() else t)
        return _eps_from_prediction(f, x_t, ab.sqrt(), (1 - ab).sqrt(), self.prediction)


class VPScore(_VPAdapter):
    """A discrete-time VP model (DDPM, DDIM, diffusers) as this library's score (SPEC 11).

    y in [0, 1] at level sigma is, in the model's space, ym = a + c y at VE level c sigma,
    i.e. VP x_t = sqrt(ab) ym with ab = 1 / (1 + (c sigma)^2), at the time t(sigma) of the
    schedule (`DiscreteVPSchedule.sigma_to_t`). The model's output gives eps_hat by its
    prediction type and s(y, sigma) = -eps_hat / sigma.

    Args:
        model: callable `model(x_t, t)`: x_t (M, C, H, W) in the model's space, t (M,) float
            ("continuous") or int64 ("nearest"); a diffusers `UNet2DModel` works as it is.
        alphas_cumprod: the schedule's ab_t, t = 0..T-1 (diffusers' `scheduler.alphas_cumprod`).
        prediction: "epsilon", "v_prediction" or "sample" (x_0).
        data_range: the range of the model's training data, (-1, 1) for diffusers and DDPM.
        timesteps: "continuous" (real t) or "nearest" (rounded t; x_t still uses the exact ab).

    Raises:
        ValueError: a bad argument; at call time a sigma outside the schedule's range.
    """

    def __init__(self, model, alphas_cumprod, *, prediction: str = "epsilon", data_range=(-1.0, 1.0),
                 timesteps: str = "continuous"):
        super().__init__(model, prediction, data_range)
        self.schedule = DiscreteVPSchedule(alphas_cumprod, timesteps=timesteps)

    def _label(self, t, y):
        return t if not t.is_floating_point() else t.to(_time_dtype(y))

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, data_range={self.data_range}, {self.schedule.extra_repr()}"


class ContinuousVPScore(_VPAdapter):
    """score_sde's continuous VP model (DDPM++ and NCSN++ VP, DiffPure's CIFAR-10 model).

    As `VPScore` with the continuous schedule (`ContinuousVPSchedule`): t(sigma) solves
    ab(t) = 1 / (1 + (c sigma)^2) and the network's label is `label_scale * t` (999 t for the
    official models, whose official score is -f / sqrt(1 - ab(t))).

    Args:
        model: callable `model(x_t, labels)`, labels float (M,).
        beta_min, beta_max: the VP SDE's beta(t) = beta_min + t (beta_max - beta_min).
        prediction: "epsilon", "v_prediction" or "sample".
        data_range: (-1, 1) for score_sde's centered data.
        label_scale: label = label_scale * t, > 0.

    Raises:
        ValueError: a bad argument; at call time a sigma above the level of t = 1.
    """

    def __init__(self, model, *, beta_min: float = 0.1, beta_max: float = 20.0, prediction: str = "epsilon",
                 data_range=(-1.0, 1.0), label_scale: float = 999.0):
        super().__init__(model, prediction, data_range)
        self.schedule = ContinuousVPSchedule(beta_min=beta_min, beta_max=beta_max)
        self.label_scale = checks.real("label_scale", label_scale, positive=True)

    def _label(self, t, y):
        return (self.label_scale * t).to(_time_dtype(y))

    def extra_repr(self) -> str:
        return (f"prediction={self.prediction!r}, data_range={self.data_range}, label_scale={self.label_scale}, "
                f"{self.schedule.extra_repr()}")


class VEScore(ScoreAdapter):
    """A VE model (score_sde NCSN++, EDM-style denoisers) as this library's score (SPEC 11).

    The model takes its own noise level sigma_m = c sigma directly: f = model(ym, sigma_m) with
    ym = a + c y, and s_m is f ("score"), -f / sigma_m ("epsilon") or (f - ym) / sigma_m^2
    ("sample": a denoiser D predicting x_0); then s(y, sigma) = c s_m.

    Args:
        model: callable `model(ym, sigma_m)`, sigma_m float (M,).
        prediction: "score", "epsilon" or "sample".
        data_range: (0, 1) for score_sde's VE configs (`data.centered = False`).

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(self, model, *, prediction: str = "score", data_range=(0.0, 1.0)):
        super().__init__(model, data_range)
        self.prediction = _prediction(prediction, VE_PREDICTIONS)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _check_sigma(y, sigma)
        c = self.scale
        sig_m = sigma.to(y.dtype) * c
        ym = self.to_model_space(y)
        f = self._model(ym, sig_m.to(_time_dtype(y)))
        sm = sig_m.view(-1, 1, 1, 1)
        if self.prediction == "score":
            s = f
        elif self.prediction == "epsilon":
            s = -f / sm
        else:
            s = (f - ym) / sm**2
        return s * c if c != 1.0 else s

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, data_range={self.data_range}"


class NoisePredictionScore(VEScore):
    """Score of a VE noise-prediction model on [0, 1] data: s(y, sigma) = -model(y, sigma) / sigma.

    For y = x + sigma * eps, the model predicts eps, and Tweedie's formula gives
    grad log p_sigma(y) = -E[eps | y] / sigma. The same as `VEScore(model, prediction="epsilon")`.
    A DDPM (VP) noise predictor is a `VPScore`, not this.

    Args:
        model: callable `model(y, sigma) -> eps_hat` with the shapes of the protocol.

    Raises:
        ValueError: model is not callable.
    """

    def __init__(self, model):
        super().__init__(model, prediction="epsilon", data_range=(0.0, 1.0))


class LabelIndexedScore(nn.Module):
    """Continuous-sigma score from an NCSN-style `model(y, labels)` trained on a sigma ladder.

    Each row takes the ladder level nearest to its sigma in log-space (the ladders are
    geometric, so this is the nearest level in ratio terms; a tie goes to the lower index,
    i.e. the larger sigma on a decreasing ladder), then the output, a score at
    sigmas[label], is rescaled by sigmas[label] / sigma. NCSN outputs are body / sigmas[label],
    so the result is body / sigma: exact for a noise-unconditional body (NCSNv2), the usual
    1/sigma approximation for a label-conditional one (NCSN v1). At a sigma on the ladder it
    equals model(y, labels) up to rounding.

    Args:
        model: callable `model(y, labels) -> score` with labels int64 of shape (M,).
        sigmas: the training ladder, 1-D, finite, positive (tensor or sequence of floats).

    Raises:
        ValueError: model is not callable, or sigmas is empty, not 1-D, not finite or not
            positive.
    """

    def __init__(self, model, sigmas):
        super().__init__()
        checks.function("model", model)
        try:
            ladder = torch.as_tensor(sigmas).detach().clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"sigmas must be a 1-D tensor or sequence of floats, got {sigmas!r}") from None
        if ladder.dim() != 1 or ladder.numel() == 0 or ladder.is_complex() or ladder.dtype == torch.bool:
            raise ValueError(f"sigmas must be a non-empty 1-D real tensor, got {sigmas!r}")
        if not ladder.is_floating_point():
            ladder = ladder.to(torch.get_default_dtype())
        if not bool(torch.isfinite(ladder).all()) or not bool((ladder > 0).all()):
            raise ValueError(f"sigmas must be finite and positive, got {sigmas!r}")
        self.model = model
        self.register_buffer("sigmas", ladder)
        self.register_buffer("log_sigmas", ladder.log())

    def labels(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the ladder level nearest to each sigma in log-space.

        Args:
            sigma: positive noise levels, shape (M,).

        Returns:
            int64 tensor of shape (M,).
        """
        distance = (sigma.to(self.log_sigmas.dtype).log()[:, None] - self.log_sigmas[None, :]).abs()
        return distance.argmin(dim=1)

    def forward(self, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        _check_sigma(y, sigma)
        labels = self.labels(sigma)
        scale = self.sigmas[labels].to(sigma.dtype) / sigma
        return check_output(call_model(self.model, y, labels), y, name="model") * scale.view(-1, 1, 1, 1)


class ScoreAsVPModel(nn.Module):
    """Any score of this library as a VP noise predictor `model(x_t, t)` on a discrete schedule:
    the inverse of `VPScore` (SPEC 11), so VPScore(ScoreAsVPModel(s, ac), ac) is s again.

    At time t with ab = ab_t, x_t / sqrt(ab) = ym + sigma_m eps with sigma_m = sqrt((1 - ab) / ab):
    y = (x_t / sqrt(ab) - a) / c is a [0, 1]-space image at sigma = sigma_m / c, and Tweedie
    gives eps_hat = -sigma * s(y, sigma).

    Args:
        score: callable score(y, sigma); registered when it is an nn.Module.
        alphas_cumprod: the schedule's ab_t, t = 0..T-1.
        data_range: the model space this noise predictor works in, (-1, 1) as DDPM's.

    Raises:
        ValueError: on a bad argument.
    """

    def __init__(self, score, alphas_cumprod, *, data_range=(-1.0, 1.0)):
        super().__init__()
        self.score = checks.function("score", score)
        self.schedule = DiscreteVPSchedule(alphas_cumprod)
        self.data_range = _data_range(data_range)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat at model-space x_t (M, C, H, W) and times t (M,): int64 grid indices or real t."""
        if not isinstance(t, torch.Tensor) or t.shape != (x_t.shape[0],):
            raise ValueError(f"t must be a tensor of shape ({x_t.shape[0]},), got {tuple(getattr(t, 'shape', ()))}")
        a, c = self.data_range[0], self.data_range[1] - self.data_range[0]
        ab = self.schedule.alpha_bar(t).to(x_t.dtype)
        sigma = ((1 - ab) / ab).sqrt() / c
        y = (x_t * ab.rsqrt().view(-1, 1, 1, 1) - a) / c
        s = check_output(call_model(self.score, y, sigma), y)
        return -sigma.view(-1, 1, 1, 1) * s


def vp_alpha_bar(T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02) -> torch.Tensor:
    """The VP (DDPM) schedule alpha_bar_t = prod_{s <= t} (1 - beta_s), linear betas (SPEC 8).

    Timesteps are 1-based: beta_1 = beta_min, ..., beta_T = beta_max, and t = 0 is the clean
    image, so the result has T + 1 entries and is indexed by t directly (entry 0 is 1.0).
    A model trained with DDPM's 0-based indices (index i = our t = i + 1) plugs in through
    `NativeNoisePredictor(model, zero_based=True)`.

    Args:
        T: number of diffusion steps, >= 1.
        beta_min, beta_max: first and last beta, 0 < beta_min <= beta_max < 1.

    Returns:
        float64 tensor (T + 1,) on the CPU, strictly decreasing from 1.0.

    Raises:
        ValueError: a bad argument (named in the message).
    """
    T = checks.integer("T", T, 1)
    beta_min = checks.real("beta_min", beta_min, positive=True)
    beta_max = checks.real("beta_max", beta_max, beta_min)
    if beta_max >= 1:
        raise ValueError(f"beta_max must be < 1, got {beta_max!r}")
    betas = torch.linspace(beta_min, beta_max, T, dtype=torch.float64)
    return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])


class NoisePredictor(nn.Module):
    """Base class of noise predictors eps_hat(xb_t, t) for VP diffusion on [-1, 1] images.

    `forward(xb_t, t)`: xb_t (M, C, H, W), the noised image sqrt(alpha_bar_t) xb +
    sqrt(1 - alpha_bar_t) eps of xb = 2x - 1; t int64 (M,) in 1..T (`vp_alpha_bar`'s
    convention); returns eps_hat of xb_t's shape. `HeteroPurifier` uses an instance of this
    class as it is and wraps anything else as a VE score (`VPNoisePredictor`).
    """


class VPNoisePredictor(NoisePredictor):
    """The noise predictor of a VE score model s(y, sigma) on [0, 1] images (SPEC 8).

    xb_t / sqrt(alpha_bar_t) = xb + sqrt((1 - alpha_bar_t) / alpha_bar_t) eps, so
    y = (xb_t / sqrt(alpha_bar_t) + 1) / 2 = x + sigma' eps with
    sigma' = 0.5 * sqrt((1 - alpha_bar_t) / alpha_bar_t): a VE-noised [0, 1] image. Tweedie
    gives E[eps | y] = -sigma' * grad_y log p_sigma'(y), and eps is the same variable in both
    spaces, so eps_hat(xb_t, t) = -sigma' * s(y, sigma').

    Args:
        score: callable score(y, sigma), y (M, C, H, W) in [0, 1]-space, sigma (M,);
            registered as a submodule when it is an nn.Module.
        T, beta_min, beta_max: the schedule (`vp_alpha_bar`).

    Attributes:
        alpha_bar: float64 buffer (T + 1,), not saved in the state dict (it is a function of
            T, beta_min, beta_max); `.to(dtype)` of the module rounds it like any buffer.

    Raises:
        ValueError: score is not callable, or a bad schedule argument.
    """

    def __init__(self, score, *, T: int = 1000, beta_min: float = 1e-4, beta_max: float = 0.02):
        super().__init__()
        self.score = checks.function("score", score)
        # On the score's device, so that the purifier needs no copy per call (a sync on CUDA);
        # `.to(device)` of this module moves both together afterwards.
        tensors = [*score.parameters(), *score.buffers()] if isinstance(score, nn.Module) else []
        alpha_bar = vp_alpha_bar(T, beta_min, beta_max).to(tensors[0].device if tensors else "cpu")
        self.register_buffer("alpha_bar", alpha_bar, persistent=False)
        self.T, self.beta_min, self.beta_max = T, beta_min, beta_max

    def forward(self, xb_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_hat for xb_t (M, C, H, W) at timesteps t (int64 (M,), values in 1..T, unchecked:
        checking them would sync the device every call; t = 0 is no noise level and gives inf)."""
        _check_timesteps(xb_t, t)
        ab = self.alpha_bar[t]
        sigma = (0.5 * ((1 - ab) / ab).sqrt()).to(xb_t.dtype)
        inv_sqrt_ab = ab.rsqrt().to(xb_t.dtype).view(-1, 1, 1, 1)
        y = (xb_t * inv_sqrt_ab + 1) / 2
        s = check_output(call_model(self.score, y, sigma), y)
        return -sigma.view(-1, 1, 1, 1) * s

    def extra_repr(self) -> str:
        return f"T={self.T}, beta_min={self.beta_min}, beta_max={self.beta_max}"


class NativeNoisePredictor(NoisePredictor):
    """A model that predicts the VP noise itself, eps_hat = model(xb_t, t), used as it is.

    Args:
        model: callable model(xb_t, t) with xb_t (M, C, H, W) in [-1, 1]-space and t int64 (M,).
        zero_based: the model was trained with DDPM's 0-based timestep indices (the DDPM,
            score_sde and guided-diffusion code, where index i means alpha_bar_(i+1) here):
            it is called with t - 1.

    Raises:
        ValueError: model is not callable, or zero_based is not a bool.
    """

    def __init__(self, model, *, zero_based: bool = False):
        super().__init__()
        self.model = checks.function("model", model)
        self.zero_based = checks.flag("zero_based", zero_based)

    def forward(self, xb_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        _check_timesteps(xb_t, t)
        return check_output(call_model(self.model, xb_t, t - 1 if self.zero_based else t), xb_t, name="model")

    def extra_repr(self) -> str:
        return f"zero_based={self.zero_based}"


def _check_timesteps(xb_t: torch.Tensor, t: torch.Tensor) -> None:
    if xb_t.dim() != 4:
        raise ValueError(f"xb_t must have shape (M, C, H, W), got {tuple(xb_t.shape)}")
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (xb_t.shape[0],):
        raise ValueError(f"t must be an int64 tensor of shape ({xb_t.shape[0]},), got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
