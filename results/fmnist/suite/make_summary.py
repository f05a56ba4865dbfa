"""Summarise the suite run in this directory (rows.jsonl.gz, autoattack.*.jsonl.gz) into summary.md.

    python results/fmnist/suite/make_summary.py [runs/fmnist/final/suite]

With a run directory, its rows (rank shards included), manifest and AutoAttack rows are
first copied here (gzipped).

The run was stopped at its time budget: the worst case counts the images every member of
both defences finished (`pursamere-fast suite-summary`), and the AutoAttack comparison the
clean-correct images AutoAttack finished as well (paired, the same images).
"""

import gzip
import json
import os
import shutil
import sys

from pursamere_fast.attacks.runner import _all_rows, read_rows
from pursamere_fast.attacks.suite import CLEAN, summarise_rows, suite_markdown

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(run_dir):
    shutil.copy(os.path.join(run_dir, "manifest.json"), HERE)
    with gzip.open(os.path.join(HERE, "rows.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in _all_rows(run_dir))
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("autoattack.") and name.endswith(".jsonl"):
            with gzip.open(os.path.join(HERE, name + ".gz"), "wt") as f:
                f.writelines(json.dumps(r) + "\n" for r in read_rows(os.path.join(run_dir, name)))


def main():
    if len(sys.argv) > 1:
        collect(sys.argv[1])
    rows = _read(os.path.join(HERE, "rows.jsonl.gz"))
    with open(os.path.join(HERE, "manifest.json")) as f:
        summary = summarise_rows(rows, json.load(f)["settings"])
    lines = [suite_markdown(summary), "",
             "| AutoAttack check (BPDA, APGD-CE + APGD-DLR x 100, pyautoattack) | n (clean-correct, both finished) "
             "| suite robust | AutoAttack robust | only AutoAttack broke | only the suite broke |",
             "|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["defence"], r["index"]), {})[r["attack"]] = r
    names = {r["attack"] for r in rows}
    for d in summary["defences"]:
        path = os.path.join(HERE, f"autoattack.{d['defence']}.jsonl.gz")
        if not os.path.exists(path):
            continue
        aa = {r["index"]: r["broken"] for r in _read(path)}
        common = [i for i in sorted(aa) if set(by.get((d["defence"], i), {})) == names]
        suite = {i: not any(r["broken"] for r in by[(d["defence"], i)].values()) for i in common}
        assert all(by[(d["defence"], i)][CLEAN]["clean_correct"] for i in common)
        lines.append(f"| {d['defence']} | {len(common)} | {sum(suite.values())} | {sum(not aa[i] for i in common)} "
                     f"| {sum(suite[i] and aa[i] for i in common)} | {sum(not suite[i] and not aa[i] for i in common)} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
