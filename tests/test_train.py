"""Trainers: loss goes down, checkpoints and plots are written, resume equals an uninterrupted run."""

import csv
import gzip
import json
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pursamere_fast
from pursamere_fast.commands.train_classifier import main_train_classifier
from pursamere_fast.commands.train_score import main_train_score
from pursamere_fast.config import geometric_sigmas
from pursamere_fast.nets import ConvScoreNet, SmallCNN, load_net
from pursamere_fast.train import (
    CHECKPOINT,
    LOSS_LOG,
    LOSS_PNG,
    evaluate_classifier,
    evaluate_denoiser,
    score_matching_loss,
    train_classifier,
    train_score,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SIGMAS = geometric_sigmas(1.0, 0.05, 4)

pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n=48, side=8, seed=0):
    """Images with one bright 3x3 square at a class-dependent corner, plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = 0.1 * torch.rand(n, 1, side, side, generator=g)
    for i, c in enumerate(labels.tolist()):
        r, col = [(0, 0), (0, side - 3), (side - 3, 0)][c]
        x[i, 0, r:r + 3, col:col + 3] += 0.8
    return x.clamp(0, 1), labels


def score_net(seed=1):
    torch.manual_seed(seed)
    return ConvScoreNet(1, 8, 3)


def clf_net(seed=1):
    torch.manual_seed(seed)
    return SmallCNN(1, 3, width=4, image_size=8)


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


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def read_log(out_dir):
    with open(out_dir / LOSS_LOG, newline="") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


def run_score(out_dir, steps, model=None, **kw):
    kw = {"sigmas": SIGMAS, "batch_size": 8, "lr": 2e-3, "ema": 0.9, "seed": 5, "checkpoint_every": 4,
          "progress": False} | kw
    return train_score(model if model is not None else score_net(), blobs()[0], steps=steps,
                       out_dir=out_dir, **kw)


def test_score_loss_decreases_and_files_written(tmp_path):
    res = run_score(tmp_path, 60)
    losses = [v for _, v in res.losses]
    assert len(losses) == 60 and [s for s, _ in res.losses] == list(range(60))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert (tmp_path / CHECKPOINT).is_file()
    assert (tmp_path / LOSS_PNG).read_bytes()[:8] == PNG_MAGIC
    logged = read_log(tmp_path)
    assert [s for s, _ in logged] == [s for s, _ in res.losses]
    assert [v for _, v in logged] == pytest.approx([v for _, v in res.losses])
    assert not res.model.training


def test_score_resume_matches_uninterrupted(tmp_path):
    straight = run_score(tmp_path / "a", 16)
    run_score(tmp_path / "b", 8)
    resumed = run_score(tmp_path / "b", 16)
    assert state_equal(straight.model, resumed.model)
    assert resumed.losses == straight.losses
    assert read_log(tmp_path / "b") == read_log(tmp_path / "a")


def test_score_resume_after_kill(tmp_path):
    straight = run_score(tmp_path / "a", 16, checkpoint_every=3)
    raw = score_net()
    with pytest.raises(Killed):
        run_score(tmp_path / "b", 16, model=KillAfter(raw, 10), checkpoint_every=3)
    # Checkpoint at step 9; the log holds steps 0..8 only.
    assert [s for s, _ in read_log(tmp_path / "b")] == list(range(9))
    resumed = run_score(tmp_path / "b", 16, model=KillAfter(score_net(seed=99), -1), checkpoint_every=3)
    assert state_equal(straight.model, resumed.model.model)
    assert read_log(tmp_path / "b") == read_log(tmp_path / "a")
    assert (tmp_path / "b" / LOSS_PNG).read_bytes()[:8] == PNG_MAGIC


def test_score_deterministic_and_seed_matters(tmp_path):
    a = run_score(tmp_path / "a", 6)
    b = run_score(tmp_path / "b", 6)
    c = run_score(tmp_path / "c", 6, seed=6)
    assert state_equal(a.model, b.model)
    assert not state_equal(a.model, c.model)


def test_score_resume_refuses_other_hparams(tmp_path):
    run_score(tmp_path, 4)
    with pytest.raises(ValueError, match="lr"):
        run_score(tmp_path, 8, lr=1e-2)
    with pytest.raises(ValueError, match="past steps=2"):
        run_score(tmp_path, 2)
    fresh = run_score(tmp_path, 2, lr=1e-2, resume=False)
    assert [s for s, _ in fresh.losses] == [0, 1]


def test_score_matching_loss_is_zero_for_exact_score():
    # Single-image data: the perturbed density is N(x0, sigma^2 I), whose score is exact.
    x0 = torch.rand(1, 1, 5, 5).expand(4, -1, -1, -1)
    sigma = torch.tensor([0.1, 0.3, 0.5, 1.0])
    z = torch.randn(4, 1, 5, 5)
    exact = lambda y, s: -(y - x0) / s.view(-1, 1, 1, 1) ** 2  # noqa: E731
    assert score_matching_loss(exact, x0, sigma, z).item() == pytest.approx(0.0, abs=1e-10)
    zero = lambda y, s: torch.zeros_like(y)  # noqa: E731
    assert score_matching_loss(zero, x0, sigma, z).item() == pytest.approx(0.5 * z.pow(2).sum().item() / 4)


@pytest.mark.parametrize("bad", [{"steps": 0}, {"steps": 2.5}, {"batch_size": 0}, {"batch_size": True},
                                 {"lr": 0.0}, {"lr": float("nan")}, {"ema": 1.0}, {"ema": -0.1}, {"seed": -1},
                                 {"checkpoint_every": 0}, {"sigmas": (0.1, -0.1)}, {"sigmas": ()},
                                 {"sigmas": "0.1"}])
def test_score_validates(tmp_path, bad):
    name, value = next(iter(bad.items()))
    with pytest.raises(ValueError, match=f"^{name} must be .*, got {re.escape(repr(value))}$"):
        run_score(tmp_path, **({"steps": 2} | bad))
    assert not (tmp_path / CHECKPOINT).exists()


def test_score_validates_images(tmp_path):
    with pytest.raises(ValueError, match="images"):
        train_score(score_net(), torch.full((4, 1, 8, 8), 2.0), sigmas=SIGMAS, steps=1, batch_size=2,
                    lr=1e-3, out_dir=tmp_path, seed=0)


def run_clf(out_dir, epochs, model=None, data=None, **kw):
    x, y = data if data is not None else blobs()
    kw = {"batch_size": 16, "lr": 1e-2, "seed": 2, "checkpoint_every": 2, "progress": False} | kw
    return train_classifier(model if model is not None else clf_net(), x, y, epochs=epochs, out_dir=out_dir, **kw)


def test_classifier_learns(tmp_path):
    x, y = blobs(seed=3)
    before = evaluate_classifier(clf_net(), x, y)
    res = run_clf(tmp_path, 12, data=(x, y))
    assert len(res.losses) == 12 * 3
    assert np.mean([v for _, v in res.losses[-3:]]) < 0.5 * np.mean([v for _, v in res.losses[:3]])
    assert evaluate_classifier(res.model, x, y) > max(0.9, before)
    assert (tmp_path / LOSS_PNG).read_bytes()[:8] == PNG_MAGIC


def test_classifier_resume_matches_uninterrupted(tmp_path):
    # 48 images / batch 16 = 3 steps per epoch; the kill lands mid-epoch (after step 5 of 9).
    straight = run_clf(tmp_path / "a", 3)
    with pytest.raises(Killed):
        run_clf(tmp_path / "b", 3, model=KillAfter(clf_net(), 5))
    assert [s for s, _ in read_log(tmp_path / "b")] == list(range(4))
    resumed = run_clf(tmp_path / "b", 3, model=KillAfter(clf_net(seed=7), -1))
    assert state_equal(straight.model, resumed.model.model)
    assert read_log(tmp_path / "b") == read_log(tmp_path / "a")
    run_clf(tmp_path / "c", 1)
    extended = run_clf(tmp_path / "c", 3)
    assert state_equal(straight.model, extended.model)


def test_classifier_validates(tmp_path):
    x, y = blobs()
    with pytest.raises(ValueError, match="labels"):
        run_clf(tmp_path, 1, data=(x, y[:-1]))
    with pytest.raises(ValueError, match="epochs"):
        run_clf(tmp_path, 0)
    for bad in (y.float(), y - 1):  # a float would be cast, -1 is no class
        with pytest.raises(ValueError, match="^labels must be"):
            run_clf(tmp_path, 1, data=(x, bad))
    with pytest.raises(ValueError, match="^seed must be"):
        run_clf(tmp_path, 1, seed=-1)
    with pytest.raises(ValueError, match="^labels must have shape"):
        evaluate_classifier(clf_net(), x, y[:-1])
    with pytest.raises(ValueError, match="^sigmas must be"):
        evaluate_denoiser(score_net(), x, [0.1, 0.0])


def test_classifier_purified_augmentation_adds_ce_of_purified(tmp_path, monkeypatch):
    calls = []

    def fake_purify(x, score, config=None, **overrides):
        calls.append(overrides)
        return 1 - x

    monkeypatch.setattr(pursamere_fast, "purify", fake_purify)
    x, y = blobs()
    model = clf_net()
    seen = []
    model.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    config = pursamere_fast.PurifyConfig(sigmas=(0.1,), steps_per_sigma=1, n_samples=1)
    res = run_clf(tmp_path, 1, model=model, data=(x, y), purify_score=score_net(), purify_config=config)
    assert calls == [{"sam_radius": 0.0}]  # SAM off, once for the 48 images (one chunk)
    clean, purified = seen[0], seen[1]
    torch.testing.assert_close(purified, 1 - clean)
    idx = [int(torch.nonzero((x == row).flatten(1).all(1))[0]) for row in clean]
    model0 = clf_net()
    want = F.cross_entropy(model0(x[idx]), y[idx]) + F.cross_entropy(model0(1 - x[idx]), y[idx])
    assert res.losses[0][1] == pytest.approx(want.item(), rel=1e-5)


def test_classifier_purifies_each_image_once_and_resumes_exactly(tmp_path, monkeypatch):
    import pursamere_fast.train.classifier as classifier

    seen = []

    def counting_purify(x, score, config=None, **overrides):
        seen.append(x.shape[0])
        return real_purify(x, score, config, **overrides)

    real_purify = pursamere_fast.purify
    monkeypatch.setattr(pursamere_fast, "purify", counting_purify)
    monkeypatch.setattr(classifier, "_PURIFY_CHUNK", 20)  # 48 images: chunks of 20, 20, 8
    config = pursamere_fast.PurifyConfig(sigmas=(0.2, 0.1), steps_per_sigma=1, n_samples=2, rho=0.1)
    kw = {"purify_score": score_net(), "purify_config": config}
    straight = run_clf(tmp_path / "a", 3, **kw)
    assert seen == [20, 20, 8]  # 3 epochs, each image purified once
    stored = torch.from_numpy(np.load(tmp_path / "a" / classifier.PURIFIED))
    assert torch.equal(stored[20:40], real_purify(blobs()[0][20:40], score_net(), config, sam_radius=0.0))
    seen.clear()

    # Killed in the second chunk of the purified set, then in training: the resumed run purifies
    # only the missing chunks and ends with the uninterrupted run's weights, bit for bit.
    def dies_on_second_call(x, score, config=None, **overrides):
        if seen:
            raise Killed
        return counting_purify(x, score, config, **overrides)

    monkeypatch.setattr(pursamere_fast, "purify", dies_on_second_call)
    with pytest.raises(Killed):
        run_clf(tmp_path / "b", 3, **kw)
    monkeypatch.setattr(pursamere_fast, "purify", counting_purify)
    with pytest.raises(Killed):
        run_clf(tmp_path / "b", 3, model=KillAfter(clf_net(), 9), **kw)  # 2 forwards per step
    assert seen == [20, 20, 8]
    resumed = run_clf(tmp_path / "b", 3, model=KillAfter(clf_net(seed=7), -1), **kw)
    assert seen == [20, 20, 8]  # the set on disk is reused
    assert state_equal(straight.model, resumed.model.model)
    assert read_log(tmp_path / "b") == read_log(tmp_path / "a")
    np.testing.assert_array_equal(np.load(tmp_path / "b" / classifier.PURIFIED),
                                  np.load(tmp_path / "a" / classifier.PURIFIED))


def test_classifier_purified_augmentation_real_purify(tmp_path):
    config = pursamere_fast.PurifyConfig(sigmas=(0.2, 0.1), steps_per_sigma=1, n_samples=2, rho=0.1)
    res = run_clf(tmp_path, 1, purify_score=score_net(), purify_config=config)
    plain = run_clf(tmp_path / "plain", 1)
    assert len(res.losses) == 3 and all(np.isfinite(v) for _, v in res.losses)
    assert res.losses[0][1] > plain.losses[0][1]  # two cross-entropies instead of one


def test_evaluate_denoiser_exact_score():
    x0 = torch.rand(1, 1, 6, 6)
    images = x0.expand(10, -1, -1, -1).contiguous()
    exact = lambda y, s: -(y - x0) / s.view(-1, 1, 1, 1) ** 2  # noqa: E731
    out = evaluate_denoiser(exact, images, (0.1, 0.5), seed=0)
    for sigma, v in out.items():
        assert v["n"] == 10
        assert v["tweedie_mse"] == pytest.approx(0.0, abs=1e-12)
        assert v["noisy_mse"] == pytest.approx(sigma ** 2, rel=0.3)


def _write_fashion(directory, n):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            (directory / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(header + arr.tobytes()))


def test_cli_train_score_and_classifier(tmp_path, capsys):
    _write_fashion(tmp_path / "fm", 16)
    common = ["--data-root", str(tmp_path / "fm"), "--batch-size", "4", "--no-progress"]
    assert main_train_score(["--out", str(tmp_path / "s"), "--width", "4", "--depth", "3", "--dilations", "1,2,1",
                             "--steps", "3", "--num-sigmas", "3", "--eval-n", "4",
                             "--export", str(tmp_path / "score.safetensors"), *common]) == 0
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["denoising_test"]) >= {"0.05", "0.1", "0.25", "0.5"}
    score = load_net(tmp_path / "score.safetensors")
    assert isinstance(score, ConvScoreNet) and score.dilations == (1, 2, 1)
    assert main_train_classifier(["--out", str(tmp_path / "c"), "--width", "4", "--epochs", "1",
                                  "--export", str(tmp_path / "clf.safetensors"), *common]) == 0
    metrics = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["test_n"] == 16 and 0 <= metrics["test_accuracy"] <= 1
    assert isinstance(load_net(tmp_path / "clf.safetensors"), SmallCNN)
    assert "test accuracy" in capsys.readouterr().out
