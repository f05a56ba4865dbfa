"""Issue 13: --holdout (a validation split left out of training) and the score architectures
of train-score (conv, unet, ncsnv2): training, save/load, resume, batch invariance."""

import argparse
import json

import pytest
import torch
from test_data import write_fashion

from pursamere_fast import cli
from pursamere_fast.attacks.sweep import validation_split
from pursamere_fast.commands.options import ArgumentParser
from pursamere_fast.commands.training import load_datasets
from pursamere_fast.config import geometric_sigmas
from pursamere_fast.data import load_fashion_mnist
from pursamere_fast.nets import ConvScoreNet, NCSNv2ScoreNet, UNetScoreNet, load_net, save_net
from pursamere_fast.train import CHECKPOINT, ResumeError, train_score

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN = 12
SIGMAS = geometric_sigmas(1.0, 0.05, 3)
# Tiny members of each family (8x8 images: the U-Net halves twice, NCSNv2 once).
NETS = {
    "conv": lambda: ConvScoreNet(1, 4, 3, dilations=(1, 2, 1)),
    "unet": lambda: UNetScoreNet(1, 4, levels=2, blocks=1),
    "ncsnv2": lambda: NCSNv2ScoreNet(8, 1, ngf=2),
}


def fashion(tmp_path):
    root = tmp_path / "fm"
    write_fashion(root, "train", n=N_TRAIN, seed=1)
    write_fashion(root, "test", n=6, seed=2)
    return root


def parsed(root, holdout):
    return argparse.Namespace(dataset="fashion-mnist", data_root=str(root), holdout=holdout)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_error(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pursamere-fast {argv[0]}: error: argument {option}: "), err
    return lines[0]


# --- --holdout ---------------------------------------------------------------------------

@pytest.mark.parametrize("holdout", [0, 1, 5])
def test_holdout_drops_exactly_the_last_images(tmp_path, holdout):
    root = fashion(tmp_path)
    images, labels = load_fashion_mnist("train", root)
    (x, y), (tx, _), (hx, hy) = load_datasets(ArgumentParser(), parsed(root, holdout), held_out=True)
    assert len(x) == N_TRAIN - holdout and (x == images[:N_TRAIN - holdout]).all() and (y == labels[:len(x)]).all()
    assert len(tx) == 6 and len(hx) == holdout
    if holdout:
        vx, vy = validation_split(holdout, str(root))  # the validation split is exactly what was left out
        assert torch.equal(torch.from_numpy(hx), vx) and torch.equal(torch.from_numpy(hy), vy)
        assert torch.equal(validation_split(1, str(root))[0], vx[-1:])  # a smaller split is inside it
    else:  # nothing copied: the arrays the loader gave, as before the option existed
        assert (x == images).all() and len(load_datasets(ArgumentParser(), parsed(root, 0))) == 2


@pytest.mark.parametrize("command", ["train-score", "train-classifier"])
@pytest.mark.parametrize("value", ["-1", "1.5", str(N_TRAIN), str(N_TRAIN + 3)])
def test_holdout_refuses_bad_values(tmp_path, capsys, command, value):
    root = fashion(tmp_path)
    line = one_line_error([command, "--out", str(tmp_path / "o"), "--data-root", str(root), "--holdout", value,
                           "--no-progress"], "--holdout", capsys)
    assert value in line
    assert not (tmp_path / "o").exists()


def score_cli(tmp_path, root, *extra):
    return cli.main(["train-score", "--out", str(tmp_path / "s"), "--data-root", str(root), "--width", "4",
                     "--depth", "3", "--dilations", "1,2,1", "--steps", "2", "--num-sigmas", "3", "--eval-n", "4",
                     "--batch-size", "4", "--no-progress", *extra])


def clf_cli(tmp_path, root, *extra):
    return cli.main(["train-classifier", "--out", str(tmp_path / "c"), "--data-root", str(root), "--width", "4",
                     "--epochs", "1", "--batch-size", "4", "--no-progress", *extra])


def test_holdout_is_recorded_and_a_resume_with_another_is_refused(tmp_path, capsys):
    root = fashion(tmp_path)
    assert score_cli(tmp_path, root, "--holdout", "5") == 0
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["holdout"] == m["args"]["holdout"] == 5 and m["train_images"] == N_TRAIN - 5
    assert m["denoising_validation"]["0.1"]["n"] == 4  # the last --eval-n of the held-out images
    assert clf_cli(tmp_path, root, "--holdout", "4") == 0
    m = json.loads((tmp_path / "c" / "metrics.json").read_text())
    assert m["args"]["holdout"] == 4 and m["steps"] == 2  # 8 images, batch 4
    capsys.readouterr()
    for run, other in ((score_cli, "4"), (clf_cli, "0")):
        before = {p: p.read_bytes() for p in tmp_path.glob("[sc]/" + CHECKPOINT)}
        with pytest.raises(SystemExit) as exit_info:
            run(tmp_path, root, "--holdout", other)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "error: argument --out: cannot resume" in err and "images" in err
        assert {p: p.read_bytes() for p in before} == before
    assert score_cli(tmp_path, root, "--holdout", "5", "--steps", "3") == 0  # the same holdout resumes
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["steps"] == 3


def test_default_cli_trains_the_conv_net_on_all_images_as_before(tmp_path):
    # What main_train_score did before --arch and --holdout: seed, ConvScoreNet, train_score on
    # every training image. The default command must give the same weights, bit for bit.
    root = fashion(tmp_path)
    assert score_cli(tmp_path, root, "--export", str(tmp_path / "cli.safetensors")) == 0
    torch.manual_seed(0)
    images, _ = load_fashion_mnist("train", root)
    want = train_score(ConvScoreNet(1, 4, 3, dilations=[1, 2, 1]), images, sigmas=geometric_sigmas(1.0, 0.01, 3),
                       steps=2, batch_size=4, lr=1e-3, ema=0.999, out_dir=tmp_path / "direct", seed=0,
                       progress=False)
    assert state_equal(load_net(tmp_path / "cli.safetensors"), want.model)
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["holdout"] == 0 and m["train_images"] == N_TRAIN and "denoising_validation" not in m
    assert m["arch"] == "ConvScoreNet" and m["arch_config"]["dilations"] == [1, 2, 1]


# --- architectures -------------------------------------------------------------------------

def images8(n=16):
    g = torch.Generator().manual_seed(0)
    x = 0.1 * torch.rand(n, 1, 8, 8, generator=g)
    x[::2, :, 2:5, 2:5] += 0.8
    return x.clamp(0, 1)


def net(arch, seed=1):
    torch.manual_seed(seed)
    return NETS[arch]()


def run(arch, out_dir, steps, model=None, **kw):
    kw = {"sigmas": SIGMAS, "batch_size": 4, "lr": 2e-3, "ema": 0.9, "seed": 3, "checkpoint_every": 2,
          "progress": False} | kw
    return train_score(model if model is not None else net(arch), images8(), steps=steps, out_dir=out_dir, **kw)


@pytest.mark.parametrize("arch", list(NETS))
def test_arch_trains_saves_reloads_and_resumes(tmp_path, arch):
    straight = run(arch, tmp_path / "a", 4)
    assert all(torch.isfinite(torch.tensor(v)) for _, v in straight.losses)
    assert not state_equal(straight.model, net(arch))  # it learnt something
    save_net(straight.model, tmp_path / "s.safetensors")
    loaded = load_net(tmp_path / "s.safetensors")
    assert type(loaded) is type(straight.model) and loaded.config == straight.model.config
    assert state_equal(loaded, straight.model)
    y, sigma = images8(3), torch.tensor([0.1, 0.3, 1.0])
    with torch.no_grad():
        assert torch.equal(loaded(y, sigma), straight.model(y, sigma))
    run(arch, tmp_path / "b", 2)
    resumed = run(arch, tmp_path / "b", 4, model=net(arch, seed=9))  # weights come from the checkpoint
    assert state_equal(resumed.model, straight.model) and resumed.losses == straight.losses


def test_resume_with_another_arch_or_config_is_refused(tmp_path):
    run("conv", tmp_path, 2)
    for other in (net("unet"), net("ncsnv2"), ConvScoreNet(1, 4, 3, dilations=(1, 1, 1))):  # same weight shapes
        with pytest.raises(ResumeError, match="net"):
            run("conv", tmp_path, 4, model=other)


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["unet", "ncsnv2"])
def test_arch_score_does_not_depend_on_the_batch(arch):
    # In float64, where the conv library's batch-size-dependent summation order shows only at
    # ~1e-14 (measured: 0 for the U-Net, 1.7e-14 to 3.8e-14 for NCSNv2 on outputs up to ~40),
    # so any mixing of images (a batch norm would move them by ~1e-1) stands out. In float32
    # the same order effects reach 1e-5 on NCSNv2's outputs of ~20 (InstanceNorm++ divides by
    # a spread over few channels), more than a tolerance for "the same function" should hide.
    model = net(arch).eval().double()
    g = torch.Generator().manual_seed(4)
    y = torch.rand(6, 1, 8, 8, generator=g, dtype=torch.float64)
    sigma = torch.linspace(0.05, 1.0, 6, dtype=torch.float64)
    with torch.no_grad():
        whole = model(y, sigma)
        alone = torch.cat([model(y[i:i + 1], sigma[i:i + 1]) for i in range(6)])
        mates = torch.cat([y[:1], torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)])
        others = model(mates, sigma[:4])[:1]
    torch.testing.assert_close(alone, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(others, whole[:1], rtol=0, atol=1e-12)


def test_unet_and_ncsnv2_validate():
    with pytest.raises(ValueError, match="^levels must be"):
        UNetScoreNet(1, 4, levels=0)
    with pytest.raises(ValueError, match="^width must be"):
        UNetScoreNet(1, 0)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 4"):
        UNetScoreNet(1, 4, levels=2)(torch.rand(1, 1, 6, 6), torch.ones(1))
    with pytest.raises(ValueError, match="^ngf must be"):
        NCSNv2ScoreNet(28, 1, ngf=1)


@pytest.mark.parametrize("arch, extra, cls", [("unet", ["--width", "4", "--levels", "1"], UNetScoreNet),
                                              ("ncsnv2", ["--ngf", "2"], NCSNv2ScoreNet)])
def test_cli_trains_each_arch(tmp_path, arch, extra, cls):
    root = fashion(tmp_path)
    assert cli.main(["train-score", "--out", str(tmp_path / "s"), "--data-root", str(root), "--arch", arch, *extra,
                     "--steps", "2", "--num-sigmas", "3", "--eval-n", "2", "--batch-size", "2", "--no-progress",
                     "--export", str(tmp_path / "e.safetensors")]) == 0
    model = load_net(tmp_path / "e.safetensors")
    assert type(model) is cls
    m = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert m["arch"] == cls.__name__ and m["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("argv, option", [
    (["--arch", "unet", "--depth", "3"], "--depth"),
    (["--arch", "unet", "--dilations", "1,2"], "--dilations"),
    (["--arch", "conv", "--levels", "1"], "--levels"),
    (["--arch", "ncsnv2", "--blocks", "2"], "--blocks"),
    (["--ngf", "4"], "--ngf"),
    (["--arch", "ncsnv2", "--width", "8"], "--width"),
    (["--arch", "ncsnv2", "--ngf", "1"], "--ngf"),
    (["--arch", "unet", "--levels", "0"], "--levels"),
    (["--arch", "unet", "--levels", "3"], "--levels"),  # 28 is not divisible by 8
    (["--arch", "transformer"], "--arch"),
])
def test_cli_arch_options_are_checked(tmp_path, capsys, argv, option):
    root = fashion(tmp_path)
    one_line_error(["train-score", "--out", str(tmp_path / "o"), "--data-root", str(root), "--no-progress", *argv],
                   option, capsys)
    assert not (tmp_path / "o" / CHECKPOINT).exists()


def test_cli_resume_with_another_arch_is_a_one_line_error(tmp_path, capsys):
    root = fashion(tmp_path)
    common = ["train-score", "--out", str(tmp_path / "s"), "--data-root", str(root), "--steps", "2",
              "--num-sigmas", "3", "--eval-n", "2", "--batch-size", "2", "--no-progress"]
    assert cli.main([*common, "--width", "4", "--depth", "3", "--dilations", "1,2,1"]) == 0
    capsys.readouterr()
    line = one_line_error([*common, "--arch", "unet", "--width", "4", "--levels", "1"], "--out", capsys)
    assert "cannot resume" in line and "UNetScoreNet" in line
