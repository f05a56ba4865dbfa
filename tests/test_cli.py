"""Hostile command lines: one-line error naming the option, exit code 2, never a traceback."""

import argparse
import sys

import pytest
from test_data import write_fashion

from pursamere_fast import cli
from pursamere_fast.attacks.loading import load_toml
from pursamere_fast.commands import options
from pursamere_fast.commands import sweep as sweep_command

pytestmark = pytest.mark.usefixtures("one_thread")

SWEEP_BASE = """\
classifier = "pursamere_fast.attacks.toy:make_classifier"
score = "pursamere_fast.attacks.toy:make_score"
data = "pursamere_fast.attacks.toy:synthetic_data"
out = "{tmp}/sweep_out"
select = {{ clean = "clean", robust = "bpda-linf-eps0.0313725-s1", tiebreak = "gpgd-linf-eps0.0313725-s1" }}

[data_kwargs]
n = 8

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

FILES = {
    "zero_batch.toml": "batch_size = 0\n",
    "malformed.toml": "x = [\n",
    "junk.safetensors": "not a safetensors file\n",
    "unknown_key.toml": "oops = 1\n",
    "kwargs_typo.toml": "[classifier_kwargs]\ntrainsteps = 3\n",
    "flag_not_bool.toml": "no_progress = 1\n",
    "attack_typo.toml": '[[attack]]\nthreat = "bpda"\nepsilon = 0.1\n',
    "attack_eps.toml": '[[attack]]\nthreat = "bpda"\neps = "8/0"\n',
    "table_not_table.toml": "pursamere = 3\n",
    "sweep_bad_rho.toml": SWEEP_BASE + '\n[grid]\nrho = ["0", "abc"]\n',
    "sweep_n_too_big.toml": "n = 100\n" + SWEEP_BASE + '\n[grid]\nrho = ["0"]\n',
    "sweep_unknown.toml": "nn = 1\n" + SWEEP_BASE + '\n[grid]\nrho = ["0"]\n',
    "sweep_select.toml": SWEEP_BASE.replace('s1" }}', 's9" }}') + '\n[grid]\nrho = ["0"]\n',
    "sweep_adp_typo.toml": SWEEP_BASE + '\n[[point]]\ndefence = "adp"\nfoo = 1\n',
    "not_safetensors.bin": "garbage\n",
}

# (command line, the option its error must name). "{tmp}" is the test's tmp_path.
CASES = [
    (["evaluate", "--eps", "abc"], "--eps"),
    (["evaluate", "--eps", "8/0"], "--eps"),
    (["evaluate", "--eps", "0"], "--eps"),
    (["evaluate", "--steps", "1.5"], "--steps"),
    (["evaluate", "--steps", "0"], "--steps"),
    (["evaluate", "--mean", "a,b"], "--mean"),
    (["evaluate", "--std", "0.5,0"], "--std"),
    (["evaluate", "--mean", "0.5,0.5"], "--mean"),  # two entries for one-channel images
    (["evaluate", "--classifier", "nosuch.mod:f"], "--classifier"),
    (["evaluate", "--score", "pursamere_fast.nets:nosuch"], "--score"),
    (["evaluate", "--data", "no_colon"], "--data"),
    (["evaluate", "--purify-config", "pursamere_fast.config:math"], "--purify-config"),
    (["evaluate", "--n", "-3"], "--n"),
    (["evaluate", "--n", "100000"], "--n"),
    (["evaluate", "--start", "512"], "--start"),
    (["evaluate", "--restarts", "0"], "--restarts"),
    (["evaluate", "--eot", "-1"], "--eot"),
    (["evaluate", "--batch-size", "0"], "--batch-size"),
    (["evaluate", "--seed", "-1"], "--seed"),
    (["evaluate", "--alpha", "0"], "--alpha"),
    (["evaluate", "--device", "gpu7"], "--device"),
    (["evaluate", "--device", "cuda:64"], "--device"),
    (["evaluate", "--backend", "cuda"], "--backend"),
    (["evaluate", "--defences", "none,nonsense"], "--defences"),
    (["evaluate", "--threats", "gpgd,nope"], "--threats"),
    (["evaluate", "--pursamere", "rho=abc"], "--pursamere"),
    (["evaluate", "--pursamere", "rho"], "--pursamere"),
    (["evaluate", "--pursamere", "nosuch=1"], "--pursamere"),
    (["evaluate", "--defences", "adp", "--adp", "foo=1"], "--adp"),
    (["evaluate", "--defences", "adp", "--adp", "sigma=-1"], "--adp"),
    (["evaluate", "--defences", "hetero", "--hetero", "foo=1"], "--hetero"),
    (["evaluate", "--defences", "hetero", "--hetero", "runs=0"], "--hetero"),
    (["evaluate", "--classifier", "{tmp}/missing.safetensors"], "--classifier"),
    (["evaluate", "--classifier", "{tmp}/junk.safetensors"], "--classifier"),
    (["evaluate", "--config", "{tmp}/missing.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/malformed.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/zero_batch.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/unknown_key.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/kwargs_typo.toml"], "--classifier"),
    (["evaluate", "--config", "{tmp}/flag_not_bool.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/attack_typo.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/attack_eps.toml"], "--config"),
    (["evaluate", "--config", "{tmp}/table_not_table.toml"], "--config"),
    (["sanity", "--eps-list", "0,abc"], "--eps-list"),
    (["sanity", "--eps-steps", "0"], "--eps-steps"),
    (["sanity", "--tol", "2"], "--tol"),
    (["sanity", "--grad-n", "-1"], "--grad-n"),
    (["example", "--n", "-3"], "--n"),
    (["example", "--n", "1001"], "--n"),
    (["example", "--device", "gpu7"], "--device"),
    (["demo", "--n", "0"], "--n"),
    (["demo", "--eps=-8/255"], "--eps"),  # with "=": argparse takes a bare -8/255 for an option
    (["demo", "--bpda-steps", "0"], "--bpda-steps"),
    (["demo", "--out-dir", "{tmp}/malformed.toml"], "--out-dir"),
    (["train-score", "--out", "{tmp}/o", "--steps", "1.5"], "--steps"),
    (["train-score", "--out", "{tmp}/o", "--ema", "1"], "--ema"),
    (["train-score", "--out", "{tmp}/o", "--lr", "0"], "--lr"),
    (["train-score", "--out", "{tmp}/o", "--depth", "3"], "--dilations"),
    (["train-score", "--out", "{tmp}/o", "--dilations", "1,x"], "--dilations"),
    (["train-score", "--out", "{tmp}/o", "--data-root", "{tmp}/nowhere"], "--data-root"),
    (["train-classifier", "--out", "{tmp}/o", "--batch-size", "-1"], "--batch-size"),
    (["train-classifier", "--out", "{tmp}/o", "--epochs", "0"], "--epochs"),
    (["train-classifier", "--out", "{tmp}/o", "--threads", "0"], "--threads"),
    (["train-classifier", "--out", "{tmp}/o", "--dataset", "cifar10"], "--data-root"),
    (["train-classifier", "--out", "{tmp}/o", "--purify-score", "{tmp}/missing"], "--purify-score"),
    # With tiny IDX files as --data-root: the score file is read after the data, and the suite must not
    # depend on Debian's dataset-fashion-mnist being installed.
    (["train-classifier", "--out", "{tmp}/o", "--data-root", "{tmp}/fashion", "--purify-score",
      "{tmp}/not_safetensors.bin"], "--purify-score"),
    (["train-classifier", "--out", "{tmp}/o", "--purify-config", '{{"rho": 1}}'], "--purify-config"),
]

SWEEP_CASES = [
    (["run", "--config", "{tmp}/missing.toml"], "--config"),
    (["run", "--config", "{tmp}/malformed.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_bad_rho.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_n_too_big.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_unknown.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_select.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_adp_typo.toml"], "--config"),
    (["run", "--config", "{tmp}/sweep_bad_rho.toml", "--n", "0"], "--n"),
    (["collect", "--out", "{tmp}/summary", "{tmp}/nowhere"], "runs"),
]


@pytest.fixture
def files(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text.format(tmp=tmp_path) if name.startswith("sweep") else text)
    write_fashion(tmp_path / "fashion", "train", n=6, seed=1)
    write_fashion(tmp_path / "fashion", "test", n=4, seed=2)
    return tmp_path


def _assert_one_line_error(run, argv, prog, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"{prog}: error: argument {option}: "), lines[0]
    assert "Traceback" not in out + err


@pytest.mark.parametrize("argv, option", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_hostile_command_line(files, argv, option, capsys):
    argv = [a.format(tmp=files) for a in argv]
    _assert_one_line_error(cli.main, argv, f"pursamere-fast {argv[0]}", option, capsys)
    assert not (files / "o").exists()  # nothing started


@pytest.mark.parametrize("argv, option", SWEEP_CASES, ids=[" ".join(a) for a, _ in SWEEP_CASES])
def test_hostile_sweep_command_line(files, argv, option, capsys):
    argv = [a.format(tmp=files) for a in argv]
    _assert_one_line_error(sweep_command.main, argv, f"pursamere-fast sweep {argv[0]}", option, capsys)
    assert not (files / "sweep_out").exists()


def test_messages_say_what_is_wrong(files, capsys):
    for argv, expected in [
        (["evaluate", "--eps", "8/0"], "value must be a finite number > 0, got '8/0'"),
        (["evaluate", "--pursamere", "rho=abc"], "rho must be a finite number >= 0, got 'abc'"),
        (["evaluate", "--config", str(files / "unknown_key.toml")], "unknown key 'oops'"),
        (["evaluate", "--config", str(files / "zero_batch.toml")], "key 'batch_size' of"),
        (["evaluate", "--config", str(files / "kwargs_typo.toml")], "takes no argument 'trainsteps'"),
        (["evaluate", "--classifier", "nosuch.mod:f"], "No module named 'nosuch'"),
        (["example", "--n", "-3"], "value must be an integer >= 1 and <= 1000, got -3"),
    ]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert expected in capsys.readouterr().err


def test_unknown_command_is_refused_on_one_line(capsys):
    assert cli.main(["nonsense"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_types_accept_good_values_from_the_command_line_and_toml():
    assert options.real(positive=True)("8/255") == 8 / 255
    assert options.real(0, 1)(1) == 1.0
    assert options.integer(1)(" 3 ") == 3 and options.integer(1)(3) == 3
    assert options.listed(options.real(0))("0,4/255, 0.5") == [0.0, 4 / 255, 0.5]
    assert options.listed(options.integer(1))([5, 10]) == [5, 10]
    assert options.device("cpu") == "cpu"
    for bad_type, bad_value in [(options.integer(1), 2.0), (options.integer(1), True), (options.real(), "inf"),
                                (options.listed(options.integer(1)), ""), (options.device, "cuda:-1")]:
        with pytest.raises(argparse.ArgumentTypeError, match="value must"):
            bad_type(bad_value)


def test_option_errors_let_genuine_bugs_through():
    parser = options.ArgumentParser(prog="x")
    with pytest.raises(KeyError):
        with options.option_errors(parser, "--x"):
            {}["bug"]


def test_load_toml_falls_back_to_tomli(tmp_path, monkeypatch):
    pytest.importorskip("tomli", reason="tomli (the TOML reader of Python 3.10) is not installed")
    path = tmp_path / "a.toml"
    path.write_text('eps = "8/255"\n[pursamere]\nrho = 0.1\n')
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10: `import tomllib` fails
    with pytest.raises(ImportError):
        import tomllib  # noqa: F401
    assert load_toml(path) == {"eps": "8/255", "pursamere": {"rho": 0.1}}


def test_load_toml_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*missing.toml"):
        load_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_bytes(b"\xff = 1\n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        load_toml(tmp_path / "bad.toml")

