"""The runner under torchrun (2 CPU processes, gloo) gives the same rows as 1 process."""

import json
import os
import subprocess
import sys

from pursamere_fast.attacks import read_rows

CONFIG = """\
classifier = "pursamere_fast.attacks.toy:make_classifier"
score = "pursamere_fast.attacks.toy:make_score"
data = "pursamere_fast.attacks.toy:synthetic_data"
defences = "none,pursamere"
threats = "bpda,bpda_eot"
eot = 2
eps = "8/255"
steps = "2"
batch_size = 4
no_progress = true

[data_kwargs]
n = 22
seed = 1

[pursamere]
sigmas = [0.3, 0.1]
steps_per_sigma = 1
n_samples = 2
rho = 0.06
sam_radius = 0.02
"""


def _run(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_gloo_ranks_match_one_process(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    one, two = tmp_path / "one", tmp_path / "two"
    cli = ["-m", "pursamere_fast.cli", "evaluate", "--config", str(cfg)]
    _run([sys.executable, *cli, "--out", str(one)], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *cli,
          "--out", str(two)], tmp_path)
    rows_one = read_rows(str(one / "rows.jsonl"))
    # 22 samples in batches of 4: 6 batches, the last one short; 2 defences x 2 threats.
    assert len(rows_one) == 22 * 4
    assert (two / "rows.jsonl").read_text() == (one / "rows.jsonl").read_text()
    assert not list(two.glob("rows.rank*.jsonl"))
    run_two = json.loads((two / "summary.json").read_text())["run"]
    # Batches 0, 2, 4 (12 samples) on rank 0 and 1, 3, 5 (10 samples) on rank 1, 4 settings each.
    assert run_two["world_size"] == 2 and run_two["rows_written_per_rank"] == [48, 40]
    assert json.loads((two / "summary.json").read_text())["settings"] == \
        json.loads((one / "summary.json").read_text())["settings"]
    assert (two / "acc_vs_eps.png").exists()
