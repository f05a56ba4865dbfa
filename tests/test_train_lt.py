"""Long-tailed classifier training: LT subsets, the SAM-family options of train_classifier and
train-classifier, their checkpoints and resumes (SPEC 9)."""

import dataclasses
import gzip
import json
import math
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pursamere_fast import cli
from pursamere_fast.nets import SmallCNN
from pursamere_fast.optim import SAM, SSESAM, ImbSAM
from pursamere_fast.train import (
    CHECKPOINT,
    OptimizerConfig,
    ResumeError,
    long_tailed_counts,
    long_tailed_subset,
    per_class_accuracy,
    tail_classes,
    train_classifier,
)
from pursamere_fast.train import classifier as classifier_module
from pursamere_fast.train.checkpoint import step_generator

pytestmark = pytest.mark.usefixtures("one_thread")

FMNIST_LT_100 = [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
# Radii large enough that a perturbed step differs clearly from a plain one.
CONFIGS = {
    "adam": OptimizerConfig("adam"),
    "sgd": OptimizerConfig("sgd", weight_decay=5e-4),
    "sam": OptimizerConfig("sam", weight_decay=5e-4, rho=0.2),
    "imbsam": OptimizerConfig("imbsam", weight_decay=5e-4, rho=0.3, tail_threshold=12),
    "ssesam": OptimizerConfig("ssesam", weight_decay=5e-4, rho_head=0.15, rho_tail=0.3, gamma=0.5,
                              tail_threshold=12),
}
LR = {"adam": 1e-2, "sgd": 0.05, "sam": 0.05, "imbsam": 0.05, "ssesam": 0.05}


def lt_blobs(counts=(24, 12, 6), side=8, seed=0):
    """Long-tailed images: a bright 3x3 square at a class-dependent corner, plus noise; with
    tail_threshold 12 classes 0 is head and 1, 2 are tail."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = 0.1 * torch.rand(len(labels), 1, side, side, generator=g)
    for i, c in enumerate(labels.tolist()):
        r, col = [(0, 0), (0, side - 3), (side - 3, 0)][c]
        x[i, 0, r:r + 3, col:col + 3] += 0.8
    return x.clamp(0, 1), labels


def clf_net(seed=1):
    torch.manual_seed(seed)
    return SmallCNN(1, 3, width=4, image_size=8)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run(out_dir, epochs, name="sgd", model=None, config=None, **kw):
    x, y = lt_blobs()
    kw = {"batch_size": 14, "lr": LR[name], "seed": 2, "checkpoint_every": 2, "progress": False} | kw
    return train_classifier(model if model is not None else clf_net(), x, y, epochs=epochs, out_dir=out_dir,
                            optimizer=config or CONFIGS[name], **kw)


# ---------------------------------------------------------------------------------------------
# Long-tailed subsets


def test_long_tailed_counts_follow_the_formula():
    assert long_tailed_counts(6000, 100, 10) == FMNIST_LT_100
    for n_max, ratio, classes in [(500, 10, 10), (5000, 50, 100), (37, 3.5, 7), (10, 1, 4), (8, 8, 2)]:
        counts = long_tailed_counts(n_max, ratio, classes)
        assert counts == [math.floor(n_max * ratio ** (-c / (classes - 1))) for c in range(classes)]
        assert counts[0] == n_max and counts[-1] == math.floor(n_max / ratio)
        assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("args, name", [((0, 10, 10), "n_max"), ((100, 0.5, 10), "ratio"),
                                        ((100, 101, 10), "ratio"), ((100, float("nan"), 10), "ratio"),
                                        ((100, 10, 1), "num_classes")])
def test_long_tailed_counts_validate(args, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        long_tailed_counts(*args)


def test_long_tailed_subset_counts_and_determinism():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.repeat(np.arange(10), 60))
    labels = np.concatenate([labels, [3] * 7])  # a larger class: n_max is the smallest count
    idx = long_tailed_subset(labels, 20, seed=4)
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # ascending, no repeats
    assert np.bincount(labels[idx]).tolist() == long_tailed_counts(60, 20, 10)
    assert np.array_equal(idx, long_tailed_subset(torch.as_tensor(labels), 20, seed=4))
    assert not np.array_equal(idx, long_tailed_subset(labels, 20, seed=5))
    assert np.bincount(labels[long_tailed_subset(labels, 20, seed=5)]).tolist() == long_tailed_counts(60, 20, 10)
    # ratio 1 keeps n_max of every class.
    assert np.bincount(labels[long_tailed_subset(labels, 1, seed=0)]).tolist() == [60] * 10


def test_long_tailed_subset_validates():
    with pytest.raises(ValueError, match="every class"):
        long_tailed_subset(np.array([0, 0, 2, 2]), 2)
    with pytest.raises(ValueError, match="^labels must be"):
        long_tailed_subset(np.array([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="^ratio must be"):
        long_tailed_subset(np.array([0, 1, 1]), 2)  # n_max = 1 allows no ratio above 1
    with pytest.raises(ValueError, match="^seed must be"):
        long_tailed_subset(np.array([0, 1]), 1, seed=-1)


def test_tail_classes():
    y = torch.tensor([0] * 5 + [1] * 3 + [3] * 4)
    assert tail_classes(y, 4) == [1, 2]  # class 2 has no sample
    assert tail_classes(y, 1) == [2]
    assert tail_classes(y, 6) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="^tail_threshold must be"):
        tail_classes(y, 0)


def test_per_class_accuracy():
    class Fixed(torch.nn.Module):  # predicts class int(x[0, 0, 0] * 10)
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return F.one_hot((x[:, 0, 0, 0] * 10).long(), 4).float() + self.w

    x = torch.zeros(6, 1, 2, 2)
    x[:, 0, 0, 0] = torch.tensor([0.0, 0.1, 0.1, 0.2, 0.3, 0.0]) + 0.01
    y = torch.tensor([0, 1, 2, 2, 2, 0])
    assert per_class_accuracy(Fixed(), x, y, batch_size=4) == [1.0, 1.0, pytest.approx(1 / 3)]
    acc = per_class_accuracy(Fixed(), x, y, num_classes=4)
    assert acc[:3] == [1.0, 1.0, pytest.approx(1 / 3)] and math.isnan(acc[3])
    with pytest.raises(ValueError, match="^labels must be class indices"):
        per_class_accuracy(Fixed(), x, y, num_classes=2)


# ---------------------------------------------------------------------------------------------
# The optimisers inside train_classifier


def reference_run(name, epochs, batch_size=14, seed=2):
    """train_classifier's loop written out with the optim wrappers and SPEC 9's losses: data order
    from (seed, epoch), cosine lr when configured, L_H / L_T as sums over the batch size."""
    cfg = CONFIGS[name]
    x, y = lt_blobs()
    model = clf_net()
    params = list(model.parameters())
    if name == "adam":
        opt = torch.optim.Adam(params, lr=LR[name], weight_decay=cfg.weight_decay)
    else:
        base = torch.optim.SGD(params, lr=LR[name], momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        opt = {"sgd": lambda: base, "sam": lambda: SAM(base, cfg.rho), "imbsam": lambda: ImbSAM(base, cfg.rho),
               "ssesam": lambda: SSESAM(base, cfg.rho_head, cfg.rho_tail)}[name]()
    counts = torch.bincount(y)
    steps = math.ceil(len(y) / batch_size)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y), generator=step_generator(seed, epoch))
        for b in range(steps):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            step = epoch * steps + b
            if cfg.schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = LR[name] * 0.5 * (1 + math.cos(math.pi * step / (epochs * steps)))
            if name in ("adam", "sgd"):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            elif name == "sam":
                opt.step(lambda xb=xb, yb=yb: F.cross_entropy(model(xb), yb))
            else:
                if name == "ssesam":
                    opt.rho_head = cfg.rho_head if epoch < cfg.gamma * epochs else 0.0
                tail = counts[yb] < cfg.tail_threshold

                def closure(xb=xb, yb=yb, tail=tail):
                    per = F.cross_entropy(model(xb), yb, reduction="none")
                    return per[~tail].sum() / len(yb), per[tail].sum() / len(yb)

                opt.step(closure)
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_optimizer_is_its_algorithm(tmp_path, name):
    # 42 images / batch 14 = 3 steps per epoch; ssesam (gamma 0.5) switches to phase 2 at epoch 1.
    res = run(tmp_path, 2, name)
    assert state_equal(res.model, reference_run(name, 2))
    assert res.step == 6 and all(np.isfinite(v) for _, v in res.losses)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_optimizer_lowers_the_loss(tmp_path, name):
    # An MLP: with SGD the width-4 SmallCNN sits on its class-prior plateau for longer than a
    # fast test can wait (loss 1.08 -> 0.96 in 30 steps); the MLP drops below 0.3 in 18.
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    res = run(tmp_path, 6, name, model=mlp, config=dataclasses.replace(CONFIGS[name], schedule="cosine"),
              lr=0.1 if name != "adam" else 1e-2)
    losses = [v for _, v in res.losses]
    assert np.mean(losses[-3:]) < 0.4 * np.mean(losses[:3])


def test_optimizers_differ_as_the_algorithms_say(tmp_path):
    plain = run(tmp_path / "sgd", 1, "sgd").model
    # SAM with rho = 0 is its base optimiser, bit for bit; rho > 0 changes the step.
    sam0 = run(tmp_path / "sam0", 1, "sam", config=OptimizerConfig("sam", weight_decay=5e-4, rho=0.0)).model
    assert state_equal(plain, sam0)
    assert not state_equal(plain, run(tmp_path / "sam", 1, "sam").model)
    # SSE-SAM with gamma = 0 has rho_H = 0 from the start: ImbSAM with rho = rho_T.
    imb = run(tmp_path / "imb", 2, "imbsam").model
    sse0 = run(tmp_path / "sse0", 2, "ssesam", config=OptimizerConfig(
        "ssesam", weight_decay=5e-4, rho_head=0.15, rho_tail=0.3, gamma=0.0, tail_threshold=12)).model
    assert state_equal(imb, sse0)
    assert not state_equal(imb, run(tmp_path / "sse", 2, "ssesam").model)
    # With no class below the threshold there is no tail loss: ImbSAM's gradient is grad L_H = grad L.
    no_tail = run(tmp_path / "notail", 1, "imbsam",
                  config=OptimizerConfig("imbsam", weight_decay=5e-4, rho=0.3, tail_threshold=1)).model
    for a, b in zip(plain.parameters(), no_tail.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights(tmp_path):
    a = run(tmp_path / "a", 2, "ssesam")
    b = run(tmp_path / "b", 2, "ssesam")
    c = run(tmp_path / "c", 2, "ssesam", seed=3)
    assert state_equal(a.model, b.model) and a.losses == b.losses
    assert not state_equal(a.model, c.model)


def test_logged_loss_is_the_mean_cross_entropy_at_w(tmp_path):
    x, y = lt_blobs()
    idx = torch.randperm(len(y), generator=step_generator(2, 0))[:14]  # the first batch (seed 2, epoch 0)
    want = F.cross_entropy(clf_net()(x[idx]), y[idx]).item()
    for name in ("sgd", "sam", "imbsam", "ssesam"):
        assert run(tmp_path / name, 1, name).losses[0][1] == pytest.approx(want, rel=1e-6), name


@pytest.mark.parametrize("bad", [{"name": "adamw"}, {"name": "SAM"}, {"schedule": "linear"}, {"weight_decay": -1.0},
                                 {"momentum": 1.0}, {"momentum": -0.1}, {"rho": -0.1}, {"rho_head": float("nan")},
                                 {"rho_tail": float("inf")}, {"gamma": 1.5}, {"tail_threshold": 0},
                                 {"tail_threshold": 2.5}])
def test_optimizer_config_validates(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be"):
        OptimizerConfig(**bad)


def test_train_classifier_refuses_a_non_config(tmp_path):
    with pytest.raises(ValueError, match="^optimizer must be an OptimizerConfig"):
        run(tmp_path, 1, config="sam")
    assert not (tmp_path / CHECKPOINT).exists()


# ---------------------------------------------------------------------------------------------
# Checkpoints


class Killed(Exception):
    pass


class KillAfter(torch.nn.Module):
    """Wraps a model and raises after `calls` forwards: a run killed mid-way."""

    def __init__(self, model, calls):
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, *args):
        if self.calls == 0:
            raise Killed
        self.calls -= 1
        return self.model(*args)


@pytest.mark.parametrize("name", ["adam", "sgd", "sam", "imbsam", "ssesam"])
def test_resume_restores_the_optimizer_state(tmp_path, name, monkeypatch):
    # 3 steps per epoch, checkpoints after steps 2, 3, 4, 6: killed in step 5, resumed from 4.
    # ssesam (gamma 0.5) changes phase at epoch 1, so the killed part ran phase 1.
    straight = run(tmp_path / "a", 2, name)
    # Forwards in steps 0..4 (ssesam: 3 per step in phase 1, 2 in phase 2); step 5's first one raises.
    forwards = {"adam": 5, "sgd": 5, "sam": 10, "imbsam": 10, "ssesam": 3 * 3 + 2 * 2}[name]
    with pytest.raises(Killed):
        run(tmp_path / "b", 2, name, model=KillAfter(clf_net(), forwards))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "b" / CHECKPOINT)
    buffers = [k for k in saved if k.startswith("optim.")]
    want = {"adam": ("exp_avg", "exp_avg_sq", "step")}.get(name, ("momentum_buffer",))
    assert buffers and {k.split(".", 2)[2] for k in buffers} == set(want)
    resumed = run(tmp_path / "b", 2, name, model=KillAfter(clf_net(seed=7), -1))
    assert state_equal(straight.model, resumed.model.model)
    assert resumed.losses == straight.losses
    # The state matters: a resume that drops it ends elsewhere.
    with pytest.raises(Killed):
        run(tmp_path / "c", 2, name, model=KillAfter(clf_net(), forwards))
    monkeypatch.setattr(classifier_module, "load_optimizer", lambda opt, tensors: None)
    forgetful = run(tmp_path / "c", 2, name, model=KillAfter(clf_net(seed=7), -1))
    assert not state_equal(straight.model, forgetful.model.model)


@pytest.mark.parametrize("other", [
    {"config": OptimizerConfig("sam", weight_decay=5e-4, rho=0.2)},
    {"config": OptimizerConfig("ssesam", weight_decay=5e-4, rho_head=0.15, rho_tail=0.25, gamma=0.5,
                               tail_threshold=12)},
    {"config": OptimizerConfig("ssesam", weight_decay=5e-4, rho_head=0.15, rho_tail=0.3, gamma=0.5,
                               tail_threshold=20)},
    {"config": OptimizerConfig("ssesam", weight_decay=5e-4, rho_head=0.15, rho_tail=0.3, gamma=0.5,
                               tail_threshold=12, schedule="cosine")},
    {"epochs": 3},  # gamma * epochs moves: the phase switch would too
])
def test_resume_with_other_optimizer_settings_is_refused(tmp_path, other):
    run(tmp_path, 2, "ssesam")
    with pytest.raises(ResumeError, match="hyperparameters differ"):
        run(tmp_path, other.get("epochs", 2), "ssesam", config=other.get("config"))


def test_unused_settings_do_not_block_a_resume(tmp_path):
    # SGD reads no radius; a constant schedule lets epochs grow, as before.
    run(tmp_path, 1, "sgd")
    res = run(tmp_path, 2, "sgd", config=OptimizerConfig("sgd", weight_decay=5e-4, rho=0.9, gamma=0.1))
    assert state_equal(res.model, run(tmp_path / "straight", 2, "sgd").model)


# ---------------------------------------------------------------------------------------------
# The command line


def write_fashion(directory, per_class=10):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    n = 10 * per_class
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (directory / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return directory


def train_cli(tmp_path, *extra, out="o"):
    return cli.main(["train-classifier", "--out", str(tmp_path / out), "--data-root", str(tmp_path / "fm"),
                     "--width", "4", "--epochs", "1", "--batch-size", "16", "--no-progress", *extra])


def test_cli_long_tailed_ssesam(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    assert train_cli(tmp_path, "--optimizer", "ssesam", "--imbalance-ratio", "4", "--tail-threshold", "5",
                     "--schedule", "cosine", "--weight-decay", "5e-4") == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    counts = long_tailed_counts(10, 4, 10)  # 10, 8, 7, 6, 5, 4, 3, 3, 2, 2
    assert m["train_class_counts"] == counts and m["steps"] == math.ceil(sum(counts) / 16)
    assert m["tail_classes"] == [c for c, n in enumerate(counts) if n < 5]
    assert m["optimizer"] == {"name": "ssesam", "weight_decay": 5e-4, "schedule": "cosine", "momentum": 0.9,
                              "rho_head": 0.05, "rho_tail": 0.1, "gamma": 0.7, "tail_threshold": 5}
    assert m["args"]["lr"] == 0.05  # the SGD family's default
    assert len(m["test_accuracy_per_class"]) == 10 and m["test_class_counts"] == [10] * 10
    assert m["test_accuracy"] == pytest.approx(np.mean(m["test_accuracy_per_class"]))
    assert "test accuracy" in capsys.readouterr().out


def test_cli_default_is_adam_at_1e3(tmp_path):
    write_fashion(tmp_path / "fm")
    assert train_cli(tmp_path) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["optimizer"] == {"name": "adam", "weight_decay": 0.0, "schedule": "constant"}
    assert m["args"]["lr"] == 1e-3 and m["train_class_counts"] == [10] * 10 and m["tail_classes"] is None


def test_cli_notes_an_empty_tail(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    assert train_cli(tmp_path, "--optimizer", "imbsam") == 0  # 10 images per class, threshold 1000
    assert "every class has fewer than 1000" in capsys.readouterr().err


BAD_OPTIONS = [
    (["--optimizer", "adamw"], "--optimizer"),
    (["--schedule", "linear"], "--schedule"),
    (["--optimizer", "sam", "--rho", "-0.1"], "--rho"),
    (["--optimizer", "sam", "--rho", "abc"], "--rho"),
    (["--optimizer", "ssesam", "--rho-head", "nan"], "--rho-head"),
    (["--optimizer", "ssesam", "--rho-tail", "-1"], "--rho-tail"),
    (["--optimizer", "ssesam", "--gamma", "1.5"], "--gamma"),
    (["--optimizer", "imbsam", "--tail-threshold", "0"], "--tail-threshold"),
    (["--optimizer", "imbsam", "--tail-threshold", "2.5"], "--tail-threshold"),
    (["--optimizer", "sgd", "--momentum", "1"], "--momentum"),
    (["--weight-decay=-5e-4"], "--weight-decay"),  # "=": argparse takes a bare -5e-4 for an option
    (["--lr", "0"], "--lr"),
    (["--imbalance-ratio", "0.5"], "--imbalance-ratio"),
    (["--imbalance-ratio", "11"], "--imbalance-ratio"),  # above n_max = 10: the last class would be empty
    (["--subset-seed", "3"], "--subset-seed"),  # without --imbalance-ratio
    (["--imbalance-ratio", "2", "--subset-seed", "-1"], "--subset-seed"),
    (["--optimizer", "ssesam", "--rho", "0.1"], "--rho"),  # sam / imbsam only
    (["--optimizer", "sam", "--rho-tail", "0.1"], "--rho-tail"),
    (["--optimizer", "sam", "--tail-threshold", "10"], "--tail-threshold"),
    (["--optimizer", "imbsam", "--gamma", "0.5"], "--gamma"),
    (["--momentum", "0.5"], "--momentum"),  # adam has no momentum option
]


@pytest.mark.parametrize("extra, option", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_cli_bad_option_is_a_one_line_error(tmp_path, capsys, extra, option):
    write_fashion(tmp_path / "fm")
    with pytest.raises(SystemExit) as exit_info:
        train_cli(tmp_path, *extra)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pursamere-fast train-classifier: error: argument {option}: ")
    assert "Traceback" not in out + err
    assert not (tmp_path / "o" / CHECKPOINT).exists()


def test_cli_resume_with_other_optimizer_is_a_one_line_error(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    lt = ["--imbalance-ratio", "4"]
    assert train_cli(tmp_path, *lt, "--optimizer", "sam", "--rho", "0.05") == 0
    before = (tmp_path / "o" / CHECKPOINT).read_bytes()
    capsys.readouterr()
    for other in (["--optimizer", "sam", "--rho", "0.1"], ["--optimizer", "imbsam", "--tail-threshold", "5"],
                  ["--optimizer", "sgd"], ["--optimizer", "sam", "--schedule", "cosine"]):
        with pytest.raises(SystemExit) as exit_info:
            train_cli(tmp_path, *lt, *other, "--epochs", "2")
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "error: argument --out: cannot resume" in err and "optimizer" in err and "--no-resume" in err
    assert (tmp_path / "o" / CHECKPOINT).read_bytes() == before
    assert train_cli(tmp_path, *lt, "--optimizer", "sam", "--rho", "0.05", "--epochs", "2") == 0  # same: resumes
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["steps"] == 8
    assert train_cli(tmp_path, *lt, "--optimizer", "sgd", "--no-resume") == 0


def test_cli_train_score_resume_with_other_hparams_is_a_one_line_error(tmp_path, capsys):
    write_fashion(tmp_path / "fm")
    common = ["train-score", "--out", str(tmp_path / "s"), "--data-root", str(tmp_path / "fm"), "--width", "4",
              "--depth", "3", "--dilations", "1,2,1", "--steps", "2", "--num-sigmas", "3", "--eval-n", "4",
              "--batch-size", "4", "--no-progress"]
    assert cli.main(common) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*common, "--lr", "2e-3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("pursamere-fast train-score: error: argument --out: cannot resume") and "'lr'" in err
