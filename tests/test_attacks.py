"""PGD, projections, wrappers and threat models on tiny synthetic data."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from pursamere_fast import PurifyConfig
from pursamere_fast.attacks import (
    AttackSpec,
    Defence,
    FreshNoisePurifier,
    IdentityPurifier,
    PurifiedClassifier,
    StraightThrough,
    VotingClassifier,
    attack_loss,
    cosine_per_sample,
    input_gradients,
    pgd,
    project_l1,
    run_attack,
    toy,
    wilson_interval,
)
from pursamere_fast.purifiers import ADPPurifier

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
    kw = dict(norm="linf", eps=0.08, alpha=0.02, steps=3, seed=3)
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
    with torch.no_grad():
        model[1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # class 0 before and after the step
    x = torch.stack([torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), 0.3)])
    y = torch.tensor([0, 0])
    # The cross-entropy of a linear model is convex in x, so the step raises the loss and the
    # returned iterate (highest loss, nothing fooled) is the stepped one.
    x_adv = pgd(model, x, y, norm="l1", eps=10.0, alpha=0.5, steps=1, random_start=False, l1_sparsity=0.1)
    changed = ((x_adv - x).abs() > 0).flatten(1).sum(1)
    assert changed.tolist() == [math.ceil(0.1 * 64)] * 2
    assert torch.allclose(_dist(x_adv, x, "l1"), torch.full((2,), 0.5, dtype=torch.float64))


class _Bump(torch.nn.Module):
    """Two classes on a 1x1 image p: z = (z0, 1 - ((p - 0.6) / 0.1)^2). From p = 0.5, linf
    steps of 0.15 oscillate 0.5 -> 0.65 -> 0.5: the middle iterate is the one of highest
    loss, and it fools the model iff z0 < 0.75."""

    def __init__(self, z0):
        super().__init__()
        self.z0 = z0

    def forward(self, x):
        p = x.flatten(1)[:, 0]
        return torch.stack([torch.full_like(p, self.z0), 1 - ((p - 0.6) / 0.1) ** 2], dim=1)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_keeps_the_worst_iterate_not_the_last(loss):
    x, y = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64), torch.tensor([0])
    kw = dict(norm="linf", eps=0.2, alpha=0.15, steps=2, random_start=False, loss=loss, return_history=True)
    fooled = _Bump(0.1)
    x_adv, first = pgd(fooled, x, y, **kw)
    assert x_adv.item() == pytest.approx(0.65) and first.tolist() == [1]
    with torch.no_grad():
        assert fooled(x_adv).argmax(1).item() == 1
        assert fooled(x).argmax(1).item() == 0  # the last iterate (back at 0.5) is not fooled
    assert torch.equal(pgd(fooled, x, y, **(kw | {"return_history": False})), x_adv)
    # Never fooled: the iterate of highest loss (the middle one), not the last.
    x_adv, first = pgd(_Bump(2.0), x, y, **kw)
    assert x_adv.item() == pytest.approx(0.65) and first.tolist() == [-1]


class _Recorder(torch.nn.Module):
    """Never fooled (class 0 is 100 logits ahead); records every input it is called on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        s = x.flatten(1).sum(1)
        return torch.stack([100 + 0 * s, s], dim=1)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_restarts_start_independently_and_batch_invariantly(setup, norm):
    _, x, _ = setup
    x, y, eps = x[:4], torch.zeros(4, dtype=torch.int64), EPS[norm]
    kw = dict(norm=norm, eps=eps, alpha=0.1, steps=0)
    state = torch.get_rng_state()
    rec = _Recorder()
    pgd(rec, x, y, restarts=3, seed=5, **kw)
    starts = rec.seen
    assert len(starts) == 3
    for s in starts:
        assert bool((_dist(s, x, norm) <= eps * (1 + 1e-6)).all()) and bool((_dist(s, x, norm) > 0).all())
    assert not any(torch.equal(starts[i] - x, starts[j] - x) for i in range(3) for j in range(i))
    # Restart 0 is the run of one restart; a sample's starts do not depend on the batch.
    one = _Recorder()
    pgd(one, x, y, restarts=1, seed=5, **kw)
    assert torch.equal(one.seen[0], starts[0])
    single = _Recorder()
    pgd(single, x[2:3], y[2:3], restarts=3, seed=5, **kw)
    assert all(torch.equal(a, b[2:3]) for a, b in zip(single.seen, starts))
    # Per-sample seeds: sample i's starts follow its own seed wherever it sits in the batch.
    per = _Recorder()
    pgd(per, x, y, restarts=2, seed=[7, 8, 9, 10], **kw)
    alone = _Recorder()
    pgd(alone, x[1:2], y[1:2], restarts=2, seed=[8], **kw)
    assert all(torch.equal(a, b[1:2]) for a, b in zip(alone.seen, per.seen))
    assert not torch.equal(per.seen[0][0] - x[0], per.seen[0][1] - x[1])
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_batch_invariant(setup, norm):
    clf, x, y = setup
    clf = copy.deepcopy(clf).double()
    x, y = x[:8].double(), y[:8]
    eps = {"linf": 0.08, "l2": 0.4}[norm]
    kw = dict(norm=norm, eps=eps, alpha=eps / 4, steps=6, restarts=2, return_history=True)
    full, first = pgd(clf, x, y, seed=3, **kw)
    per, per_first = pgd(clf, x, y, seed=list(range(10, 18)), **kw)
    # Some samples break mid-run and leave the batch, others survive every step.
    assert 0 < int((first >= 0).sum()) < 8 and 0 < int((per_first >= 0).sum()) < 8
    # float64: linf measured bitwise equal; l2 within 2.2e-16 (a per-row norm whose reduction
    # order depends on the batch size).
    for i in range(8):
        one, f = pgd(clf, x[i:i + 1], y[i:i + 1], seed=3, **kw)
        torch.testing.assert_close(one, full[i:i + 1], rtol=0, atol=1e-12)
        assert f.item() == first[i].item()
        one, f = pgd(clf, x[i:i + 1], y[i:i + 1], seed=[10 + i], **kw)
        torch.testing.assert_close(one, per[i:i + 1], rtol=0, atol=1e-12)
        assert f.item() == per_first[i].item()


def test_eot_averages_logits_and_gradients(setup):
    clf, x, y = setup
    kw = dict(norm="linf", eps=0.06, alpha=0.01, steps=4, seed=1)
    # A deterministic model: the mean of identical draws is the draw itself, bit for bit.
    assert torch.equal(pgd(clf, x, y, eot=3, **kw), pgd(clf, x, y, eot=1, **kw))


def test_pgd_refuses_restarts_without_random_start(setup):
    clf, x, y = setup
    with pytest.raises(ValueError, match="restarts.*random_start"):
        pgd(clf, x[:2], y[:2], norm="linf", eps=0.1, alpha=0.01, steps=1, restarts=2, random_start=False)


def test_attack_losses_match_a_hand_computation():
    z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [0.5, 0.5, -1.0, 4.0]])
    y = torch.tensor([0, 1, 3])
    # cw: max_{j != y} z_j - z_y; dlr: that margin over (largest - third largest logit).
    assert attack_loss(z, y, "cw").tolist() == [3 - 1, 2 - 3, 0.5 - 4]
    assert torch.allclose(attack_loss(z, y, "dlr"), torch.tensor([2 / 2, -1 / 2, -3.5 / 3.5]))
    assert torch.allclose(attack_loss(z, y, "ce"), F.cross_entropy(z, y, reduction="none"))
    # dlr is invariant to shifting and positive scaling of the logits.
    assert torch.allclose(attack_loss(7 * z - 3, y, "dlr"), attack_loss(z, y, "dlr"))
    with pytest.raises(ValueError, match="dlr"):
        attack_loss(z[:, :2], y.clamp(max=1), "dlr")
    with pytest.raises(ValueError, match="loss"):
        attack_loss(z, y, "hinge")


@pytest.mark.parametrize("loss", ["cw", "dlr"])
def test_pgd_margin_losses_break_the_model(setup, loss):
    clf, x, y = setup
    x_adv = pgd(clf, x, y, norm="linf", eps=0.08, alpha=0.02, steps=10, loss=loss)
    assert _acc(clf, x_adv, y) < _acc(clf, x, y) - 0.3


def test_pgd_dlr_needs_three_classes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="dlr.*3 classes"):
        pgd(model, torch.full((2, 1, 8, 8), 0.5), torch.tensor([0, 1]), norm="linf", eps=0.1, alpha=0.01,
            steps=1, loss="dlr")


def test_return_history_gives_every_shorter_run(setup):
    clf, x, y = setup
    kw = dict(norm="linf", eps=0.06, alpha=0.01, seed=2)
    x_adv, first = pgd(clf, x, y, steps=8, return_history=True, **kw)
    assert first.dtype == torch.int64 and first.shape == y.shape
    with torch.no_grad():
        assert torch.equal(first >= 0, clf(x_adv).argmax(1) != y)
    # One long run at a fixed step contains the shorter ones (restart 0: index = steps taken).
    for k in (0, 3, 8):
        with torch.no_grad():
            wrong_k = clf(pgd(clf, x, y, steps=k, **kw)).argmax(1) != y
        assert torch.equal(wrong_k, (first >= 0) & (first <= k))
    assert 0 < int(((first > 0) & (first < 8)).sum())
    # Restart r, step s -> r * (steps + 1) + s; restart 0 is the single-restart run.
    x3, first3 = pgd(clf, x, y, steps=8, restarts=3, return_history=True, **kw)
    assert torch.equal(torch.where((first3 >= 0) & (first3 <= 8), first3, -1), first)
    assert int((first3 > 8).sum()) > 0 and int(first3.max()) <= 3 * 9 - 1
    assert torch.equal(x3[first >= 0], x_adv[first >= 0])
    # Zero budget: the verdict on x itself.
    _, first0 = pgd(clf, x, y, steps=5, eps=0.0, alpha=0.01, norm="linf", return_history=True)
    with torch.no_grad():
        assert torch.equal(first0, torch.where(clf(x).argmax(1) != y, 0, -1))


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
    # (3 steps + the verdict on the last iterate) x 4 EoT draws, each a fresh seed.
    assert len(attack_seeds) == (3 + 1) * 4 and len(set(attack_seeds)) == len(attack_seeds)
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


class _ShiftRuns(torch.nn.Module):
    """A toy purifier whose run r adds shifts[r] to the image (purify_runs for VotingClassifier)."""

    def __init__(self, shifts):
        super().__init__()
        self.shifts = torch.as_tensor(shifts, dtype=torch.float64)

    def forward(self, x):
        return x + self.shifts[0]

    def purify_runs(self, x, runs):
        return torch.stack([x + self.shifts[r] for r in range(runs)])


def test_voting_classifier_value_is_the_majority_vote_and_gradient_the_soft_vote():
    torch.manual_seed(0)
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    runs = _ShiftRuns([0.0, 0.3, -0.4, 0.9, 0.05])
    model = VotingClassifier(runs, clf, 5)
    x = torch.rand(6, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    out = model(x)
    logits = torch.stack([clf(x + s) for s in runs.shifts])  # (R, B, K)
    votes = F.one_hot(logits.argmax(-1), 3).sum(0)
    p_bar = logits.softmax(-1).mean(0)
    torch.testing.assert_close(out.detach(), votes.double() + 0.5 * p_bar.detach(), rtol=0, atol=1e-12)
    top = votes.max(1, keepdim=True).values
    # argmax is a class with the most votes, and among those the one of highest p_bar.
    expected = torch.where(votes == top, p_bar.detach(), torch.tensor(-1.0, dtype=torch.float64)).argmax(1)
    assert torch.equal(out.argmax(1), expected)
    w = torch.randn(6, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    (g_ref,) = torch.autograd.grad((p_bar.log() * w).sum(), x)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="purify_runs"):
        VotingClassifier(IdentityPurifier(), clf, 3)
    with pytest.raises(ValueError, match="runs"):
        VotingClassifier(runs, clf, 0)


def test_defence_model_votes_only_with_runs_and_fresh_noise_forwards_purify_runs():
    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3)).double()
    single = Defence("one", lambda grad_mode, seed: _ShiftRuns([0.1]))
    assert type(single.model(clf)) is PurifiedClassifier
    voted = Defence("vote", lambda grad_mode, seed: _ShiftRuns([0.1, 0.2, 0.3]), runs=3)
    assert isinstance(voted.model(clf), VotingClassifier) and voted.model(clf).runs == 3
    assert isinstance(voted.model(clf, None).purifier, IdentityPurifier)  # gray-box: the classifier alone
    seeds = []
    fresh = FreshNoisePurifier(lambda s: seeds.append(s) or _ShiftRuns([s, s + 1]), seed=2)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert torch.equal(fresh.purify_runs(x, 2)[:, 0, 0, 0, 0], torch.tensor([2_000_006.0, 2_000_007.0],
                                                                            dtype=torch.float64))
    fresh.purify_runs(x, 2)
    assert seeds == [2_000_006, 2_000_007]
    with pytest.raises(ValueError, match="runs"):
        Defence("bad", lambda grad_mode, seed: _ShiftRuns([0.1]), runs=0)
