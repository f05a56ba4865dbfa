"""APGD (ours, against the paper's rules and pyautoattack's APGDAttack) and the Square wrapper."""

import copy
import math
import sys

import pytest
import torch

from pursamere_fast.attacks import apgd, attack_loss, pgd, square, toy
from pursamere_fast.attacks.apgd import checkpoints, halve

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

P = {"linf": math.inf, "l2": 2}


@pytest.fixture(scope="module")
def setup():
    x, y = toy.synthetic_data(512, seed=0)
    clf = toy.train_classifier(toy.make_classifier(), x, y, steps=60)
    xt, yt = toy.synthetic_data(1000, seed=1)
    return clf, xt, yt


def _correct(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) == y


def _dist(a, b, norm):
    return torch.linalg.vector_norm((a - b).flatten(1).double(), ord=P[norm], dim=1)


def test_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (then 1.05 > 1); w_j = ceil(p_j * N).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(50) == [11, 21, 29, 35, 40, 44, 47, 50]
    assert checkpoints(20) == [5, 9, 12, 14, 16, 18, 19, 20]
    assert checkpoints(5) == [2, 3, 4, 5]  # ceil(2.85) = 3 and ceil(4.0) = 4 count once
    assert checkpoints(1) == [1]
    assert checkpoints(0) == []


def test_halving_rule_by_hand():
    t, f = torch.tensor(True), torch.tensor(False)
    one = torch.tensor(1.0)
    # Condition 1: fewer than 0.75 * 8 = 6 of the 8 steps increased the loss.
    assert bool(halve(torch.tensor(5), 8, t, one + 1, one))
    assert not bool(halve(torch.tensor(6), 8, t, one + 1, one))
    # Condition 2: no halving last time and no better best loss since.
    assert bool(halve(torch.tensor(8), 8, f, one, one))
    assert not bool(halve(torch.tensor(8), 8, t, one, one))
    assert not bool(halve(torch.tensor(8), 8, f, one + 1, one))


class _Bowl(torch.nn.Module):
    """Two classes; z1 = -||x - c||^2 + 0.05 sum sin(10 x) - 5 < 0 = z0, so never fooled:
    a smooth but bumpy loss on which APGD both halves and keeps its step. Records its inputs."""

    def __init__(self, c):
        super().__init__()
        self.c = c
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        z1 = -((x - self.c).flatten(1) ** 2).sum(1) + 0.05 * torch.sin(10 * x.flatten(1)).sum(1) - 5
        return torch.stack([torch.zeros_like(z1), z1], dim=1)


def _apgd_reference(model, x0, start, norm, eps, steps, rho=0.75):
    """The paper's APGD on one image, written plainly; returns (iterates, best point, decisions)."""
    y = torch.tensor([0])

    def loss_and_grad(p):
        p = p.clone().requires_grad_(True)
        loss = attack_loss(model(p), y, "ce").sum()
        return loss.item(), torch.autograd.grad(loss, p)[0]

    def proj(p):
        d = p - x0
        d = d.clamp(-eps, eps) if norm == "linf" else d * min(1.0, eps / max(d.norm().item(), 1e-12))
        return (x0 + d).clamp(0, 1)

    def direction(g):
        return torch.sign(g) if norm == "linf" else g / max(g.norm().item(), 1e-12)

    marks = checkpoints(steps)
    cur = prev = start
    f, g = loss_and_grad(cur)
    best, best_p, best_g = f, cur, g
    eta, last, increases, halved, best_then, mark = 2 * eps, f, 0, True, f, 0
    iterates, decisions = [cur], []
    for k in range(1, steps + 1):
        z = proj(cur + eta * direction(g))
        a = 1.0 if k == 1 else 0.75
        prev, cur = cur, proj(cur + a * (z - cur) + (1 - a) * (cur - prev))
        f, g = loss_and_grad(cur)
        iterates.append(cur)
        increases += f > last
        last = f
        if f > best:
            best, best_p, best_g = f, cur, g
        if k in marks and k < steps:
            h = increases < rho * (k - mark) or (not halved and best <= best_then)
            decisions.append(h)
            if h:
                eta, cur, g, last = eta / 2, best_p, best_g, best
            halved, best_then, increases, mark = h, best, 0, k
    return iterates, best_p, decisions


@pytest.mark.parametrize("norm, eps", [("linf", 0.2), ("l2", 0.6)])
def test_trajectory_matches_the_paper_step_by_step(norm, eps):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand((1, 1, 3, 3), generator=gen, dtype=torch.float64) * 0.6 + 0.2
    c = torch.rand((1, 1, 3, 3), generator=gen, dtype=torch.float64)
    model = _Bowl(c)
    out = apgd(model, x0, torch.tensor([0]), norm=norm, eps=eps, steps=40, seed=1)
    iterates, best, decisions = _apgd_reference(_Bowl(c), x0, model.seen[0], norm, eps, 40)
    # The step halved at some checkpoints and not at others: the schedule was exercised.
    assert any(decisions) and not all(decisions)
    # Same arithmetic in another order: measured <= 3.4e-16 apart.
    assert len(model.seen) == len(iterates) == 41
    for ours, ref in zip(model.seen, iterates):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, best, rtol=0, atol=1e-12)


def _pyautoattack(model, x, y, norm, eps, steps, loss):
    from pyautoattack.autopgd_base import APGDAttack

    # APGDAttack seeds and draws from the global RNG: keep that from leaking into other tests.
    with torch.random.fork_rng(devices=[]):
        attack = APGDAttack(model, n_iter=steps, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, loss=loss,
                            seed=0, device=x.device)
        return attack.perturb(x, y)


def _paired(ours, theirs):
    # Different random starts: equal strength in distribution, not per sample. b, c: samples
    # only one attack broke; |b - c| <= 4 sqrt(b + c) + 1 is a 4-sigma paired bound.
    b, c = int((~ours & theirs).sum()), int((ours & ~theirs).sum())
    assert abs(b - c) <= 4 * (b + c) ** 0.5 + 1, (b, c)
    return b, c


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")
@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm, eps", [("linf", 0.06), ("l2", 0.4)])
def test_as_strong_as_pyautoattack_on_the_toy_task(setup, norm, eps, loss):
    clf, x, y = setup
    ours = _correct(clf, apgd(clf, x, y, norm=norm, eps=eps, steps=20, loss=loss), y)
    theirs = _correct(clf, _pyautoattack(clf, x, y, norm, eps, 20, loss), y)
    # In the sensitive range (clean 99%): the budget breaks many images, not all.
    assert 0.2 < ours.double().mean().item() < 0.8
    # Measured (b, c) at n = 1000: linf ce (9, 6), dlr (9, 9); l2 ce (9, 9), dlr (11, 8).
    _paired(ours, theirs)


@pytest.mark.filterwarnings("ignore:there are .* points with zero gradient")
def test_as_strong_as_pyautoattack_on_fashion_mnist():
    from pursamere_fast.pretrained import fashion_mnist

    d = fashion_mnist(release="v1")  # the classifier the measurement below was made on
    clf, x, y = d.classifier, d.images[:200], d.labels[:200]
    ok = _correct(clf, x, y)
    x, y = x[ok][:100], y[ok][:100]
    # 20 steps on 100 images: pyautoattack attacks the whole batch every step (~6 s on one core).
    ours = _correct(clf, apgd(clf, x, y, norm="linf", eps=0.015, steps=20), y)
    theirs = _correct(clf, _pyautoattack(clf, x, y, "linf", 0.015, 20, "ce"), y)
    # Measured: 68% both, (b, c) = (1, 1); with loss "dlr" 67% both, (0, 0).
    assert 0.4 < ours.double().mean().item() < 0.95
    _paired(ours, theirs)


@pytest.mark.parametrize("norm, eps", [("linf", 0.08), ("l2", 0.5)])
def test_apgd_stays_in_budget_and_box_and_breaks_the_model(setup, norm, eps):
    clf, x, y = setup
    x, y = x[:200], y[:200]
    x_adv, first = apgd(clf, x, y, norm=norm, eps=eps, steps=10, return_history=True)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert float(_dist(x_adv, x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    wrong = ~_correct(clf, x_adv, y)
    assert wrong.double().mean().item() > 0.5
    assert torch.equal(first >= 0, wrong) and int(first.max()) <= 10


def test_apgd_deterministic_batch_invariant_and_side_effect_free(setup):
    clf, x, y = setup
    clf = copy.deepcopy(clf).double()
    x, y = x[:8].double(), y[:8]
    kw = {"norm": "linf", "eps": 0.06, "steps": 10, "restarts": 2, "loss": "dlr", "return_history": True}
    state = torch.get_rng_state()
    full, first = apgd(clf, x, y, seed=4, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in clf.parameters())
    assert 0 < int((first >= 0).sum()) < 8  # some samples leave the batch mid-run
    again, _ = apgd(clf, x, y, seed=4, **kw)
    assert torch.equal(again, full)
    assert not torch.equal(apgd(clf, x, y, seed=5, **kw)[0], full)
    with torch.inference_mode():
        assert torch.equal(apgd(clf, x, y, seed=4, **kw)[0], full)
    # float64: measured bitwise equal; the tolerance only allows a batch-size-dependent reduction order.
    for i in range(8):
        one, f = apgd(clf, x[i:i + 1], y[i:i + 1], seed=4, **kw)
        torch.testing.assert_close(one, full[i:i + 1], rtol=0, atol=1e-12)
        assert f.item() == first[i].item()


def test_apgd_restarts_cascade_and_index_the_history(setup):
    clf, x, y = setup
    x, y = x[:200], y[:200]
    kw = {"norm": "linf", "eps": 0.05, "steps": 5, "seed": 2, "return_history": True}
    one, first1 = apgd(clf, x, y, restarts=1, **kw)
    three, first3 = apgd(clf, x, y, restarts=3, **kw)
    # Restart 0 is the single run; later restarts only add samples, at indices 6..17.
    assert torch.equal(torch.where(first3 <= 5, first3, -1), first1)
    assert torch.equal(three[first1 >= 0], one[first1 >= 0])
    assert int((first3 > 5).sum()) > 0 and int(first3.max()) < 3 * 6
    assert torch.equal(first3 >= 0, ~_correct(clf, three, y))


def test_apgd_zero_budget_and_zero_steps(setup):
    clf, x, y = setup
    x, y = x[:16], y[:16]
    x_adv, first = apgd(clf, x, y, norm="l2", eps=0.0, steps=5, return_history=True)
    assert torch.equal(x_adv, x)
    assert torch.equal(first, torch.where(_correct(clf, x, y), -1, 0))
    start = apgd(clf, x, y, norm="linf", eps=0.05, steps=0)
    # linf start: x + eps * t / max|t| clamped, so some coordinate moves by exactly eps.
    assert torch.allclose(_dist(start, x, "linf"), torch.full((16,), 0.05, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"norm": "l1"}, "pgd"), ({"norm": "l3"}, "norm"), ({"eps": -0.1}, "eps"), ({"steps": -1}, "steps"),
    ({"loss": "hinge"}, "loss"), ({"restarts": 0}, "restarts"), ({"eot": 0}, "eot"), ({"seed": -1}, "seed"),
    ({"seed": [1, 2, 3]}, "seed"), ({"return_history": 1}, "return_history"),
])
def test_apgd_rejects_bad_arguments(setup, kwargs, match):
    clf, x, y = setup
    with pytest.raises(ValueError, match=match):
        apgd(clf, x[:2], y[:2], **({"norm": "linf", "eps": 0.1, "steps": 1} | kwargs))


def test_apgd_dlr_needs_three_classes():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2))
    with pytest.raises(ValueError, match="dlr.*3 classes"):
        apgd(model, torch.full((2, 1, 8, 8), 0.5), torch.tensor([0, 1]), norm="linf", eps=0.1, steps=2, loss="dlr")


def test_apgd_at_least_as_strong_as_pgd_at_the_same_cost(setup):
    clf, x, y = setup
    x, y = x[:300], y[:300]
    a = _correct(clf, apgd(clf, x, y, norm="linf", eps=0.06, steps=20), y)
    p = _correct(clf, pgd(clf, x, y, norm="linf", eps=0.06, alpha=0.06 / 4, steps=20), y)
    assert a.sum() <= p.sum() + 4 * (a ^ p).sum() ** 0.5 + 1


@pytest.mark.parametrize("norm, eps", [("linf", 0.25), ("l2", 1.5)])
def test_square_breaks_an_undefended_model_deterministically(setup, norm, eps):
    clf, x, y = setup
    x, y = x[:64], y[:64]
    kw = {"norm": norm, "eps": eps, "queries": 100}
    state = torch.get_rng_state()
    a = square(clf, x, y, seed=3, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(square(clf, x, y, seed=3, **kw), a)
    assert not torch.equal(square(clf, x, y, seed=4, **kw), a)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert float(_dist(a, x, norm).max()) <= eps * (1 + 1e-5) + 1e-6
    # Clean 99%; measured 0% (linf) and 1.6% (l2) after 100 queries.
    assert _correct(clf, a, y).double().mean().item() < 0.1
    with torch.inference_mode():
        assert torch.equal(square(clf, x, y, seed=3, **kw), a)


def test_square_arguments_and_missing_dependency(setup, monkeypatch):
    clf, x, y = setup
    kw = {"norm": "linf", "eps": 0.1, "queries": 5}
    for bad, match in [({"norm": "l1"}, "norm"), ({"queries": -1}, "queries"), ({"p_init": 0.0}, "p_init"),
                       ({"loss": "dlr"}, "loss"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=match):
            square(clf, x[:2], y[:2], **(kw | bad))
    with pytest.raises(ValueError, match="5x5"):
        square(clf, x[:2, :, :4, :4], y[:2], norm="l2", eps=0.5, queries=5)
    monkeypatch.setitem(sys.modules, "pyautoattack.square", None)
    with pytest.raises(ImportError, match=r"pursamere_fast\[autoattack\]"):
        square(clf, x[:2], y[:2], **kw)
