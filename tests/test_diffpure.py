"""DiffPurePurifier (SPEC 12): the fast path against reference/diffpure.py on the same noise,
the noise modes, batch invariance, the VE -> VP score conversion on Gaussian data whose score
is known, the ODE's convergence in the step count, and the grad modes."""

import copy
import math

import pytest
import torch
from kernel_checks import assert_2x, assert_equal
from pursamere_fast.reference import diffpure_reference

from pursamere_fast.nets import ConvScoreNet
from pursamere_fast.purifiers import DiffPurePurifier
from pursamere_fast.scores import ContinuousVPScore, NonFiniteScoreError

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

# Small enough that the whole file runs in seconds on one core: 8x8 images, a few steps.
SMALL = dict(t_star=0.1, steps=5)


def net(channels=1, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return ConvScoreNet(channels, 4, 2).eval().requires_grad_(False).to(dtype)


def images(b, c=1, h=8, w=8, dtype=torch.float64, seed=0, low=0.0, high=1.0):
    x = torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return low + (high - low) * x


def reference(p, x, noise, score=None, **kw):
    return diffpure_reference(x, score or p.score, noise.to(x.dtype), t_star=p.t_star, steps=p.steps,
                              method=p.method, beta_min=p.beta_min, beta_max=p.beta_max, **kw)


def gaussian_score(mu, s):
    """The exact VE score of x ~ N(mu, s^2 I) in [0, 1]-space: -(y - mu) / (s^2 + sigma^2)."""
    def score(y, sigma):
        return -(y - mu) / (s * s + sigma.view(-1, 1, 1, 1) ** 2)
    return score


class Counting(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, y, sigma):
        self.calls += 1
        return self.inner(y, sigma)


# --- the fast path against the reference ---------------------------------------------------

CASES = [  # (channels, H, W, t_star, steps, method)
    (1, 8, 8, 0.1, 5, "sde"),
    (1, 8, 8, 0.1, 5, "ode"),
    (3, 5, 7, 0.3, 7, "sde"),     # odd sizes, a longer diffusion
    (3, 5, 7, 0.3, 7, "ode"),
    (1, 8, 8, 1.0, 1, "sde"),     # one step from t* = 1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "c{}_{}x{}_t{}_S{}_{}".format(*c))
def test_fast_path_matches_reference(case):
    c, h, w, t_star, steps, method = case
    score = net(c)
    p = DiffPurePurifier(score, t_star=t_star, steps=steps, method=method, seed=5)
    x = images(3, c, h, w)
    noise = p.make_noise(x.shape[1:])
    assert noise.shape == (steps + 1, c, h, w) and noise.dtype == torch.float32
    ref64 = reference(p, x, noise)
    assert not torch.allclose(ref64, x, atol=1e-3), "the purifier must move the images"
    torch.testing.assert_close(p(x, noise), ref64, rtol=0, atol=1e-12)
    torch.testing.assert_close(p(x), ref64, rtol=0, atol=1e-12)  # its own noise is make_noise's

    p32 = DiffPurePurifier(copy.deepcopy(score).float(), t_star=t_star, steps=steps, method=method, seed=5)
    ref32 = reference(p32, x.float(), noise)
    out32 = p32(x.float(), noise)
    assert out32.dtype == torch.float32
    assert_2x("float32", out32, ref32, ref64)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_every_device_matches_the_cpu_float64_reference(device, method, monkeypatch):
    """The noise is drawn on the CPU, so every device purifies with the same noise: the device's
    float32 output is within twice the CPU float32 reference's error of the float64 one."""
    if device.type == "cuda":  # TF32 convolutions would round to 10 bits, not float32's 23
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    score = net()
    x = images(3)
    p = DiffPurePurifier(copy.deepcopy(score).float().to(device), method=method, **SMALL)
    out = p(x.float().to(device))
    assert out.device.type == device.type and out.dtype == torch.float32
    noise = p.make_noise(x.shape[1:])
    ref64 = reference(DiffPurePurifier(score, method=method, **SMALL), x, noise)
    ref32 = reference(DiffPurePurifier(copy.deepcopy(score).float(), method=method, **SMALL), x.float(), noise)
    assert_2x(f"{device.type} float32", out, ref32, ref64)
    xr = x.float().to(device).requires_grad_(True)
    (g,) = torch.autograd.grad(DiffPurePurifier(p.score, method=method, grad_mode="full", **SMALL)(xr).sum(), xr)
    assert g.device.type == device.type and torch.isfinite(g).all()


def test_ode_ignores_the_step_noise_and_sde_uses_it():
    score = net()
    x = images(2)
    for method in ("sde", "ode"):
        p = DiffPurePurifier(score, method=method, **SMALL)
        noise = p.make_noise(x.shape[1:])
        other = noise.clone()
        other[1:] = torch.randn(other[1:].shape, generator=torch.Generator().manual_seed(9))
        same = torch.equal(p(x, noise), p(x, other))
        assert same == (method == "ode"), method


class EpsNet(torch.nn.Module):
    """A tiny score_sde-style continuous VP eps-network f(x_t, label), label = 999 t."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)

    def forward(self, x_t, label):
        return torch.tanh(self.conv(x_t)) * (1 + label.view(-1, 1, 1, 1) / 999)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_continuous_vp_score_round_trip_is_the_official_score(method):
    """DiffPure's own CIFAR-10 model (score_sde continuous VP) through `ContinuousVPScore` and the
    VE -> VP conversion gives the official VP score -f(x, 999 t) / sqrt(1 - ab(t)), up to rounding."""
    f = EpsNet().requires_grad_(False)
    p = DiffPurePurifier(ContinuousVPScore(f), method=method, **SMALL)
    x = images(2)
    noise = p.make_noise(x.shape[1:])

    def official(xt, t):
        ab = math.exp(-0.5 * t * t * 19.9 - 0.1 * t)
        return -f(xt, torch.full((xt.shape[0],), 999 * t, dtype=xt.dtype)) / math.sqrt(1 - ab)

    ref = reference(p, x, noise, vp_score=official)
    assert not torch.allclose(ref, reference(p, x, noise, vp_score=lambda xt, t: 0 * xt), atol=1e-3)
    torch.testing.assert_close(p(x, noise), ref, rtol=0, atol=1e-12)  # measured: 2.2e-16


def test_non_finite_score_names_the_step_and_sigma():
    score = net()
    calls = []

    def bad(y, sigma):
        calls.append(float(sigma[0]))
        s = score(y, sigma)
        return s * float("nan") if len(calls) == 3 else s

    p = DiffPurePurifier(bad, **SMALL)
    with pytest.raises(NonFiniteScoreError, match=r"step 2 \(sigma=" + f"{p._plan[2].sigma:.6g}".replace(".", r"\.")):
        p(images(2))


# --- noise modes, determinism, batch invariance ---------------------------------------------

@pytest.mark.parametrize("method", ["sde", "ode"])
def test_fixed_noise_is_deterministic_batch_invariant_and_seeded(method):
    score = net()
    p = DiffPurePurifier(score, method=method, seed=1, **SMALL)
    x = images(6)
    out = p(x)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert_equal("repeated call", p(x), out)
    assert_equal("same seed", DiffPurePurifier(score, method=method, seed=1, **SMALL)(x), out)
    with torch.inference_mode():
        assert_equal("inference_mode", p(x), out)
    # Every image sees the same noise; 1e-12 leaves room for a convolution whose blocking
    # changes with the batch size.
    torch.testing.assert_close(torch.cat([p(x[:2]), p(x[2:])]), out, rtol=0, atol=1e-12)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    torch.testing.assert_close(p(x[perm]), out[perm], rtol=0, atol=1e-12)
    assert not torch.allclose(DiffPurePurifier(score, method=method, seed=2, **SMALL)(x), out, atol=1e-3)


def test_fresh_noise_differs_between_calls_and_is_reproducible():
    score = net()
    x = images(4)
    p = DiffPurePurifier(score, noise="fresh", seed=3, **SMALL)
    rng = torch.get_rng_state()
    first, second = p(x), p(x)
    assert_equal("global RNG untouched", torch.get_rng_state(), rng)
    assert not torch.allclose(first, second, atol=1e-3)
    # The sequence of draws is the seed's: a new purifier, or reset(), replays it.
    again = DiffPurePurifier(score, noise="fresh", seed=3, **SMALL)
    assert_equal("replayed first", again(x), first)
    assert_equal("replayed second", again(x), second)
    p.reset()
    p(x, p.make_noise(x.shape[1:], seed=8))  # explicit noise does not advance the generator
    assert_equal("reset", p(x), first)
    # Within one call the noise is shared by the batch: a duplicated image gets one result.
    dup = p(torch.cat([x[:1], x[:1]]))
    assert_equal("duplicates", dup[0], dup[1])
    # The first fresh draw is a fixed purifier's noise; explicit noise replaces the draw.
    assert_equal("first draw", first, DiffPurePurifier(score, seed=3, **SMALL)(x))
    noise = p.make_noise(x.shape[1:], seed=11)
    assert_equal("explicit", p(x, noise), DiffPurePurifier(score, seed=11, **SMALL)(x))


# --- the score conversion on Gaussian data ----------------------------------------------------

# x ~ N(MU, S^2) per pixel in [0, 1]-space, 5.0 standard deviations inside [0, 1] on each side,
# so the final clamp binds with probability ~6e-7 per pixel (and clamp=False is checked too).
MU, S = 0.45, 0.09


def test_reverse_sde_returns_the_gaussian_data_marginal():
    """Diffuse data samples to t* and run the reverse SDE with the exact score: the output has
    the data's mean and variance. The pixels of one image are independent samples (the score is
    per pixel and each pixel has its own noise). Euler-Maruyama's own bias at t* = 0.1,
    S = 100 is 3e-5 of the variance (the exact moment recursion of this linear chain), far
    below the Monte-Carlo tolerance of 4 standard errors; a conversion off by a factor fails."""
    n_side = 200
    x = MU + S * torch.randn((1, 1, n_side, n_side), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert 0 < x.min() and x.max() < 1
    score = gaussian_score(MU, S)
    p = DiffPurePurifier(score, t_star=0.1, steps=100, seed=1)
    out = p(x)
    n = out.numel()
    torch.testing.assert_close(out, reference(p, x, p.make_noise(x.shape[1:]), clamp=False), rtol=0, atol=1e-12)
    mean, var = out.mean().item(), out.var().item()
    assert abs(mean - MU) < 4 * S / math.sqrt(n), mean
    assert abs(var / S**2 - 1) < 4 * math.sqrt(2 / n), var / S**2
    # The diffused input alone is far from the marginal: the reverse process is what restores it.
    ab = math.exp(-0.5 * 0.1**2 * 19.9 - 0.1 * 0.1)
    assert (ab * 4 * S**2 + 1 - ab) / 4 / S**2 > 3
    # A score conversion off by a factor of two (the VP score not divided by 2 sqrt(ab)) does
    # not pass the same test.
    wrong = DiffPurePurifier(lambda y, sigma: 2 * score(y, sigma), t_star=0.1, steps=100, seed=1)(x)
    assert abs(wrong.var().item() / S**2 - 1) > 10 * math.sqrt(2 / n)


def test_ode_converges_to_the_exact_flow_like_one_over_steps():
    """On Gaussian data the probability-flow ODE from t* is the affine map that sends the
    marginal at t*, N(sqrt(ab) m, ab v + 1 - ab) in [-1, 1]-space, to the data's N(m, v); Euler's
    error against it falls like 1 / steps."""
    x = images(1, seed=3, low=0.3, high=0.6)
    score = gaussian_score(MU, S)
    t_star = 0.3
    z0 = torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    m, v = 2 * MU - 1, 4 * S**2
    ab = math.exp(-0.5 * t_star**2 * 19.9 - t_star * 0.1)
    x_t = math.sqrt(ab) * (2 * x - 1) + math.sqrt(1 - ab) * z0
    exact = (m + (x_t - math.sqrt(ab) * m) * math.sqrt(v / (ab * v + 1 - ab)) + 1) / 2
    assert 0 < exact.min() and exact.max() < 1
    errors = []
    for steps in (10, 20, 40, 80):
        p = DiffPurePurifier(score, t_star=t_star, steps=steps, method="ode")
        noise = torch.cat([z0[None], torch.zeros((steps, 1, 8, 8), dtype=torch.float64)])
        errors.append((p(x, noise) - exact).abs().max().item())
    # Measured: steps * error = 0.316, 0.330, 0.338, 0.343 (first order, the constant settling).
    ratios = [a / b for a, b in zip(errors[:-1], errors[1:], strict=True)]
    assert all(1.8 < r < 2.2 for r in ratios), (errors, ratios)


# --- grad modes -------------------------------------------------------------------------------

def test_bpda_is_the_identity_backward_with_the_none_value():
    score = net()
    x = images(2).requires_grad_(True)
    w = torch.randn_like(x)
    none = DiffPurePurifier(score, **SMALL)(x)
    with pytest.raises(RuntimeError, match="grad_mode='bpda'"):
        torch.autograd.grad(none.sum(), x)  # "none" names the grad modes that have a gradient
    out = DiffPurePurifier(score, grad_mode="bpda", **SMALL)(x)
    assert_equal("bpda value", out, none)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert_equal("bpda grad", g, w)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_full_gradient_equals_autograd_of_the_reference_and_is_checkpointed(method):
    score = Counting(net())
    x = images(2, seed=8).requires_grad_(True)
    w = torch.randn_like(x)
    p = DiffPurePurifier(score, method=method, grad_mode="full", **SMALL)
    out = p(x)
    assert score.calls == p.steps
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert score.calls == 2 * p.steps  # each step's forward rerun once in the backward
    noise = p.make_noise(x.shape[1:])
    (g_ref,) = torch.autograd.grad((reference(p, x, noise) * w).sum(), x)  # plain autograd, no checkpoint
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert g.abs().sum() > 0 and not torch.allclose(g, w, atol=1e-3)
    for mode in ("full_st", "full_st_proj", "none", "bpda"):
        q = DiffPurePurifier(score, method=method, grad_mode=mode, **SMALL)
        assert_equal(mode, q(x).detach(), out.detach())
    (g_st,) = torch.autograd.grad((DiffPurePurifier(score, method=method, grad_mode="full_st", **SMALL)(x) * w)
                                  .sum(), x)
    assert_equal("full_st", g_st, g)


@pytest.mark.parametrize("method", ["sde", "ode"])
def test_full_gradient_matches_finite_differences(method):
    """A smooth case: the output stays inside (0, 1), so the clamp is the identity."""
    score = net()
    p = DiffPurePurifier(score, t_star=0.05, steps=3, method=method, grad_mode="full", seed=2)
    x = images(1, h=4, w=4, seed=9, low=0.3, high=0.7).requires_grad_(True)
    noise = p.make_noise(x.shape[1:]).double()
    out = p(x, noise)
    assert 0 < out.min() and out.max() < 1
    assert torch.autograd.gradcheck(lambda v: p(v, noise), (x,), eps=1e-6, atol=1e-6)


def test_full_graph_holds_only_each_steps_inputs():
    """The checkpointed graph saves per step only the step's inputs (state, noise row, sigma
    row): the network's activations are not kept, whatever its width, so memory grows by one
    image per step instead of one network's activations per step (measured in
    bench/bench_diffpure.py). Plain autograd through the reference saves far more."""
    x = images(2).requires_grad_(True)
    per_step_inputs = x.numel() + x[0].numel() + x.shape[0]

    def saved_numel(run, *args):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(*args)
        return sum(sizes)

    for width in (4, 16):
        torch.manual_seed(0)
        score = ConvScoreNet(1, width, 3).double().eval().requires_grad_(False)
        full = {s: saved_numel(DiffPurePurifier(score, steps=s, grad_mode="full"), x) for s in (2, 8)}
        assert full[8] - full[2] == 6 * per_step_inputs, (width, full)
        p = DiffPurePurifier(score, steps=2)
        plain = saved_numel(reference, p, x, p.make_noise(x.shape[1:]))
        assert plain - full[2] > 2 * width * x.numel(), (width, plain, full)


def test_full_st_proj_passes_the_clamp_straight_through():
    score = net()
    x = images(4, seed=1).requires_grad_(True)
    settings = dict(t_star=0.3, steps=4)
    out = DiffPurePurifier(score, grad_mode="full", **settings)(x)
    st = DiffPurePurifier(score, grad_mode="full_st_proj", **settings)(x)
    assert_equal("value", st, out)
    clamped = (out.detach() == 0) | (out.detach() == 1)
    assert clamped.any() and not clamped.all(), "pick inputs with some purified values at the clamp"
    w = torch.randn_like(x)
    inside, outside = w * ~clamped, w * clamped
    (g,) = torch.autograd.grad((out * inside).sum(), x, retain_graph=True)
    (g_st,) = torch.autograd.grad((st * inside).sum(), x, retain_graph=True)
    assert_equal("inside", g_st, g)  # a clamp that does not bind is the identity either way
    (g,) = torch.autograd.grad((out * outside).sum(), x, retain_graph=True)
    (g_st,) = torch.autograd.grad((st * outside).sum(), x, retain_graph=True)
    assert not g.any() and g_st.abs().sum() > 0  # a binding clamp blocks "full" only


# --- arguments --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(t_star=0.0), "t_star"), (dict(t_star=1.5), "t_star"), (dict(t_star=float("nan")), "t_star"),
    (dict(steps=0), "steps"), (dict(steps=2.0), "steps"), (dict(method="euler"), "method"),
    (dict(beta_min=0.0), "beta_min"), (dict(beta_max=0.05), "beta_max"), (dict(seed=-1), "seed"),
    (dict(noise="random"), "noise"), (dict(grad_mode="exact"), "grad_mode"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DiffPurePurifier(net(), **{**SMALL, **kwargs})


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="score"):
        DiffPurePurifier("score", **SMALL)
    p = DiffPurePurifier(net(), **SMALL)
    x = images(2)
    for bad in (x[0], x + 2, x - 1, (x * 255).to(torch.uint8), x * float("nan")):
        with pytest.raises(ValueError, match="x"):
            p(bad)
    for noise in (p.make_noise((1, 8, 8))[1:], p.make_noise((1, 8, 7)), p.make_noise((1, 8, 8))[None]):
        with pytest.raises(ValueError, match="noise"):
            p(x, noise)
    for shape, name in (((8, 8), "image_shape"), ((1, 0, 8), "image_shape"), ((1, 8.0, 8), "image_shape")):
        with pytest.raises(ValueError, match=name):
            p.make_noise(shape)
    with pytest.raises(ValueError, match="seed"):
        p.make_noise((1, 8, 8), seed=-1)
    with pytest.raises(ValueError, match="seed"):
        p.reset(seed=1.5)
    bad_score = DiffPurePurifier(lambda y, sigma: y[:, :, :4], **SMALL)
    with pytest.raises(ValueError, match="score"):
        bad_score(x)


# --- the harness's "diffpure" defence kind ---------------------------------------------------

def test_diffpure_defence_kind_under_every_threat():
    """The registry's "diffpure" kind: resolved settings in the description, the cost, the fixed
    noise for the deterministic threats and fresh draws (EoT count in the label) for the
    stochastic ones."""
    from pursamere_fast.attacks import AttackSpec, Defence, run_attack, toy
    from pursamere_fast.attacks.defences import DefenceContext, build_defence, cost

    clf, score = toy.make_classifier(train_steps=30), toy.make_score()
    x, y = toy.synthetic_data(4, seed=1)
    defence = build_defence("diffpure", {"steps": 2, "seed": 5}, DefenceContext(score=score), name="dp")
    assert defence.name == "dp" and defence.description == {
        "kind": "diffpure", "seed": 5, "t_star": 0.1, "steps": 2, "method": "sde", "beta_min": 0.1, "beta_max": 20.0}
    assert cost(defence.description) == 2
    assert_equal("fixed noise", defence.build("none", None)(x), DiffPurePurifier(score, steps=2, seed=5)(x))
    assert_equal("a draw", defence.build("full", 9)(x), DiffPurePurifier(score, steps=2, seed=9)(x))
    assert defence.build("bpda", None).grad_mode == "bpda"
    built = []

    def recording(grad_mode, seed):
        built.append((grad_mode, seed))
        return defence.build(grad_mode, seed)

    watched = Defence(defence.name, recording, defence.description)
    for threat, modes in (("gpgd", {"none"}), ("bpda", {"bpda", "none"}), ("exact", {"full", "none"}),
                          ("bpda_eot", {"bpda", "none"}), ("exact_eot", {"full", "none"})):
        built.clear()
        attack = AttackSpec(threat, "linf", 0.1, 2, eot=2 if threat.endswith("_eot") else 1)
        assert ("eot2" in attack.label) == threat.endswith("_eot")
        x_adv, pred = run_attack(watched, attack, clf, x, y)
        assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6 and pred.shape == y.shape
        assert {m for m, _ in built} == modes, (threat, built)
        # The stochastic threats draw a new seed per call (2 EoT draws per step); the others
        # keep the defence's fixed noise.
        seeds = [s for _, s in built]
        assert (None in seeds) != threat.endswith("_eot") and len(set(seeds)) > 4 * threat.endswith("_eot")
    with pytest.raises(ValueError, match="eot"):
        AttackSpec("exact", "linf", 0.1, 2, eot=2)
    with pytest.raises(ValueError, match="'noise'"):
        build_defence("diffpure", {"noise": "fresh"}, DefenceContext(score=score))
    with pytest.raises(ValueError, match="takes no argument 'stpes'"):
        build_defence("diffpure", {"stpes": 2}, DefenceContext(score=score))
    with pytest.raises(ValueError, match="t_star"):
        build_defence("diffpure", {"t_star": 2.0}, DefenceContext(score=score))


def test_rand_autoattack_check_on_fresh_noise(tmp_path):
    """DiffPure's own 'rand' AutoAttack check: APGD-CE + APGD-DLR with EoT over fresh draws of
    the purifier, judged on a fresh draw, against a suite run of the stochastic threat."""
    from pursamere_fast.attacks import AttackSpec, Defence, toy
    from pursamere_fast.attacks.defences import DefenceContext, build_defence
    from pursamere_fast.attacks.suite import autoattack_check, autoattack_markdown, run_suite

    clf = toy.make_classifier(train_steps=60)
    data = toy.synthetic_data(8, seed=1)
    inner = build_defence("diffpure", {"steps": 2}, DefenceContext(score=toy.make_score()), name="dp")
    built = []

    def recording(grad_mode, seed):
        built.append((grad_mode, seed))
        return inner.build(grad_mode, seed)

    defence = Defence("dp", recording, inner.description)
    out = str(tmp_path)
    run_suite(clf, data, [defence], [AttackSpec("bpda_eot", eps=0.15, steps=2, alpha=0.05, eot=2)], out_dir=out,
              batch_size=8, progress=False)
    built.clear()
    state = torch.random.get_rng_state()
    r = autoattack_check(clf, data, defence, suite_dir=out, norm="linf", eps=0.15, threat="bpda_eot", eot=2,
                         steps=2, batch_size=8, progress=False)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's RNG must be left alone"
    assert r["threat"] == "bpda_eot" and r["eot"] == 2 and r["n"] == 8
    assert r["suite_robust"] - len(r["autoattack_only"]) == r["autoattack_robust"] - len(r["suite_only"])
    # Every call of the attacked and the judging model is a fresh draw (a seed, never the fixed noise).
    seeds = [s for _, s in built]
    assert {m for m, _ in built} == {"bpda", "none"} and None not in seeds and len(set(seeds)) == len(seeds)
    assert (tmp_path / "autoattack.dp.bpda_eot-eot2.jsonl").exists()
    assert autoattack_check(clf, data, defence, suite_dir=out, norm="linf", eps=0.15, threat="bpda_eot", eot=2,
                            steps=2, batch_size=8, progress=False) == r  # resumed from its rows
    assert "EoT 2" in autoattack_markdown([r])
    with pytest.raises(ValueError, match="threat"):
        autoattack_check(clf, data, defence, suite_dir=out, norm="linf", eps=0.15, threat="eot")
