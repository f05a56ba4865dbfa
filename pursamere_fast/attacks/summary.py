"""Summaries of a run directory from its rows and manifest: what `pursamere-fast summarise RUN` writes.

One function per kind of run, and `summarise_run`, which tells them apart:
- a suite run (`evaluate --suite`; its manifest records the member order): the worst case per
  defence over the images every member finished, and, when the directory holds AutoAttack rows
  (autoattack.<defence>.jsonl, .gz too), the AutoAttack check on the clean-correct images both
  finished;
- an evaluation run (`evaluate`, `sweep run`, `sanity`): n, clean and robust accuracy per
  (defence, attack) with Wilson intervals, as `evaluate` writes them (`runner.summarise`).

Rows are read with `rows.read_run` (rows.jsonl or rows.jsonl.gz, and every rank's shard), so a
run still going, a run stopped at its budget and a committed copy under results/ are read alike.
`copy_run` first brings a run directory's rows (gzipped), manifest and AutoAttack rows into a
results directory: the job the former `results/*/make_summary.py` scripts did (the
study-specific tables are scripts/summaries/*.py).
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil
from types import SimpleNamespace

from .rows import MANIFEST, ROWS, read_manifest, read_rows, read_run
from .runner import markdown_table, summarise
from .suite import CLEAN, suite_markdown, summarise_rows

_AUTOATTACK = "autoattack.*.jsonl"


def copy_run(src: str, dest: str) -> None:
    """Copy a run directory's rows (every shard, as dest/rows.jsonl.gz), manifest and AutoAttack
    rows (gzipped) into dest (created).

    Raises:
        ValueError: src holds no manifest.
    """
    if not os.path.isfile(os.path.join(src, MANIFEST)):
        raise ValueError(f"{src!r} holds no {MANIFEST}: not a run directory")
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(src, MANIFEST), dest)
    with gzip.open(os.path.join(dest, ROWS + ".gz"), "wt") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in read_run(src))
    for path in sorted(glob.glob(os.path.join(src, _AUTOATTACK))):
        with gzip.open(os.path.join(dest, os.path.basename(path) + ".gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in read_rows(path))


def autoattack_table(rows, summary: dict, out_dir: str) -> str:
    """Markdown of the AutoAttack check against a suite's rows: per defence with AutoAttack rows,
    the clean-correct images both finished, robust by each, and those only one broke."""
    lines = ["| AutoAttack check (BPDA, APGD-CE + APGD-DLR x 100, pyautoattack) | n (clean-correct, both finished) "
             "| suite robust | AutoAttack robust | only AutoAttack broke | only the suite broke |",
             "|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        by.setdefault((r["defence"], r["index"]), {})[r["attack"]] = r
    names = {r["attack"] for r in rows}
    found = False
    for d in summary["defences"]:
        path = os.path.join(out_dir, f"autoattack.{d['defence']}.jsonl")
        aa_rows = read_rows(path) or read_rows(path + ".gz")
        if not aa_rows:
            continue
        found = True
        aa = {r["index"]: r["broken"] for r in aa_rows}
        common = [i for i in sorted(aa) if set(by.get((d["defence"], i), {})) == names
                  and by[(d["defence"], i)][CLEAN]["clean_correct"]]
        suite = {i: not any(r["broken"] for r in by[(d["defence"], i)].values()) for i in common}
        only_aa = sum(suite[i] and aa[i] for i in common)
        only_suite = sum(not suite[i] and not aa[i] for i in common)
        lines.append(f"| {d['defence']} | {len(common)} | {sum(suite.values())} | {sum(not aa[i] for i in common)} "
                     f"| {only_aa} | {only_suite} |")
    return "\n".join(lines) + "\n" if found else ""


def evaluation_summary(rows, settings: dict) -> list[dict]:
    """`runner.summarise` of an evaluation run's rows under its manifest's settings, in the order
    of the rows (the merged rows.jsonl is sorted by setting), over every image that has a row."""
    first = {}
    for r in rows:
        first.setdefault(f"{r['defence']} | {r['attack']}", len(first))
    pairs = []
    for label in sorted(settings, key=lambda k: first.get(k, len(first))):
        defence, _, _ = label.partition(" | ")
        attack = dict(settings[label]["attack"])
        pairs.append((SimpleNamespace(name=defence), SimpleNamespace(**attack)))
    return summarise(rows, pairs, sorted({r["index"] for r in rows}))


def summarise_run(out_dir: str) -> tuple[dict | list, str]:
    """(summary, markdown) of a run directory, written to its summary.json and summary.md.

    Raises:
        ValueError: out_dir holds no manifest or no rows.
    """
    manifest = read_manifest(out_dir)
    if not manifest:
        raise ValueError(f"{out_dir!r} holds no {MANIFEST}")
    settings = manifest.get("settings", {})
    runs = [v.get("run", {}) for v in settings.values()] if isinstance(settings, dict) else []
    rows = read_run(out_dir)
    if not rows:
        raise ValueError(f"{out_dir!r} holds no rows")
    if runs and "suite" in runs[0]:
        summary = summarise_rows(rows, settings)
        aa = autoattack_table(rows, summary, out_dir)
        text = suite_markdown(summary) + ("\n\n" + aa if aa else "")
    else:
        summary = evaluation_summary(rows, settings)
        text = markdown_table(summary)
    payload = summary
    if isinstance(summary, list):  # evaluate's layout: the settings, and how the run went if it said
        path = os.path.join(out_dir, "summary.json")
        old = json.load(open(path)) if os.path.exists(path) else {}
        payload = {"settings": summary, **({"run": old["run"]} if isinstance(old, dict) and "run" in old else {})}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(payload, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    return summary, text
