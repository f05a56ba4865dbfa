"""The adapters of SPEC 11 (`VPScore`, `ContinuousVPScore`, `VEScore`, diffusers) against closed forms.

Gaussian data x ~ N(mu, s^2) per pixel has a known score at every level, so every adapter is
checked exactly: the model stand-ins below return the exact epsilon, v, x_0 or score of that
Gaussian in the model's own space and time, written here from the formulas (numpy time maps),
not from the library's schedule code.
"""

import math

import numpy as np
import pytest
import torch

from pursamere_fast.scores import (
    ContinuousVPScore,
    ScoreAsVPModel,
    VEScore,
    VPScore,
)
from pursamere_fast.scores.schedules import ContinuousVPSchedule, DiscreteVPSchedule

MU, S = 0.4, 0.15  # the data: N(MU, S^2) per pixel in [0, 1]-space


def exact_score(y, sigma):
    return -(y - MU) / (S**2 + sigma.view(-1, 1, 1, 1) ** 2)


def linear_ac(T=1000, b0=1e-4, b1=0.02):
    return torch.cumprod(1 - torch.linspace(b0, b1, T, dtype=torch.float64), 0)


def cosine_ac(T=1000, s=0.008):
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = [min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def np_discrete_ab(ac, t):
    """ab at real t: log sigma_t = 0.5 log((1 - ab) / ab) interpolated linearly over the grid."""
    ac = ac.numpy()
    log_sigma = np.interp(t, np.arange(len(ac)), 0.5 * np.log((1 - ac) / ac))
    return 1 / (1 + np.exp(2 * log_sigma))


class GaussianVP(torch.nn.Module):
    """The exact prediction of a VP model trained on the Gaussian, in its own data range and time."""

    def __init__(self, ab_of_t, prediction, data_range):
        super().__init__()
        self.ab_of_t, self.prediction = ab_of_t, prediction
        a, b = data_range
        self.m, self.v = a + (b - a) * MU, ((b - a) * S) ** 2

    def forward(self, x_t, t):
        ab = torch.as_tensor(self.ab_of_t(t.detach().cpu().double().numpy()), dtype=x_t.dtype).view(-1, 1, 1, 1)
        r = (x_t - ab.sqrt() * self.m) / (ab * self.v + 1 - ab)
        eps = (1 - ab).sqrt() * r
        x0 = self.m + ab.sqrt() * self.v * r
        if self.prediction == "epsilon":
            return eps
        if self.prediction == "sample":
            return x0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0  # v


class GaussianVE(torch.nn.Module):
    """The exact score / epsilon / x_0 of a VE model trained on the Gaussian in its data range."""

    def __init__(self, prediction, data_range):
        super().__init__()
        a, b = data_range
        self.prediction, self.m, self.v = prediction, a + (b - a) * MU, ((b - a) * S) ** 2

    def forward(self, ym, sigma_m):
        sm = sigma_m.view(-1, 1, 1, 1)
        score = -(ym - self.m) / (self.v + sm**2)
        if self.prediction == "score":
            return score
        if self.prediction == "epsilon":
            return -sm * score
        return ym + sm**2 * score  # Tweedie's x_0


def _y(sigma, seed=0, shape=(2, 3, 4)):
    g = torch.Generator().manual_seed(seed)
    x = MU + S * torch.randn(len(sigma), *shape, generator=g, dtype=torch.float64)
    return x + sigma.view(-1, 1, 1, 1) * torch.randn(x.shape, generator=g, dtype=torch.float64)


SIGMAS = torch.tensor([0.006, 0.03, 0.1, 0.25, 0.8], dtype=torch.float64)
RANGES = [(-1.0, 1.0), (0.0, 1.0), (-2.0, 3.0)]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("data_range", RANGES)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_discrete_vp_adapter_gives_the_exact_gaussian_score(prediction, data_range, schedule):
    ac = linear_ac() if schedule == "linear" else cosine_ac()
    model = GaussianVP(lambda t: np_discrete_ab(ac, t), prediction, data_range)
    score = VPScore(model, ac, prediction=prediction, data_range=data_range)
    sigma = SIGMAS / (data_range[1] - data_range[0]) * 2  # inside every schedule's range
    y = _y(sigma)
    torch.testing.assert_close(score(y, sigma), exact_score(y, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_nearest_timesteps_are_exact_on_the_grid_and_feed_integers(prediction):
    ac = cosine_ac()
    seen = []

    def ab_of_t(t):
        seen.append(t)
        return ac.numpy()[t.astype(np.int64)]

    score = VPScore(GaussianVP(ab_of_t, prediction, (-1, 1)), ac, prediction=prediction, timesteps="nearest")
    t = torch.tensor([0, 17, 250, 999])
    sigma = (((1 - ac[t]) / ac[t]).sqrt() / 2).to(torch.float64)
    y = _y(sigma)
    torch.testing.assert_close(score(y, sigma), exact_score(y, sigma), rtol=1e-9, atol=1e-9)
    assert np.array_equal(seen[-1], t.numpy())


def test_nearest_rounds_the_time_but_builds_x_t_with_the_exact_alpha_bar():
    ac = linear_ac()
    calls = {}

    def model(x_t, t):
        calls["x_t"], calls["t"] = x_t, t
        return torch.zeros_like(x_t)

    sigma = torch.tensor([0.0123], dtype=torch.float64)
    y = _y(sigma)
    VPScore(model, ac, timesteps="nearest")(y, sigma)
    t_real = np.interp(np.log(2 * 0.0123), 0.5 * np.log((1 - ac.numpy()) / ac.numpy()), np.arange(1000))
    assert calls["t"].dtype == torch.int64 and int(calls["t"]) == round(t_real)
    ab = 1 / (1 + (2 * 0.0123) ** 2)
    torch.testing.assert_close(calls["x_t"], math.sqrt(ab) * (2 * y - 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("data_range", RANGES)
def test_continuous_vp_adapter_gives_the_exact_gaussian_score(prediction, data_range):
    b0, b1 = 0.1, 20.0

    def ab_of_label(label):
        t = label / 999.0
        return np.exp(-0.5 * t**2 * (b1 - b0) - t * b0)

    score = ContinuousVPScore(GaussianVP(ab_of_label, prediction, data_range), prediction=prediction,
                              data_range=data_range)
    sigma = SIGMAS / (data_range[1] - data_range[0]) * 2
    y = _y(sigma)
    torch.testing.assert_close(score(y, sigma), exact_score(y, sigma), rtol=1e-9, atol=1e-9)


def test_continuous_vp_time_is_score_sde_s_and_labels_are_999_t():
    labels = {}

    def model(x_t, label):
        labels["label"] = label
        return torch.zeros_like(x_t)

    t = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    # score_sde: std = sqrt(1 - exp(2 lmc)), lmc = -t^2 (b1 - b0) / 4 - t b0 / 2; VE level = std / mean.
    lmc = -0.25 * t**2 * 19.9 - 0.5 * t * 0.1
    sigma_m = torch.sqrt(1 - torch.exp(2 * lmc)) / torch.exp(lmc)
    ContinuousVPScore(model)(torch.rand(4, 1, 2, 2, dtype=torch.float64), sigma_m / 2)
    torch.testing.assert_close(labels["label"], 999 * t, rtol=1e-10, atol=0)


@pytest.mark.parametrize("prediction", ["score", "epsilon", "sample"])
@pytest.mark.parametrize("data_range", RANGES)
def test_ve_adapter_gives_the_exact_gaussian_score(prediction, data_range):
    score = VEScore(GaussianVE(prediction, data_range), prediction=prediction, data_range=data_range)
    y = _y(SIGMAS)
    torch.testing.assert_close(score(y, SIGMAS), exact_score(y, SIGMAS), rtol=1e-10, atol=1e-10)


def test_prediction_aliases_and_bad_arguments():
    ac = linear_ac()
    assert VPScore(lambda x, t: x, ac, prediction="v").prediction == "v_prediction"
    with pytest.raises(ValueError, match="prediction"):
        VPScore(lambda x, t: x, ac, prediction="flow")
    with pytest.raises(ValueError, match="prediction"):
        VEScore(lambda x, t: x, prediction="v_prediction")
    with pytest.raises(ValueError, match="data_range"):
        VEScore(lambda x, t: x, data_range=(1.0, -1.0))
    with pytest.raises(ValueError, match="timesteps"):
        VPScore(lambda x, t: x, ac, timesteps="floor")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPScore(lambda x, t: x, torch.tensor([0.5, 0.7]))
    with pytest.raises(ValueError, match="model"):
        VPScore(None, ac)


def test_sigma_outside_the_schedule_is_a_value_error_naming_the_range():
    score = VPScore(lambda x, t: torch.zeros_like(x), linear_ac())
    lo, hi = (s / 2 for s in score.schedule.sigma_range())
    y = torch.rand(1, 1, 2, 2, dtype=torch.float64)
    score(y, torch.tensor([lo * 1.001], dtype=torch.float64))
    score(y, torch.tensor([hi * 0.999], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"sigma must lie in \["):
        score(y, torch.tensor([lo * 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must lie in"):
        score(y, torch.tensor([hi * 2], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma must lie in"):
        ContinuousVPScore(lambda x, t: torch.zeros_like(x))(y, torch.tensor([1e4], dtype=torch.float64))


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ve_to_vp_to_ve_round_trip(schedule):
    ac = linear_ac() if schedule == "linear" else cosine_ac()
    back = VPScore(ScoreAsVPModel(exact_score, ac), ac)
    y = _y(SIGMAS)
    torch.testing.assert_close(back(y, SIGMAS), exact_score(y, SIGMAS), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_vp_to_ve_to_vp_round_trip(prediction):
    ac = cosine_ac()
    model = GaussianVP(lambda t: ac.numpy()[t.astype(np.int64)] if t.dtype.kind == "i" else np_discrete_ab(ac, t),
                       "epsilon", (-1, 1))
    score = VPScore(GaussianVP(model.ab_of_t, prediction, (-1, 1)), ac, prediction=prediction)
    eps_model = ScoreAsVPModel(score, ac)
    t = torch.tensor([3, 100, 640, 990])
    x_t = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(eps_model(x_t, t), model(x_t, t), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(score.noise_prediction(x_t, t), model(x_t, t), rtol=1e-9, atol=1e-10)


def test_schedules_invert_their_time_maps():
    sched = DiscreteVPSchedule(cosine_ac())
    t = torch.tensor([0.0, 0.5, 17.25, 998.9], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, rtol=0, atol=1e-9)
    cont = ContinuousVPSchedule()
    t = torch.tensor([1e-4, 1e-3, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(cont.sigma_to_t(cont.t_to_sigma(t)), t, rtol=1e-12, atol=0)
