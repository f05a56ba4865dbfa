"""Convergence study: one long run per restart gives the accuracy of every shorter one."""

import json

import pytest
import torch

from pursamere_fast import PurifyConfig
from pursamere_fast.attacks import Defence, PurifiedClassifier, pgd, toy
from pursamere_fast.attacks.convergence import convergence_table, run_convergence
from pursamere_fast.commands.convergence import main

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = 0.12


@pytest.fixture(scope="module")
def setup():
    clf = toy.make_classifier(train_steps=60)
    data = toy.synthetic_data(16, seed=1)
    cfg = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=1, n_samples=2, rho=0.06, sam_radius=0.0)
    return clf, data, Defence.pursamere(toy.make_score(), cfg)


def test_table_from_history_matches_shorter_runs(setup, tmp_path):
    clf, (x, y), defence = setup
    table = run_convergence(clf, (x, y), defence, out_dir=str(tmp_path), eps=EPS, alpha=EPS / 8, steps=8,
                            restarts=2, batch_size=5, steps_grid=(1, 2, 4), restarts_grid=(1, 2), progress=False)
    acc = {(g["steps"], g["restarts"]): g["robust_correct"] for g in table["grid"]}
    assert table["n"] == 16 and set(acc) == {(s, r) for s in (1, 2, 4, 8) for r in (1, 2)}
    for r in (1, 2):
        assert [acc[(s, r)] for s in (1, 2, 4, 8)] == sorted([acc[(s, r)] for s in (1, 2, 4, 8)], reverse=True)
    for s in (1, 2, 4, 8):
        assert acc[(s, 2)] <= acc[(s, 1)]
    assert acc[(8, 2)] < table["clean_correct"], "the toy attack must break something"
    # A separate 4-step run from the same per-sample starts breaks exactly the images the history says.
    model = PurifiedClassifier(defence.build("bpda", None), clf)
    seeds = list(range(16))  # run_convergence seeds restart 0 of index i with i
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
    x4 = pgd(model, x, y, norm="linf", eps=EPS, alpha=EPS / 8, steps=4, seed=seeds)
    with torch.no_grad():
        ok4 = model(x4).argmax(1) == y
    assert int((ok4 & clean_ok).sum()) == acc[(4, 1)]
    assert (tmp_path / "convergence.png").stat().st_size > 0


def test_resume_and_other_settings(setup, tmp_path):
    clf, data, defence = setup
    kw = dict(out_dir=str(tmp_path), eps=EPS, steps=2, restarts=1, batch_size=8, progress=False)
    first = run_convergence(clf, data, defence, **kw)
    rows = (tmp_path / "rows.jsonl").read_text()
    assert run_convergence(clf, data, defence, **kw)["grid"] == first["grid"]
    assert (tmp_path / "rows.jsonl").read_text() == rows
    with pytest.raises(ValueError, match="other settings"):
        run_convergence(clf, data, defence, **{**kw, "steps": 3})


def test_table_by_hand():
    rows = [{"restart": 0, "index": 0, "clean_correct": True, "first_broken": -1},
            {"restart": 1, "index": 0, "clean_correct": True, "first_broken": 3},
            {"restart": 0, "index": 1, "clean_correct": True, "first_broken": 0},
            {"restart": 1, "index": 1, "clean_correct": True, "first_broken": -1},
            {"restart": 0, "index": 2, "clean_correct": False, "first_broken": -1}]
    t = convergence_table(rows, [0, 1, 2], 5, 2, steps_grid=(2, 5), restarts_grid=(1, 2))
    acc = {(g["steps"], g["restarts"]): (g["n"], g["robust_correct"]) for g in t["grid"]}
    # Image 2 lacks restart 1, so only the one-restart cells count it; image 1 fell at its start.
    assert t["n"] == 3 and acc == {(2, 1): (3, 1), (5, 1): (3, 1), (2, 2): (2, 1), (5, 2): (2, 0)}


def test_cli(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["--defence", "adp", "--adp", "sigma=0.1", "--adp", "noise_std=0.1", "--adp", "steps=2", "--n", "6",
            "--steps", "3", "--restarts", "2", "--batch-size", "3", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    assert "restarts \\ steps" in capsys.readouterr().out
    assert json.loads((out / "convergence.json").read_text())["n"] == 6
    with pytest.raises(SystemExit) as e:
        main(argv + ["--threat", "square"])
    assert e.value.code == 2
