"""Hostile inputs to purify / PurifyConfig / Purifier / make_noise: each gets a ValueError naming
the argument and value, a NonFiniteScoreError naming the first bad step, or a warning; never a
silent wrong answer or an error from deep inside autograd. The table doubles as documentation:
`python -m pytest tests/test_hostile_inputs.py -v` lists every case."""

import re
import warnings

import pytest
import torch
from torch import nn

from pursamere_fast import NonFiniteScoreError, Purifier, PurifyConfig, geometric_sigmas, make_noise, purify
from pursamere_fast.exact import purify_unrolled
from pursamere_fast.nets import ConvScoreNet

SHAPE = (2, 1, 5, 6)
CFG = dict(sigmas=(0.2, 0.1), steps_per_sigma=2, n_samples=2, rho=0.05, sam_radius=0.02, lr_max=0.02, lr_min=0.005)


def x0():
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(0))


def cfg(**kw):
    return PurifyConfig(**{**CFG, **kw})


def net():
    torch.manual_seed(0)
    return ConvScoreNet(1, width=4, depth=2)


def gaussian(y, sigma):
    return -(y - 0.5) / (0.04 + sigma.view(-1, 1, 1, 1) ** 2)


CONFIG_CASES = [
    ("adam_eps=0 (0/0 where the gradient is zero)", dict(adam_eps=0.0), "adam_eps"),
    ("lr_min > lr_max (a rising schedule)", dict(lr_min=0.1, lr_max=0.01), "lr_min"),
    ("lr_max=0 (a purifier that does nothing)", dict(lr_max=0.0, lr_min=0.0), "lr_max"),
    ("sigmas as a string", dict(sigmas="54"), "sigmas"),
    ("sigmas as a dict", dict(sigmas={0.2: 1, 0.1: 2}), "sigmas"),
    ("sigmas as a set", dict(sigmas={0.2, 0.1}), "sigmas"),
    ("sigmas as a 2-D tensor", dict(sigmas=torch.tensor([[0.2, 0.1]])), "sigmas"),
    ("sigmas with a bool", dict(sigmas=(True, 0.1)), "sigmas"),
    ("sigmas with NaN", dict(sigmas=(0.2, float("nan"))), "sigmas"),
    ("sigmas rising", dict(sigmas=(0.1, 0.2)), "sigmas"),
    ("betas a float", dict(betas=0.9), "betas"),
    ("betas of three", dict(betas=(0.9, 0.99, 0.999)), "betas"),
    ("betas 1.0", dict(betas=(0.9, 1.0)), "betas"),
    ("seed 2**70 (overflows the generator)", dict(seed=2**70), "seed"),
    ("seed negative", dict(seed=-1), "seed"),
    ("seed a float", dict(seed=1.0), "seed"),
    ("n_samples True", dict(n_samples=True), "n_samples"),
    ("steps_per_sigma 1.5", dict(steps_per_sigma=1.5), "steps_per_sigma"),
    ("max_batch 0", dict(max_batch=0), "max_batch"),
    ("rho Inf", dict(rho=float("inf")), "rho"),
    ("rho 16 with norm linf (a missing /255)", dict(rho=16.0), "rho"),
    ("rho a string", dict(rho="0.1"), "rho"),
    ("sam_radius negative", dict(sam_radius=-0.01), "sam_radius"),
    ("norm ['linf']", dict(norm=["linf"]), "norm"),
    ("norm 'L2'", dict(norm="L2"), "norm"),
]


@pytest.mark.parametrize("case, fields, arg", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_names_the_field(case, fields, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must") as info:
        cfg(**fields)
    assert "got" in str(info.value)
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        purify(x0(), gaussian, cfg(), **fields)


def test_config_canonicalises_types():
    import numpy as np

    c = cfg(sigmas=np.array([0.2, 0.1]), seed=np.int64(3), rho=0, betas=[0.5, 0.9])
    assert c.sigmas == (0.2, 0.1) and type(c.seed) is int and type(c.rho) is float and c.betas == (0.5, 0.9)
    assert c == cfg(sigmas=(0.2, 0.1), seed=3, rho=0.0, betas=(0.5, 0.9))


def _detached(y, sigma):
    return gaussian(y, sigma).detach()


def _no_grad_score(y, sigma):
    with torch.no_grad():
        return gaussian(y, sigma)


CALL_CASES = [
    ("score not callable", lambda: purify(x0(), "ncsnv2", cfg()), r"^score must be callable"),
    ("score returns a detached tensor", lambda: purify(x0(), _detached, cfg()), r"does not depend on its input"),
    ("score computed under no_grad", lambda: purify(x0(), _no_grad_score, cfg()), r"does not depend on its input"),
    ("score returns a constant", lambda: purify(x0(), lambda y, s: torch.zeros_like(y), cfg()),
     r"does not depend on its input"),
    ("score returns an int tensor", lambda: purify(x0(), lambda y, s: (y * 10).long(), cfg()),
     r"^score must return a floating"),
    # A tuple's first element is the output (SPEC 11: models that return tuples are unwrapped).
    ("score returns a tuple of None", lambda: purify(x0(), lambda y, s: (None,), cfg()),
     r"^score must return a floating"),
    ("score returns a string", lambda: purify(x0(), lambda y, s: "score", cfg()), r"^score must return a floating"),
    ("score returns the wrong shape", lambda: purify(x0(), lambda y, s: y[:, :, :2], cfg()), r"score returned shape"),
    ("score detached, reference backend", lambda: purify(x0(), _detached, cfg(), backend="reference"),
     r"does not depend on its input"),
    ("score detached, exact gradient", lambda: purify_unrolled(x0().requires_grad_(), _detached, cfg()),
     r"does not depend on its input"),
    ("config a dict", lambda: purify(x0(), gaussian, {"rho": 0.1}), r"^config must be a PurifyConfig"),
    ("config an empty dict (falsy)", lambda: purify(x0(), gaussian, {}), r"^config must be a PurifyConfig"),
    ("return_ere 'yes'", lambda: purify(x0(), gaussian, cfg(), return_ere="yes"), r"^return_ere must be True or"),
    ("backend 'cuda'", lambda: purify(x0(), gaussian, cfg(), backend="cuda"), r"^backend must be one of"),
    ("cuda_graph 'yes'", lambda: purify(x0(), gaussian, cfg(), cuda_graph="yes"), r"^cuda_graph must be"),
    ("channels_last 1", lambda: purify(x0(), gaussian, cfg(), channels_last=1), r"^channels_last must be True"),
    ("score_dtype float16", lambda: purify(x0(), gaussian, cfg(), score_dtype=torch.float16), r"^score_dtype"),
    ("x_adv a numpy array", lambda: purify(x0().numpy(), gaussian, cfg()), r"^x_adv must be a torch.Tensor"),
    ("x_adv 3-D", lambda: purify(x0()[0], gaussian, cfg()), r"^x_adv must have shape"),
    ("x_adv uint8", lambda: purify((x0() * 255).byte(), gaussian, cfg()), r"^x_adv must be a floating"),
    ("x_adv empty", lambda: purify(x0()[:0], gaussian, cfg()), r"^x_adv must not be empty"),
    ("x_adv in [0, 255]", lambda: purify(x0() * 255, gaussian, cfg()), r"^x_adv must lie in \[0, 1\]"),
    ("x_adv with NaN", lambda: purify(x0().masked_fill(x0() > 0.5, float("nan")), gaussian, cfg()),
     r"^x_adv contains NaN"),
    ("noise of the wrong shape", lambda: purify(x0(), gaussian, cfg(), noise=torch.randn(3, 2, 1, 5, 6)),
     r"^noise must have shape"),
    ("noise an int tensor", lambda: purify(x0(), gaussian, cfg(), noise=torch.ones(4, 2, 1, 5, 6, dtype=torch.long)),
     r"^noise must be a floating"),
    ("noise with Inf", lambda: purify(x0(), gaussian, cfg(), noise=torch.full((4, 2, 1, 5, 6), float("inf"))),
     r"^noise contains NaN or Inf"),
    ("unknown override", lambda: purify(x0(), gaussian, cfg(), nsamples=3), r"unknown PurifyConfig field"),
    ("Purifier grad_mode 'exact'", lambda: Purifier(gaussian, cfg(), grad_mode="exact"), r"^grad_mode must be"),
    ("Purifier score None", lambda: Purifier(None, cfg()), r"^score must be callable"),
    ("Purifier full with compile_score", lambda: Purifier(gaussian, cfg(), grad_mode="full",
                                                          purify_options={"compile_score": True}),
     r"^purify_options \['compile_score'\] do not apply"),
    ("chunk_rows 0", lambda: purify(x0(), gaussian, cfg(), chunk_rows=0), r"^chunk_rows must be an integer >= 1"),
    ("channels_last 'yes'", lambda: purify(x0(), gaussian, cfg(), channels_last="yes"), r"^channels_last must be"),
    ("Purifier config a dict", lambda: Purifier(gaussian, {"rho": 0.1}), r"^config must be a PurifyConfig"),
    ("make_noise of a dict", lambda: make_noise({"seed": 0}, (1, 5, 6)), r"^config must be a PurifyConfig"),
    ("make_noise image_shape floats", lambda: make_noise(cfg(), (1.0, 5, 6)), r"^image_shape"),
    ("geometric_sigmas n=0", lambda: geometric_sigmas(1.0, 0.1, 0), r"^n must be an integer >= 1"),
    ("geometric_sigmas sigma_min=0", lambda: geometric_sigmas(1.0, 0.0, 3), r"^sigma_min must be"),
]


@pytest.mark.parametrize("case, call, message", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_bad_call_raises_a_clear_value_error(case, call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert re.search(message, str(info.value)), str(info.value)


def _nan_grad_score(y, sigma):
    # Finite output, NaN input-gradient once sigma is small: sqrt has an infinite derivative
    # at 0 and 0 * inf is NaN.
    big = (sigma >= 0.15).view(-1, 1, 1, 1).to(y.dtype)
    return gaussian(y, sigma) + torch.sqrt(y * 0.0 + big) - big


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_nan_input_gradient_is_reported_not_returned(backend):
    # Before: finite ERE trace, NaN images handed back.
    with pytest.raises(NonFiniteScoreError, match="gradient through the score") as info:
        purify(x0(), _nan_grad_score, cfg(), backend=backend)
    assert re.search(r"step 2 \(sigma=0\.1\)", str(info.value)), str(info.value)


def test_nan_input_gradient_in_the_exact_path_is_reported():
    with pytest.raises(NonFiniteScoreError, match="gradient through the score") as info:
        purify_unrolled(x0(), _nan_grad_score, cfg())
    assert "step 2 (sigma=0.1)" in str(info.value)


@pytest.mark.parametrize("layer", [nn.BatchNorm2d(1), nn.Dropout(0.1)], ids=["BatchNorm2d", "Dropout"])
def test_score_in_training_mode_warns(layer):
    module_score = _Wrapped(nn.Sequential(layer, ConvScoreNet(1, width=4, depth=2)))
    with pytest.warns(RuntimeWarning, match=type(layer).__name__ + ".*call score.eval"):
        purify(x0(), module_score, cfg(), backend="torch")
    module_score.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        purify(x0(), module_score, cfg(), backend="torch")


class _Wrapped(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, y, sigma):
        return self.model[1](self.model[0](y), sigma)


def test_training_mode_without_batchnorm_or_dropout_is_fine():
    score = net().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        purify(x0(), score, cfg(), backend="torch")
