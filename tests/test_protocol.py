"""The evaluation protocols (docs/protocol.md), pursamere_fast/protocol/: config
resolution and the selection rule; CIFAR-10 (WideResNet, crop-flip augmentation, the official
checkpoint as a score, scripts/run_cifar10.sh end to end in its smoke profile on a synthetic
CIFAR-format set with the ngf-16 fixture checkpoint). Fashion-MNIST and the report:
tests/test_protocol_fmnist.py."""

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pursamere_fast import cli, protocol
from pursamere_fast.attacks.loading import load_toml
from pursamere_fast.attacks.rows import read_rows
from pursamere_fast.commands import protocol as protocol_command
from pursamere_fast.commands.protocol import pin_inputs, weights_sha256
from pursamere_fast.nets import WideResNet, load_net, save_net
from pursamere_fast.protocol import dump_toml, resolve, select, selection_rule, spec, training_options
from pursamere_fast.purifiers.saliency import SALIENCY_STAGES, saliency_map
from pursamere_fast.scores import NCSNv2Score
from pursamere_fast.train import ResumeError, train_classifier
from pursamere_fast.train.classifier import crop_flip, load_purify_score

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "fixtures" / "ncsnv2_cifar10_ngf16" / "checkpoint.pth"
DRIVER = ROOT / "scripts" / "run_cifar10.sh"
PROTOCOL = load_toml(ROOT / "configs" / "cifar10_protocol.toml")
FMNIST = load_toml(ROOT / "configs" / "fmnist_protocol.toml")
TEMPLATES = [spec(PROTOCOL).select, *spec(PROTOCOL).tests.values()]
PER_BATCH = 8  # synthetic images per CIFAR batch file: 40 training images, 8 test images

pytestmark = pytest.mark.usefixtures("one_thread")


def write_cifar(directory, n=PER_BATCH, seed=0):
    """Random images and labels in the python-batches format (as tests/test_data.py's write_cifar)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]:
        batch = {b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return directory


# ---------------------------------------------------------------------------------- WideResNet

def test_wrn_28_10_has_robustbench_names_and_size():
    model = WideResNet()  # depth 28, widen 10, 10 classes
    # RobustBench's WideResNet-28-10 ("Standard" CIFAR-10 model) has 36,479,194 parameters.
    assert sum(p.numel() for p in model.parameters()) == 36_479_194
    modules = dict(model.named_modules())
    assert all(stage in modules for stage in SALIENCY_STAGES["WideResNet"])
    for stage, width in (("block1", 160), ("block2", 320), ("block3", 640)):
        blocks = modules[f"{stage}.layer"]
        assert isinstance(blocks, torch.nn.Sequential) and len(blocks) == 4
        for i, block in enumerate(blocks):
            assert {n for n, _ in block.named_children()} >= {"bn1", "relu1", "conv1", "bn2", "relu2", "conv2"}
            assert block.conv2.out_channels == width
            assert (block.convShortcut is not None) == (i == 0)  # only where the width changes
    keys = model.state_dict().keys()
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block3.layer.3.bn2.running_var", "bn1.weight",
            "fc.weight", "fc.bias"} <= set(keys)
    assert model.config == {"depth": 28, "widen_factor": 10, "num_classes": 10, "channels": 3}


def test_wrn_forward_shapes_and_saliency_stages():
    torch.manual_seed(0)
    model = WideResNet(28, 1).eval()  # the protocol's depth, so the registry's stages exist
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10)
    assert saliency_map(model, x).shape == (3, 1, 32, 32)  # SALIENCY_STAGES["WideResNet"] by default
    gray = WideResNet(10, 2, num_classes=4, channels=1).eval()
    assert gray(torch.rand(2, 1, 28, 28)).shape == (2, 4)  # global pooling: any side


@pytest.mark.parametrize("kwargs, name", [({"depth": 27}, "depth"), ({"depth": 4}, "depth"),
                                          ({"widen_factor": 0}, "widen_factor"), ({"num_classes": 0}, "num_classes"),
                                          ({"channels": 2.5}, "channels")])
def test_wrn_validates(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        WideResNet(**kwargs)


def test_wrn_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = WideResNet(10, 2)
    model(torch.rand(8, 3, 32, 32))  # a train-mode forward: the BN running statistics move
    save_net(model, tmp_path / "wrn.safetensors", {"note": "x"})
    loaded = load_net(tmp_path / "wrn.safetensors")
    assert isinstance(loaded, WideResNet) and not loaded.training and loaded.config == model.config
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k].float(), got[k].float()) for k in want)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded(x))


def test_wrn_eval_mode_is_batch_invariant_bitwise():
    torch.manual_seed(0)
    model = WideResNet(10, 2)
    x, others = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    mixed = torch.cat([x[:2], others[2:]])
    model.eval()
    assert torch.equal(model(x)[:2], model(mixed)[:2])  # same batch size, other companions
    model.train()  # batch statistics: the reason purification and attacks use eval mode only
    assert not torch.allclose(model(x)[:2], model(mixed)[:2])


@pytest.mark.numerics
def test_wrn_eval_mode_batch_size_changes_only_rounding():
    torch.manual_seed(0)
    model = WideResNet(10, 2).eval()
    x = torch.rand(4, 3, 32, 32)
    # Another batch size may take another convolution algorithm: measured 2e-8 / 6e-8 / 3e-8 on
    # logits of size 0.2 under the native (AVX-512), AVX2 and scalar/SSE4.1 kernels; 1e-6 leaves
    # 16x of that for other CPUs.
    torch.testing.assert_close(model(x[1:2]), model(x)[1:2], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- training

def test_crop_flip_crops_the_padded_image_and_flips():
    x = torch.rand(16, 3, 8, 8)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, crop_flip(x, torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flipped = 0
    for b in range(16):
        crops = [padded[b, :, i:i + 8, j:j + 8] for i in range(9) for j in range(9)]
        plain = any(torch.equal(out[b], c) for c in crops)
        mirrored = any(torch.equal(out[b], c.flip(-1)) for c in crops)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16


def test_train_classifier_augment_is_in_the_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 8, 8, generator=g), torch.arange(12) % 3
    torch.manual_seed(0)
    model = WideResNet(10, 1, num_classes=3)
    common = dict(epochs=1, batch_size=6, lr=0.05, out_dir=tmp_path, seed=0, progress=False)
    res = train_classifier(model, x, y, augment="crop-flip", **common)
    assert len(res.losses) == 2 and all(math.isfinite(v) for _, v in res.losses)
    with pytest.raises(ResumeError, match="augment"):
        train_classifier(WideResNet(10, 1, num_classes=3), x, y, **common)
    with pytest.raises(ValueError, match="^augment must"):
        train_classifier(model, x, y, augment="mixup", **{**common, "out_dir": tmp_path / "other"})


def test_purify_score_reads_an_official_checkpoint():
    score = load_purify_score(str(CHECKPOINT), 3, 32)
    assert isinstance(score, NCSNv2Score) and score.model.ngf == 16 and not score.training
    with pytest.raises(ValueError, match="3 channels, the images have 1"):
        load_purify_score(str(CHECKPOINT), 1, 32)


BAD_TRAIN = [(["--arch", "smallcnn", "--wrn-depth", "16"], "--wrn-depth"),
             (["--wrn-widen", "2"], "--wrn-widen"),  # smallcnn is the default
             (["--arch", "wrn", "--width", "8"], "--width"),
             (["--arch", "wrn", "--activation", "gelu"], "--activation"),
             (["--arch", "wrn", "--wrn-depth", "27"], "--wrn-depth"),
             (["--arch", "wrn", "--wrn-widen", "0"], "--wrn-widen"),
             (["--augment", "mixup"], "--augment"),
             (["--device", "gpu7"], "--device")]


@pytest.mark.parametrize("extra, option", BAD_TRAIN, ids=[" ".join(a) for a, _ in BAD_TRAIN])
def test_train_classifier_network_options_are_one_line_errors(tmp_path, capsys, extra, option):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train-classifier", "--out", str(tmp_path / "o"), "--dataset", "cifar10", "--data-root",
                  str(tmp_path), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"pursamere-fast train-classifier: error: argument {option}: ")


def test_train_classifier_wrn_with_the_official_checkpoint(tmp_path, capsys):
    data = write_cifar(tmp_path / "cifar")
    argv = ["train-classifier", "--out", str(tmp_path / "o"), "--dataset", "cifar10", "--data-root", str(data),
            "--arch", "wrn", "--wrn-depth", "10", "--wrn-widen", "1", "--holdout", "8", "--epochs", "1",
            "--batch-size", "16", "--optimizer", "sgd", "--augment", "crop-flip", "--no-progress",
            "--purify-score", str(CHECKPOINT), "--purify-config",
            '{"sigmas": [0.1], "steps_per_sigma": 1, "n_samples": 1, "rho": 0.03}']
    assert cli.main(argv) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert m["arch"] == "WideResNet" and m["arch_config"]["depth"] == 10 and m["augment"] == "crop-flip"
    assert m["train_n"] == 5 * PER_BATCH - 8 and m["purified_augmentation"] and m["steps"] == 2
    assert isinstance(load_net(tmp_path / "o" / "classifier.safetensors"), WideResNet)
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a resume with other settings stays refused
        cli.main([*argv, "--purify-config", '{"sigmas": [0.1], "steps_per_sigma": 1, "n_samples": 1, "rho": 0.1}'])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "argument --out: cannot resume" in err


# ---------------------------------------------------------------------------------- configs and selection

def test_dump_toml_round_trips(tmp_path):
    cfg = {"score": "m:f", "n": 3, "ratio": 0.125, "flag": True, "note": 'say "hi" \\ é',
           "pursamere": {"sigmas": [0.25, 0.01], "rho": "8/255"}, "data_kwargs": {"root": "/tmp/a b"},
           "defence": [{"name": "a", "kind": "none"}, {"name": "b", "kind": "adp", "steps": 2}],
           "attack": [{"threat": "clean"}]}
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg))
    assert load_toml(path) == cfg


def _templates():
    return {name: load_toml(ROOT / "configs" / name) for name in TEMPLATES}


CHOICE = {"chosen": {"sam": {"rho": 12 / 255, "sam_radius": 3 / 255, "steps_per_sigma": 2, "n_samples": 4},
                     "nosam": {"rho": 16 / 255, "sam_radius": 0.0, "steps_per_sigma": 4, "n_samples": 8}}}


def test_resolve_takes_the_choice_and_scales_r_with_rho():
    paths = dict(score=str(CHECKPOINT), data_root="/data", holdout=5000)
    cfg = resolve(_templates()["cifar10_test_main.toml"], PROTOCOL, choice=CHOICE, **paths)
    by_name = {d["name"]: d for d in cfg["defence"]}
    sam8 = by_name["pursamere-sam-rho8"]
    assert sam8["rho"] == "8/255" and sam8["sam_radius"] == pytest.approx(2 / 255)  # r = rho / 4 as chosen
    assert (sam8["steps_per_sigma"], sam8["n_samples"]) == (2, 4) and "choice" not in sam8
    assert by_name["pursamere-nosam-rho12"]["sam_radius"] == 0.0
    assert cfg["pursamere"]["sigmas"] == PROTOCOL["pursamere"]["sigmas"] and cfg["adp"] == PROTOCOL["adp"]
    assert cfg["score_kwargs"] == {"path": str(CHECKPOINT)} and cfg["data_kwargs"] == {"root": "/data", "part": "test"}
    select_cfg = resolve(_templates()["cifar10_select.toml"], PROTOCOL, **paths)
    assert select_cfg["data_kwargs"]["holdout"] == 5000 and len(select_cfg["defence"]) == 19
    with pytest.raises(ValueError, match="--choice"):
        resolve(_templates()["cifar10_test_suite.toml"], PROTOCOL, **paths)


def test_resolve_smoke_caps_attacks_and_purification():
    cfg = resolve(_templates()["cifar10_test_suite.toml"], PROTOCOL, choice=CHOICE, smoke=True, score="c",
                  data_root="d", holdout=8)
    smoke = PROTOCOL["smoke"]
    assert (cfg["n"], cfg["batch_size"]) == (smoke["n"], smoke["batch_size"])
    assert {a["steps"] for a in cfg["attack"]} == {smoke["max_steps"], smoke["max_queries"]}
    for d in cfg["defence"]:
        if d["kind"] == "pursamere":
            assert (d["steps_per_sigma"], d["n_samples"]) == (1, 1)
    assert cfg["pursamere"]["sigmas"] == [0.1] and cfg["adp"]["steps"] == 1
    assert selection_rule(PROTOCOL, smoke=True)["clean_tol"] == 1.0
    assert training_options(PROTOCOL, smoke=True)["holdout"] == 8 and training_options(PROTOCOL)["holdout"] == 5000


def test_config_command_writes_evaluate_configs(tmp_path):
    (tmp_path / "choice.json").write_text(json.dumps(CHOICE))
    write_cifar(tmp_path / "cifar")
    assert protocol_command.main(["config", "--protocol", str(ROOT / "configs" / "cifar10_protocol.toml"), "--score",
                         str(CHECKPOINT), "--data-root", str(tmp_path / "cifar"), "--choice",
                         str(tmp_path / "choice.json"), "--smoke", "--out-dir", str(tmp_path / "out"),
                         *(str(ROOT / "configs" / name) for name in TEMPLATES)]) == 0
    for name in TEMPLATES:
        cfg = load_toml(tmp_path / "out" / name)
        assert cfg["n"] == 4 and cfg["score_kwargs"]["path"] == str(CHECKPOINT)
    assert load_toml(tmp_path / "out" / "cifar10_select.toml")["data_kwargs"]["holdout"] == 8


def _suite_summary(n, results):
    """A suite summary: results maps defence -> (clean correct, worst-case robust correct) of n."""
    return {"defences": [{"defence": name, "n": n, "clean_acc": c / n, "clean_ci": [0, 1], "robust_acc": r / n,
                          "robust_ci": [0, 1]} for name, (c, r) in results.items()]}


def test_select_applies_the_rule_per_group():
    config = {"n": 100, "pursamere": {"sigmas": [0.2, 0.1]},
              "defence": [{"name": "none", "kind": "none"},
                          {"name": "cheap-sam", "kind": "pursamere", "rho": "8/255", "sam_radius": "2/255",
                           "steps_per_sigma": 1, "n_samples": 1},
                          {"name": "dear-sam", "kind": "pursamere", "rho": "8/255", "sam_radius": "4/255",
                           "steps_per_sigma": 4, "n_samples": 4},
                          {"name": "lossy-nosam", "kind": "pursamere", "rho": "16/255", "sam_radius": "0",
                           "steps_per_sigma": 1, "n_samples": 1},
                          {"name": "nosam", "kind": "pursamere", "rho": "12/255", "sam_radius": 0,
                           "steps_per_sigma": 2, "n_samples": 2}]}
    summary = _suite_summary(100, {"none": (95, 0), "cheap-sam": (94, 60), "dear-sam": (93, 61),
                                   "lossy-nosam": (80, 70), "nosam": (94, 50)})
    choice = select(summary, config, {"clean_tol": 0.02, "robust_tol": 0.01})
    # SAM: the cheap point is within 1 pp of the best worst case, so it wins on cost.
    assert choice["groups"]["sam"]["chosen"] == "cheap-sam"
    assert choice["chosen"]["sam"] == {"rho": 8 / 255, "sam_radius": 2 / 255, "steps_per_sigma": 1, "n_samples": 1}
    # SAM off: the most robust point loses 15 pp of clean accuracy, so it is not eligible.
    assert choice["groups"]["nosam"]["chosen"] == "nosam" and choice["chosen"]["nosam"]["rho"] == 12 / 255
    costs = {r["defence"]: r["cost"] for r in choice["groups"]["sam"]["rows"]}
    assert costs == {"cheap-sam": 2 * 1 * 2, "dear-sam": 2 * 4 * 4 * 2}  # K * N * 2 with SAM
    unfinished = {"defences": [*summary["defences"][:-1], {**summary["defences"][-1], "n": 99}]}
    with pytest.raises(ValueError, match="all n = 100 images; defence 'nosam' has 99"):
        select(unfinished, config, {"clean_tol": 0.02, "robust_tol": 0.01})


def test_select_chooses_adp_as_a_group_of_its_own_and_resolve_takes_it():
    config = {"n": 10, "pursamere": {"sigmas": [0.2]}, "adp": {"sigma": 0.05, "noise_std": 0.05, "steps": 5},
              "defence": [{"name": "none", "kind": "none"},
                          {"name": "sam", "kind": "pursamere", "rho": "8/255", "sam_radius": "2/255"},
                          {"name": "nosam", "kind": "pursamere", "rho": "8/255", "sam_radius": "0"},
                          {"name": "adp-lossy", "kind": "adp", "sigma": 0.1, "noise_std": 0.1},
                          {"name": "adp-short", "kind": "adp", "sigma": 0.05, "noise_std": 0.05, "steps": 2},
                          {"name": "adp-long", "kind": "adp", "sigma": 0.05, "noise_std": 0.05}]}
    summary = _suite_summary(10, {"none": (10, 0), "sam": (10, 5), "nosam": (10, 5), "adp-lossy": (7, 9),
                                  "adp-short": (10, 6), "adp-long": (10, 6)})
    choice = select(summary, config, {"clean_tol": 0.1, "robust_tol": 0.0})
    # adp-lossy is the most robust but 3 images below the undefended; of the two others, equally
    # robust, the one of 2 steps (2 score evaluations) is cheaper than the base's 5.
    rows = {r["defence"]: r for r in choice["groups"]["adp"]["rows"]}
    assert {k: (r["cost"], r["eligible"]) for k, r in rows.items()} == {
        "adp-lossy": (5, False), "adp-short": (2, True), "adp-long": (5, True)}
    assert choice["chosen"]["adp"] == {"sigma": 0.05, "noise_std": 0.05, "steps": 2}
    assert set(choice["chosen"]) == {"sam", "nosam", "adp"} and "**ADP**" in protocol.choice_markdown(choice)
    template = {"defence": [{"name": "adp", "kind": "adp", "choice": "adp"},
                            {"name": "p", "kind": "pursamere", "choice": "nosam"}], "attack": [{"threat": "clean"}]}
    cfg = resolve(template, FMNIST, score="s", data_root="d", holdout=8, choice=choice)
    assert cfg["defence"][0] == {"sigma": 0.05, "noise_std": 0.05, "steps": 2, "name": "adp", "kind": "adp"}
    assert cfg["score"] == "pursamere_fast.nets:load_net" and cfg["data"] == "pursamere_fast.data:fashion_mnist_data"
    with pytest.raises(ValueError, match="choice 'adp' is for kind 'adp', the entry's kind is 'pursamere'"):
        resolve({"defence": [{"name": "x", "kind": "pursamere", "choice": "adp"}]}, FMNIST, score="s",
                data_root="d", holdout=8, choice=choice)
    without_adp = {**config, "defence": config["defence"][:3]}  # CIFAR-10's grid: no ADP points
    assert set(select(summary, without_adp, {"clean_tol": 0.1, "robust_tol": 0.0})["chosen"]) == {"sam", "nosam"}


def test_pin_refuses_a_run_made_with_other_weights(tmp_path):
    model = WideResNet(10, 1)
    save_net(model, tmp_path / "a.safetensors", {"seconds": "1"})
    save_net(model, tmp_path / "b.safetensors", {"seconds": "2"})  # other header, same weights
    digest = weights_sha256(tmp_path / "a.safetensors")
    assert digest == weights_sha256(tmp_path / "b.safetensors")
    pin_inputs(tmp_path / "run", {"classifier": digest})
    pin_inputs(tmp_path / "run", {"classifier": digest})  # the same weights continue
    with torch.no_grad():
        model.fc.bias.add_(1)
    save_net(model, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="holds results made with other weights or settings"):
        pin_inputs(tmp_path / "run", {"classifier": weights_sha256(tmp_path / "c.safetensors")})


# ---------------------------------------------------------------------------------- end to end

def _driver(*args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PURSAMERE_DEVICE": "cpu"}
    return subprocess.run(["bash", str(DRIVER), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cifar10")
    data = write_cifar(tmp / "data" / "cifar-10-batches-py").parent
    checkpoint = tmp / "ncsnv2" / "checkpoint.pth"
    checkpoint.parent.mkdir()
    shutil.copy(CHECKPOINT, checkpoint)
    out = tmp / "out"
    t0 = time.monotonic()
    proc = _driver("--smoke", checkpoint, data, out)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "data": data, "checkpoint": checkpoint, "stdout": proc.stdout, "seconds": seconds}


def test_smoke_trains_both_classifiers_without_the_held_out_images(smoke_run):
    out = smoke_run["out"]
    for name, purified in (("clean", False), ("aug", True)):
        model = load_net(out / "models" / f"wrn_{name}.safetensors")
        assert isinstance(model, WideResNet) and model.config["depth"] == 10 and model.config["widen_factor"] == 1
        m = json.loads((out / f"train_{name}" / "metrics.json").read_text())
        # 40 training images, the last 8 held out for the selection (cifar10_data's "validation").
        assert m["train_n"] == 5 * PER_BATCH - 8 and m["args"]["holdout"] == 8 and m["augment"] == "crop-flip"
        assert m["purified_augmentation"] == purified and m["test_n"] == PER_BATCH
    augment = json.loads((out / "select" / "augment.json").read_text())
    aug_args = json.loads((out / "train_aug" / "metrics.json").read_text())["args"]
    assert json.loads(aug_args["purify_config"]) == augment and augment["sam_radius"] == 0.0
    assert aug_args["purify_score"] == str(smoke_run["checkpoint"])


def test_smoke_selection_writes_its_choice(smoke_run):
    out = smoke_run["out"]
    summary = json.loads((out / "select" / "summary.json").read_text())
    assert len(summary["defences"]) == 19 and {e["n"] for e in summary["defences"]} == {4}
    choice = json.loads((out / "select" / "choice.json").read_text())
    assert choice["chosen"]["sam"]["sam_radius"] > 0 and choice["chosen"]["nosam"]["sam_radius"] == 0
    assert choice["rule"] == {"clean_tol": 1.0, "robust_tol": 0.01}
    assert "chosen:" in (out / "select" / "choice.md").read_text() and "SAM off" in smoke_run["stdout"]
    rows = read_rows(out / "select" / "rows.jsonl")
    assert {r["index"] for r in rows} == set(range(4))  # the first 4 of the 8 held-out images


MAIN = ["none", "pursamere-sam-rho8", "pursamere-sam-rho12", "pursamere-sam-rho16", "pursamere-nosam-rho8",
        "pursamere-nosam-rho12", "pursamere-nosam-rho16", "adp"]


def check_test_suites(out):
    """Check both classifiers' main and bpda200 rows; return their suite summaries' defences."""
    defences = []
    for clf in ("clean", "aug"):
        main = json.loads((out / "test" / clf / "main" / "summary.json").read_text())["settings"]
        assert {(e["defence"], e["threat"]) for e in main} == {(d, t) for d in MAIN for t in ("clean", "gpgd", "bpda")}
        bpda = json.loads((out / "test" / clf / "bpda200" / "summary.json").read_text())["settings"]
        assert {(e["defence"], e["norm"]) for e in bpda if e["threat"] == "bpda"} == {
            (d, n) for d in ("none", "pursamere-sam", "pursamere-nosam", "adp") for n in ("linf", "l2", "l1")}
        assert {e["n"] for e in main + bpda} == {4}
        suite = json.loads((out / "test" / clf / "suite" / "summary.json").read_text())
        assert [e["defence"] for e in suite["defences"]] == ["pursamere-sam", "pursamere-nosam", "adp"]
        for e in suite["defences"]:
            assert e["n"] == 4 and len(e["members"]) == 8  # 7 attacks and the transfer
        defences += suite["defences"]
    return defences


def test_smoke_test_rows_for_every_defence_and_member(smoke_run):
    out = smoke_run["out"]
    check_test_suites(out)
    report = (out / "report.md").read_text()
    assert report.count("classifier: suite") == 2 and "train_aug" in report
    assert "](report.png)" in report and (out / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_smoke_rerun_continues_without_redoing_rows(smoke_run):
    out = smoke_run["out"]
    rows = out / "test" / "aug" / "suite" / "rows.jsonl"
    before = rows.read_text()
    t0 = time.monotonic()
    proc = _driver("--smoke", smoke_run["checkpoint"], smoke_run["data"], out)
    assert proc.returncode == 0, proc.stderr
    assert rows.read_text() == before
    # The first run's time with the rerun's: the budget of this test module.
    print(f"smoke run {smoke_run['seconds']:.0f} s, rerun {time.monotonic() - t0:.0f} s")


@pytest.mark.parametrize("args, message", [
    ((), "usage: "),
    (("nope.pth", "."), "error: NCSNV2_CHECKPOINT: no such file: nope.pth"),
    ((CHECKPOINT, "nope"), "error: CIFAR10_DIR: no such directory: nope"),
])
def test_driver_argument_errors_are_one_line(args, message):
    proc = _driver(*args, timeout=60)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message in proc.stderr


def test_driver_refuses_a_bad_checkpoint_and_data_before_training(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    write_cifar(tmp_path / "cifar")
    proc = _driver("--smoke", bad, tmp_path / "cifar", tmp_path / "out", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "error: argument NCSNV2_CHECKPOINT: cannot load checkpoint" in proc.stderr
    proc = _driver("--smoke", CHECKPOINT, tmp_path, tmp_path / "out", timeout=120)  # no batches there
    assert proc.returncode == 2 and "error: argument CIFAR10_DIR: CIFAR-10 test batches not found" in proc.stderr
    assert not (tmp_path / "out" / "train_clean").exists()
