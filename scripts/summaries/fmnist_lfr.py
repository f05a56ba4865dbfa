"""Summarise the LFR study (scripts/run_fmnist_lfr.sh) into summary.md, summary.json and robust.png.

    python scripts/summaries/fmnist_lfr.py [runs/fmnist_lfr]

With a run directory, each finished suite's rows and manifest are first copied here
(eval/<run>_<eps>/rows.jsonl.gz, purified_lfr/), then everything is computed from the copies:
- per classifier and budget: clean and worst-case robust accuracy over the suite (Wilson 95%
  interval), what each member broke, and what Square broke after every gradient attack had
  failed (the masking signal: those images were not robust, the gradients just missed them);
- paired comparisons (exact McNemar) of the classifiers on the same images;
- LFR behind PurSAMERE against the shipped classifier behind PurSAMERE (the rows of
  results/fmnist/suite), paired on the images both finished.
"""

import gzip
import json
import os
import shutil
import sys

from pursamere_fast.attacks.rows import read_run
from pursamere_fast.attacks.stats import format_accuracy, wilson_interval
from pursamere_fast.attacks.suite import CLEAN, paired_robust, robust_per_image, summarise_rows

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results", "fmnist_lfr")
RUNS = ("standard", "gradpen", "pgdat", "lfr")
LABELS = {"standard": "standard", "gradpen": "clean-point gradient penalty", "pgdat": "PGD-AT", "lfr": "LFR"}
BUDGETS = {"eps0.1": "0.1", "eps8": "8/255"}
SHIPPED_SUITE = os.path.join(HERE, "..", "fmnist", "suite")


def _read(path):
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def _copy(run_dir, dest):
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(run_dir, "manifest.json"), dest)
    with gzip.open(os.path.join(dest, "rows.jsonl.gz"), "wt") as f:
        f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in read_run(run_dir))


def collect(out):
    for name in sorted(os.listdir(os.path.join(out, "eval"))):
        run = os.path.join(out, "eval", name)
        if os.path.isdir(run) and os.path.exists(os.path.join(run, "manifest.json")):
            _copy(run, os.path.join(HERE, "eval", name))
    for name in ("lfr", "standard"):
        purified = os.path.join(out, f"purified_{name}")
        if os.path.exists(os.path.join(purified, "manifest.json")):
            _copy(purified, os.path.join(HERE, f"purified_{name}"))


def _summary(dest):
    """The suite summary of a copied run, and {index: robust} of its one defence."""
    rows = _read(os.path.join(dest, "rows.jsonl.gz"))
    with open(os.path.join(dest, "manifest.json")) as f:
        return summarise_rows(rows, json.load(f)["settings"]), robust_per_image(rows)


def _pct(k, n):
    return format_accuracy(k / n, wilson_interval(k, n))


def main():
    if len(sys.argv) > 1:
        collect(sys.argv[1])
    train = {}
    for name in RUNS:
        path = os.path.join(HERE, f"train_{name}.json")
        if os.path.exists(path):
            with open(path) as f:
                train[name] = json.load(f)
    lines = ["# LFR on Fashion-MNIST: standard training, clean-point gradient penalty, PGD-AT and LFR", "",
             "Setup: scripts/run_fmnist_lfr.sh (SmallCNN width 8 with softplus, Adam 1e-3, batch 128, 2 epochs, "
             "seed 0; inner maximisation linf 0.1, 5 steps of 0.025; lambda 0.02). Attacks: the cascaded suite "
             "PGD-CE-100 (step eps/4), APGD-CE-100, APGD-DLR-100, then Square-1000 on what survived; the first n "
             "images of the shipped 1,000-image test subset. Robust accuracy is the worst case over the suite, an "
             "upper bound, with a Wilson 95% interval.", "",
             "| classifier | test acc. (10,000) | train s/epoch | budget | n | clean % | robust % [95% CI] "
             "| broken by PGD / APGD-CE / APGD-DLR / Square after them |",
             "|---|---|---|---|---|---|---|---|"]
    out = {"classifiers": {}, "paired": [], "purified": None}
    robust = {}
    for name in RUNS:
        t = train.get(name)
        for eps_key, eps_text in BUDGETS.items():
            dest = os.path.join(HERE, "eval", f"{name}_{eps_key}")
            if not os.path.exists(os.path.join(dest, "rows.jsonl.gz")):
                continue
            summary, rob = _summary(dest)
            (d,) = summary["defences"]
            if not d["n"]:
                continue
            robust[(name, eps_key)] = rob
            broke = " / ".join(str(m["broke"]) for m in d["members"] if m["member"] != CLEAN)
            per_epoch = t["seconds_this_invocation"] / t["args"]["epochs"] if t else None
            lines.append(f"| {LABELS[name]} | {100 * t['test_accuracy']:.1f} | {per_epoch:.0f} | {eps_text} "
                         f"| {d['n']} | {_pct(d['clean_correct'], d['n'])} | {_pct(d['robust_correct'], d['n'])} "
                         f"| {broke} |" if t else
                         f"| {LABELS[name]} | - | - | {eps_text} | {d['n']} | {_pct(d['clean_correct'], d['n'])} "
                         f"| {_pct(d['robust_correct'], d['n'])} | {broke} |")
            out["classifiers"].setdefault(name, {})[eps_key] = {"summary": d, "train": t and {
                "test_accuracy": t["test_accuracy"], "seconds": t["seconds_this_invocation"],
                "epochs": t["args"]["epochs"]}}
    lines += ["", "Paired (same images, exact McNemar on the worst case): robust counts and discordant pairs.", "",
              "| budget | a | b | n | a robust | b robust | only a | only b | p |",
              "|---|---|---|---|---|---|---|---|---|"]
    for eps_key, eps_text in BUDGETS.items():
        for other in ("standard", "gradpen", "pgdat"):
            if ("lfr", eps_key) in robust and (other, eps_key) in robust:
                r = paired_robust(robust[("lfr", eps_key)], robust[(other, eps_key)])
                out["paired"].append({"budget": eps_text, "a": "lfr", "b": other, **r})
                lines.append(f"| {eps_text} | LFR | {LABELS[other]} | {r['n']} | {r['a']} | {r['b']} | {r['a_only']} "
                             f"| {r['b_only']} | {r['p']:.3g} |")
    behind = {"shipped": os.path.join(SHIPPED_SUITE, "rows.jsonl.gz")}
    behind.update({name: os.path.join(HERE, f"purified_{name}", "rows.jsonl.gz") for name in ("lfr", "standard")})
    behind = {k: robust_per_image(_read(v), "pursamere") for k, v in behind.items() if os.path.exists(v)}
    out["purified"] = []
    rows_md = []
    for a, b in (("lfr", "shipped"), ("standard", "shipped"), ("lfr", "standard")):
        if a in behind and b in behind:
            r = paired_robust(behind[a], behind[b])
            if r["n"]:
                out["purified"].append({"a": a, "b": b, **r})
                rows_md.append(f"| {a} | {b} | {r['n']} | {_pct(r['a'], r['n'])} | {_pct(r['b'], r['n'])} "
                               f"| {r['a_only']} | {r['b_only']} | {r['p']:.3g} |")
    if rows_md:
        lines += ["", "Classifiers behind PurSAMERE (configs/fmnist_suite.toml's suite at linf 8/255: the same "
                  "members, images and PurSAMERE config; shipped = the shipped ReLU width-32 classifier, "
                  "results/fmnist/suite), paired on the images both finished:", "",
                  "| a + PurSAMERE | b + PurSAMERE | n | a robust % | b robust % | only a | only b | p |",
                  "|---|---|---|---|---|---|---|---|"] + rows_md
    text = "\n".join(lines) + "\n"
    with open(os.path.join(HERE, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(HERE, "summary.json"), "w") as f:
        json.dump(out, f, indent=1)
    _plot(out)
    print(text)


def _plot(out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.35
    for j, (eps_key, eps_text) in enumerate(BUDGETS.items()):
        xs, ys, errs = [], [], [[], []]
        for i, name in enumerate(RUNS):
            d = out["classifiers"].get(name, {}).get(eps_key)
            if d is None:
                continue
            d = d["summary"]
            acc, (lo, hi) = 100 * d["robust_acc"], d["robust_ci"]
            xs.append(i + (j - 0.5) * width)
            ys.append(acc)
            errs[0].append(acc - 100 * lo)
            errs[1].append(100 * hi - acc)
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=f"linf {eps_text}")
    ax.set_xticks(range(len(RUNS)), [LABELS[n] for n in RUNS], fontsize=8)
    ax.set_ylabel("robust accuracy % (worst case)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "robust.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
