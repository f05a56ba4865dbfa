"""Summarise the SAM-variant suite run (scripts/run_fmnist.sh suite_sam) into summary.md, paired
with the shipped SAM-off config's suite rows (../suite) on the images both finished.

    python scripts/summaries/fmnist_suite_sam.py [runs/fmnist/final/suite_sam]

With a run directory, its manifest and rows (rank shards merged) are first copied here. The run
stops at its time budget: n counts the images every member finished. The pairing counts the
members both runs have (the SAM run is a one-defence run, so it has no transfer member).
"""

import gzip
import json
import os
import shutil
import sys

from pursamere_fast.attacks.rows import read_run
from pursamere_fast.attacks.suite import paired_robust, robust_per_image, suite_markdown, summarise_rows

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results", "fmnist", "suite_sam")


def _rows(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    if len(sys.argv) > 1:
        shutil.copy(os.path.join(sys.argv[1], "manifest.json"), HERE)
        with gzip.open(os.path.join(HERE, "rows.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in read_run(sys.argv[1]))
    sam = _rows(os.path.join(HERE, "rows.jsonl.gz"))
    with open(os.path.join(HERE, "manifest.json")) as f:
        summary = summarise_rows(sam, json.load(f)["settings"])
    base = _rows(os.path.join(HERE, "..", "suite", "rows.jsonl.gz"))
    members = sorted({r["attack"] for r in sam} & {r["attack"] for r in base})
    on = robust_per_image(sam, "pursamere", members)
    off = robust_per_image(base, "pursamere", members)
    p = paired_robust(on, off)
    text = suite_markdown(summary) + (
        "\n| paired on the same images (members both ran) | n | robust, SAM 8/255 | robust, SAM off (shipped) "
        "| only SAM on robust | only SAM off robust | exact McNemar p |\n|---|---|---|---|---|---|---|\n"
        f"| pursamere | {p['n']} | {p['a']} | {p['b']} | {p['a_only']} | {p['b_only']} | {p['p']:.3g} |\n")
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump({**summary, "paired_with_sam_off": p}, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
