"""The evaluation runner: rows, summaries, plots, resume after SIGKILL, CLI + TOML, sanity suite."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pursamere_fast import PurifyConfig
from pursamere_fast.attacks import AttackSpec, Defence, evaluate, grid, read_rows, run_sanity, toy, wilson_interval
from pursamere_fast.attacks.loading import load_object
from pursamere_fast.commands.evaluate import main_evaluate
from pursamere_fast.commands.sanity import main_sanity
from pursamere_fast.purify import CPU_CHUNK_PIXELS

CONFIG = """\
classifier = "pursamere_fast.attacks.toy:make_classifier"
score = "pursamere_fast.attacks.toy:make_score"
data = "pursamere_fast.attacks.toy:synthetic_data"
defences = "none,pursamere"
threats = "gpgd,bpda"
eps = "8/255"
steps = "{steps}"
batch_size = 4
no_progress = true
no_plots = true

[data_kwargs]
n = {n}
seed = 1

[pursamere]
sigmas = [0.3, 0.1]
steps_per_sigma = 1
n_samples = 2
rho = 0.06
sam_radius = 0.02
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy classifier trained once for the module, and its state-dict file for the CLI."""
    clf = toy.make_classifier(train_steps=60)
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    torch.save(clf.state_dict(), path)
    return clf, path


def _small_defence():
    cfg = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=1, n_samples=2, rho=0.06, sam_radius=0.02)
    return Defence.pursamere(toy.make_score(), cfg)


def _rows(path):
    return {(r["defence"], r["attack"], r["index"]): r for r in read_rows(path)}


def test_evaluate_writes_rows_summary_table_and_plots(tmp_path, trained):
    clf = trained[0]
    data = toy.synthetic_data(20, seed=1)
    attacks = [AttackSpec("clean"), AttackSpec("bpda", "linf", 0.05, 2), AttackSpec("bpda", "linf", 0.2, 2),
               AttackSpec("bpda", "linf", 0.05, 4)]
    settings = grid([Defence.none(), _small_defence()], attacks)
    summary = evaluate(clf, data, settings, out_dir=str(tmp_path), batch_size=8, progress=False)
    rows = read_rows(str(tmp_path / "rows.jsonl"))
    assert len(rows) == 20 * len(settings)
    assert not list(tmp_path.glob("rows.rank*.jsonl"))
    for r in rows:
        assert r["robust_correct"] == (r["clean_pred"] == r["label"] == r["adv_pred"])
        assert r["perturbation"] <= r["eps"] + 1e-6
    for e in summary:
        mine = [r for r in rows if (r["defence"], r["attack"]) == (e["defence"], e["attack"])]
        k = sum(r["robust_correct"] for r in mine)
        assert e["n"] == len(mine) == 20
        assert e["robust_acc"] == k / 20 and e["robust_ci"] == list(wilson_interval(k, 20))
        assert e["robust_acc"] <= e["clean_acc"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["settings"] == summary and on_disk["run"]["rows_written"] == len(rows)
    table = (tmp_path / "summary.md").read_text()
    assert table.count("\n") == 2 + len(settings) and "bpda-linf-eps0.2-s2" in table
    for name in ("acc_vs_eps.png", "acc_vs_steps.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by = {(e["defence"], e["attack"]): e for e in summary}
    assert by[("none", "clean")]["robust_acc"] == by[("none", "clean")]["clean_acc"]


def test_resume_skips_finished_rows_and_repairs_a_truncated_line(tmp_path):
    clf = toy.make_classifier()
    data = toy.synthetic_data(16, seed=2)
    settings = grid([_small_defence()], [AttackSpec("bpda", "linf", 0.05, 2)])
    full = tmp_path / "full"
    evaluate(clf, data, settings, out_dir=str(full), batch_size=4, progress=False, plots=False)
    part = tmp_path / "part"
    part.mkdir()
    lines = (full / "rows.jsonl").read_text().splitlines(keepends=True)
    # Six finished rows and half of a seventh, as a kill in the middle of a write leaves them.
    (part / "rows.rank0.jsonl").write_text("".join(lines[:6]) + lines[6][:20])
    evaluate(clf, data, settings, out_dir=str(part), batch_size=4, progress=False, plots=False)
    run = json.loads((part / "summary.json").read_text())["run"]
    assert run == {"rows_written": 10, "rows_skipped": 6, "rows_written_per_rank": [10], "world_size": 1,
                   "batch_size": 4}
    assert (part / "rows.jsonl").read_text() == (full / "rows.jsonl").read_text()
    evaluate(clf, data, settings, out_dir=str(part), batch_size=4, progress=False, plots=False)
    assert json.loads((part / "summary.json").read_text())["run"]["rows_written"] == 0


def test_resume_refuses_a_changed_setting(tmp_path):
    clf = toy.make_classifier()
    data = toy.synthetic_data(4, seed=2)
    evaluate(clf, data, [(Defence.none(), AttackSpec("bpda", "linf", 0.05, 1, name="a"))], out_dir=str(tmp_path),
             progress=False, plots=False)
    with pytest.raises(ValueError, match="different setting"):
        evaluate(clf, data, [(Defence.none(), AttackSpec("bpda", "linf", 0.1, 1, name="a"))], out_dir=str(tmp_path),
                 progress=False, plots=False)


def test_manifest_records_how_it_ran_and_refuses_another_batch_size(tmp_path):
    clf = toy.make_classifier()
    data = toy.synthetic_data(4, seed=2)
    settings = [(_small_defence(), AttackSpec("clean"))]
    evaluate(clf, data, settings, out_dir=str(tmp_path), batch_size=2, progress=False, plots=False)
    run = json.loads((tmp_path / "manifest.json").read_text())["settings"]["pursamere | clean"]["run"]
    assert run == {"device": "cpu", "batch_size": 2, "channels_last": True, "chunk_rows": CPU_CHUNK_PIXELS // (8 * 8),
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "score_dtype": "torch.float32"}
    # Batches seed the attacks' random starts, so another batch size is another result.
    with pytest.raises(ValueError, match="different setting"):
        evaluate(clf, data, settings, out_dir=str(tmp_path), batch_size=4, progress=False, plots=False)


def test_evaluate_rejects_bad_arguments(tmp_path):
    clf = toy.make_classifier()
    data = toy.synthetic_data(4)
    s = [(Defence.none(), AttackSpec("clean"))]
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(clf, data, s, out_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="indices"):
        evaluate(clf, data, s, out_dir=str(tmp_path), indices=[0, 9])
    with pytest.raises(ValueError, match="unique"):
        evaluate(clf, data, s + s, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match="settings"):
        evaluate(clf, data, [], out_dir=str(tmp_path))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(n=64, steps=4))
    total = 64 * 4
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pursamere_fast.cli", "evaluate", "--config", str(cfg),
                             "--out", str(killed)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    shard = killed / "rows.rank0.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    proc.stderr.close()
    before = len(read_rows(str(shard)))
    assert 12 <= before < total and not (killed / "rows.jsonl").exists()

    assert main_evaluate(["--config", str(cfg), "--out", str(killed)]) == 0
    fresh = tmp_path / "fresh"
    assert main_evaluate(["--config", str(cfg), "--out", str(fresh)]) == 0
    run = json.loads((killed / "summary.json").read_text())["run"]
    assert run["rows_skipped"] == before and run["rows_written"] == total - before
    assert (killed / "rows.jsonl").read_text() == (fresh / "rows.jsonl").read_text()
    assert len(_rows(str(killed / "rows.jsonl"))) == total


def test_cli_flags_override_toml_and_config_keys_are_checked(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.format(n=8, steps=1))
    out = tmp_path / "out"
    assert main_evaluate(["--config", str(cfg), "--out", str(out), "--threats", "clean", "--defences", "none",
                          "--eps", "0.1,0.2"]) == 0
    rows = read_rows(str(out / "rows.jsonl"))
    assert {r["attack"] for r in rows} == {"clean"} and len(rows) == 8
    listed = tmp_path / "listed.toml"
    listed.write_text(CONFIG.format(n=8, steps=1) + '\n[[attack]]\nthreat = "bpda"\nnorm = "l2"\neps = 0.5\n'
                      'steps = 2\nname = "my-l2"\n\n[[attack]]\nthreat = "clean"\n')
    assert main_evaluate(["--config", str(listed), "--out", str(tmp_path / "listed"), "--defences", "none"]) == 0
    rows = read_rows(str(tmp_path / "listed" / "rows.jsonl"))
    assert sorted({(r["attack"], r["norm"], r["eps"], r["steps"]) for r in rows}) == [
        ("clean", "linf", 0.0, 0), ("my-l2", "l2", 0.5, 2)]
    assert load_object("pursamere_fast:PurifyConfig.rho", {"rho": 0.25}) == 0.25
    with pytest.raises(ValueError, match="cannot load"):
        load_object("pursamere_fast:PurifyConfig.nope")
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.format(n=8, steps=1) + "\n[oops]\nx = 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main_evaluate(["--config", str(bad), "--out", str(out)])
    assert exit_info.value.code == 2
    assert f"argument --config: unknown key 'oops' in {bad}" in capsys.readouterr().err


def test_sanity_suite_passes_on_a_trained_toy_model(tmp_path, trained):
    clf = trained[0]
    data = toy.synthetic_data(24, seed=1)
    score = toy.make_score()
    cfg = PurifyConfig(sigmas=(0.3, 0.1), steps_per_sigma=1, n_samples=2, rho=0.06, sam_radius=0.02)
    report = run_sanity(clf, data, Defence.pursamere(score, cfg),
                        rho_zero=Defence.pursamere(score, cfg, rho=0.0, name="pursamere-rho0"),
                        out_dir=str(tmp_path), eps_list=(0.0, 0.05, 0.5), steps_list=(1, 3), eps_steps=0.05,
                        grad_n=4, batch_size=12, progress=False, zero_tol=0.05, tol=0.05)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["eps sweep falls to ~0"]["passed"], checks["eps sweep falls to ~0"]["detail"]
    assert checks["eps sweep falls to ~0"]["robust_acc"][0] > 0.5
    assert checks["more steps never help"]["passed"], checks["more steps never help"]["detail"]
    rho0 = checks["rho = 0 reproduces undefended"]
    assert rho0["passed"] and rho0["agree"] == rho0["n"] == 24
    cos = checks["BPDA vs exact gradient"]["cosine"]
    assert len(cos) == 4 and all(-1 - 1e-9 <= c <= 1 + 1e-9 for c in cos)
    assert (tmp_path / "sanity.md").read_text().startswith("| check | result | detail |")


class _ZeroGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.zeros_like(g)


class _MaskedIdentity(torch.nn.Module):
    def forward(self, x):
        return _ZeroGrad.apply(x)


def test_sanity_flags_a_defence_that_masks_gradients(tmp_path, trained):
    # The identity with a zero backward: only the random start moves the attack, so the
    # robust accuracy stays high at a budget where BPDA (identity backward) breaks it.
    clf = trained[0]
    data = toy.synthetic_data(16, seed=1)
    masked = Defence("masked", lambda grad_mode, seed: _MaskedIdentity())
    kw = dict(eps_list=(0.0, 0.2), steps_list=(8,), grad_n=0, progress=False)  # 8 steps of eps / 4
    report = run_sanity(clf, data, masked, threat="exact", out_dir=str(tmp_path / "exact"), **kw)
    assert report["checks"][0]["passed"] is False, report["checks"][0]["detail"]
    honest = run_sanity(clf, data, Defence.none(name="plain"), threat="bpda", out_dir=str(tmp_path / "bpda"), **kw)
    assert honest["checks"][0]["passed"] is True, honest["checks"][0]["detail"]


def test_main_sanity_exit_code(tmp_path, trained):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'defence = "none"\nn = 12\n[classifier_kwargs]\ncheckpoint = "{trained[1]}"\n')
    rc = main_sanity(["--config", str(cfg), "--out", str(tmp_path / "ok"), "--eps-list", "0,0.3",
                      "--steps-list", "6", "--grad-n", "0", "--no-progress"])  # 6 steps of eps / 4
    assert rc == 0
    report = json.loads((tmp_path / "ok" / "sanity.json").read_text())
    assert [c["passed"] for c in report["checks"]] == [True, True, None]
    # A budget too small to break the model fails the "falls to ~0" check: exit code 1.
    rc = main_sanity(["--config", str(cfg), "--out", str(tmp_path / "fail"), "--eps-list", "0,0.01",
                      "--steps-list", "6", "--grad-n", "0", "--no-progress"])
    assert rc == 1


def test_mcnemar_exact_matches_the_binomial_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    from pursamere_fast.attacks.stats import mcnemar_exact
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    for b, c in [(0, 5), (4, 1), (12, 30), (100, 70), (7, 0)]:
        expected = scipy_stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="b must"):
            mcnemar_exact(bad, 2)


def test_key_value_overrides_parse_json_fractions_and_strings():
    from pursamere_fast.attacks.loading import key_values
    assert key_values(["sam_radius=8/255", "n_samples=2", "norm=l2", "betas=[0.8, 0.9]"]) == {
        "sam_radius": 8 / 255, "n_samples": 2, "norm": "l2", "betas": [0.8, 0.9]}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        key_values(["sam_radius"])


def test_defence_array_names_variants_and_refuses_bad_entries(tmp_path, capsys):
    base = CONFIG.format(n=4, steps=1).replace('defences = "none,pursamere"\n', "")
    cfg = tmp_path / "variants.toml"
    cfg.write_text(base + '\n[[defence]]\nname = "bare"\nkind = "none"\n\n[[defence]]\nname = "rho0"\n'
                   'kind = "pursamere"\nrho = 0.0\n\n[[defence]]\nname = "adp1"\nkind = "adp"\nsteps = 1\n')
    out = tmp_path / "out"
    assert main_evaluate(["--config", str(cfg), "--out", str(out), "--threats", "clean"]) == 0
    rows = read_rows(str(out / "rows.jsonl"))
    assert sorted({r["defence"] for r in rows}) == ["adp1", "bare", "rho0"]
    manifest = json.loads((out / "manifest.json").read_text())
    described = {k.split(" | ")[0]: v["defence"] for k, v in manifest["settings"].items()}
    # The entry's settings override the [pursamere] table; the table's other fields stay.
    assert described["rho0"]["rho"] == 0.0 and described["rho0"]["sam_radius"] == 0.02
    assert described["adp1"]["steps"] == 1
    for entries, message in [
        ('\n[[defence]]\nname = "a"\nkind = "diffusion"\n', "kind must be one of"),
        ('\n[[defence]]\nname = "a"\nkind = "none"\n\n[[defence]]\nname = "a"\nkind = "none"\n', "used twice"),
        ('\n[[defence]]\nkind = "none"\n', "non-empty string 'name'"),
        ('\n[[defence]]\nname = "a"\nkind = "none"\nrho = 1\n', "takes no settings"),
        ('\n[[defence]]\nname = "a"\nkind = "adp"\nfoo = 1\n', "takes no argument 'foo'"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(base + entries)
        with pytest.raises(SystemExit) as e:
            main_evaluate(["--config", str(bad), "--out", str(tmp_path / "bad"), "--threats", "clean"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--config" in err and message in err, err
    with pytest.raises(SystemExit):
        main_evaluate(["--config", str(cfg), "--out", str(tmp_path / "both"), "--defences", "none"])
    assert "--defences" in capsys.readouterr().err


def test_hetero_defence_votes_under_every_threat(tmp_path):
    """The heterogeneous purifier through the harness: a vote over 3 runs, judged by the vote."""
    from pursamere_fast.attacks import run_attack
    from pursamere_fast.purifiers import HeteroPurifier

    clf, score = toy.make_classifier(train_steps=30), toy.make_score()
    x, y = toy.synthetic_data(4, seed=1)
    small = dict(t_l=40, t_s=20, resample_steps=1, grid_steps=50)
    defence = Defence.hetero(score, clf, runs=3, seed=5, **small)
    assert defence.description == {"kind": "hetero", "seed": 5, "runs": 3, **small}
    with torch.no_grad():
        votes = sum(torch.nn.functional.one_hot(clf(HeteroPurifier(score, clf, seed=s, **small)(x)).argmax(1), 4)
                    for s in (5, 6, 7))
        # The value is votes + p_bar / 2 with p_bar < 1 (test_attacks checks the tie-break).
        assert torch.equal(defence.model(clf)(x).floor(), votes.float())
    for threat in ("bpda", "exact", "bpda_eot"):
        attack = AttackSpec(threat, "linf", 0.1, 2, eot=2 if threat == "bpda_eot" else 1)
        x_adv, pred = run_attack(defence, attack, clf, x, y)
        assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= 0.1 + 1e-6
        assert pred.shape == y.shape
    summary = evaluate(clf, (x, y), grid([defence], [AttackSpec("clean"), AttackSpec("bpda", "linf", 0.1, 1)]),
                       out_dir=str(tmp_path / "run"), batch_size=2, progress=False, plots=False)
    assert {e["attack"] for e in summary} == {"clean", "bpda-linf-eps0.1-s1"}
