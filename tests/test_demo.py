"""The demo and the CLI run end to end at a tiny size and write what they promise."""

import pytest

from pursamere_fast import cli
from pursamere_fast.commands import demo as demo_command

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_prints_table_and_writes_pngs(tmp_path, capsys):
    assert demo_command.main(["--n", "4", "--pgd-steps", "1", "--bpda-steps", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("clean, undefended", "gray-box PGD-1, purified", "BPDA-det PGD-1, purified", "ms per image"):
        assert row in out
    for name in ("demo_grid.png", "demo_ere.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_demo_rejects_bad_n_on_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_command.main(["--n", "0", "--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("pursamere-fast demo: error: argument --n: value must be an integer "
                                       ">= 1 and <= 1000, got 0\n")


def test_cli_example_and_usage(capsys):
    assert cli.main(["example", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "purified 2 images" in out and "k=  0" in out
    assert cli.main(["nonsense"]) == 2
