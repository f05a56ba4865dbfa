"""The straight-through gradient estimators (grad modes "full_st", "full_st_proj"; SPEC section 7)
of Purifier and ADPPurifier: the forward value is the exact one, the gradient that of a plain
autograd loop with the named pieces held constant or passed straight through."""

import pytest
import torch
from pursamere_fast.reference import purify_reference
from pursamere_fast.reference.purify import ere, project, sam_perturbation

from pursamere_fast import Purifier, PurifyConfig, make_noise
from pursamere_fast.exact import purify_unrolled
from pursamere_fast.nets import ConvScoreNet
from pursamere_fast.purifier import GRAD_MODES
from pursamere_fast.purifiers import ADPPurifier

pytestmark = pytest.mark.usefixtures("one_thread")

FULL_MODES = ("full", "full_st", "full_st_proj")
# linf with a small rho and inputs on the [0, 1] edges: the projection and the clamp both bind,
# so "full_st_proj" has something to pass through; SAM on, so its second score call is covered.
BINDING = {"sigmas": (0.5, 0.3), "steps_per_sigma": 2, "n_samples": 2, "norm": "linf", "rho": 0.03,
           "sam_radius": 0.02, "lr_max": 0.05, "lr_min": 0.02}


def _score(dtype=torch.float64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ConvScoreNet(1, 4, 2)
    return net.to(dtype).requires_grad_(False)


def _x(b=2, side=5, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((b, 1, side, side), generator=gen, dtype=dtype)
    x[:, :, 0] = 0.0
    x[:, :, -1] = 1.0
    return x


def _cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def _grad(f, x, w):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((f(x) * w).sum(), x)
    return g


def _reference_st(x_adv, score, cfg, noise, proj):
    """The loop of SPEC section 2 in plain autograd (no checkpointing), with Adam's normaliser
    detached and, when `proj`, the projection and clamp as x + (f(x) - x).detach()."""
    b1, b2 = cfg.betas
    x, m, v = x_adv, torch.zeros_like(x_adv), torch.zeros_like(x_adv)
    def ere_grad(z, sigma, eps):
        return torch.autograd.grad(ere(z, score, sigma, eps).sum(), z, create_graph=True)[0]

    for k, (sigma, lr) in enumerate(zip(cfg.step_sigmas(), cfg.step_lrs())):
        g = ere_grad(x, sigma, noise[k])
        if cfg.sam_radius > 0:
            g = ere_grad(x + sam_perturbation(g, cfg.sam_radius, cfg.norm), sigma, noise[k])
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        bc1, bc2 = 1 - b1 ** (k + 1), 1 - b2 ** (k + 1)
        x = x - lr * (m / bc1) / ((v / bc2).sqrt() + cfg.adam_eps).detach()
        bounded = project(x, x_adv, cfg.rho, cfg.norm).clamp(0.0, 1.0)
        x = x + (bounded - x).detach() if proj else bounded
    return x


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_value_is_the_exact_one_bitwise(dtype):
    cfg = PurifyConfig(**BINDING)
    score = _score(dtype)
    x = _x(b=3, dtype=dtype)
    noise = make_noise(cfg, (1, 5, 5), dtype=dtype)
    ref, _ = purify_reference(x.clone(), score, cfg, noise)
    # The reference's layout, as in test_exact: the same building blocks, the same arithmetic.
    plain = {"channels_last": False}
    for mode in FULL_MODES:
        out = Purifier(score, cfg, grad_mode=mode, purify_options=plain)(x.clone().requires_grad_(True), noise)
        assert out.requires_grad
        assert torch.equal(out.detach(), ref), mode
    none = Purifier(score, cfg, grad_mode="none", backend="reference", purify_options=plain)(x, noise)
    assert torch.equal(none, ref)


@pytest.mark.numerics
@pytest.mark.parametrize("mode,proj", [("full_st", False), ("full_st_proj", True)])
def test_gradient_equals_plain_autograd_reference(mode, proj):
    cfg = PurifyConfig(**BINDING)
    score = _score()
    x = _x()
    noise = make_noise(cfg, (1, 5, 5), dtype=torch.float64)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = _grad(lambda t: Purifier(score, cfg, grad_mode=mode)(t, noise), x, w)
    g_ref = _grad(lambda t: _reference_st(t, score, cfg, noise, proj), x, w)
    assert bool(torch.isfinite(g).all())
    # float64; the checkpointed backward sums the same terms in another order.
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.numerics
def test_estimators_change_the_gradient():
    cfg = PurifyConfig(**BINDING)
    score = _score()
    x = _x()
    noise = make_noise(cfg, (1, 5, 5), dtype=torch.float64)
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g = {m: _grad(lambda t, m=m: purify_unrolled(t, score, cfg, noise, straight_through=m), x, w)
         for m in (None, "adam", "adam_proj")}
    # A flag that were ignored would give cosine 1 up to rounding (1e-16 in float64).
    assert _cosine(g[None], g["adam"]) < 1 - 1e-6
    assert _cosine(g["adam"], g["adam_proj"]) < 1 - 1e-6


def test_bad_grad_mode_and_straight_through():
    with pytest.raises(ValueError, match="grad_mode"):
        Purifier(_score(), grad_mode="full_st_clamp")
    with pytest.raises(ValueError, match="straight_through"):
        purify_unrolled(_x(), _score(), PurifyConfig(**BINDING), straight_through="proj")
    with pytest.raises(ValueError, match=r"purify_options \['compile_score'\]"):
        Purifier(_score(), grad_mode="full_st_proj", purify_options={"compile_score": True})


def _adp(score, grad_mode):
    # noise_std 0.3 on inputs at 0 and 1: both clamps bind.
    return ADPPurifier(score, sigma=0.3, noise_std=0.3, steps=2, seed=1, grad_mode=grad_mode)


def _adp_reference_st(x, score):
    """ADP's steps in plain autograd with both clamps as y + (clamp(y) - y).detach()."""
    adp = _adp(score, "none")
    noise = torch.randn(x.shape[1:], generator=torch.Generator("cpu").manual_seed(adp.seed),
                        dtype=torch.float32).to(x.dtype)
    y = x + adp.noise_std * noise
    y = y + (y.clamp(0, 1) - y).detach()
    sig = torch.full((x.shape[0],), adp.sigma, dtype=x.dtype)
    for _ in range(adp.steps):
        y = y + adp.alpha * adp.sigma**2 * score(y, sig)
    return y + (y.clamp(0, 1) - y).detach()


@pytest.mark.numerics
def test_adp_grad_modes():
    assert set(GRAD_MODES) == {"none", "bpda", "full", "full_st", "full_st_proj"}
    score = _score()
    x = _x()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ref = _adp(score, "none")(x)
    for mode in GRAD_MODES:
        assert torch.equal(_adp(score, mode)(x.clone().requires_grad_(True)).detach(), ref), mode
    g = {m: _grad(_adp(score, m), x, w) for m in FULL_MODES}
    # No Adam in ADP: "full_st" is "full", the same ops.
    assert torch.equal(g["full_st"], g["full"])
    torch.testing.assert_close(g["full_st_proj"], _grad(lambda t: _adp_reference_st(t, score), x, w),
                               rtol=1e-12, atol=1e-14)
    assert _cosine(g["full"], g["full_st_proj"]) < 1 - 1e-6
    with pytest.raises(ValueError, match="grad_mode"):
        ADPPurifier(score, grad_mode="exact_st")
