"""`pursamere-fast summarise`: the committed summaries come back from the committed rows and manifests."""

import json
import shutil
from pathlib import Path

import pytest

from pursamere_fast import cli
from pursamere_fast.attacks.rows import read_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("run", ["results/fmnist/suite", "results/fmnist_protocol/test/clean/main"])
def test_summarise_rebuilds_the_committed_summary(run, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(ROOT / run, copy)
    (copy / "summary.md").unlink()
    assert cli.main(["summarise", str(copy)]) == 0
    want = (ROOT / run / "summary.md").read_text()
    assert (copy / "summary.md").read_text() == want
    assert capsys.readouterr().out == want
    assert json.loads((copy / "summary.json").read_text()) == json.loads((ROOT / run / "summary.json").read_text())


def test_summarise_from_copies_a_run_first(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "results/fmnist_protocol/test/clean/main", src)
    dest = tmp_path / "dest"
    assert cli.main(["summarise", str(dest), "--from", str(src)]) == 0
    assert (dest / "rows.jsonl.gz").is_file() and read_run(dest) == read_run(src)
    assert (dest / "summary.md").read_text() == (src / "summary.md").read_text()


def test_summarise_refuses_a_directory_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["summarise", str(tmp_path)])
    assert capsys.readouterr().err.startswith("pursamere-fast summarise: error: argument RUN: ")
