"""Validation sweep: the split, the grid, the selection rule, a toy end-to-end run, collection."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from pursamere_fast.attacks import sweep
from pursamere_fast.commands import sweep as sweep_command


def _write_train_idx(directory, n):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for name, arr, code in (("train-images-idx3-ubyte.gz", images, 0x08), ("train-labels-idx1-ubyte.gz", labels, 0x08)):
        header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (directory / name).write_bytes(gzip.compress(header + arr.tobytes()))
    return images, labels


def test_validation_split_is_the_end_of_the_training_set(tmp_path):
    images, labels = _write_train_idx(tmp_path, 10)
    x, y = sweep.validation_split(3, root=tmp_path)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 28, 28)
    assert torch.equal(x[:, 0], torch.from_numpy(images[-3:].astype(np.float32) / 255))
    assert y.tolist() == labels[-3:].tolist()
    for bad in (0, 11, 2.0):
        with pytest.raises(ValueError, match="size"):
            sweep.validation_split(bad, root=tmp_path)


def test_config_grid_and_names():
    points = sweep.config_grid({"rho": [8 / 255, 16 / 255], "sam_radius": [0.0, 4 / 255, 8 / 255]})
    assert len(points) == 6
    assert points[0] == {"rho": 8 / 255, "sam_radius": 0.0} and points[-1] == {"rho": 16 / 255, "sam_radius": 8 / 255}
    assert sweep.config_name(points[1]) == "rho=8/255,sam_radius=4/255"
    assert sweep.config_name({"n_samples": 8, "lr_max": 0.02}) == "n_samples=8,lr_max=0.02"
    with pytest.raises(ValueError, match="rho"):
        sweep.config_grid({"rho": []})


def _entry(defence, attack, n, clean, robust):
    return {"defence": defence, "attack": attack, "n": n, "clean_acc": clean, "robust_acc": robust,
            "robust_ci": [0.0, 1.0]}


def _summary(rows, n=100):
    out = [_entry("none", "clean", n, 0.90, 0.90)]
    for name, clean, gray, bpda in rows:
        out += [_entry(name, "clean", n, clean, clean), _entry(name, "gpgd", n, clean, gray),
                _entry(name, "bpda", n, clean, bpda)]
    return out


def _choose(summary, costs, **kw):
    return sweep.choose_config(summary, costs, undefended="none", clean="clean", robust="bpda", tiebreak="gpgd", **kw)


def test_choose_maximises_bpda_within_the_clean_tolerance():
    summary = _summary([("a", 0.89, 0.5, 0.40), ("b", 0.85, 0.7, 0.60), ("c", 0.885, 0.6, 0.45)])
    choice = _choose(summary, {"a": 10, "b": 10, "c": 10})
    # b has the best BPDA accuracy but loses 5 pp clean: not eligible.
    assert choice["chosen"] == "c"
    assert [r["eligible"] for r in choice["rows"]] == [True, False, True]
    assert _choose(summary, {"a": 10, "b": 10, "c": 10}, clean_tol=0.06)["chosen"] == "b"


def test_choose_ties_go_to_cost_then_gray_box_then_order():
    summary = _summary([("a", 0.9, 0.5, 0.4), ("b", 0.9, 0.6, 0.4), ("c", 0.9, 0.6, 0.4), ("d", 0.9, 0.6, 0.4),
                        ("e", 0.9, 0.7, 0.39)])
    costs = {"a": 1, "b": 80, "c": 40, "d": 40, "e": 1}
    assert _choose(summary, costs)["chosen"] == "a"
    assert _choose(summary, {"b": 80, "c": 40, "d": 40})["chosen"] == "c"
    summary = _summary([("a", 0.9, 0.5, 0.4), ("b", 0.9, 0.6, 0.4)])
    assert _choose(summary, {"a": 40, "b": 40})["chosen"] == "b"


def test_choose_robust_tol_takes_the_cheapest_config_near_the_best():
    summary = _summary([("big", 0.9, 0.6, 0.50), ("mid", 0.9, 0.6, 0.49), ("small", 0.9, 0.7, 0.47),
                        ("tiny", 0.85, 0.7, 0.50)])
    costs = {"big": 160, "mid": 40, "small": 20, "tiny": 1}
    choice = _choose(summary, costs, robust_tol=0.02)
    # tiny is ineligible (clean); small is 3 pp below the best: mid is the cheapest within 2 pp.
    assert choice["chosen"] == "mid" and choice["best_robust"] == 0.50
    assert _choose(summary, costs, robust_tol=0.0)["chosen"] == "big"
    assert _choose(summary, costs, robust_tol=0.03)["chosen"] == "small"
    with pytest.raises(ValueError, match="robust_tol"):
        _choose(summary, costs, robust_tol=-0.1)


def test_choose_allows_one_sample_at_small_n_and_reports_none_when_nothing_fits():
    summary = _summary([("a", 0.9 - 1 / 20, 0.5, 0.4)], n=20)
    assert _choose(summary, {"a": 1})["chosen"] == "a"
    summary = _summary([("a", 0.9 - 2 / 20, 0.5, 0.4)], n=20)
    assert _choose(summary, {"a": 1})["chosen"] is None
    with pytest.raises(ValueError, match="'zz'"):
        _choose(summary, {"zz": 1})
    with pytest.raises(ValueError, match="clean_tol"):
        _choose(summary, {"a": 1}, clean_tol=2)


TOML = """\
classifier = "pursamere_fast.attacks.toy:make_classifier"
score = "pursamere_fast.attacks.toy:make_score"
data = "pursamere_fast.attacks.toy:synthetic_data"
out = "{out}"
n = 8
batch_size = 4
clean_tol = 0.02
select = {{ clean = "clean", robust = "bpda-linf-eps0.0313725-s1", tiebreak = "gpgd-linf-eps0.0313725-s1" }}

[classifier_kwargs]
train_steps = 30

[data_kwargs]
n = 8
seed = 1

[pursamere]
sigmas = [0.3, 0.1]
steps_per_sigma = 1
n_samples = 2

[grid]
rho = ["0", "16/255"]
sam_radius = ["0", "4/255"]

[[attack]]
threat = "clean"

[[attack]]
threat = "gpgd"
eps = "8/255"
steps = 1

[[attack]]
threat = "bpda"
eps = "8/255"
steps = 1
"""


def test_toy_sweep_runs_end_to_end_and_collects(tmp_path, capsys):
    out = tmp_path / "sweep"
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(TOML.format(out=out))
    assert sweep_command.main(["run", "--config", str(cfg), "--no-progress"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    rows = {r["defence"]: r for r in report["choice"]["rows"]}
    assert set(rows) == {"rho=0.0,sam_radius=0.0", "rho=0.0,sam_radius=4/255",
                         "rho=16/255,sam_radius=0.0", "rho=16/255,sam_radius=4/255"}
    # rho = 0 leaves the image as it is: the undefended clean accuracy, every rho = 0 config eligible.
    assert rows["rho=0.0,sam_radius=0.0"]["clean_acc"] == report["choice"]["undefended_clean"]
    assert rows["rho=0.0,sam_radius=4/255"]["eligible"]
    assert rows["rho=16/255,sam_radius=4/255"]["cost"] == 2 * rows["rho=16/255,sam_radius=0.0"]["cost"] == 8
    assert report["choice"]["chosen"] in rows
    assert report["chosen_overrides"] is not None and set(report["chosen_overrides"]) == {"rho", "sam_radius"}
    assert "chosen:" in (out / "sweep.md").read_text()

    entries = sweep.collect([str(out)])
    assert len(entries) == 5 * 3 and all(e["n"] == 8 for e in entries)
    by = {(e["defence"], e["attack"]): e for e in entries}
    e = by[("rho=16/255,sam_radius=4/255", "bpda-linf-eps0.0313725-s1")]
    assert e["description"]["rho"] == pytest.approx(16 / 255) and e["threat"] == "bpda"
    assert 0 <= e["robust_ci"][0] <= e["robust_acc"] <= e["robust_ci"][1] <= 1
    # A run stopped inside a batch: one setting lacks a sample, so by default every setting drops it.
    rows = (out / "rows.jsonl").read_text().splitlines()
    victim = next(i for i, line in enumerate(rows) if json.loads(line)["attack"].startswith("bpda")
                  and json.loads(line)["index"] == 7)
    (out / "rows.jsonl").write_text("\n".join(rows[:victim] + rows[victim + 1:]) + "\n")
    assert all(e["n"] == 7 for e in sweep.collect([str(out)]))
    assert sorted({e["n"] for e in sweep.collect([str(out)], complete_only=False)}) == [7, 8]
    assert sweep_command.main(["collect", "--out", str(tmp_path / "res"), str(out)]) == 0
    assert len(json.loads((tmp_path / "res" / "summary.json").read_text())) == 15
    assert "| sweep |" in (tmp_path / "res" / "summary.md").read_text()
    assert (tmp_path / "res" / "acc_vs_eps.png").stat().st_size > 0


def test_explicit_points_mix_pursamere_and_adp(tmp_path, capsys):
    out = tmp_path / "points"
    grid = '[grid]\nrho = ["0", "16/255"]\nsam_radius = ["0", "4/255"]\n'
    points = ('[[point]]\nrho = "16/255"\nn_samples = 1\n\n'
              '[[point]]\ndefence = "adp"\nsigma = 0.1\nnoise_std = "1/10"\nsteps = 2\n')
    cfg = tmp_path / "points.toml"
    cfg.write_text("robust_tol = 0.5\n" + TOML.format(out=out).replace(grid, points))
    assert sweep_command.main(["run", "--config", str(cfg), "--no-progress"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    rows = {r["defence"]: r for r in report["choice"]["rows"]}
    assert set(rows) == {"rho=16/255,n_samples=1", "adp:sigma=0.1,noise_std=0.1,steps=2"}
    adp = rows["adp:sigma=0.1,noise_std=0.1,steps=2"]
    assert adp["cost"] == 2 and rows["rho=16/255,n_samples=1"]["cost"] == 2 * 1 * 1 * 2  # K * N * (SAM: 2)
    assert report["choice"]["robust_tol"] == 0.5

    for text, message in [(TOML.format(out=out) + '\n[[point]]\nrho = "0"\n', "exactly one of [grid] and [[point]]"),
                          (TOML.format(out=out).replace(grid, '[[point]]\ndefence = "dip"\n'), "'dip'")]:
        cfg.write_text(text)
        with pytest.raises(SystemExit) as exit_info:
            sweep_command.main(["run", "--config", str(cfg), "--no-progress"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("pursamere-fast sweep run: error: argument --config: ")
        assert message in err


def _write_rows(directory, defence, attack, robust, labels=None):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "rows.jsonl", "a") as f:
        for i, ok in enumerate(robust):
            f.write(json.dumps({"defence": defence, "attack": attack, "index": i, "label": 0 if labels is None
                                else labels[i], "clean_correct": True, "robust_correct": bool(ok)}) + "\n")


def test_compare_counts_discordant_pairs_on_common_images(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    # a right on 0-7, b right on 0-3 and 8: only_a = 4 (4-7), only_b = 1 (8); b has a 10th image.
    _write_rows(a, "sam", "bpda-x", [1] * 8 + [0])
    _write_rows(b, "nosam", "bpda-y", [1] * 4 + [0] * 4 + [1, 1])
    r = sweep.compare(str(a), str(b), "bpda-x", "bpda-y")
    assert (r["n"], r["only_a"], r["only_b"]) == (9, 4, 1)
    assert r["acc_a"] == 8 / 9 and r["acc_b"] == 5 / 9
    assert r["p_value"] == pytest.approx(2 * 6 / 32)   # P(X <= 1), X ~ Bin(5, 1/2), two-sided
    assert sweep_command.main(["compare", f"{a}:sam", str(b), "--attack", "bpda-x", "--attack-b", "bpda-y"]) == 0
    assert "only_a=4 only_b=1" in capsys.readouterr().out


def test_compare_refuses_ambiguous_missing_or_mismatched_settings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_rows(a, "d1", "atk", [1, 0])
    _write_rows(a, "d2", "atk", [1, 1])
    _write_rows(b, "d1", "atk", [1, 1], labels=[0, 3])
    with pytest.raises(ValueError, match="several defences"):
        sweep.compare(str(a), str(b), "atk")
    with pytest.raises(ValueError, match="no rows"):
        sweep.compare(f"{a}:d1", str(b), "other")
    with pytest.raises(ValueError, match="label"):
        sweep.compare(f"{a}:d1", str(b), "atk")


def test_compare_uses_the_complete_samples_of_each_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_rows(a, "d", "atk", [1, 1, 1, 1])
    _write_rows(a, "d", "other", [1, 1, 1])   # image 3 lacks this setting: not complete
    _write_rows(b, "u", "atk", [0, 0, 0, 0])
    assert sweep.compare(str(a), str(b), "atk")["n"] == 3
    assert sweep.compare(str(a), str(b), "atk", complete_only=False)["n"] == 4
