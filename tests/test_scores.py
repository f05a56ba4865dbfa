"""The score(y, sigma) protocol and its adapters."""

import math

import pytest
import torch

from pursamere_fast.scores import LabelIndexedScore, NCSNv2, NCSNv2Score, NoisePredictionScore, ScoreFn

pytestmark = pytest.mark.numerics

MU, S0 = 0.3, 0.5  # 1-D Gaussian data N(MU, S0^2) per pixel: every score is known in closed form


def _gaussian_eps_model(y, sigma):
    """The optimal noise predictor E[eps | y] for y = x + sigma*eps, x ~ N(MU, S0^2)."""
    s = sigma.view(-1, 1, 1, 1)
    return s * (y - MU) / (S0**2 + s**2)


def _gaussian_score(y, sigma):
    s = sigma.view(-1, 1, 1, 1)
    return -(y - MU) / (S0**2 + s**2)


class _LadderModel(torch.nn.Module):
    """NCSN-style model(y, labels) = body(y) / sigmas[labels] with a fixed nonlinear body."""

    def __init__(self, sigmas):
        super().__init__()
        self.register_buffer("sigmas", torch.as_tensor(sigmas, dtype=torch.float32))
        self.calls = []

    @staticmethod
    def body(y):
        return torch.sin(3 * y) - y**2

    def forward(self, y, labels):
        self.calls.append(labels.clone())
        return self.body(y) / self.sigmas[labels].view(-1, 1, 1, 1)


# ---------------------------------------------------------------- protocol

def test_protocol_accepts_adapters_and_plain_functions():
    assert isinstance(NoisePredictionScore(_gaussian_eps_model), ScoreFn)
    assert isinstance(_gaussian_score, ScoreFn)
    assert not isinstance(3.0, ScoreFn)


# ---------------------------------------------------------------- NoisePredictionScore

def test_noise_prediction_gives_the_exact_gaussian_score():
    score = NoisePredictionScore(_gaussian_eps_model)
    y = torch.randn(4, 2, 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.2, 1.0, 7.5], dtype=torch.float64)
    torch.testing.assert_close(score(y, sigma), _gaussian_score(y, sigma), rtol=1e-12, atol=0)


def test_noise_prediction_divides_each_row_by_its_sigma():
    score = NoisePredictionScore(lambda y, sigma: torch.ones_like(y))
    out = score(torch.zeros(3, 1, 2, 2), torch.tensor([0.5, 2.0, 4.0]))
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([-2.0, -0.5, -0.25]))
    assert torch.equal(out, out[:, :1, :1, :1].expand_as(out))


def test_noise_prediction_registers_module_models():
    model = _EpsConv()
    wrapped = NoisePredictionScore(model)
    assert list(wrapped.parameters()) == list(model.parameters())
    y, sigma = torch.rand(2, 1, 3, 3), torch.tensor([0.5, 2.0])
    torch.testing.assert_close(wrapped(y, sigma), -model(y, sigma) / sigma.view(-1, 1, 1, 1), rtol=0, atol=0)


class _EpsConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)

    def forward(self, y, sigma):
        return self.conv(y)


# ---------------------------------------------------------------- LabelIndexedScore

def test_label_is_nearest_in_log_space():
    adapter = LabelIndexedScore(_LadderModel([10.0, 1.0, 0.1]), [10.0, 1.0, 0.1])
    sigma = torch.tensor([5.0, 0.4, 10.0, 1.0, 100.0, 1e-4, math.sqrt(10.0) * 1.001])
    # Linear distance would pick 1, 0.1 for the first two; log distance picks 10, 1.
    assert adapter.labels(sigma).tolist() == [0, 1, 0, 1, 0, 2, 0]


def test_label_indexed_rescales_to_the_requested_sigma():
    ladder = [50.0 * (0.01 / 50.0) ** (i / 9) for i in range(10)]
    model = _LadderModel(ladder)
    adapter = LabelIndexedScore(model, ladder)
    y = torch.rand(5, 2, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.013, 0.7, 3.3, 49.0, 0.02], dtype=torch.float64)
    out = adapter(y, sigma)
    # float64, one rescaling: measured 2.4e-16 relative.
    torch.testing.assert_close(out, model.body(y) / sigma.view(-1, 1, 1, 1), rtol=1e-12, atol=0)
    assert model.calls[-1].tolist() == adapter.labels(sigma).tolist()
    assert model.calls[-1].dtype == torch.int64


def test_label_indexed_on_the_ladder_equals_the_model():
    ladder = torch.tensor([1.0, 0.5, 0.25, 0.125])
    model = _LadderModel(ladder)
    adapter = LabelIndexedScore(model, ladder)
    labels = torch.tensor([3, 0, 2, 1, 1])
    y = torch.rand(5, 1, 3, 3)
    # On the ladder the rescaling factor is 1 up to a log/exp round trip: measured bitwise equal.
    torch.testing.assert_close(adapter(y, ladder[labels]), model(y, labels), rtol=1e-6, atol=0)
    assert model.calls[0].tolist() == labels.tolist()


def test_label_indexed_ncsnv2_matches_its_continuous_score():
    torch.manual_seed(0)
    net = NCSNv2(image_size=8, channels=1, ngf=2, num_classes=6, sigma_begin=1.0, sigma_end=0.05).eval()
    adapter = LabelIndexedScore(net, net.sigmas)
    y = torch.rand(3, 1, 8, 8)
    sigma = torch.tensor([0.9, 0.11, 0.033])
    with torch.no_grad():
        # float32, the same network divided by sigma in two orders: measured 1.3% of the bound
        # (AVX2, SSE4.1, scalar kernels).
        torch.testing.assert_close(adapter(y, sigma), NCSNv2Score(net)(y, sigma), rtol=1e-5, atol=1e-6)


def test_label_indexed_buffers_follow_the_module():
    adapter = LabelIndexedScore(_LadderModel([2.0, 1.0]), [2.0, 1.0])
    assert adapter.sigmas.dtype == torch.float32
    assert set(dict(adapter.named_buffers())) >= {"sigmas", "log_sigmas"}
    assert adapter.double().log_sigmas.dtype == torch.float64


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("sigmas", [[], [[1.0, 0.5]], [1.0, -0.5], [1.0, float("nan")], [0.0], "abc", [True]])
def test_label_indexed_rejects_bad_ladders(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        LabelIndexedScore(_LadderModel([1.0]), sigmas)


def test_label_indexed_accepts_integer_ladders():
    adapter = LabelIndexedScore(_LadderModel([4, 2, 1]), [4, 2, 1])
    assert adapter.sigmas.is_floating_point()


@pytest.mark.parametrize("cls, args", [(NoisePredictionScore, ()), (LabelIndexedScore, ([1.0],))])
def test_adapters_reject_non_callable_models(cls, args):
    with pytest.raises(ValueError, match="model"):
        cls("not a model", *args)


@pytest.mark.parametrize("adapter", [
    NoisePredictionScore(_gaussian_eps_model),
    LabelIndexedScore(_LadderModel([1.0, 0.1]), [1.0, 0.1]),
])
def test_adapters_reject_bad_sigma_and_y_shapes(adapter):
    y = torch.rand(2, 1, 3, 3)
    with pytest.raises(ValueError, match="sigma"):
        adapter(y, torch.tensor(0.5))
    with pytest.raises(ValueError, match="sigma"):
        adapter(y, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="y must"):
        adapter(y[0], torch.tensor([0.5]))


# ---------------------------------------------------------------- with the purifier

def test_ncsnv2_score_drives_purify():
    from pursamere_fast import purify

    torch.manual_seed(0)
    net = NCSNv2(image_size=8, channels=1, ngf=2, num_classes=6, sigma_begin=1.0, sigma_end=0.05).eval()
    x = torch.rand(2, 1, 8, 8)
    out = purify(x, NCSNv2Score(net), backend="reference", sigmas=(0.5, 0.1), steps_per_sigma=1, n_samples=2,
                 rho=0.1, sam_radius=0.02, lr_max=0.05, lr_min=0.01)
    assert out.shape == x.shape
    assert 0 < (out - x).abs().max() <= 0.1 + 1e-6
    assert all(p.grad is None and p.requires_grad for p in net.parameters())
