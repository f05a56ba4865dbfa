"""The adaptive suite: worst case over members, cascade, transfer, resume, batch invariance, CLI."""

import json

import pytest
import torch

from pursamere_fast import PurifyConfig
from pursamere_fast.attacks import AttackSpec, Defence, read_rows, toy
from pursamere_fast.attacks.suite import (
    CLEAN,
    default_suite,
    paired_robust,
    robust_per_image,
    run_suite,
    suite_markdown,
    summarise_suite,
)
from pursamere_fast.commands.evaluate import main_evaluate

pytestmark = pytest.mark.usefixtures("one_thread")

# On the toy task some members break images and some do not (7 of 24 survive them all on an
# Intel Xeon; 0 at 0.15).
EPS = 0.08


@pytest.fixture(scope="module")
def setup():
    clf = toy.make_classifier(train_steps=60)
    data = toy.synthetic_data(24, seed=1)
    cfg = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=1, n_samples=2, rho=0.06, sam_radius=0.0)
    defences = [Defence.pursamere(toy.make_score(), cfg), Defence.adp(toy.make_score(), sigma=0.1, noise_std=0.1,
                                                                      steps=2)]
    members = [AttackSpec("gpgd", eps=EPS, steps=2, alpha=EPS / 2),
               AttackSpec("bpda", eps=EPS, steps=3, alpha=EPS / 4),
               AttackSpec("exact", eps=EPS, steps=2, attack="apgd", loss="dlr")]
    return clf, data, defences, members


def _rows(out):
    return {(r["defence"], r["attack"], r["index"]): r for r in read_rows(str(out / "rows.jsonl"))}


def test_worst_case_is_the_union_of_members_and_cascade_agrees(setup, tmp_path):
    clf, data, defences, members = setup
    full = run_suite(clf, data, defences[:1], members, out_dir=str(tmp_path / "full"), batch_size=8,
                     cascade=False, progress=False)
    casc = run_suite(clf, data, defences[:1], members, out_dir=str(tmp_path / "casc"), batch_size=8,
                     progress=False)
    rows = _rows(tmp_path / "full")
    labels = [m.label for m in members]
    robust = [rows[("pursamere", "clean", i)]["clean_correct"]
              and not any(rows[("pursamere", m, i)]["broken"] for m in labels) for i in range(24)]
    (e,) = full["defences"]
    assert e["n"] == 24 and e["robust_correct"] == sum(robust)
    assert 0 < sum(robust) < e["clean_correct"], "the toy setting must leave something to break and to keep"
    # Per sample seeds: the cascade attacks fewer images, but each one exactly as the full run does.
    crow = _rows(tmp_path / "casc")
    for k, r in crow.items():
        if r.get("ran"):
            assert r["adv_pred"] == rows[k]["adv_pred"]
    assert casc["defences"][0]["robust_correct"] == e["robust_correct"]
    ran_full = sum(s["ran"] for s in e["members"])
    ran_casc = sum(s["ran"] for s in casc["defences"][0]["members"])
    assert ran_casc < ran_full
    only = {s["member"]: s["only"] for s in e["members"]}
    for m in labels:
        assert only[m] == sum(1 for i in range(24) if rows[("pursamere", m, i)]["broken"]
                              and not any(rows[("pursamere", o, i)]["broken"] for o in labels if o != m))


def test_rows_do_not_depend_on_batch_size(setup, tmp_path):
    clf, data, defences, members = setup
    run_suite(clf, data, defences[:1], members, out_dir=str(tmp_path / "b8"), batch_size=8, progress=False)
    run_suite(clf, data, defences[:1], members, out_dir=str(tmp_path / "b5"), batch_size=5, progress=False)
    a, b = _rows(tmp_path / "b8"), _rows(tmp_path / "b5")
    assert a.keys() == b.keys()
    for k in a:
        assert {f: a[k].get(f) for f in ("ran", "broken", "adv_pred")} == \
               {f: b[k].get(f) for f in ("ran", "broken", "adv_pred")}, k


def test_transfer_scores_other_defences_adversarials(setup, tmp_path):
    clf, data, defences, members = setup
    out = tmp_path / "t"
    s = run_suite(clf, data, defences, members[:2], out_dir=str(out), batch_size=8, progress=False)
    rows = _rows(out)
    for d in ("pursamere", "adp"):
        for i in range(24):
            t = rows[(d, "transfer", i)]
            survived = rows[(d, "clean", i)]["clean_correct"] and not any(
                rows[(d, m.label, i)]["broken"] for m in members[:2])
            # Transfer runs on exactly the survivors that the other defence has an adversarial for.
            other = "adp" if d == "pursamere" else "pursamere"
            has_adv = any(rows[(other, m.label, i)]["ran"] for m in members[:2])
            assert t["ran"] == (survived and has_adv)
            if t["ran"]:
                assert t["source"].split(" | ")[0] == other
    assert len(s["paired"]) == 1 and s["paired"][0]["n"] == 24
    assert "paired (worst case)" in suite_markdown(s)


def test_resume_skips_finished_rows_and_refuses_another_order(setup, tmp_path):
    clf, data, defences, members = setup
    out = str(tmp_path / "r")
    first = run_suite(clf, data, defences[:1], members, out_dir=out, indices=range(8), batch_size=8, progress=False)
    before = read_rows(tmp_path / "r" / "rows.jsonl")
    again = run_suite(clf, data, defences[:1], members, out_dir=out, indices=range(8), batch_size=8, progress=False)
    assert read_rows(tmp_path / "r" / "rows.jsonl") == before and again == first
    with pytest.raises(ValueError, match="different setting"):
        run_suite(clf, data, defences[:1], members[::-1], out_dir=out, indices=range(8), batch_size=8,
                  progress=False)


def test_summary_counts_only_complete_images():
    rows = [{"defence": "d", "attack": "clean", "index": 0, "clean_correct": True, "ran": False, "broken": False},
            {"defence": "d", "attack": "a", "index": 0, "clean_correct": True, "ran": True, "broken": False,
             "cpu_s": 2.0},
            {"defence": "d", "attack": "clean", "index": 1, "clean_correct": True, "ran": False, "broken": False}]
    s = summarise_suite(rows, ["d"], ["clean", "a"], [0, 1])
    (e,) = s["defences"]
    assert (e["n"], e["robust_correct"], e["cpu_s_per_image"]) == (1, 1, 2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(members=[]), "members"),
    (dict(members=[AttackSpec("clean")]), "clean"),
    (dict(batch_size=0), "batch_size"),
    (dict(cascade="yes"), "cascade"),
])
def test_bad_arguments(setup, tmp_path, kwargs, match):
    clf, data, defences, members = setup
    args = dict(members=members[:1], batch_size=4, cascade=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        run_suite(clf, data, defences[:1], args.pop("members"), out_dir=str(tmp_path), progress=False, **args)


def test_default_suite_is_ordered_and_fixed_step():
    s = default_suite("linf", 8 / 255, square_queries=100)
    assert [m.threat for m in s][:2] == ["gpgd", "bpda"] and s[-1].attack == "square"
    assert all(m.alpha == pytest.approx(2 / 255) for m in s if m.attack == "pgd")
    assert len({m.label for m in s}) == len(s)
    assert all(m.attack != "square" for m in default_suite("l2", 0.5, square_queries=0))


def test_attack_spec_refuses_inconsistent_members():
    with pytest.raises(ValueError, match="restarts"):
        AttackSpec("bpda", restarts=3, random_start=False)
    with pytest.raises(ValueError, match="blackbox"):
        AttackSpec("bpda", attack="square")
    with pytest.raises(ValueError, match="alpha"):
        AttackSpec("bpda", attack="apgd", alpha=0.01)
    with pytest.raises(ValueError, match="l1"):
        AttackSpec("bpda", norm="l1", attack="apgd")
    assert AttackSpec("bpda", steps=4, eps=0.1).label == "bpda-linf-eps0.1-s4"
    assert AttackSpec("exact_st", steps=4, eps=0.1, attack="apgd", loss="dlr").label == \
        "apgd-dlr-exact_st-linf-eps0.1-s4"


def test_cli_suite(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["--classifier", "pursamere_fast.attacks.toy:make_classifier", "--data",
            "pursamere_fast.attacks.toy:synthetic_data", "--defences", "none,adp", "--adp", "sigma=0.1",
            "--adp", "noise_std=0.1", "--adp", "steps=2", "--suite", "--eps", "0.1", "--bpda-steps", "2",
            "--exact-steps", "1", "--square-queries", "5", "--n", "8", "--batch-size", "4", "--no-progress",
            "--out", str(out)]
    assert main_evaluate(argv) == 0
    text = capsys.readouterr().out
    assert "worst-case robust acc" in text and "transfer" in text
    summary = json.loads((out / "summary.json").read_text())
    assert {e["defence"] for e in summary["defences"]} == {"none", "adp"}
    assert main_evaluate(argv + ["--autoattack-only"]) == 0
    assert "only AutoAttack broke" in capsys.readouterr().out
    checked = json.loads((out / "autoattack.json").read_text())
    assert [c["defence"] for c in checked] == ["none", "adp"] and all(c["n"] == 8 for c in checked)
    # DiffPure's 'rand' check: fresh noise, EoT; its own file beside the BPDA check's.
    # --n limits the check to the first images of a larger suite run.
    rand = ["--autoattack-only", "--autoattack-threat", "bpda_eot", "--autoattack-eot", "2", "--n", "5"]
    assert main_evaluate(argv + rand) == 0
    assert "EoT 2" in capsys.readouterr().out
    checked_rand = json.loads((out / "autoattack.bpda_eot-eot2.json").read_text())
    assert [(c["threat"], c["eot"], c["n"]) for c in checked_rand] == [("bpda_eot", 2, 5)] * 2
    assert json.loads((out / "autoattack.json").read_text()) == checked
    with pytest.raises(SystemExit) as e:
        main_evaluate(argv + ["--autoattack-only", "--autoattack-threat", "gpgd"])
    assert e.value.code == 2 and "--autoattack-threat" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main_evaluate(argv[:-2] + ["--eps", "0.1,0.2", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "--eps" in capsys.readouterr().err


@pytest.mark.parametrize("threat", ["exact_st", "exact_st_proj"])
def test_straight_through_threats_run(setup, threat):
    clf, data, defences, _ = setup
    from pursamere_fast.attacks import run_attack

    x, y = data[0][:4], data[1][:4]
    for d in defences:
        x_adv, pred = run_attack(d, AttackSpec(threat, eps=EPS, steps=1, alpha=EPS), clf, x, y)
        assert (x_adv - x).abs().max() <= EPS + 1e-6 and pred.shape == (4,)


def test_autoattack_check_compares_with_the_suite(setup, tmp_path):
    clf, data, defences, members = setup
    from pursamere_fast.attacks.suite import autoattack_check, autoattack_markdown

    out = str(tmp_path / "aa")
    run_suite(clf, data, defences[:1], members[:1], out_dir=out, batch_size=8, progress=False)
    state = torch.random.get_rng_state()
    r = autoattack_check(clf, data, defences[0], suite_dir=out, norm="linf", eps=EPS, steps=5, batch_size=8,
                         progress=False)
    assert torch.equal(state, torch.random.get_rng_state()), "the caller's RNG must be left alone"
    rows = _rows(tmp_path / "aa")
    suite_robust = sum(rows[("pursamere", "clean", i)]["clean_correct"]
                       and not rows[("pursamere", members[0].label, i)]["broken"] for i in range(24))
    assert r["n"] == 24 and r["suite_robust"] == suite_robust
    assert r["autoattack_robust"] < sum(rows[("pursamere", "clean", i)]["clean_correct"] for i in range(24))
    # Images robust to both = suite-robust minus those only AutoAttack broke = the reverse.
    assert r["suite_robust"] - len(r["autoattack_only"]) == r["autoattack_robust"] - len(r["suite_only"])
    again = autoattack_check(clf, data, defences[0], suite_dir=out, norm="linf", eps=EPS, steps=5, batch_size=8,
                             progress=False)
    assert again == r
    assert "only AutoAttack broke" in autoattack_markdown([r])


def test_summary_of_a_stopped_run_from_its_shards(setup, tmp_path, capsys):
    clf, data, defences, members = setup
    from pursamere_fast.attacks.suite import summarise_dir, summarise_rows
    from pursamere_fast.commands.suite_summary import main

    out = tmp_path / "s"
    full = run_suite(clf, data, defences, members[:2], out_dir=str(out), batch_size=8, progress=False)
    # A run killed before rank 0 merged leaves only its shard: move the merged rows there.
    (out / "rows.jsonl").rename(out / "rows.rank0.jsonl")
    assert summarise_dir(str(out)) == full
    # The same summary from the rows and settings alone (the results scripts' gzipped copies).
    rows = read_rows(str(out / "rows.rank0.jsonl"))
    settings = json.loads((out / "manifest.json").read_text())["settings"]
    assert summarise_rows(rows, settings) == full
    with pytest.raises(ValueError, match="settings"):
        summarise_rows(rows, {k: {**v, "run": {}} for k, v in settings.items()})
    assert main([str(out)]) == 0 and "worst-case robust acc" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "missing")])
    assert e.value.code == 2 and "out_dir" in capsys.readouterr().err


def test_robust_per_image_and_paired_robust():
    def row(defence, attack, index, broken=False, clean_correct=True):
        return {"defence": defence, "attack": attack, "index": index, "broken": broken, "clean_correct": clean_correct}

    rows = [row("a", CLEAN, 0), row("a", "m1", 0), row("a", "m2", 0, broken=True),
            row("a", CLEAN, 1), row("a", "m1", 1), row("a", "m2", 1),
            row("a", CLEAN, 2, clean_correct=False), row("a", "m1", 2), row("a", "m2", 2),
            row("a", CLEAN, 3), row("a", "m1", 3),  # m2 unfinished: not judged
            row("b", CLEAN, 0), row("b", "m1", 0), row("b", CLEAN, 1), row("b", "m1", 1, broken=True)]
    assert robust_per_image(rows, "a") == {0: False, 1: True, 2: False}
    assert robust_per_image(rows, "a", [CLEAN, "m1"]) == {0: True, 1: True, 2: False, 3: True}
    b = robust_per_image(rows, "b")
    assert b == {0: True, 1: False}
    r = paired_robust(robust_per_image(rows, "a"), b)
    assert r == {"n": 2, "a": 1, "b": 1, "a_only": 1, "b_only": 1, "p": 1.0}
