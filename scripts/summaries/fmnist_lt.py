"""Summarise the Fashion-MNIST-LT benchmark (scripts/run_fmnist_lt.sh) from its per-run JSON.

    python scripts/summaries/fmnist_lt.py [results/fmnist_lt]

Reads <dir>/runs/*.json and writes <dir>/summary.md (accuracy overall and on the Many / Medium
/ Few classes, mean ± sample std over the seeds; each run; the paper's claims checked) and
<dir>/per_class.png (per-class test accuracy per optimiser). Nothing in summary.md is written
by hand.
"""

import json
import statistics
import sys
from pathlib import Path

import numpy as np

ORDER = ("sgd", "sam", "imbsam", "ssesam")
LABEL = {"sgd": "SGD", "sam": "SAM", "imbsam": "ImbSAM", "ssesam": "SSE-SAM"}
CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Buckets by training images per class: with R = 100 the counts are 6000, 3596, 2156, 1292 |
# 774, 464, 278 | 166, 100, 60, i.e. 4 / 3 / 3 classes. Many is also ImbSAM's and SSE-SAM's
# head (tail: fewer than eta = 1000 images).
MANY_MIN, FEW_MAX = 1000, 200


def bucket_of(count: int) -> str:
    if count >= MANY_MIN:
        return "Many"
    return "Few" if count < FEW_MAX else "Medium"


BUCKET_RULE = f"Many: >= {MANY_MIN} training images, Medium: {FEW_MAX}..{MANY_MIN - 1}, Few: < {FEW_MAX}"


def scores(row: dict) -> dict[str, float]:
    """Overall and per-bucket test accuracy (%) of one run; a bucket's is the mean of its
    classes' accuracies (the test set has 1000 images per class, so it is also the pooled one)."""
    acc = row["test_accuracy_per_class"]
    out = {"overall": 100 * row["test_accuracy"]}
    for bucket in ("Many", "Medium", "Few"):
        members = [a for a, n in zip(acc, row["train_class_counts"]) if bucket_of(n) == bucket]
        out[bucket] = 100 * float(np.mean(members))
    return out


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def claim(rows, a: str, b: str, metric: str) -> str:
    """Does optimiser `a` beat `b` on `metric`? Paired by seed (same initialisation and data
    order), and set against the spread of each over the seeds."""
    sa = {r["seed"]: scores(r)[metric] for r in rows[a]}
    sb = {r["seed"]: scores(r)[metric] for r in rows[b]}
    seeds = sorted(set(sa) & set(sb))
    if not seeds:
        return f"{LABEL[a]} > {LABEL[b]} on {metric}: not measured"
    diffs = [sa[s] - sb[s] for s in seeds]
    mean_diff = statistics.mean(diffs)
    wins = sum(d > 0 for d in diffs)
    spread = max(statistics.stdev(list(sa.values())) if len(sa) > 1 else 0.0,
                 statistics.stdev(list(sb.values())) if len(sb) > 1 else 0.0)
    if mean_diff <= 0:
        verdict = "**does not hold**"
    elif len(seeds) < 2:
        verdict = "**holds in the one seed measured**: no spread to judge it by, not evidence"
    elif mean_diff > spread and wins == len(seeds):
        verdict = "**holds**, by more than the seed spread and in every seed"
    elif wins == len(seeds):
        verdict = "**holds in every seed**, but by less than the seed spread: weak evidence at best"
    else:
        verdict = "**holds in the mean only**, within the seed spread: not evidence"
    return (f"{LABEL[a]} > {LABEL[b]} on {metric}: {verdict} ({LABEL[a]} {statistics.mean(sa.values()):.2f}, "
            f"{LABEL[b]} {statistics.mean(sb.values()):.2f}; difference {mean_diff:+.2f} pp, "
            f"{LABEL[a]} ahead in {wins} of {len(seeds)} seeds; larger seed std {spread:.2f} pp"
            + (f", std of the paired difference {statistics.stdev(diffs):.2f} pp)" if len(diffs) > 1 else ")"))


def plot(rows, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = next(r for rs in rows.values() for r in rs)["train_class_counts"]
    fig = Figure(figsize=(10, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    present = [o for o in ORDER if rows.get(o)]
    width = 0.8 / len(present)
    x = np.arange(len(counts))
    for i, opt in enumerate(present):
        acc = 100 * np.array([r["test_accuracy_per_class"] for r in rows[opt]])
        err = acc.std(0, ddof=1) if len(acc) > 1 else None
        ax.bar(x + (i - (len(present) - 1) / 2) * width, acc.mean(0), width, yerr=err, capsize=2,
               label=f"{LABEL[opt]} ({len(acc)} seed{'s' * (len(acc) > 1)})")
    for edge in [i + 0.5 for i in range(len(counts) - 1) if bucket_of(counts[i]) != bucket_of(counts[i + 1])]:
        ax.axvline(edge, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [f"{c}\n{CLASSES[c] if c < len(CLASSES) else c}\nn={n}" for c, n in enumerate(counts)],
                  fontsize=8)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    ax.set_title("Fashion-MNIST-LT (R = 100): per-class test accuracy (dashed: Many | Medium | Few)")
    ax.legend(fontsize=8, ncol=len(present), loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")


def main(directory: Path) -> None:
    runs = [json.loads(p.read_text()) for p in sorted((directory / "runs").glob("*.json"))]
    if not runs:
        raise SystemExit(f"no runs in {directory / 'runs'}")
    rows = {o: sorted((r for r in runs if r["optimizer"] == o), key=lambda r: r["seed"]) for o in ORDER}
    first = runs[0]
    counts = first["train_class_counts"]
    settings = "; ".join(f"{LABEL[o]} " + ", ".join(f"{k}={v}" for k, v in rows[o][0]["settings"].items()
                                                    if k != "name")
                         for o in ORDER if rows[o])
    tail = next((r["tail_classes"] for r in runs if r["tail_classes"]), None)
    buckets = {b: [c for c, n in enumerate(counts) if bucket_of(n) == b] for b in ("Many", "Medium", "Few")}
    machine = first["machine"]
    lines = [
        "# Fashion-MNIST-LT (imbalance ratio 100): SGD, SAM, ImbSAM, SSE-SAM",
        "",
        ("Made by `scripts/summaries/fmnist_lt.py` from `runs/*.json` (written by "
         "`scripts/run_fmnist_lt.sh`); test accuracy in %, mean ± sample std over the seeds."),
        "",
        (f"- Training set: the long-tailed subset, images per class {counts} ({sum(counts)} in all); test set: "
         f"all {sum(first['test_class_counts'])} test images ({first['test_class_counts'][0]} per class)."),
        (f"- Model and schedule (every run): SmallCNN width {first['width']}, {first['epochs']} epochs "
         f"({first['steps']} steps) at batch 128, SGD momentum 0.9, weight decay 5e-4, peak lr {first['lr']:g} "
         "with cosine decay, 1 CPU thread."),
        (f"- Buckets: {BUCKET_RULE} (Many: classes {buckets['Many']}, Medium: {buckets['Medium']}, "
         f"Few: {buckets['Few']})."),
        (f"- Settings: {settings}. ImbSAM and SSE-SAM tail classes (fewer than eta = 1000 training images): "
         f"{tail}."),
        (f"- Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, 1 thread per run, "
         "runs one after another under `nice -n 5`, with other engineers' jobs running on the same 2 cores: "
         "wall times are indicative only."),
        "",
        "## Accuracy",
        "",
        "| optimizer | seeds | overall | Many | Medium | Few | wall time per run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in ORDER:
        if not rows[o]:
            continue
        s = [scores(r) for r in rows[o]]
        cells = [mean_std([x[m] for x in s]) for m in ("overall", "Many", "Medium", "Few")]
        walls = [r["wall_s"] for r in rows[o]]
        lines.append(f"| {LABEL[o]} | {len(s)} | " + " | ".join(cells)
                     + f" | {statistics.mean(walls):.0f} ({min(walls)}-{max(walls)}) |")
    lines += [
        "",
        "## The paper's claims (Lyu et al., AAAI 2025), checked",
        "",
        ("Runs with the same seed share initialisation and data order, so the differences are paired by seed. "
         "With 3 seeds a difference smaller than the spread over seeds is not evidence either way."),
        "",
        f"- {claim(rows, 'ssesam', 'imbsam', 'overall')}",
        f"- {claim(rows, 'ssesam', 'imbsam', 'Many')}",
        f"- {claim(rows, 'ssesam', 'sam', 'Few')}",
        "",
        "## Each run",
        "",
        "| optimizer | seed | overall | Many | Medium | Few | wall (s) | training (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for o in ORDER:
        for r in rows[o]:
            s = scores(r)
            lines.append(f"| {LABEL[o]} | {r['seed']} | {s['overall']:.2f} | {s['Many']:.2f} | {s['Medium']:.2f} "
                         f"| {s['Few']:.2f} | {r['wall_s']} | {r['train_seconds']} |")
    lines += ["", "## Per class (mean over seeds)", "",
              "| class | train images | " + " | ".join(LABEL[o] for o in ORDER if rows[o]) + " |",
              "|---|---|" + "---|" * sum(bool(rows[o]) for o in ORDER)]
    for c, n in enumerate(counts):
        accs = [100 * statistics.mean(r["test_accuracy_per_class"][c] for r in rows[o]) for o in ORDER if rows[o]]
        lines.append(f"| {c} {CLASSES[c] if c < len(CLASSES) else ''} | {n} | "
                     + " | ".join(f"{a:.1f}" for a in accs) + " |")
    lines += ["", "![per-class accuracy](per_class.png)", ""]
    (directory / "summary.md").write_text("\n".join(lines))
    plot(rows, directory / "per_class.png")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "results" / "fmnist_lt")
