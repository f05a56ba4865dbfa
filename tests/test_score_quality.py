"""`pursamere-fast score-quality` on a tiny fake Fashion-MNIST: the MSE figures are
evaluate_denoiser's, the table has its columns, bad input is a one-line error. (No timing is
checked: the command's timings are for the machine it runs on.)"""

import json

import pytest
import torch
from test_data import write_fashion

from pursamere_fast import cli
from pursamere_fast.attacks.sweep import validation_split
from pursamere_fast.data import load_fashion_mnist
from pursamere_fast.nets import ConvScoreNet, UNetScoreNet, load_net, save_net
from pursamere_fast.train import evaluate_denoiser
from pursamere_fast.train.quality import SIGMAS

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--repeats", "1", "--batch", "2", "--purify-images", "2", "--purify-repeats", "1"]


@pytest.fixture
def setup(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    write_fashion(root, "train", n=10, seed=1)
    write_fashion(root, "test", n=8, seed=2)
    monkeypatch.setenv("PURSAMERE_FASHION_MNIST", str(root))
    paths = []
    for name, make in (("conv", lambda: ConvScoreNet(1, 4, 2)), ("unet", lambda: UNetScoreNet(1, 2, levels=1))):
        torch.manual_seed(0)
        paths.append(tmp_path / f"{name}.safetensors")
        save_net(make(), paths[-1], {"training": json.dumps({"steps": 7})})
    return tmp_path, root, paths


def quality(*argv):
    return cli.main(["score-quality", *argv])


@pytest.mark.numerics
@pytest.mark.parametrize("split", ["test", "validation"])
def test_writes_evaluate_denoisers_figures_and_the_table(setup, split, capsys):
    tmp_path, root, paths = setup
    out = tmp_path / "q"
    assert quality("--score", str(paths[0]), "--score", str(paths[1]), "--n", "5", "--split", split,
                   "--out", str(out), *FAST) == 0
    if split == "test":
        images = torch.from_numpy(load_fashion_mnist("test", root)[0][:5])
    else:
        images = validation_split(5, str(root))[0]  # the last 5 training images
    report = json.loads((out / "quality.json").read_text())
    assert report["split"] == split and report["threads"] == 1 and len(report["rows"]) == 2
    for path, row in zip(paths, report["rows"]):
        want = evaluate_denoiser(load_net(path), images, SIGMAS, seed=0)
        assert row["score"] == str(path) and row["n"] == 5 and row["training_steps"] == 7
        # Equal, not close: the same function on the same images and noise.
        assert row["tweedie_mse"] == {str(s): want[s]["tweedie_mse"] for s in SIGMAS}
        assert row["noisy_mse"] == {str(s): want[s]["noisy_mse"] for s in SIGMAS}
        assert row["params"] == sum(p.numel() for p in load_net(path).parameters())
        assert row["mflop_per_image"] > 0 and row["score_ms_per_image"] > 0 and row["purify_ms_per_image"] > 0
    base, other = report["rows"]
    assert base["score_cost_ratio"] == base["purify_cost_ratio"] == 1.0
    assert all(v == 1.0 for v in base["mse_gain"].values())
    for s in SIGMAS:
        assert other["mse_gain"][str(s)] == pytest.approx(base["tweedie_mse"][str(s)] / other["tweedie_mse"][str(s)])
    table = (out / "quality.md").read_text()
    assert table == capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 4 and len({line.count("|") for line in rows}) == 1  # header, rule, two scores
    assert all(f"sigma={s:g}" in rows[0] for s in SIGMAS) and "ms/img" in rows[0]
    assert str(paths[1]) in rows[3] and "UNetScoreNet" in rows[3] and f"{base['params']:,}" in rows[2]
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_out_prints_only(setup, capsys):
    tmp_path, _, paths = setup
    assert quality("--score", str(paths[0]), "--n", "2", *FAST) == 0
    assert capsys.readouterr().out.count("\n| ") == 2 and not list(tmp_path.glob("**/quality.json"))


@pytest.mark.parametrize("argv, option", [
    (["--n", "0"], "--n"),
    (["--n", "9"], "--n"),  # 8 test images
    (["--n", "4", "--purify-images", "5"], "--purify-images"),
    (["--split", "train"], "--split"),
    (["--repeats", "0"], "--repeats"),
    (["--threads", "0"], "--threads"),
    (["--score", "{tmp}/missing.safetensors"], "--score"),
    (["--score", "{tmp}/junk.safetensors"], "--score"),
    (["--score", "{tmp}/rgb.safetensors"], "--score"),
    (["--data-root", "{tmp}/nowhere"], "--data-root"),
])
def test_bad_input_is_a_one_line_error(setup, capsys, argv, option):
    tmp_path, _, paths = setup
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_net(ConvScoreNet(3, 4, 2), tmp_path / "rgb.safetensors")  # 3 channels: does not take 28x28x1
    argv = ["score-quality", "--score", str(paths[0]), "--n", "2", *FAST, *(a.format(tmp=tmp_path) for a in argv)]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pursamere-fast score-quality: error: argument {option}: "), err


def test_quality_rows_validates(setup):
    from pursamere_fast.train.quality import quality_rows

    _, _, paths = setup
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match="^scores must be"):
        quality_rows([], [], images)
    with pytest.raises(ValueError, match="^scores must be"):
        quality_rows(paths, [load_net(paths[0])], images)
    with pytest.raises(ValueError, match="^repeats must be"):
        quality_rows(paths[:1], [load_net(paths[0])], images, repeats=0)
