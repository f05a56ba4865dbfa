"""HeteroPurifier and its parts (SPEC 8): the VE -> VP adapter, the saliency mask, the sampler
against reference/hetero.py, determinism, batch invariance, purify_runs, grad modes."""

import copy
import math

import pytest
import torch
from kernel_checks import assert_2x, assert_equal
from pursamere_fast.reference import hetero_reference
from torch import nn

from pursamere_fast.nets import ConvScoreNet, SmallCNN
from pursamere_fast.purifiers import (
    SALIENCY_STAGES,
    HeteroNoise,
    HeteroPurifier,
    ddim_step,
    saliency_map,
    saliency_mask,
)
from pursamere_fast.scores import NativeNoisePredictor, NoisePredictor, VPNoisePredictor, VPScore, vp_alpha_bar
from pursamere_fast.scores.schedules import DiscreteVPSchedule

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

# Small enough that the whole file runs in seconds on one core: 8x8 images, 4 grid steps.
SMALL = dict(t_l=40, t_s=20, resample_steps=2, grid_steps=100)


def nets(channels=1, side=8, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    score = ConvScoreNet(channels, 4, 2).eval().requires_grad_(False).to(dtype)
    classifier = SmallCNN(channels, 10, 4, side).eval().requires_grad_(False).to(dtype)
    return score, classifier


def images(b, c=1, h=8, w=8, dtype=torch.float64, seed=0):
    return torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(p, x, noise, mask, eps_model=None):
    return hetero_reference(x, eps_model or p.noise_predictor, mask, [n.to(x.dtype) for n in noise], t_l=p.t_l,
                            t_s=p.t_s, stride=p.stride, resample_steps=p.resample_steps)


# --- schedule, DDIM step, adapter ---------------------------------------------------------

def test_vp_alpha_bar_is_one_based_with_the_clean_image_at_zero():
    ab = vp_alpha_bar()
    assert ab.dtype == torch.float64 and ab.shape == (1001,)
    assert ab[0] == 1.0 and ab[1] == 1 - 1e-4
    assert math.isclose(ab[1000], math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(1000)), rel_tol=1e-12)
    assert (ab[1:] < ab[:-1]).all()
    with pytest.raises(ValueError, match="beta_max"):
        vp_alpha_bar(10, 0.1, 1.0)


def test_ddim_step_recovers_the_noise_trajectory():
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 2, 3, 4, 5, generator=gen, dtype=torch.float64)
    for ab_t, ab_prev in ((0.3, 0.7), (0.5, 1.0), (0.9, 0.9)):
        x_t = math.sqrt(ab_t) * x0 + math.sqrt(1 - ab_t) * eps
        want = math.sqrt(ab_prev) * x0 + math.sqrt(1 - ab_prev) * eps
        torch.testing.assert_close(ddim_step(x_t, eps, ab_t, ab_prev), want, rtol=0, atol=1e-14)
        as_tensors = [torch.tensor(ab, dtype=torch.float64) for ab in (ab_t, ab_prev)]
        torch.testing.assert_close(ddim_step(x_t, eps, *as_tensors), want, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="ab_prev"):
        ddim_step(x0, eps, 0.5, 0.0)


def test_ve_to_vp_adapter_is_the_posterior_mean_noise_of_a_gaussian():
    """Data x ~ N(mu, s^2) per pixel in [0, 1]-space: the VE score is known in closed form, and
    so is E[eps | xb_t] in VP space (xb = 2x - 1 ~ N(2mu - 1, 4s^2)):
    E[eps | xb_t] = sqrt(1 - ab) (xb_t - sqrt(ab)(2mu - 1)) / (4 s^2 ab + 1 - ab)."""
    mu, s2 = 0.3, 0.05

    def score(y, sigma):
        return -(y - mu) / (s2 + sigma.view(-1, 1, 1, 1) ** 2)

    eps_model = VPNoisePredictor(score)
    xb_t = torch.randn(5, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.5
    ab_all = vp_alpha_bar()
    for steps in ((1, 1, 1, 1, 1), (10, 200, 500, 999, 1000)):
        t = torch.tensor(steps)
        ab = ab_all[t].view(-1, 1, 1, 1)
        want = (1 - ab).sqrt() * (xb_t - ab.sqrt() * (2 * mu - 1)) / (4 * s2 * ab + 1 - ab)
        torch.testing.assert_close(eps_model(xb_t, t), want, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="t must"):
        eps_model(xb_t, t.int())
    # The schedule is a buffer (it moves with the module) but not state: it follows from T and the betas.
    assert "alpha_bar" in dict(eps_model.named_buffers()) and not eps_model.state_dict()


def test_native_noise_predictor_plugs_in_directly():
    score, classifier = nets()
    x = images(3)
    seen = []

    def model(xb_t, t):
        seen.append(t.clone())
        return VPNoisePredictor(score)(xb_t, t + 1)

    native = HeteroPurifier(NativeNoisePredictor(model, zero_based=True), classifier, **SMALL)
    assert isinstance(native.noise_predictor, NativeNoisePredictor)
    assert_equal("native", native(x), HeteroPurifier(score, classifier, **SMALL)(x))
    assert [int(t[0]) for t in seen] == [s.t - 1 for s in native._plan]  # 0-based: our t - 1
    with pytest.raises(ValueError, match="score"):
        HeteroPurifier(VPNoisePredictor(score, T=500), classifier, **SMALL)


def cosine_alphas_cumprod(T=1000):
    """diffusers' DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod, in float64."""
    def f(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class GaussianEps(nn.Module):
    """The exact noise prediction, on the schedule `ac` at the model's own (0-based) time t, for
    data x ~ N(mu, s2) per pixel in [0, 1]-space (xb = 2x - 1 ~ N(2mu - 1, 4 s2)):
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab)(2mu - 1)) / (4 s2 ab + 1 - ab)."""

    def __init__(self, ac, mu=0.3, s2=0.05):
        super().__init__()
        self.schedule, self.mu, self.s2, self.seen = DiscreteVPSchedule(ac), mu, s2, []

    def forward(self, x_t, t):
        self.seen.append(t.clone())
        ab = self.schedule.alpha_bar(t).to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * (2 * self.mu - 1)) / (4 * self.s2 * ab + 1 - ab)


def test_vp_score_brings_its_own_schedule():
    """A VPScore on [-1, 1] data runs the purifier on the model's schedule (issue 37 item 1):
    alpha_bar = [1, alphas_cumprod], betas from the ratios, T from the model, the network asked
    at its own time t - 1; not SPEC 8's linear schedule."""
    _, classifier = nets()
    ac = cosine_alphas_cumprod()
    model = GaussianEps(ac)
    p = HeteroPurifier(VPScore(model, ac), classifier, **SMALL)
    assert p.T == 1000 and torch.equal(p.alpha_bar, torch.cat([torch.ones(1, dtype=torch.float64), ac]))
    betas = 1 - p.alpha_bar[1:] / p.alpha_bar[:-1]
    assert (p.alpha_bar[1:] - vp_alpha_bar()[1:]).abs().max() > 0.01  # the schedules differ
    x = images(3, seed=4)
    noise, mask = [n.to(x.dtype) for n in p.make_noise(x.shape[1:])], p.mask(x)
    model.seen.clear()
    out = p(x)
    assert [int(t[0]) for t in model.seen] == [s.t - 1 for s in p._plan]  # 0-based model time
    assert all(t.dtype == torch.int64 for t in model.seen)
    # The reference on the model's betas (it rebuilds alpha_bar by cumprod: rounding apart).
    want = hetero_reference(x, p.noise_predictor, mask, noise, t_l=p.t_l, t_s=p.t_s, stride=p.stride,
                            resample_steps=p.resample_steps, betas=betas)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    linear = hetero_reference(x, p.noise_predictor, mask, noise, t_l=p.t_l, t_s=p.t_s, stride=p.stride,
                              resample_steps=p.resample_steps)
    assert (out - linear).abs().max() > 1e-3
    with pytest.raises(ValueError, match="T must be the score model's schedule length 1000"):
        HeteroPurifier(VPScore(model, ac), classifier, **SMALL, T=500)
    # A VPScore on [0, 1] data is a score like any other: SPEC 8's schedule.
    assert torch.equal(HeteroPurifier(VPScore(model, ac, data_range=(0.0, 1.0)), classifier, **SMALL).alpha_bar,
                       vp_alpha_bar())


# --- saliency mask ------------------------------------------------------------------------

class TwoStages(nn.Module):
    """Stage "full" is the input itself, stage "pooled" its 2x2 average pool: maps by hand."""

    def __init__(self):
        super().__init__()
        self.full = nn.Identity()
        self.pooled = nn.AvgPool2d(2)

    def forward(self, x):
        return self.pooled(self.full(x)).flatten(1)


def by_hand(x):
    """A of SPEC 8 for TwoStages on 4x4 images, with bilinear upsampling (align_corners=False)
    written as its 1-D weights: output i samples the input at (i + 0.5) / 2 - 0.5, clamped to
    [0, 1] (the two input rows)."""
    up = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)

    def scaled(a):
        return (a - a.min()) / (a.max() - a.min())

    out = []
    for img in x:
        a_full = (img**2).sum(0)
        pooled = img.view(img.shape[0], 2, 2, 2, 2).mean((2, 4))
        a_half = up @ (pooled**2).sum(0) @ up.T
        out.append(torch.maximum(scaled(a_full), scaled(a_half)))
    return torch.stack(out)[:, None]


def test_saliency_map_and_mask_by_hand():
    x = images(3, 2, 4, 4, seed=3)
    clf = TwoStages()
    want = by_hand(x)
    got = saliency_map(clf, x, stages=("full", "pooled"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    assert_equal("tau", saliency_mask(clf, x, stages=["full", "pooled"], tau=0.5), want >= 0.5)
    flat = want.flatten(1).tolist()
    for q in (0.25, 0.5, 1.0):
        k = round(q * 16)
        top = torch.zeros(3, 16, dtype=torch.bool)
        for b, row in enumerate(flat):
            top[b, sorted(range(16), key=lambda i: (-row[i], i))[:k]] = True  # ties: earlier pixel
        assert_equal(f"top_q={q}", saliency_mask(clf, x, stages=("full", "pooled"), top_q=q), top.view(3, 1, 4, 4))
    # Per image: the map of an image does not depend on the others in the batch.
    assert_equal("batch", saliency_map(clf, x[1:], stages=("full", "pooled")), got[1:])
    # A constant map has no salient pixel (min-max would divide by zero).
    flat_image = torch.full((1, 2, 4, 4), 0.5, dtype=torch.float64)
    assert not saliency_mask(clf, flat_image, stages=("full",)).any()
    assert saliency_mask(clf, flat_image, stages=("full",), tau=0.0).all()


def test_saliency_stages_registry_and_hook_cleanup():
    _, classifier = nets()
    assert SALIENCY_STAGES["SmallCNN"] == ("features.3", "features.8")
    for name in SALIENCY_STAGES["SmallCNN"]:  # the last activation before each MaxPool
        index = int(name.split(".")[1])
        assert isinstance(classifier.features[index + 1], nn.MaxPool2d)
    x = images(2)
    assert saliency_mask(classifier, x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="stages"):
        saliency_mask(TwoStages(), x)
    with pytest.raises(ValueError, match="stages"):
        saliency_mask(classifier, x, stages=("features.99",))
    with pytest.raises(ValueError, match="stages"):
        saliency_mask(classifier, x, stages="features.3")
    with pytest.raises(ValueError, match="stages"):  # the head's output is 2-D
        saliency_mask(classifier, x, stages=("head",))
    assert all(not m._forward_hooks for m in classifier.modules())

    class Broken(TwoStages):
        def forward(self, x):
            self.full(x)
            raise RuntimeError("boom")

    broken = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        saliency_map(broken, x, stages=("full",))
    assert not broken.full._forward_hooks
    with pytest.raises(ValueError, match="tau"):
        saliency_mask(classifier, x, tau=1.5)
    with pytest.raises(ValueError, match="top_q"):
        saliency_mask(classifier, x, top_q=0.0)


# --- the sampler against the reference ----------------------------------------------------

CASES = [  # (channels, H, W, t_l, t_s, U, grid_steps)
    (1, 8, 8, 40, 20, 2, 100),
    (3, 5, 7, 60, 20, 3, 50),    # odd sizes, stride 20
    (1, 8, 8, 30, 10, 0, 100),   # no forward steps
    (1, 8, 8, 30, 30, 3, 100),   # t_s = t_l: no resampling step
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "c{}_{}x{}_tl{}_ts{}_U{}_S{}".format(*c))
def test_fast_path_matches_reference(case):
    c, h, w, t_l, t_s, u, grid = case
    score, classifier = nets(c)
    p = HeteroPurifier(score, classifier, t_l=t_l, t_s=t_s, resample_steps=u, grid_steps=grid, seed=5)
    x = images(3, c, h, w)
    noise = p.make_noise(x.shape[1:])
    assert noise.renoise.shape == (p.n_resample, c, h, w) and noise.forward.shape == (p.n_resample, u, c, h, w)
    mask = torch.rand(3, 1, h, w, generator=torch.Generator().manual_seed(6)) < 0.3
    ref64 = reference(p, x, noise, mask)
    torch.testing.assert_close(p(x, noise, mask), ref64, rtol=0, atol=1e-12)

    p32 = HeteroPurifier(copy.deepcopy(score).float(), classifier, t_l=t_l, t_s=t_s, resample_steps=u,
                         grid_steps=grid, seed=5)
    ref32 = reference(p32, x.float(), noise, mask)
    assert_2x("float32", p32(x.float(), noise, mask), ref32, ref64)


def test_own_noise_and_mask_are_what_make_noise_and_mask_give():
    score, classifier = nets()
    p = HeteroPurifier(score, classifier, seed=3, **SMALL)
    x = images(4)
    mask = p.mask(x)
    assert mask.dtype == torch.bool and mask.shape == (4, 1, 8, 8) and mask.any() and not mask.all()
    assert_equal("saliency mask", mask, saliency_mask(classifier, x))
    torch.testing.assert_close(p(x), reference(p, x, p.make_noise(x.shape[1:]), mask), rtol=0, atol=1e-12)


# --- determinism, batch invariance, runs --------------------------------------------------

@pytest.mark.parametrize("mask", ["saliency", "random", "all"])
def test_deterministic_batch_invariant_and_seeded(mask):
    score, classifier = nets()
    p = HeteroPurifier(score, classifier, seed=1, mask=mask, **SMALL)
    x = images(6)
    out = p(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    assert_equal("same seed", out, HeteroPurifier(score, classifier, seed=1, mask=mask, **SMALL)(x))
    # Every image sees the same noise and its own mask; the networks' rows do not depend on the
    # batch here (measured bitwise, float32 and float64, with the AVX2 kernels and with
    # ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41);
    # 1e-12 leaves room for a convolution whose blocking changes with the batch size.
    torch.testing.assert_close(torch.cat([p(x[:2]), p(x[2:])]), out, rtol=0, atol=1e-12)
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    torch.testing.assert_close(p(x[perm]), out[perm], rtol=0, atol=1e-12)
    assert not torch.equal(out, HeteroPurifier(score, classifier, seed=2, mask=mask, **SMALL)(x))


def test_random_mask_has_the_saliency_fraction_and_the_saliency_noise():
    score, classifier = nets()
    x = images(5)
    salient = HeteroPurifier(score, classifier, **SMALL)
    rand = HeteroPurifier(score, classifier, mask="random", **SMALL)
    m_s, m_r = salient.mask(x), rand.mask(x)
    assert torch.equal(m_s.sum((1, 2, 3)), m_r.sum((1, 2, 3))) and not torch.equal(m_s, m_r)
    assert_equal("random mask per seed", rand.mask(x), m_r)
    assert not torch.equal(rand.mask(x, seed=9), m_r)
    # The permutation is drawn after the noise: with the same mask both runs are the same.
    assert_equal("shared noise", rand(x, mask=m_s), salient(x))


def test_purify_runs_equals_separate_runs():
    score, classifier = nets()
    x = images(3)
    for mask in ("saliency", "random"):
        p = HeteroPurifier(score, classifier, seed=4, mask=mask, **SMALL)
        runs = p.purify_runs(x, 3)
        assert runs.shape == (3, *x.shape)
        separate = torch.stack([HeteroPurifier(score, classifier, seed=4 + r, mask=mask, **SMALL)(x)
                                for r in range(3)])
        # Elementwise the same ops; the network sees 9 rows instead of 3 (bitwise as measured, see
        # test_deterministic_batch_invariant_and_seeded for the tolerance).
        torch.testing.assert_close(runs, separate, rtol=0, atol=1e-12)
        assert_equal("runs=1", p.purify_runs(x, 1)[0], p(x))
    with pytest.raises(ValueError, match="runs"):
        p.purify_runs(x, 0)


def test_mask_all_and_t_s_equal_t_l_are_plain_ddim_from_t_l():
    score, classifier = nets()
    other = nets(seed=7)[1]
    x = images(3)
    uniform = HeteroPurifier(score, classifier, mask="all", **SMALL)
    out = uniform(x)
    assert uniform.n_resample == 0 and uniform.mask(x).all()
    assert_equal("classifier ignored", HeteroPurifier(score, other, mask="all", **SMALL)(x), out)
    assert_equal("no classifier", HeteroPurifier(score, None, mask="all", **SMALL)(x), out)

    def never(_):
        raise AssertionError("mask='all' must not run the classifier")

    assert_equal("not run", HeteroPurifier(score, never, mask="all", **SMALL)(x), out)
    # t_s = t_l leaves no resampling step: the mask no longer matters.
    same = HeteroPurifier(score, classifier, **{**SMALL, "t_s": SMALL["t_l"]})
    assert same.n_resample == 0 and same.mask(x).all()
    assert_equal("t_s = t_l", same(x), out)
    # Plain DDIM from t_l on the same initial noise.
    ab = vp_alpha_bar()
    z = uniform.make_noise(x.shape[1:]).init.double()
    state = ab[40].sqrt() * (2 * x - 1) + (1 - ab[40]).sqrt() * z
    for t in (40, 30, 20, 10):
        eps = uniform.noise_predictor(state, torch.full((3,), t))
        state = ddim_step(state, eps, ab[t], ab[t - 10])
    torch.testing.assert_close(out, ((state + 1) / 2).clamp(0, 1), rtol=0, atol=1e-12)


# --- grad modes ---------------------------------------------------------------------------

def test_bpda_is_the_identity_backward_with_the_none_value():
    score, classifier = nets()
    x = images(2).requires_grad_(True)
    w = torch.randn_like(x)
    none = HeteroPurifier(score, classifier, **SMALL)(x)
    # "none" has no gradient: a backward through it names the grad modes that have one.
    with pytest.raises(RuntimeError, match="grad_mode='bpda'"):
        torch.autograd.grad(none.sum(), x)
    bpda = HeteroPurifier(score, classifier, grad_mode="bpda", **SMALL)
    out = bpda(x)
    assert_equal("bpda value", out, none)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert_equal("bpda grad", g, w)
    runs = bpda.purify_runs(x, 2)
    (g,) = torch.autograd.grad((runs * w).sum(), x)
    torch.testing.assert_close(g, 2 * w, rtol=0, atol=0)


class Counting(NoisePredictor):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, xb_t, t):
        self.calls += 1
        return self.inner(xb_t, t)


def test_full_gradient_equals_autograd_of_the_reference_and_is_checkpointed():
    score, classifier = nets()
    classifier.requires_grad_(True)
    x = images(2, seed=8).requires_grad_(True)
    w = torch.randn_like(x)
    eps_model = Counting(VPNoisePredictor(score))
    p = HeteroPurifier(eps_model, classifier, grad_mode="full", **SMALL)
    noise, mask = p.make_noise(x.shape[1:]), p.mask(x)
    out = p(x)
    steps = len(p._plan)
    assert eps_model.calls == steps
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert eps_model.calls == 2 * steps  # each grid step rerun once in the backward
    # The mask is a constant: the classifier gets no gradient, and an explicit mask changes nothing.
    assert all(q.grad is None for q in classifier.parameters())
    (g_mask,) = torch.autograd.grad((p(x, mask=mask) * w).sum(), x)
    assert_equal("explicit mask", g_mask, g)
    (g_ref,) = torch.autograd.grad((reference(p, x, noise, mask) * w).sum(), x)  # plain autograd, no checkpoint
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    for mode in ("full_st", "full_st_proj", "none"):
        assert_equal(mode, HeteroPurifier(score, classifier, grad_mode=mode, **SMALL)(x).detach(), out.detach())
    (g_st,) = torch.autograd.grad((HeteroPurifier(score, classifier, grad_mode="full_st", **SMALL)(x) * w).sum(), x)
    assert_equal("full_st", g_st, g)
    runs = HeteroPurifier(score, classifier, grad_mode="full", **SMALL).purify_runs(x, 2)
    (g_runs,) = torch.autograd.grad((runs[0] * w).sum(), x)
    torch.testing.assert_close(g_runs, g, rtol=1e-10, atol=1e-12)


def test_full_gradient_gradcheck():
    """A smooth case: the output stays inside (0, 1), so the clamp is the identity."""
    score, classifier = nets(side=4)
    p = HeteroPurifier(score, classifier, t_l=20, t_s=10, resample_steps=1, grid_steps=100, grad_mode="full")
    x = (0.3 + 0.4 * images(1, h=4, w=4, seed=9)).requires_grad_(True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]], dtype=torch.bool).view(1, 1, 4, 4)
    noise = p.make_noise(x.shape[1:])
    assert 0 < p(x, noise, mask).min() and p(x, noise, mask).max() < 1
    assert torch.autograd.gradcheck(lambda v: p(v, noise, mask), (x,), eps=1e-6, atol=1e-6)


def test_full_st_proj_passes_the_clamp_straight_through():
    score, classifier = nets()
    x = images(2).requires_grad_(True)
    out = HeteroPurifier(score, classifier, grad_mode="full", **SMALL)(x)
    st = HeteroPurifier(score, classifier, grad_mode="full_st_proj", **SMALL)(x)
    assert_equal("value", st, out)
    clamped = (out.detach() == 0) | (out.detach() == 1)
    assert clamped.any() and not clamped.all(), "pick inputs with some purified values at the clamp"
    w = torch.randn_like(x)
    inside, outside = w * ~clamped, w * clamped
    for name, upstream in (("inside", inside), ("outside", outside)):
        (g,) = torch.autograd.grad((out * upstream).sum(), x, retain_graph=True)
        (g_st,) = torch.autograd.grad((st * upstream).sum(), x, retain_graph=True)
        if name == "inside":  # a clamp that does not bind is the identity either way
            assert_equal("inside", g_st, g)
        else:  # a binding clamp blocks "full" only
            assert not g.any() and g_st.abs().sum() > 0


# --- arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(t_l=0), "t_l"), (dict(t_l=1001), "t_l"), (dict(t_l=45), "t_l"),
    (dict(t_s=0), "t_s"), (dict(t_s=50), "t_s"), (dict(t_s=15), "t_s"),
    (dict(grid_steps=300), "grid_steps"), (dict(grid_steps=0), "grid_steps"),
    (dict(resample_steps=-1), "resample_steps"), (dict(t_l=1000, resample_steps=1), "resample_steps"),
    (dict(tau=1.5), "tau"), (dict(top_q=0.0), "top_q"), (dict(top_q=1.5), "top_q"),
    (dict(seed=-1), "seed"), (dict(grad_mode="exact"), "grad_mode"), (dict(mask="half"), "mask"),
    (dict(T=0), "T"), (dict(stages=("nope",)), "stages"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    score, classifier = nets()
    with pytest.raises(ValueError, match=name):
        HeteroPurifier(score, classifier, **{**SMALL, **kwargs})


def test_bad_inputs_name_the_argument():
    score, classifier = nets()
    with pytest.raises(ValueError, match="classifier"):
        HeteroPurifier(score, None, **SMALL)
    with pytest.raises(ValueError, match="stages"):
        HeteroPurifier(score, TwoStages(), **SMALL)
    with pytest.raises(ValueError, match="score"):
        HeteroPurifier("score", classifier, **SMALL)
    p = HeteroPurifier(score, classifier, **SMALL)
    x = images(2)
    with pytest.raises(ValueError, match="x"):
        p(x + 2)
    noise = p.make_noise(x.shape[1:])
    with pytest.raises(ValueError, match="noise.forward"):
        p(x, HeteroNoise(noise.init, noise.renoise, noise.forward[:, :1]))
    with pytest.raises(ValueError, match="mask"):
        p(x, mask=torch.ones(2, 1, 8, 8))


def test_wide_resnet_stages_follow_robustbench_names():
    """A miniature with RobustBench WideResNet's module names (4 blocks per stage, a final
    ReLU): the registry finds the four layers the official code hooks."""

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv = nn.Conv2d(c, c, 3, padding=1)
            self.relu2 = nn.Softplus()

        def forward(self, x):
            return self.relu2(self.conv(x))

    class Stage(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.layer = nn.Sequential(*[Block(c) for _ in range(4)])

        def forward(self, x):
            return self.layer(x)

    class WideResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
            self.block1, self.block2, self.block3 = Stage(2), Stage(2), Stage(2)
            self.relu = nn.ReLU()
            self.fc = nn.Linear(2, 3)

        def forward(self, x):
            h = self.relu(self.block3(nn.functional.avg_pool2d(self.block2(self.block1(self.conv1(x))), 2)))
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    wrn, x = WideResNet().double(), images(2)
    stages = SALIENCY_STAGES["WideResNet"]
    assert all(dict(wrn.named_modules()).get(name) is not None for name in stages)
    assert torch.equal(saliency_map(wrn, x), saliency_map(wrn, x, stages=stages))
    assert not torch.equal(saliency_map(wrn, x), saliency_map(wrn, x, stages=stages[:1]))
