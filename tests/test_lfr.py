"""Local flatness regularisation (SPEC 10): lfr_penalty, gradient_penalty, pgd_examples, the
regulariser option of train_classifier and train-classifier, SmallCNN's activations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from test_train_lt import write_fashion
from torch import nn

from pursamere_fast import cli
from pursamere_fast.nets import SmallCNN, load_net, save_net
from pursamere_fast.train import (
    CHECKPOINT,
    OptimizerConfig,
    RegulariserConfig,
    ResumeError,
    gradient_penalty,
    lfr_penalty,
    pgd_examples,
    train_classifier,
)
from pursamere_fast.train.checkpoint import step_generator

pytestmark = pytest.mark.usefixtures("one_thread")
f64 = torch.float64


def linear_model(seed=0, d=8, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k)).to(f64)


def smooth_mlp(seed=0, d=16, k=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 12), nn.Softplus(), nn.Linear(12, k)).to(f64)


def batch(b=5, side=4, k=3, seed=0, dtype=f64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, side, side, generator=g, dtype=dtype)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0], dtype=dtype)  # on the box's faces: the clamp acts
    return x, torch.arange(b) % k


# ---------------------------------------------------------------------------------------------
# lfr_penalty against closed forms


def hand_gradient(model, x, y):
    """grad_x sum_i CE(W x_i + b, y_i) = (softmax - onehot) W per sample, and the softmax."""
    w, b = model[1].weight.detach(), model[1].bias.detach()
    p = torch.softmax(x.flatten(1) @ w.T + b, 1)
    return ((p - F.one_hot(y, w.shape[0]).to(f64)) @ w).view_as(x), p


@pytest.mark.numerics
def test_penalty_at_the_start_is_the_closed_form():
    model = linear_model(d=4)
    x, y = batch(4, side=2, seed=1)
    eps = 0.05
    start = x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=f64) - 1)
    penalty, x_prime = lfr_penalty(model, x, y, eps=eps, alpha=0.02, steps=0, start=start)
    want_x = start.clamp(0, 1)  # inside the ball already: only [0, 1] clips
    g, _ = hand_gradient(model, want_x, y)
    torch.testing.assert_close(x_prime, want_x, rtol=0, atol=0)
    torch.testing.assert_close(penalty, g.abs().flatten(1).sum(1), rtol=1e-12, atol=1e-14)
    assert penalty.shape == (4,) and penalty.requires_grad and not x_prime.requires_grad


@pytest.mark.numerics
def test_one_ascent_step_is_the_closed_form():
    # d/dx ||W^T (p - e)||_1 = W^T (diag(p) - p p^T) W s with s = sign(W^T (p - e)).
    model = linear_model(d=4)
    x, y = batch(4, side=2, seed=1)
    eps, alpha = 0.05, 0.03
    start = (x + eps * (2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(2), dtype=f64) - 1)).clamp(0, 1)
    w = model[1].weight.detach()
    g, p = hand_gradient(model, start, y)
    v = g.flatten(1).sign() @ w.T
    ascent = (p * v - p * (p * v).sum(1, keepdim=True)) @ w
    assert ascent.abs().min() > 1e-6  # no sign is a rounding accident
    want_x = torch.minimum(torch.maximum(start + alpha * ascent.sign().view_as(x), x - eps), x + eps).clamp(0, 1)
    penalty, x_prime = lfr_penalty(model, x, y, eps=eps, alpha=alpha, steps=1, start=start)
    torch.testing.assert_close(x_prime, want_x, rtol=0, atol=1e-15)
    assert (x_prime - x).abs().max() == pytest.approx(eps)  # some coordinates stop at the ball
    torch.testing.assert_close(penalty, hand_gradient(model, want_x, y)[0].abs().flatten(1).sum(1),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.numerics
def test_penalty_is_per_sample_not_divided_by_the_batch():
    model = smooth_mlp()
    x, y = batch(5)
    start = (x + 0.01).clamp(0, 1)
    penalty, x_prime = lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=2, start=start)
    for i in range(5):
        one, one_x = lfr_penalty(model, x[i:i + 1], y[i:i + 1], eps=0.1, alpha=0.02, steps=2, start=start[i:i + 1])
        torch.testing.assert_close(one, penalty[i:i + 1], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(one_x, x_prime[i:i + 1], rtol=0, atol=1e-15)


def test_random_start_and_eps_zero():
    model = smooth_mlp()
    x, y = batch(5)
    g = torch.Generator().manual_seed(3)
    _, x0 = lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=0, generator=g)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=f64)
    assert torch.equal(x0, (x + 1e-3 * noise).clamp(0, 1))
    # eps = 0 pins x' to x: the clean-point penalty, bit for bit.
    penalty, x_prime = lfr_penalty(model, x, y, eps=0.0, alpha=0.02, steps=3, generator=g)
    assert torch.equal(x_prime, x) and torch.equal(penalty, gradient_penalty(model, x, y))


def test_inner_loop_raises_the_norm_inside_the_ball():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, width=4, image_size=8, activation="softplus")
    x, y = batch(16, side=8, dtype=torch.float32)
    eps = 0.1

    def run(steps):
        return lfr_penalty(model, x, y, eps=eps, alpha=0.02, steps=steps, generator=torch.Generator().manual_seed(5))

    at_start, _ = run(0)
    penalty, x_prime = run(8)
    # Signed steps are not monotone per sample; on this untrained net the mean rises ~6%.
    assert penalty.mean() > 1.03 * at_start.mean() and (penalty > at_start).float().mean() >= 0.75
    assert (x_prime - x).abs().max() <= eps + 1e-6 and x_prime.min() >= 0 and x_prime.max() <= 1
    # The penalty is the norm at the x' returned.
    torch.testing.assert_close(penalty, gradient_penalty(model, x_prime, y), rtol=0, atol=0)


@pytest.mark.numerics
def test_penalty_gradient_reaches_the_weights_and_matches_a_finite_difference():
    model = smooth_mlp()
    x, y = batch(5)
    penalty, x_prime = lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=3,
                                   generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    grads = torch.autograd.grad(penalty.sum(), params)
    assert all(g.abs().max() > 1e-3 for g in grads)
    # x' is held fixed (detached): the derivative is the penalty's at x', as training uses it.
    directions = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=f64)
                  for i, p in enumerate(params)]
    h = 1e-6

    def at(sign):
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.add_(sign * h * d)
        value = lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=0, start=x_prime)[0].sum().item()
        with torch.no_grad():
            for p, d in zip(params, directions):
                p.sub_(sign * h * d)
        return value

    fd = (at(1) - at(-1)) / (2 * h)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    assert fd == pytest.approx(analytic, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Modes


class Recorder(nn.Module):
    """A smooth net that records the mode of each forward; `fail_at` raises at that forward."""

    def __init__(self, fail_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Softplus())
        self.head = nn.Linear(6, 3)
        self.modes, self.fail_at = [], fail_at

    def forward(self, x):
        if len(self.modes) == self.fail_at:
            raise RuntimeError("boom")
        self.modes.append(self.training)
        return self.head(self.body(x))


@pytest.mark.parametrize("training", [True, False])
def test_modes_are_eval_inside_and_restored(training):
    x, y = batch(3, dtype=torch.float32)
    model = Recorder().train(training)
    model.body.eval()  # a submodule frozen in eval mode stays so
    lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=3)
    # Three inner forwards in eval mode, the penalty's in the model's own.
    assert model.modes == [False, False, False, training]
    assert model.training == training and not model.body.training and model.head.training == training
    model.modes = []
    pgd_examples(model, x, y, eps=0.1, alpha=0.02, steps=2)
    assert model.modes == [False, False] and model.training == training and not model.body.training
    model.modes, model.fail_at = [], 1
    with pytest.raises(RuntimeError, match="boom"):
        lfr_penalty(model, x, y, eps=0.1, alpha=0.02, steps=3)
    assert model.training == training and not model.body.training and model.head.training == training
    model.modes = []
    with pytest.raises(RuntimeError, match="boom"):
        pgd_examples(model, x, y, eps=0.1, alpha=0.02, steps=3)
    assert model.training == training and not model.body.training


# ---------------------------------------------------------------------------------------------
# gradient_penalty and pgd_examples


@pytest.mark.numerics
def test_gradient_penalty_is_the_closed_form():
    model = linear_model(d=16)
    x, y = batch(5)
    penalty = gradient_penalty(model, x, y)
    torch.testing.assert_close(penalty, hand_gradient(model, x, y)[0].abs().flatten(1).sum(1),
                               rtol=1e-12, atol=1e-14)
    assert penalty.requires_grad
    torch.autograd.grad(penalty.sum(), model[1].weight)  # reaches the weights
    with torch.no_grad():  # it builds its own graph, as a trainer's evaluation might call it
        assert gradient_penalty(model, x, y).requires_grad


@pytest.mark.numerics
def test_pgd_examples_start_and_one_step():
    model = linear_model(d=16)
    x, y = batch(5)
    eps, alpha = 0.05, 0.03
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=f64)
    start = (x + (2 * u - 1) * eps).clamp(0, 1)
    assert torch.equal(pgd_examples(model, x, y, eps=eps, alpha=alpha, steps=0,
                                    generator=torch.Generator().manual_seed(4)), start)
    g, _ = hand_gradient(model, start, y)
    want = torch.minimum(torch.maximum(start + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    got = pgd_examples(model, x, y, eps=eps, alpha=alpha, steps=1, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_pgd_examples_raise_the_loss_inside_the_ball():
    torch.manual_seed(0)
    model = SmallCNN(1, 3, width=4, image_size=8)
    x, y = batch(16, side=8, dtype=torch.float32)
    x_adv = pgd_examples(model, x, y, eps=0.1, alpha=0.025, steps=5, generator=torch.Generator().manual_seed(0))
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean = F.cross_entropy(model(x), y, reduction="none")
        adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (adv > clean).all()
    again = pgd_examples(model, x, y, eps=0.1, alpha=0.025, steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)


BAD_ARGS = [({"eps": -0.1}, "eps"), ({"eps": float("nan")}, "eps"), ({"alpha": -1.0}, "alpha"),
            ({"steps": -1}, "steps"), ({"steps": 1.5}, "steps"), ({"steps": True}, "steps"),
            ({"generator": 3}, "generator")]


@pytest.mark.parametrize("fn", [lfr_penalty, pgd_examples])
@pytest.mark.parametrize("bad, name", BAD_ARGS, ids=[str(b) for b, _ in BAD_ARGS])
def test_arguments_are_validated(fn, bad, name):
    model = smooth_mlp()
    x, y = batch(3)
    with pytest.raises(ValueError, match=f"^{name} must be"):
        fn(model, x, y, **({"eps": 0.1, "alpha": 0.02, "steps": 1} | bad))


def test_inputs_are_validated():
    model = smooth_mlp()
    x, y = batch(3)
    kw = {"eps": 0.1, "alpha": 0.02, "steps": 1}
    with pytest.raises(ValueError, match="^start must have shape"):
        lfr_penalty(model, x, y, start=x[:2], **kw)
    with pytest.raises(ValueError, match="^x must lie in"):
        lfr_penalty(model, x + 2, y, **kw)
    with pytest.raises(ValueError, match="^y must have shape"):
        gradient_penalty(model, x, y[:2])
    with pytest.raises(ValueError, match="^y must be an integer"):
        pgd_examples(model, x, y.double(), **kw)


# ---------------------------------------------------------------------------------------------
# train_classifier

SEED, LR = 2, 1e-2
REGS = {"lfr": RegulariserConfig("lfr", eps=0.1, alpha=0.03, steps=3, lam=0.5),
        "gradpen": RegulariserConfig("gradpen", lam=0.5),
        "pgd-at": RegulariserConfig("pgd-at", eps=0.1, alpha=0.03, steps=3)}
# Forwards per training step: the inner steps, the penalty's, the clean CE's.
FORWARDS = {"lfr": 3 + 1 + 1, "gradpen": 1 + 1, "pgd-at": 3 + 1}


def blobs(n=24, side=8, seed=0):
    """Three classes: a bright 3x3 square at a class-dependent corner, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 1, side, side, generator=g)
    for i, c in enumerate(y.tolist()):
        r, col = [(0, 0), (0, side - 3), (side - 3, 0)][c]
        x[i, 0, r:r + 3, col:col + 3] += 0.8
    return x.clamp(0, 1), y


def clf_net(seed=1):
    torch.manual_seed(seed)
    return SmallCNN(1, 3, width=4, image_size=8, activation="softplus")


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def train(out_dir, epochs=2, reg="lfr", model=None, opt="adam", **kw):
    x, y = blobs()
    if reg is not None and not isinstance(reg, RegulariserConfig):
        kw["regulariser"] = REGS[reg]
    elif reg is not None:
        kw["regulariser"] = reg
    kw = {"batch_size": 8, "lr": LR, "seed": SEED, "checkpoint_every": 2, "progress": False} | kw
    return train_classifier(model if model is not None else clf_net(), x, y, epochs=epochs, out_dir=out_dir,
                            optimizer=OptimizerConfig(opt), **kw)


def reference_run(reg, epochs, opt):
    """The trainer's loop written out with SPEC 10's losses: data order from (seed, epoch), the
    random starts from (seed, step, 1)."""
    cfg = REGS[reg]
    x, y = blobs()
    model = clf_net()
    optimizer = (torch.optim.Adam(model.parameters(), lr=LR) if opt == "adam"
                 else torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9))
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=step_generator(SEED, epoch))
        for b in range(3):
            step = 3 * epoch + b
            xb, yb = x[perm[8 * b:8 * b + 8]], y[perm[8 * b:8 * b + 8]]
            g = step_generator(SEED, step, 1)
            if reg == "pgd-at":
                loss = F.cross_entropy(model(pgd_examples(model, xb, yb, eps=cfg.eps, alpha=cfg.alpha,
                                                          steps=cfg.steps, generator=g)), yb)
            else:
                penalty = (lfr_penalty(model, xb, yb, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.steps, generator=g)[0]
                           if reg == "lfr" else gradient_penalty(model, xb, yb))
                loss = F.cross_entropy(model(xb), yb) + cfg.lam * penalty.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model


@pytest.mark.parametrize("reg, opt", [("lfr", "adam"), ("lfr", "sgd"), ("gradpen", "adam"), ("pgd-at", "sgd")])
def test_each_regulariser_is_its_algorithm(tmp_path, reg, opt):
    res = train(tmp_path, 2, reg, opt=opt)
    assert state_equal(res.model, reference_run(reg, 2, opt))
    assert res.step == 6 and all(math.isfinite(v) for _, v in res.losses)
    assert not state_equal(res.model, train(tmp_path / "plain", 2, None, opt=opt).model)


def test_no_regulariser_is_the_trainer_as_before(tmp_path):
    before = train(tmp_path / "a", 2, None)
    for i, reg in enumerate([RegulariserConfig(), RegulariserConfig("none", eps=0.3, steps=40, lam=1.0)]):
        res = train(tmp_path / f"b{i}", 2, reg)
        assert state_equal(before.model, res.model) and before.losses == res.losses
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / CHECKPOINT), framework="pt") as f:
        assert "regulariser" not in json.loads(f.metadata()["hparams"])
    # A run made without the option resumes with regulariser "none".
    assert train(tmp_path / "a", 3, RegulariserConfig()).step == 9


class Killed(Exception):
    pass


class KillAfter(nn.Module):
    """Wraps a model and raises after `calls` forwards: a run killed mid-way."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x):
        if self.calls == 0:
            raise Killed
        self.calls -= 1
        return self.model(x)


@pytest.mark.parametrize("reg", list(REGS))
def test_resume_gives_the_same_weights(tmp_path, reg):
    # 3 steps per epoch, checkpoints after steps 2, 3, 4, 6: killed inside step 5, resumed from 4.
    straight = train(tmp_path / "a", 2, reg)
    with pytest.raises(Killed):
        train(tmp_path / "b", 2, reg, model=KillAfter(clf_net(), 4 * FORWARDS[reg] + 1))
    resumed = train(tmp_path / "b", 2, reg, model=KillAfter(clf_net(seed=7), -1))
    assert state_equal(straight.model, resumed.model.model)
    assert resumed.losses == straight.losses


@pytest.mark.parametrize("other", [RegulariserConfig("lfr", eps=0.1, alpha=0.03, steps=3, lam=0.4),
                                   RegulariserConfig("lfr", eps=0.2, alpha=0.03, steps=3, lam=0.5),
                                   RegulariserConfig("lfr", eps=0.1, alpha=0.03, steps=2, lam=0.5),
                                   RegulariserConfig("pgd-at", eps=0.1, alpha=0.03, steps=3),
                                   RegulariserConfig("none"), None])
def test_resume_with_other_regulariser_settings_is_refused(tmp_path, other):
    train(tmp_path, 1, "lfr")
    with pytest.raises(ResumeError, match="hyperparameters differ.*regulariser"):
        train(tmp_path, 2, other)


def test_unused_regulariser_settings_do_not_block_a_resume(tmp_path):
    train(tmp_path, 1, "gradpen")
    res = train(tmp_path, 2, RegulariserConfig("gradpen", eps=0.3, alpha=0.1, steps=40, lam=0.5))
    assert state_equal(res.model, train(tmp_path / "straight", 2, "gradpen").model)


def test_regulariser_refuses_sam_purification_and_non_configs(tmp_path):
    with pytest.raises(ValueError, match="^regulariser 'lfr' needs optimizer adam or sgd, got 'sam'"):
        train(tmp_path, 1, "lfr", opt="sam")
    with pytest.raises(ValueError, match="^regulariser 'pgd-at' does not combine with purify_score"):
        train(tmp_path, 1, "pgd-at", purify_score=lambda y, sigma: y)
    with pytest.raises(ValueError, match="^regulariser must be a RegulariserConfig"):
        train(tmp_path, 1, None, regulariser="lfr")
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize("bad", [{"name": "LFR"}, {"name": "trades"}, {"eps": -0.1}, {"alpha": float("inf")},
                                 {"steps": -1}, {"steps": 2.0}, {"lam": -1.0}, {"lam": float("nan")}])
def test_regulariser_config_validates(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        RegulariserConfig(**bad)


def test_regulariser_config_used():
    assert RegulariserConfig().used() == {"name": "none"}
    assert RegulariserConfig("gradpen", eps=0.3).used() == {"name": "gradpen", "lam": 0.02}
    assert RegulariserConfig("pgd-at", steps=7).used() == {"name": "pgd-at", "eps": 0.1, "alpha": 0.01, "steps": 7}
    assert RegulariserConfig("lfr").used() == {"name": "lfr", "eps": 0.1, "alpha": 0.01, "steps": 10, "lam": 0.02}


# ---------------------------------------------------------------------------------------------
# The command line


def train_cli(tmp_path, *extra, out="o"):
    return cli.main(["train-classifier", "--out", str(tmp_path / out), "--data-root", str(tmp_path / "fm"),
                     "--width", "4", "--epochs", "1", "--batch-size", "32", "--no-progress", *extra])


def test_cli_lfr_end_to_end(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    assert train_cli(tmp_path, "--lfr", "--activation", "softplus", "--reg-eps", "8/255", "--reg-steps", "2") == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["regulariser"] == {"name": "lfr", "eps": 8 / 255, "alpha": 0.01, "steps": 2, "lam": 0.02}
    assert m["activation"] == "softplus" and m["steps"] == 4 and 0 <= m["test_accuracy"] <= 1
    model = load_net(tmp_path / "o" / "classifier.safetensors")
    assert isinstance(model.features[1], nn.Softplus)
    err = capsys.readouterr().err
    assert "note:" not in err
    # The same settings resume; others are a one-line error naming --out.
    assert train_cli(tmp_path, "--lfr", "--activation", "softplus", "--reg-eps", "8/255", "--reg-steps", "2") == 0
    with pytest.raises(SystemExit) as exit_info:
        train_cli(tmp_path, "--lfr", "--activation", "softplus", "--reg-eps", "8/255", "--reg-steps", "3")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "error: argument --out: cannot resume" in err and "regulariser" in err


def test_cli_notes_relu_with_a_gradient_penalty(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    assert train_cli(tmp_path, "--regulariser", "gradpen", "--reg-lambda", "0.1") == 0
    assert "note: gradpen with --activation relu" in capsys.readouterr().err
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["regulariser"] == {"name": "gradpen", "lam": 0.1} and m["activation"] == "relu"
    assert isinstance(load_net(tmp_path / "o" / "classifier.safetensors").features[1], nn.ReLU)


BAD_OPTIONS = [
    (["--regulariser", "trades"], "--regulariser"),
    (["--lfr", "--regulariser", "pgd-at"], "--regulariser"),
    (["--lfr", "--reg-eps=-0.1"], "--reg-eps"),
    (["--lfr", "--reg-alpha", "abc"], "--reg-alpha"),
    (["--lfr", "--reg-steps", "1.5"], "--reg-steps"),
    (["--lfr", "--reg-lambda", "nan"], "--reg-lambda"),
    (["--reg-eps", "0.1"], "--reg-eps"),  # no regulariser reads nothing
    (["--regulariser", "none", "--reg-lambda", "0.1"], "--reg-lambda"),
    (["--regulariser", "pgd-at", "--reg-lambda", "0.1"], "--reg-lambda"),
    (["--regulariser", "gradpen", "--reg-steps", "3"], "--reg-steps"),
    (["--regulariser", "gradpen", "--reg-alpha", "0.1"], "--reg-alpha"),
    (["--lfr", "--optimizer", "sam"], "--lfr"),
    (["--regulariser", "pgd-at", "--optimizer", "ssesam"], "--regulariser"),
    (["--activation", "tanh"], "--activation"),
]


@pytest.mark.parametrize("extra, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_cli_bad_option_is_a_one_line_error(tmp_path, capsys, extra, option):
    write_fashion(tmp_path / "fm", per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        train_cli(tmp_path, *extra)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pursamere-fast train-classifier: error: argument {option}: ")
    assert "Traceback" not in out + err
    assert not (tmp_path / "o" / CHECKPOINT).exists()


def test_cli_regulariser_with_purified_augmentation_is_refused(tmp_path, capsys):
    score = tmp_path / "score.safetensors"
    score.write_bytes(b"not read: the combination is refused first")
    with pytest.raises(SystemExit) as exit_info:
        train_cli(tmp_path, "--lfr", "--purify-score", str(score))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.strip() == "pursamere-fast train-classifier: error: argument --lfr: lfr does not combine with " \
                          "--purify-score"


# ---------------------------------------------------------------------------------------------
# SmallCNN's activation

# The shipped classifier's parameter names: every activation keeps them.
SMALLCNN_PARAMS = ["features.0.weight", "features.0.bias", "features.2.weight", "features.2.bias",
                   "features.5.weight", "features.5.bias", "features.7.weight", "features.7.bias",
                   "head.1.weight", "head.1.bias", "head.3.weight", "head.3.bias"]


@pytest.mark.parametrize("activation, cls", [("relu", nn.ReLU), ("softplus", nn.Softplus), ("gelu", nn.GELU)])
def test_smallcnn_activation_round_trips(tmp_path, activation, cls):
    torch.manual_seed(0)
    model = SmallCNN(1, 3, width=4, image_size=8, activation=activation).eval()
    assert [n for n, _ in model.named_parameters()] == SMALLCNN_PARAMS
    assert sum(isinstance(m, cls) for m in model.modules()) == 5
    save_net(model, tmp_path / "m.safetensors")
    loaded = load_net(tmp_path / "m.safetensors")
    assert loaded.config["activation"] == activation and sum(isinstance(m, cls) for m in loaded.modules()) == 5
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model(x), loaded(x))


def test_smallcnn_default_and_old_files_are_relu(tmp_path):
    torch.manual_seed(0)
    default = SmallCNN(1, 3, width=4, image_size=8)
    assert default.config["activation"] == "relu"
    torch.manual_seed(0)
    assert state_equal(default, SmallCNN(1, 3, width=4, image_size=8, activation="relu"))
    # A file written before the option: no "activation" in arch_config.
    save_net(default, tmp_path / "new.safetensors")
    config = {k: v for k, v in default.config.items() if k != "activation"}
    save_file(load_file(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors"),
              metadata={"arch": "SmallCNN", "arch_config": json.dumps(config)})
    old = load_net(tmp_path / "old.safetensors")
    assert old.config["activation"] == "relu" and isinstance(old.head[2], nn.ReLU)
    assert state_equal(old, default)


@pytest.mark.parametrize("bad", ["tanh", "ReLU", None, ["relu"]])
def test_smallcnn_refuses_other_activations(bad):
    with pytest.raises(ValueError, match="^activation must be one of"):
        SmallCNN(activation=bad)

