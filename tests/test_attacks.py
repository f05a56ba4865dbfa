"""PGD, projections, wrappers, threat models and baselines on tiny synthetic data."""

import math

import pytest
import torch
from torch.nn import functional as F

from pursamere_fast import PurifyConfig
from pursamere_fast.attacks import (ADPPurifier, AttackSpec, Defence, FreshNoisePurifier, IdentityPurifier,
                                    PurifiedClassifier, StraightThrough, cosine_per_sample, input_gradients, pgd,
                                    project_l1, run_attack, wilson_interval)
from pursamere_fast.attacks import toy

P = {"linf": math.inf, "l2": 2, "l1": 1}
EPS = {"linf": 0.08, "l2": 0.6, "l1": 3.0}


pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def setup():
    x, y = toy.synthetic_data(512, seed=0)
    clf = toy.train_classifier(toy.make_classifier(), x, y, steps=60)
    xt, yt = toy.synthetic_data(96, seed=1)
    return clf, xt, yt


def _acc(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _dist(a, b, norm):
    return torch.linalg.vector_norm((a - b).flatten(1).double(), ord=P[norm], dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_pgd_stays_in_budget_and_box_and_breaks_the_model(setup, norm):
    clf, x, y = setup
    eps = EPS[norm]
    x_adv = pgd(clf, x, y, norm=norm, eps=eps, alpha=2.5 * eps / 10, steps=10)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(_dist(x_adv, x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    clean = _acc(clf, x, y)
    assert clean > 0.9
    assert _acc(clf, x_adv, y) < clean - 0.3


def test_pgd_zero_budget_returns_input(setup):
    clf, x, y = setup
    assert torch.equal(pgd(clf, x, y, norm="linf", eps=0.0, alpha=0.1, steps=5), x)


def test_pgd_deterministic_and_leaves_global_rng_and_grads_alone(setup):
    clf, x, y = setup
    state = torch.get_rng_state()
    a = pgd(clf, x, y, norm="l2", eps=0.5, alpha=0.1, steps=3, seed=7)
    b = pgd(clf, x, y, norm="l2", eps=0.5, alpha=0.1, steps=3, seed=7)
    c = pgd(clf, x, y, norm="l2", eps=0.5, alpha=0.1, steps=3, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in clf.parameters())
    with torch.inference_mode():
        assert torch.equal(pgd(clf, x, y, norm="l2", eps=0.5, alpha=0.1, steps=3, seed=7), a)


def test_restarts_keep_the_per_sample_worst_case(setup):
    clf, x, y = setup
    kw = dict(norm="linf", eps=0.05, alpha=0.02, steps=3, seed=3)
    one = pgd(clf, x, y, restarts=1, **kw)
    three = pgd(clf, x, y, restarts=3, **kw)
    with torch.no_grad():
        wrong1 = clf(one).argmax(1) != y
        wrong3 = clf(three).argmax(1) != y
        loss1 = F.cross_entropy(clf(one), y, reduction="none")
        loss3 = F.cross_entropy(clf(three), y, reduction="none")
    # Restart 0 is the single run (same generator stream): broken samples stay broken,
    # the others can only gain loss.
    assert bool((wrong1 <= wrong3).all())
    assert torch.equal(three[wrong1], one[wrong1])
    still = ~wrong3
    assert bool((loss3[still] >= loss1[still] - 1e-6).all())
    assert int(wrong3.sum()) > int(wrong1.sum())


def test_l1_step_is_sparse():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.full((2, 1, 8, 8), 0.5)
    y = torch.tensor([0, 1])
    x_adv = pgd(model, x, y, norm="l1", eps=10.0, alpha=0.5, steps=1, random_start=False, l1_sparsity=0.1)
    changed = ((x_adv - x).abs() > 0).flatten(1).sum(1)
    assert changed.tolist() == [math.ceil(0.1 * 64)] * 2
    assert torch.allclose(_dist(x_adv, x, "l1"), torch.full((2,), 0.5, dtype=torch.float64))


def _project_l1_bisection(v, eps):
    # Independent oracle: the projection is sign(v) * max(|v| - theta, 0) with sum = eps.
    a = v.abs().double()
    if a.sum() <= eps:
        return v.double()
    lo, hi = 0.0, float(a.max())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (a - mid).clamp_min(0).sum() > eps else (lo, mid)
    return torch.sign(v.double()) * (a - hi).clamp_min(0)


def test_project_l1_matches_bisection_oracle():
    gen = torch.Generator().manual_seed(0)
    v = torch.randn((5, 3, 7, 5), generator=gen, dtype=torch.float64)
    v[0] *= 1e-3  # already inside the ball
    v[1, :, :, :2] = 0.0
    for eps in (0.0, 0.5, 4.0):
        out = project_l1(v, eps)
        for i in range(v.shape[0]):
            assert torch.allclose(out[i].double(), _project_l1_bisection(v[i].flatten(), eps).view_as(v[i]), atol=1e-9)
        assert bool((out.flatten(1).abs().sum(1) <= eps + 1e-9).all())
    assert torch.equal(project_l1(v[:1], 4.0), v[:1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l3"), "norm"), (dict(eps=-0.1), "eps"), (dict(eps=float("nan")), "eps"), (dict(alpha=0.0), "alpha"),
    (dict(steps=-1), "steps"), (dict(steps=2.5), "steps"), (dict(restarts=0), "restarts"), (dict(eot=0), "eot"),
    (dict(seed=-1), "seed"), (dict(l1_sparsity=1.5), "l1_sparsity"),
])
def test_pgd_rejects_bad_arguments(setup, kwargs, match):
    clf, x, y = setup
    kw = dict(norm="linf", eps=0.1, alpha=0.01, steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        pgd(clf, x[:2], y[:2], **kw)


def test_pgd_rejects_bad_inputs(setup):
    clf, x, y = setup
    kw = dict(norm="linf", eps=0.1, alpha=0.01, steps=1)
    with pytest.raises(ValueError, match="x"):
        pgd(clf, x[:2] + 2, y[:2], **kw)
    with pytest.raises(ValueError, match="x"):
        pgd(clf, x[0], y[:1], **kw)
    with pytest.raises(ValueError, match="y"):
        pgd(clf, x[:2], y[:3], **kw)
    with pytest.raises(ValueError, match="y"):
        pgd(clf, x[:2], y[:2].float(), **kw)


def test_purified_classifier_normalises_and_registers(setup):
    clf, x, _ = setup
    mean, std = [0.25], [0.5]
    model = PurifiedClassifier(ADPPurifier(toy.make_score(), steps=1), clf, mean, std)
    assert model.purifier is not None and model.classifier is clf
    with torch.no_grad():
        expected = clf((model.purifier(x[:4]) - 0.25) / 0.5)
        assert torch.equal(model(x[:4]), expected)
    assert any(m is clf for m in model.modules())
    with pytest.raises(ValueError, match="std"):
        PurifiedClassifier(IdentityPurifier(), clf, mean, [0.0])
    with pytest.raises(ValueError, match="mean"):
        PurifiedClassifier(IdentityPurifier(), clf, [float("nan")], std)


def test_fresh_noise_purifier_gives_new_noise_each_call_and_is_reproducible():
    score = toy.make_score()
    x = toy.synthetic_data(4)[0]
    fresh = FreshNoisePurifier(lambda s: ADPPurifier(score, seed=s), seed=3)
    with torch.no_grad():
        a, b = fresh(x), fresh(x)
        fresh.reset(3)
        a2 = fresh(x)
    assert not torch.equal(a, b)
    assert torch.equal(a, a2)
    with pytest.raises(ValueError, match="seed"):
        fresh.reset(-1)


def test_adp_deterministic_batch_invariant_and_grad_modes():
    score = toy.make_score().double()
    x = toy.synthetic_data(6)[0].double()
    adp = ADPPurifier(score, steps=2, seed=1)
    with torch.no_grad():
        full = adp(x)
        assert torch.equal(full, adp(x))
        # float64, per-image arithmetic: measured bitwise equal.
        assert torch.allclose(torch.cat([adp(x[:2]), adp(x[2:])]), full, rtol=0, atol=1e-12)
        assert not torch.equal(full, ADPPurifier(score, steps=2, seed=2)(x))
    xi = x[:1].clone().requires_grad_(True)
    w = torch.randn_like(xi)
    (g_bpda,) = torch.autograd.grad((ADPPurifier(score, steps=2, grad_mode="bpda")(xi) * w).sum(), xi)
    assert torch.equal(g_bpda, w)
    # Noise 0 keeps the input away from the clamp's kinks: the full gradient is smooth.
    smooth = ADPPurifier(score, steps=2, noise_std=0.0, sigma=0.05, grad_mode="full")
    assert torch.autograd.gradcheck(smooth, (x[:1].clamp(0.3, 0.7).requires_grad_(True),), eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="grad_mode"):
        ADPPurifier(score, grad_mode="exact")
    with pytest.raises(ValueError, match="steps"):
        ADPPurifier(score, steps=0)


def test_straight_through_is_identity_backward():
    score = toy.make_score()
    x = toy.synthetic_data(3)[0].requires_grad_(True)
    st = StraightThrough(ADPPurifier(score))
    out = st(x)
    with torch.no_grad():
        assert torch.equal(out, ADPPurifier(score)(x))
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.equal(g, w)


def test_attack_spec_validation_and_defaults():
    a = AttackSpec("bpda", "linf", 0.1, 4)
    assert a.step_size == pytest.approx(2.5 * 0.1 / 4)
    assert a.label == "bpda-linf-eps0.1-s4"
    assert AttackSpec("bpda_eot", eot=3).label.endswith("-eot3")
    for kwargs, match in [(dict(threat="fgsm"), "threat"), (dict(threat="bpda", norm="l0"), "norm"),
                          (dict(threat="bpda", eps=-1.0), "eps"), (dict(threat="bpda", eot=2), "eot"),
                          (dict(threat="bpda", alpha=0.0), "alpha"), (dict(threat="bpda", restarts=0), "restarts")]:
        with pytest.raises(ValueError, match=match):
            AttackSpec(**kwargs)


@pytest.mark.parametrize("threat", ["gpgd", "bpda", "exact"])
def test_threats_on_no_defence_equal_plain_pgd(setup, threat):
    clf, x, y = setup
    a = AttackSpec(threat, "linf", 0.05, 3, seed=4)
    x_adv, pred = run_attack(Defence.none(), a, clf, x[:16], y[:16])
    ref = pgd(clf, x[:16], y[:16], norm="linf", eps=0.05, alpha=a.step_size, steps=3, seed=4)
    assert torch.equal(x_adv, ref)
    with torch.no_grad():
        assert torch.equal(pred, clf(ref).argmax(1))


def _pursamere(**kw):
    cfg = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=1, n_samples=2, rho=0.06, sam_radius=0.02,
                       lr_max=0.02, lr_min=0.01)
    return Defence.pursamere(toy.make_score(), cfg, **kw)


def test_bpda_gradient_is_classifier_gradient_at_purified_point(setup):
    clf, x, y = setup
    d = _pursamere()
    x, y = x[:4], y[:4]
    g = input_gradients(d, clf, x, y, "bpda")
    with torch.no_grad():
        xp = d.build("none", None)(x)
    xp.requires_grad_(True)
    (ref,) = torch.autograd.grad(F.cross_entropy(clf(xp), y, reduction="sum"), xp)
    # The same purified point and classifier: measured bitwise equal on every CPU kernel set tried.
    assert torch.allclose(g, ref, atol=1e-6)
    g_full = input_gradients(d, clf, x, y, "full")
    cos = cosine_per_sample(g, g_full)
    assert bool(torch.isfinite(g_full).all()) and not torch.equal(g_full, g)
    assert bool((cos > 0).all())


def test_pursamere_threats_run_and_are_deterministic(setup):
    clf, x, y = setup
    d = _pursamere()
    x, y = x[:8], y[:8]
    for a in (AttackSpec("bpda", "linf", 0.06, 2), AttackSpec("bpda_eot", "linf", 0.06, 2, eot=2),
              AttackSpec("exact", "l2", 0.5, 1)):
        x1, p1 = run_attack(d, a, clf, x, y, seed=5)
        x2, p2 = run_attack(d, a, clf, x, y, seed=5)
        assert torch.equal(x1, x2) and torch.equal(p1, p2), a.label
        assert float(_dist(x1, x, a.norm).max()) <= a.eps * (1 + 1e-5) + 1e-6


def test_bpda_eot_averages_fresh_draws(setup):
    clf, x, y = setup
    calls = []

    def build(grad_mode, seed):
        calls.append((grad_mode, seed))
        return StraightThrough(IdentityPurifier()) if grad_mode == "bpda" else IdentityPurifier()

    run_attack(Defence("probe", build), AttackSpec("bpda_eot", "linf", 0.05, 3, eot=4), clf, x[:4], y[:4], seed=2)
    attack_seeds = [s for m, s in calls if m == "bpda"]
    # 3 steps x 4 EoT draws, each a fresh seed (one restart: no final-loss call).
    assert len(attack_seeds) == 3 * 4 and len(set(attack_seeds)) == len(attack_seeds)
    judge = [s for m, s in calls if m == "none" and s is not None]
    assert len(judge) == 1 and judge[0] not in attack_seeds


def test_wilson_interval_solves_the_score_equation():
    z = 1.96
    for k, n in ((0, 10), (3, 10), (50, 100), (97, 100), (20, 20), (1, 1)):
        lo, hi = wilson_interval(k, n, z)
        p = k / n
        assert 0 <= lo <= p <= hi <= 1
        for end in (lo, hi):
            # Endpoints strictly inside (0, 1) satisfy |p_hat - p| = z sqrt(p (1 - p) / n).
            if 0 < end < 1:
                assert abs(abs(p - end) - z * math.sqrt(end * (1 - end) / n)) < 1e-12
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    w_small, w_big = wilson_interval(5, 10), wilson_interval(500, 1000)
    assert w_big[1] - w_big[0] < w_small[1] - w_small[0]
    for args, match in (((1, 0), "n"), ((5, 4), "k"), ((-1, 4), "k"), ((1, 4, 0.0), "z")):
        with pytest.raises(ValueError, match=match):
            wilson_interval(*args)


def test_adp_defence_under_the_harness(setup):
    clf, x, y = setup
    d = Defence.adp(toy.make_score(), steps=2, seed=3)
    assert d.description == {"kind": "adp", "seed": 3, "steps": 2}
    with pytest.raises(ValueError, match="noise_std"):
        Defence.adp(toy.make_score(), noise_std=-1.0)
    x, y = x[:8], y[:8]
    for a in (AttackSpec("bpda", "linf", 0.06, 2), AttackSpec("exact", "linf", 0.06, 2)):
        x1, p1 = run_attack(d, a, clf, x, y, seed=1)
        x2, p2 = run_attack(d, a, clf, x, y, seed=1)
        assert torch.equal(x1, x2) and torch.equal(p1, p2)
    g_bpda = input_gradients(d, clf, x, y, "bpda")
    g_full = input_gradients(d, clf, x, y, "full")
    assert not torch.allclose(g_bpda, g_full)
