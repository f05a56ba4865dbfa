"""End-to-end purify(): every backend against the float64 reference, and the API's promises."""

import pytest
import torch
from pursamere_fast.reference import purify_reference

from pursamere_fast import NonFiniteScoreError, Purifier, PurifyConfig, make_noise, purify
from pursamere_fast.nets import ConvScoreNet

pytestmark = pytest.mark.numerics

SHAPE = (3, 2, 5, 7)  # B, C, H, W: D = 70, odd, so every kernel's tail is exercised

CONFIGS = {
    "linf_sam": dict(norm="linf", sam_radius=0.02, steps_per_sigma=2),
    "l2_sam": dict(norm="l2", rho=0.3, sam_radius=0.1, steps_per_sigma=2),
    "linf_nosam": dict(norm="linf", sam_radius=0.0, steps_per_sigma=1),
    "l2_nosam": dict(norm="l2", rho=0.3, sam_radius=0.0, steps_per_sigma=3),
    "single_step": dict(sigmas=(0.1,), steps_per_sigma=1, sam_radius=0.02),
}


def small_config(**kw):
    base = dict(sigmas=(0.2, 0.1, 0.05), steps_per_sigma=2, n_samples=3, rho=0.05, lr_max=0.02, lr_min=0.005)
    base.update(kw)
    return PurifyConfig(**base)


def make_score(dtype=torch.float32, channels=SHAPE[1]):
    torch.manual_seed(0)
    return ConvScoreNet(channels, width=8, depth=3).to(dtype)


def make_images(shape=SHAPE, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)


def reference64(x, score, cfg):
    score64 = make_score(torch.float64, x.shape[1]) if isinstance(score, ConvScoreNet) else score
    noise = make_noise(cfg, x.shape[1:], dtype=torch.float64)
    return purify_reference(x.double(), score64, cfg, noise)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_torch_backend_float64_equals_reference(name):
    cfg = small_config(**CONFIGS[name])
    x = make_images(dtype=torch.float64)
    score = make_score(torch.float64)
    ref, ref_ere = reference64(x, score, cfg)
    out, ere = purify(x, score, cfg, backend="torch", return_ere=True)
    # float64, the same arithmetic in another order: measured 1.1e-16..2.2e-16 (AVX-512, AVX2,
    # scalar kernels); 1e-9 leaves room for the K-step amplification float32 would show.
    assert (out - ref).abs().max().item() <= 1e-9
    assert (ere - ref_ere).abs().max().item() <= 1e-9 * ref_ere.abs().max().item()


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_backends_within_2x_rule(backend, name):
    cfg = small_config(**CONFIGS[name])
    x32 = make_images()
    ref64, _ = reference64(x32, make_score(), cfg)
    ref32, _ = purify_reference(x32, make_score(), cfg, make_noise(cfg, x32.shape[1:]))
    out = purify(x32, make_score(), cfg, backend=backend)
    ref_err = (ref32.double() - ref64).abs().max().item()
    err = (out.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"{backend}: err {err:.3g} vs float32 reference err {ref_err:.3g}"


def test_default_noise_follows_spec():
    cfg = small_config()
    expected = torch.randn((cfg.num_steps, cfg.n_samples, 2, 5, 7),
                           generator=torch.Generator("cpu").manual_seed(cfg.seed), dtype=torch.float32)
    assert torch.equal(make_noise(cfg, (2, 5, 7)), expected)
    x, score = make_images(), make_score()
    assert torch.equal(purify(x, score, cfg, backend="torch"),
                       purify(x, score, cfg, noise=expected, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_output_inside_ball_and_unit_box(backend):
    for norm, rho in (("linf", 0.03), ("l2", 0.1)):
        cfg = small_config(norm=norm, rho=rho, lr_max=0.2, lr_min=0.1)
        x = make_images()
        out = purify(x, make_score(), cfg, backend=backend)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out.min() >= 0 and out.max() <= 1
        delta = (out - x).flatten(1)
        dist = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert (dist <= rho + 1e-6).all(), dist
        assert (dist > 0).any()


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_rho_zero_returns_input(backend):
    x = make_images()
    for norm in ("linf", "l2"):
        assert torch.equal(purify(x, make_score(), small_config(rho=0.0, norm=norm), backend=backend), x)


def test_input_not_modified_and_calls_bitwise_equal():
    x = make_images()
    before = x.clone()
    a = purify(x, make_score(), small_config(), backend="torch")
    b = purify(x, make_score(), small_config(), backend="torch")
    assert torch.equal(x, before)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_invariance(backend):
    x = make_images()
    cfg = small_config()
    full = purify(x, make_score(), cfg, backend=backend)
    # The loop is per image; only the score network's convolution algorithm may change with the
    # batch size, and K Adam steps amplify its rounding: measured <= 6e-8 under AVX-512, AVX2,
    # SSE4.1 and scalar kernels. 1e-6 is 17x that and 10^4x below a real mix-up of images.
    for i in range(x.shape[0]):
        torch.testing.assert_close(purify(x[i:i + 1], make_score(), cfg, backend=backend), full[i:i + 1],
                                   rtol=0, atol=1e-6)
    chunked = purify(x, make_score(), cfg, backend=backend, max_batch=2)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-6)


def test_works_under_no_grad_and_inference_mode():
    x, score, cfg = make_images(), make_score(), small_config()
    expected = purify(x, score, cfg, backend="torch")
    with torch.no_grad():
        assert torch.equal(purify(x, score, cfg, backend="torch"), expected)
    with torch.inference_mode():
        xi = x.clone()
        assert torch.equal(purify(xi, score, cfg, backend="torch"), expected)


def test_score_parameters_untouched():
    score = make_score()
    score.body[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in score.parameters()]
    purify(make_images(), score, small_config(), backend="torch")
    assert [p.requires_grad for p in score.parameters()] == flags
    assert all(p.grad is None for p in score.parameters())


def test_plain_function_score_and_ere_trace():
    # Gaussian data N(0.5, tau^2): the exact score is -(y - 0.5) / (tau^2 + sigma^2).
    tau2 = 0.04

    def score(y, sigma):
        return -(y - 0.5) / (tau2 + sigma.view(-1, 1, 1, 1) ** 2)

    cfg = small_config(sam_radius=0.0)
    x = make_images(dtype=torch.float64)
    out, ere = purify(x, score, cfg, backend="torch", return_ere=True)
    _, ref_ere = purify_reference(x, score, cfg, make_noise(cfg, x.shape[1:], dtype=torch.float64))
    assert ere.shape == (x.shape[0], cfg.num_steps)
    # float64 with a closed-form score: measured 4e-16 relative.
    torch.testing.assert_close(ere, ref_ere, rtol=1e-12, atol=0)
    # Purification lowers the ERE at the last sigma relative to the input's.
    _, ere_in = purify(x, score, cfg.with_overrides(rho=0.0), backend="torch", return_ere=True)
    assert (ere[:, -1] < ere_in[:, -1]).all()


def test_bpda_purifier_backward_is_identity():
    pur = Purifier(make_score(), small_config(), grad_mode="bpda", backend="torch")
    x = make_images().requires_grad_(True)
    out = pur(x)
    assert torch.equal(out.detach(), purify(x.detach(), make_score(), small_config(), backend="torch"))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.equal(grad, upstream)


def test_none_purifier_returns_no_graph():
    pur = Purifier(make_score(), small_config(), backend="torch")
    x = make_images().requires_grad_(True)
    out = pur(x)
    # No gradient through the purification: a backward names the grad modes that have one
    # (issue 40) instead of torch's "appears to not have been used in the graph".
    with pytest.raises(RuntimeError, match="grad_mode='bpda'.*grad_mode='full'"):
        torch.autograd.grad(out.sum(), x)
    with torch.no_grad():
        assert not pur(x).requires_grad
    assert isinstance(pur.score, torch.nn.Module) and "score" in dict(pur.named_children())


def test_nonfinite_score_names_step_and_sigma():
    def score(y, sigma):
        bad = (sigma < 0.07).view(-1, 1, 1, 1)
        return torch.where(bad, torch.full_like(y, float("nan")), -y)

    cfg = small_config()
    for backend in ("torch", "reference"):
        with pytest.raises(NonFiniteScoreError, match=r"step 4 \(sigma=0\.05\)"):
            purify(make_images(), score, cfg, backend=backend)


BAD_INPUTS = [
    (lambda x: x[0], "x_adv", "ndim"),
    (lambda x: (x * 255).to(torch.uint8), "x_adv", "dtype"),
    (lambda x: x.masked_fill(x > 0.9, float("nan")), "x_adv", "NaN"),
    (lambda x: x + 0.5, "x_adv", r"\[0, 1\]"),
    (lambda x: x - x.min() - 1e-5, "x_adv", r"\[0, 1\]"),
]


@pytest.mark.parametrize("mutate,arg,what", BAD_INPUTS)
def test_bad_images_raise(mutate, arg, what):
    with pytest.raises(ValueError, match=arg) as info:
        purify(mutate(make_images()), make_score(), small_config())
    assert __import__("re").search(what, str(info.value))


def test_values_within_tolerance_of_box_are_accepted():
    x = make_images()
    x[0, 0, 0, 0] = 1 + 5e-7
    out = purify(x, make_score(), small_config(), backend="torch")
    assert out.max() <= 1


@pytest.mark.parametrize("field,value", [
    ("rho", -0.1), ("sigmas", (0.1, 0.2)), ("sigmas", (0.1, 0.1)), ("sigmas", (0.1, -0.01)), ("sigmas", ()),
    ("n_samples", 0), ("steps_per_sigma", 0), ("norm", "l1"), ("sam_radius", -1.0), ("max_batch", 0),
    ("betas", (0.9, 1.0)), ("lr_max", float("nan")),
])
def test_bad_config_raises(field, value):
    with pytest.raises(ValueError, match=field):
        small_config(**{field: value})
    with pytest.raises(ValueError, match=field):
        purify(make_images(), make_score(), small_config(), **{field: value})


def test_unknown_override_and_backend_raise():
    with pytest.raises(ValueError, match="unknown PurifyConfig field"):
        purify(make_images(), make_score(), small_config(), nsamples=3)
    with pytest.raises(ValueError, match="backend"):
        purify(make_images(), make_score(), small_config(), backend="cuda")
    with pytest.raises(ValueError, match="grad_mode"):
        Purifier(make_score(), grad_mode="exact")


def test_bad_noise_raises():
    cfg = small_config()
    good = make_noise(cfg, SHAPE[1:])
    with pytest.raises(ValueError, match="noise"):
        purify(make_images(), make_score(), cfg, noise=good[:-1])
    with pytest.raises(ValueError, match="noise"):
        purify(make_images(), make_score(), cfg, noise=good.masked_fill(good > 2, float("inf")))


def test_score_with_wrong_shape_raises():
    def score(y, sigma):
        return y[:, :1]

    with pytest.raises(ValueError, match="score returned shape"):
        purify(make_images(), score, small_config(), backend="torch")
