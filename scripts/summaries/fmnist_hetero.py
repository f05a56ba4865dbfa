"""Summarise the heterogeneous-noise purifier's Fashion-MNIST runs into summary.md and summary.json.

    python scripts/summaries/fmnist_hetero.py [runs/fmnist/final]

With a run directory, the rows and manifests of its hetero/ and hetero_controls/ runs are first
copied here (gzipped); everything is then computed from the copies:
- the chosen setting under the suite (configs/fmnist_suite_hetero.toml): worst case with n and
  a Wilson 95% interval, each member, CPU-seconds per image;
- the controls (configs/fmnist_suite_hetero_controls.toml) against it on the members both ran
  (gray-box PGD-20 and BPDA-det PGD-50, the same per-image seeds), paired;
- PurSAMERE and ADP (results/fmnist/suite, configs/fmnist_suite.toml) against it, paired on the
  images all finished, each defence's worst case over its own suite.
"""

import gzip
import json
import os
import shutil
import sys

from pursamere_fast.attacks.rows import read_run
from pursamere_fast.attacks.stats import format_accuracy, wilson_interval
from pursamere_fast.attacks.suite import CLEAN, paired_robust, robust_per_image, suite_markdown, summarise_rows

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results", "fmnist", "hetero")
SUITE = os.path.join(HERE, "..", "suite")
RUNS = ("hetero", "hetero_controls")


def _read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def collect(final):
    for run in RUNS:
        src = os.path.join(final, run)
        if not os.path.exists(os.path.join(src, "manifest.json")):
            continue
        shutil.copy(os.path.join(src, "manifest.json"), os.path.join(HERE, f"{run}_manifest.json"))
        with gzip.open(os.path.join(HERE, f"{run}_rows.jsonl.gz"), "wt") as f:
            f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in read_run(src))


def _summarise(run):
    with open(os.path.join(HERE, f"{run}_manifest.json")) as f:
        return summarise_rows(_read(os.path.join(HERE, f"{run}_rows.jsonl.gz")), json.load(f)["settings"])


def _cpu(rows, defence, members=None):
    """CPU-seconds per image of `defence` over `members` (attacks that ran)."""
    images = {r["index"] for r in rows if r["defence"] == defence}
    total = sum(r.get("cpu_s", 0.0) for r in rows if r["defence"] == defence and r["ran"]
                and (members is None or r["attack"] in members))
    return total / len(images) if images else None


def _pct(k, n):
    return format_accuracy(k / n, wilson_interval(k, n))


def main():
    if len(sys.argv) > 1:
        collect(sys.argv[1])
    out = {}
    lines = ["# Heterogeneous-noise purification on Fashion-MNIST (linf 8/255)", "",
             "Setting chosen on validation images (sweep.md): t_l = 200, t_s = 100, U = 3, S = 100, tau = 0.9, "
             "majority vote over R = 5 runs (100 score calls per prediction); the shipped VE score model through the "
             "VE-to-VP adapter, saliency from the shipped SmallCNN. Robust accuracy is an upper bound from the attacks "
             "run.", ""]
    rows = _read(os.path.join(HERE, "hetero_rows.jsonl.gz"))
    summary = _summarise("hetero")
    out["suite"] = summary
    lines += ["## The suite (configs/fmnist_suite_hetero.toml)", "", suite_markdown(summary)]
    hetero_all = robust_per_image(rows, "hetero")
    if os.path.exists(os.path.join(HERE, "hetero_controls_rows.jsonl.gz")):
        control_rows = _read(os.path.join(HERE, "hetero_controls_rows.jsonl.gz"))
        shared = sorted({r["attack"] for r in control_rows})
        base = robust_per_image(rows, "hetero", set(shared))
        lines += ["## Controls (configs/fmnist_suite_hetero_controls.toml)", "",
                  f"Worst case over the members both runs have ({', '.join(m for m in shared if m != CLEAN)}), the "
                  "same images and per-image seeds; paired with the heterogeneous purifier (exact McNemar).", "",
                  "| defence | n | clean % | robust % [95% CI] | CPU-s / image (these members) "
                  "| paired vs heterogeneous: only it / only heterogeneous, p |", "|---|---|---|---|---|---|"]
        entries = []
        for name in ["hetero"] + sorted({r["defence"] for r in control_rows}):
            src = rows if name == "hetero" else control_rows
            rob = base if name == "hetero" else robust_per_image(control_rows, name)
            common = sorted(set(rob) & set(base))
            clean = sum(next(r for r in src if r["defence"] == name and r["index"] == i
                             and r["attack"] == CLEAN)["clean_correct"] for i in common)
            k = sum(rob[i] for i in common)
            p = paired_robust(rob, base)
            entries.append({"defence": name, "n": len(common), "clean": clean, "robust": k, "paired": p,
                            "cpu_s": _cpu(src, name, set(shared))})
            pair = "-" if name == "hetero" else f"{p['a_only']} / {p['b_only']}, p = {p['p']:.3g}"
            lines.append(f"| {name} | {len(common)} | {_pct(clean, len(common))} | {_pct(k, len(common))} "
                         f"| {entries[-1]['cpu_s']:.1f} | {pair} |")
        out["controls"] = entries
        lines.append("")
    suite_rows = os.path.join(SUITE, "rows.jsonl.gz")
    if os.path.exists(suite_rows):
        other = _read(suite_rows)
        lines += ["## Against PurSAMERE and ADP (results/fmnist/suite)", "",
                  "Each defence's worst case over its own suite (PurSAMERE's and ADP's: configs/fmnist_suite.toml, "
                  "7 members with exact-gradient PGD-50, APGD-CE-30, APGD-DLR-30 and Square-300; the heterogeneous "
                  "purifier's: the 6 above), on the images all finished, paired (exact McNemar).", "",
                  "| a | b | n | a robust % | b robust % | only a | only b | p |", "|---|---|---|---|---|---|---|---|"]
        out["versus"] = []
        for name in ("pursamere", "adp"):
            rob = robust_per_image(other, name)
            p = paired_robust(hetero_all, rob)
            out["versus"].append({"b": name, **p})
            lines.append(f"| heterogeneous | {name} | {p['n']} | {_pct(p['a'], p['n'])} | {_pct(p['b'], p['n'])} "
                         f"| {p['a_only']} | {p['b_only']} | {p['p']:.3g} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(text)


if __name__ == "__main__":
    main()
