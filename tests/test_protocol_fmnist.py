"""The Fashion-MNIST protocol (docs/protocol.md), pursamere_fast/protocol/ and `pursamere-fast protocol`:
scripts/run_fmnist_protocol.sh end to end in its smoke profile on a synthetic Fashion-MNIST set
(score training on the held-out split, score-quality, ADP re-tuned in the selection), the
committed choice, the report's verdicts and figure, and the stage log."""

import gzip
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_data import idx_bytes, write_fashion
from test_protocol import check_test_suites

from pursamere_fast import protocol
from pursamere_fast.attacks.loading import attack_specs, load_toml, number_or_text
from pursamere_fast.attacks.rows import read_rows
from pursamere_fast.commands import protocol as protocol_command
from pursamere_fast.nets import ConvScoreNet, SmallCNN, UNetScoreNet, load_net, save_net
from pursamere_fast.pretrained import recommended_config_dict
from pursamere_fast.protocol import resolve, select, selection_rule, spec

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "tests" / "fixtures" / "ncsnv2_cifar10_ngf16" / "checkpoint.pth"
DRIVER = ROOT / "scripts" / "run_cifar10.sh"
PROTOCOL = load_toml(ROOT / "configs" / "cifar10_protocol.toml")
FMNIST = load_toml(ROOT / "configs" / "fmnist_protocol.toml")
TEMPLATES = [spec(PROTOCOL).select, *spec(PROTOCOL).tests.values()]
PER_BATCH = 8  # synthetic images per CIFAR batch file: 40 training images, 8 test images

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------- Fashion-MNIST

FMNIST_DRIVER = ROOT / "scripts" / "run_fmnist_protocol.sh"
FMNIST_TRAIN, FMNIST_TEST = 48, 8  # synthetic images; the smoke profile holds the last 8 training images out
GRID_KEYS = ("rho", "sam_radius", "steps_per_sigma", "n_samples")


def _fmnist_templates():
    names = spec(FMNIST)
    return {job: load_toml(ROOT / "configs" / name)
            for job, name in {"select": names.select, **names.tests}.items()}


def test_fmnist_protocol_is_the_v1_setup_and_the_issue_13_grid():
    shipped = recommended_config_dict("v1")
    assert FMNIST["pursamere"] == {k: v for k, v in shipped.items() if k not in GRID_KEYS}
    assert FMNIST["adp"] == {"sigma": 0.05, "noise_std": 0.05, "steps": 5}
    assert {k: FMNIST["train"][k] for k in ("holdout", "lr", "batch_size", "epochs")} == {
        "holdout": 5000, "lr": 1e-3, "batch_size": 128, "epochs": 4}
    candidate = {"arch": "unet", "width": 24, "levels": 2, "blocks": 1, "steps": 30000, "batch_size": 64, "lr": 1e-3}
    assert {k: FMNIST["train_score"][k] for k in candidate} == candidate
    templates = _fmnist_templates()
    grid = [d for d in templates["select"]["defence"] if d["kind"] == "pursamere"]
    points = {(d["rho"], d["sam_radius"], d["steps_per_sigma"], d["n_samples"]) for d in grid}
    assert len(grid) == 18 and points == {(f"{rho}/255", r, k, n) for rho in (8, 12, 16)
                                          for r in ("0", f"{rho // 4}/255", f"{rho // 2}/255")
                                          for k, n in ((2, 2), (4, 4))}
    # (steps_per_sigma 2, N 2) is the shipped K = 10, N = 2.
    assert (shipped["steps_per_sigma"], shipped["n_samples"], len(shipped["sigmas"])) == (2, 2, 5)
    assert [d["sigma"] for d in templates["select"]["defence"] if d["kind"] == "adp"] == [0.025, 0.0375, 0.05, 0.075,
                                                                                           0.1]
    assert templates["select"]["n"] <= FMNIST["train"]["holdout"]
    # The test suite is the shipped evaluation's (configs/fmnist_suite.toml).
    assert attack_specs(templates["suite"]["attack"]) == attack_specs(load_toml(ROOT / "configs" / "fmnist_suite.toml")
                                                                      ["attack"])
    assert {(a["norm"], float(number_or_text(a["eps"]))) for a in templates["bpda200"]["attack"] if "norm" in a} == {
        ("linf", 8 / 255), ("l2", 1.0), ("l1", 10.0)}



def test_committed_fmnist_choice_follows_from_its_rows_under_the_committed_rule():
    # results/fmnist_protocol/select/ is the selection's record: its choice must be what the rule
    # of configs/fmnist_protocol.toml makes of its rows, so that a change to the rule's code or to
    # the grid cannot silently disagree with the choice the test jobs were run with.
    from pursamere_fast.attacks.suite import summarise_dir

    run = ROOT / "results" / "fmnist_protocol" / "select"
    committed = json.loads((run / "choice.json").read_text())
    config = resolve(_fmnist_templates()["select"], FMNIST, score="score.safetensors", data_root=".",
                     holdout=FMNIST["train"]["holdout"])
    choice = select(summarise_dir(run), config, selection_rule(FMNIST))
    assert json.loads(json.dumps(choice)) == committed
    assert {g: c["chosen"] for g, c in choice["groups"].items()} == {
        "sam": "rho12-r3-K10-N2", "nosam": "rho12-r0-K10-N2", "adp": "adp-s0.025"}
    augment = json.loads((run / "augment.json").read_text())
    assert augment == protocol.augmentation_config(config, committed) and augment["sam_radius"] == 0.0

def test_check_held_out_refuses_scores_trained_on_the_selection_images(tmp_path):
    from pursamere_fast.pretrained import RELEASES

    shipped = ROOT / "pursamere_fast" / "pretrained" / RELEASES["v1"][0]  # trained on all 60,000 images
    with pytest.raises(ValueError, match="was trained with --holdout 0: the last 5000 training images"):
        protocol.check_held_out(shipped, "fashion-mnist", 5000)
    save_net(ConvScoreNet(1, 4, 2), tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="carries no train-score metadata for --dataset fashion-mnist"):
        protocol.check_held_out(tmp_path / "bare.safetensors", "fashion-mnist", 5000)
    meta = {"kind": "score", "holdout": 5000, "args": {"dataset": "fashion-mnist"}}
    save_net(ConvScoreNet(1, 4, 2), tmp_path / "held.safetensors", {"training": json.dumps(meta)})
    protocol.check_held_out(tmp_path / "held.safetensors", "fashion-mnist", 5000)
    with pytest.raises(ValueError, match="carries no train-score metadata for --dataset cifar10"):
        protocol.check_held_out(tmp_path / "held.safetensors", "cifar10", 5000)


def _fmnist_driver(data, *args, timeout=300):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PURSAMERE_DEVICE": "cpu",
           "PURSAMERE_FASHION_MNIST": str(data)}
    return subprocess.run(["bash", str(FMNIST_DRIVER), *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_one_class_fashion(directory):
    """Random Fashion-MNIST-format images all labelled 3: the smoke profile's classifier learns
    that in its few steps, so its predictions are right and the attacks have images to attack."""
    for split, n, prefix in (("train", FMNIST_TRAIN, "train"), ("test", FMNIST_TEST, "t10k")):
        write_fashion(directory, split, n=n, seed=len(prefix))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(n, 3, np.uint8))))
    return directory


@pytest.fixture(scope="module")
def fmnist_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmnist")
    data = write_one_class_fashion(tmp / "fashion")
    out = tmp / "out"
    t0 = time.monotonic()
    # Two passes: the test jobs on the first 2 images, then extended to the smoke n of 4.
    first = _fmnist_driver(data, "--smoke", "--test-n", "2", out, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    first_rows = {(clf, job): read_rows(out / "test" / clf / job / "rows.jsonl")
                  for clf in ("clean", "aug") for job in ("main", "suite", "bpda200")}
    proc = _fmnist_driver(data, "--smoke", out, timeout=600)
    seconds = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "data": data, "stdout": first.stdout + proc.stdout, "seconds": seconds,
            "first_rows": first_rows, "first_stdout": first.stdout}


def test_fmnist_smoke_trains_the_score_without_the_held_out_images(fmnist_run):
    out = fmnist_run["out"]
    m = json.loads((out / "train_score" / "metrics.json").read_text())
    assert m["arch"] == "UNetScoreNet" and m["arch_config"]["width"] == 4 and m["steps"] == 2
    assert m["holdout"] == 8 and m["train_images"] == FMNIST_TRAIN - 8 and m["args"]["dataset"] == "fashion-mnist"
    score = out / "models" / "score.safetensors"
    assert isinstance(load_net(score), UNetScoreNet)
    protocol.check_held_out(score, "fashion-mnist", 8)
    quality = json.loads((out / "score_quality" / "quality.json").read_text())
    assert quality["split"] == "validation" and [r["n"] for r in quality["rows"]] == [4, 4]
    assert quality["rows"][0]["arch"] == "ConvScoreNet"  # the shipped baseline first
    assert quality["rows"][1]["score"] == str(score)
    assert "MSE sigma=0.1" in (out / "score_quality" / "quality.md").read_text()


def test_fmnist_smoke_selection_obeys_the_rule(fmnist_run):
    out = fmnist_run["out"]
    summary = json.loads((out / "select" / "summary.json").read_text())
    assert len(summary["defences"]) == 1 + 18 + 5 and {e["n"] for e in summary["defences"]} == {4}
    # The first 4 of the 8 held-out images (indices into fashion_mnist_data's "validation" part).
    assert {r["index"] for r in read_rows(out / "select" / "rows.jsonl")} == set(range(4))
    choice = json.loads((out / "select" / "choice.json").read_text())
    rule = selection_rule(FMNIST, smoke=True)
    assert choice["rule"] == rule == {"clean_tol": 1.0, "robust_tol": 0.02}
    config = load_toml(out / "configs" / "fmnist_select.toml")
    assert choice == json.loads(json.dumps(select(summary, config, rule)))  # the rule, reapplied
    for group, result in choice["groups"].items():
        rows = {r["defence"]: r for r in result["rows"]}
        chosen = rows[result["chosen"]]
        near = [r for r in rows.values() if r["eligible"] and r["robust_acc"] >= result["best_robust"] - 0.02 - 1e-12]
        assert chosen["eligible"] and chosen in near and chosen["cost"] == min(r["cost"] for r in near), group
    assert choice["chosen"]["sam"]["sam_radius"] > 0 and choice["chosen"]["nosam"]["sam_radius"] == 0
    assert set(choice["chosen"]["adp"]) >= {"sigma", "noise_std"} and "**ADP**" in fmnist_run["stdout"]


def test_fmnist_smoke_augmented_classifier_purifies_with_the_chosen_sam_off_point(fmnist_run):
    out = fmnist_run["out"]
    choice = json.loads((out / "select" / "choice.json").read_text())
    augment = json.loads((out / "select" / "augment.json").read_text())
    assert augment == {**FMNIST["pursamere"], **FMNIST["smoke"]["pursamere"], **choice["chosen"]["nosam"]}
    for name, purified in (("clean", False), ("aug", True)):
        m = json.loads((out / f"train_{name}" / "metrics.json").read_text())
        assert m["arch"] == "SmallCNN" and m["arch_config"]["width"] == 4 and m["args"]["holdout"] == 8
        assert (m["train_n"], m["test_n"], m["purified_augmentation"]) == (FMNIST_TRAIN - 8, FMNIST_TEST, purified)
        assert isinstance(load_net(out / "models" / f"smallcnn_{name}.safetensors"), SmallCNN)
    args = json.loads((out / "train_aug" / "metrics.json").read_text())["args"]
    assert json.loads(args["purify_config"]) == augment
    assert args["purify_score"] == str(out / "models" / "score.safetensors")


def test_fmnist_smoke_test_rows_for_every_defence_and_member(fmnist_run):
    out = fmnist_run["out"]
    chosen_adp = json.loads((out / "select" / "choice.json").read_text())["chosen"]["adp"]
    for name in ("fmnist_test_main.toml", "fmnist_test_bpda200.toml", "fmnist_test_suite.toml"):
        adp = [d for d in load_toml(out / "configs" / name)["defence"] if d["kind"] == "adp"]
        assert adp == [{**chosen_adp, "name": "adp", "kind": "adp", **FMNIST["smoke"]["adp"]}], name
    for e in check_test_suites(out):
        # The smoke classifier gets the one-class set right, so every member attacked all 4.
        assert [m["ran"] for m in e["members"]] == [4] * 8
    for clf in ("clean", "aug"):
        rows = read_rows(out / "test" / clf / "suite" / "rows.jsonl")
        assert {r["index"] for r in rows} == set(range(4))  # the first 4 test images
    report = (out / "report.md").read_text()
    assert report.startswith("# Fashion-MNIST protocol") and "## Score model" in report and "Score quality" in report
    assert report.count("classifier: suite") == 2 and "## Verdicts" in report
    assert "pursamere-sam: aug vs clean classifier" in report and "pursamere-sam vs pursamere-nosam" in report
    assert all(f"| {claim} {text} |" in report for claim, text in protocol.CLAIMS.items())
    assert "| (i) | clean | bpda200 | bpda-l1-" in report and "pursamere-nosam vs none" in report


def test_verdicts_pair_each_claim_under_its_measures():
    # Robust on image 0 only for every key but the SAM ones, so (ii)'s pairs are discordant once.
    keys = [("clean", "main", m, d) for m in ("bpda-linf-x", "gpgd-linf-x")
            for d in ("none", "adp", "pursamere-sam-rho8", "pursamere-nosam-rho8")]
    keys += [(clf, "suite", "worst case", d) for clf in ("clean", "aug")
             for d in ("pursamere-sam", "pursamere-nosam", "adp")]
    maps = {k: {0: True, 1: "-sam" in k[3]} for k in keys}
    comps = protocol.comparisons(maps)
    got = {c[:6]: (c[6]["n"], c[6]["a_only"], c[6]["b_only"]) for c in comps}
    bpda, gpgd, worst = "bpda-linf-x", "gpgd-linf-x", "worst case"
    sam_vs = {("(ii)", "clean", "main", m, "pursamere-sam-rho8", "pursamere-nosam-rho8"): (2, 1, 0)
              for m in (bpda, gpgd)}
    sam_vs |= {("(ii)", clf, "suite", worst, "pursamere-sam", "pursamere-nosam"): (2, 1, 0) for clf in ("aug", "clean")}
    want = {("(i)", "clean", "main", bpda, "pursamere-nosam-rho8", "none"): (2, 0, 0),
            ("(i)", "clean", "main", bpda, "pursamere-sam-rho8", "none"): (2, 1, 0), **sam_vs,
            ("(iii)", "clean", "main", bpda, "pursamere-nosam-rho8", "adp"): (2, 0, 0),
            ("(iii)", "clean", "main", bpda, "pursamere-sam-rho8", "adp"): (2, 1, 0),
            **{("(iii)", clf, "suite", worst, d, "adp"): (2, int(d == "pursamere-sam"), 0)
               for clf in ("aug", "clean") for d in ("pursamere-nosam", "pursamere-sam")},
            **{("(iv)", "aug vs clean", "suite", worst, f"{d}: aug", "clean classifier"): (2, 0, 0)
               for d in ("adp", "pursamere-nosam", "pursamere-sam")}}
    assert got == want and len(comps) == len(want)
    assert [c[0] for c in comps] == sorted((c[0] for c in comps), key=list(protocol.CLAIMS).index)
    # A job one classifier has not reached yet gives no comparison, not a "no difference".
    maps |= {("aug", "suite", worst, d): {} for d in ("pursamere-sam", "pursamere-nosam", "adp")}
    assert {c[:6] for c in protocol.comparisons(maps)} == {k for k in want if k[1] == "clean"}


def test_baseline_runs_join_claim_iii_and_the_report(tmp_path):
    """OUT/baselines.json puts a run beside a protocol job: its defences pair with PurSAMERE's
    under claim (iii), on the images both have."""
    def run(path, defences, n):
        path.mkdir(parents=True)
        rows = [dict(defence=d, threat=t, attack=t if t == "clean" else "bpda-linf-x", index=i,
                     robust_correct=(i + (d == "pursamere-nosam")) % 2 == 0) for d in defences
                for t in ("clean", "bpda") for i in range(n)]
        (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (path / "summary.json").write_text(json.dumps({"defences": []}))
        (path / "summary.md").write_text(f"rows of {path.name}\n")

    run(tmp_path / "test" / "aug" / "main", ["pursamere-nosam", "adp"], 6)
    run(tmp_path / "diffpure" / "main", ["diffpure-x"], 4)
    key = ("aug", "main", "bpda-linf-x")
    assert {k[3] for k in protocol.robust_maps(tmp_path)} == {"pursamere-nosam", "adp"}
    (tmp_path / protocol.BASELINES).write_text(json.dumps({"aug": {"main": ["diffpure/main"]}}))
    assert protocol.baseline_runs(tmp_path) == [("aug", "main", tmp_path / "diffpure" / "main")]
    maps = protocol.robust_maps(tmp_path)
    assert maps[(*key, "diffpure-x")] == {0: True, 1: False, 2: True, 3: False}
    iii = {c[5]: c[6] for c in protocol.comparisons(maps) if c[0] == "(iii)"}
    assert set(iii) == {"adp", "diffpure-x"}
    # PurSAMERE is robust on the odd images, the baseline on the even: 2 vs 2 on the 4 both have.
    assert (iii["diffpure-x"]["n"], iii["diffpure-x"]["a_only"], iii["diffpure-x"]["b_only"]) == (4, 2, 2)
    assert sorted(["pursamere-nosam", "diffpure-x", "adp", "none"], key=protocol.defence_order) == [
        "none", "adp", "diffpure-x", "pursamere-nosam"]
    text = protocol.report(tmp_path)
    assert "## aug classifier: main, baseline run `diffpure/main`" in text and "rows of main" in text
    assert "pursamere-nosam vs diffpure-x" in text


def test_suite_worst_case_of_a_running_job_counts_images_every_member_reached(tmp_path):
    job = tmp_path / "test" / "clean" / "suite"
    job.mkdir(parents=True)
    members = ["gpgd", "bpda"]
    summary = {"paired": [], "defences": [{"defence": "adp", "members": [{"member": m} for m in members]}]}
    (job / "summary.json").write_text(json.dumps(summary))
    row = dict(defence="adp", clean_correct=True, broken=False)
    key = ("clean", "suite", "worst case", "adp")
    # The first batch has reached gpgd only: no image's worst case is known yet.
    rows = [{**row, "index": i, "attack": a} for i in (0, 1) for a in ("clean", "gpgd")]
    (job / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert protocol.robust_maps(tmp_path) == {key: {}}
    rows.append({**row, "index": 0, "attack": "bpda"})
    (job / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert protocol.robust_maps(tmp_path) == {key: {0: True}}


def test_report_figure_has_a_panel_per_job_and_measure(tmp_path):
    maps = {("clean", "suite", "worst case", "adp"): {0: True, 1: False},
            ("aug", "suite", "worst case", "adp"): {0: True},
            ("clean", "bpda200", "bpda-l2-x", "none"): {0: False, 1: False, 2: True},
            ("clean", "main", "bpda-linf-x", "pursamere-sam-rho12"): {0: False},
            ("aug", "main", "bpda-linf-x", "none"): {}}  # a job this classifier has not reached
    panels = protocol.accuracy_panels(maps)
    assert panels == {("main", "bpda-linf-x"): {("clean", "pursamere-sam-rho12"): (0, 1)},
                      ("suite", "worst case"): {("clean", "adp"): (1, 2), ("aug", "adp"): (1, 1)},
                      ("bpda200", "bpda-l2-x"): {("clean", "none"): (1, 3)}}
    assert list(panels) == [("main", "bpda-linf-x"), ("suite", "worst case"), ("bpda200", "bpda-l2-x")]
    names = ["pursamere-nosam-rho8", "pursamere-sam-rho16", "adp", "none", "pursamere-sam-rho8"]
    assert sorted(names, key=protocol.defence_order) == [
        "none", "adp", "pursamere-sam-rho8", "pursamere-sam-rho16", "pursamere-nosam-rho8"]
    path = protocol.plot_report(maps, tmp_path / "report.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert protocol.plot_report({k: {} for k in maps}, tmp_path / "empty.png") is None
    assert not (tmp_path / "empty.png").exists()


def test_fmnist_smoke_test_n_pass_then_extension(fmnist_run):
    out = fmnist_run["out"]
    # The first pass ran the test jobs in the order main, suite, bpda200, both classifiers each.
    stages = re.findall(r"(test_\w+) \.\.\.", fmnist_run["first_stdout"])
    assert stages == [f"test_{clf}_{job}" for job in ("main", "suite", "bpda200") for clf in ("clean", "aug")]
    for (clf, job), rows in fmnist_run["first_rows"].items():
        assert {r["index"] for r in rows} == {0, 1}, (clf, job)
        # The extension added images 2 and 3 and left the first pass's rows as they were.
        final = read_rows(out / "test" / clf / job / "rows.jsonl")
        assert {r["index"] for r in final} == set(range(4))
        key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert {key(r) for r in rows} <= {key(r) for r in final}, (clf, job)


def test_fmnist_smoke_rerun_with_the_trained_score_continues(fmnist_run):
    out, data = fmnist_run["out"], fmnist_run["data"]
    rows = out / "test" / "aug" / "suite" / "rows.jsonl"
    before, log = rows.read_text(), (out / "logs" / "train_score.log").read_text()
    t0 = time.monotonic()
    # A finished score file given by --score replaces the train_score stage; its weights are the
    # ones every evaluation was pinned to, so nothing is refused or redone.
    proc = _fmnist_driver(data, "--smoke", "--score", out / "models" / "score.safetensors", out)
    assert proc.returncode == 0, proc.stderr
    assert rows.read_text() == before and (out / "logs" / "train_score.log").read_text() == log
    assert "train_score" not in proc.stdout
    # The first run's time with the rerun's: the budget of the Fashion-MNIST smoke tests.
    print(f"fmnist smoke run {fmnist_run['seconds']:.0f} s, rerun {time.monotonic() - t0:.0f} s")


def test_fmnist_driver_refuses_a_score_trained_on_the_held_out_images(tmp_path):
    write_fashion(tmp_path / "fashion", "train", n=FMNIST_TRAIN)
    write_fashion(tmp_path / "fashion", "test", n=FMNIST_TEST)
    shipped = ROOT / "pursamere_fast" / "pretrained" / "fashion_mnist_v1_score.safetensors"  # all 60,000 images
    proc = _fmnist_driver(tmp_path / "fashion", "--smoke", "--score", shipped, tmp_path / "out", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("scripts/run_fmnist_protocol.sh: error: argument --score: ")
    assert "was trained with --holdout 0" in proc.stderr and not (tmp_path / "out").exists()
    for args, message in ((("--score", "nope"), "error: --score: no such file: nope"),
                          (("a", "b"), "error: at most one OUT_DIR"), (("--bad",), "error: unknown option: --bad")):
        proc = _fmnist_driver(tmp_path / "fashion", *args, timeout=60)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert message in proc.stderr


def test_stage_log_keeps_earlier_runs_and_a_failure_exits(tmp_path, capsys):
    (tmp_path / "logs").mkdir()
    protocol_command.stage(tmp_path, "job", "pursamere-fast job", lambda argv: print("first pass", argv), ["--n", "1"])
    protocol_command.stage(tmp_path, "job", "pursamere-fast job", lambda argv: print("second pass", argv), ["--n", "2"])
    log = (tmp_path / "logs" / "job.log").read_text()
    # A stage rerun at a larger n appends: the earlier pass's output stays, each run with its command.
    assert log.count("$ pursamere-fast job --n ") == 2 and log.index("first pass") < log.index("second pass")
    assert re.search(r"^# \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n\$ pursamere-fast job --n 1\n", log)

    def fails(argv):
        raise RuntimeError("boom")
    with pytest.raises(SystemExit):
        protocol_command.stage(tmp_path, "job", "pursamere-fast job", fails, [])
    assert "boom" in (tmp_path / "logs" / "job.log").read_text() and "stage job failed" in capsys.readouterr().err
