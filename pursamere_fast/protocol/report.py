"""The protocol's report: the paired verdicts on the paper's claims, the accuracy panels and
OUT/report.md (see `pursamere_fast.protocol`)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..attacks.rows import read_run
from ..attacks.stats import format_accuracy, paired_robust, wilson_interval
from ..attacks.suite import robust_per_image
from .spec import CHOICE_MD, CLASSIFIERS, CLEAN, LEVEL, WORST


def _verdict(a: str, b: str, pair: Mapping) -> str:
    if pair["p"] >= LEVEL:
        return f"no difference shown (p = {pair['p']:.3g})"
    return f"**{a if pair['a_only'] > pair['b_only'] else b}** more robust (p = {pair['p']:.3g})"


# The paper's claims (issue 13), each tested by the paired comparisons `comparisons` makes.
CLAIMS = {
    "(i)": "far above the undefended classifier under BPDA-det",
    "(ii)": "SAM improves robustness",
    "(iii)": "at least as robust as the baselines (ADP; DiffPure and the heterogeneous purifier where run) under "
             "the deterministic white-box attacks",
    "(iv)": "purified augmentation helps",
}

# Defences evaluated beside the protocol on the same images and members, outside its templates:
# OUT/baselines.json, {"<classifier>": {"<job>": ["<run directory relative to OUT>", ...]}}.
BASELINES = "baselines.json"


def baseline_runs(out: Path) -> list[tuple[str, str, Path]]:
    """(classifier, job, run directory) of OUT/baselines.json, in its order; [] without it."""
    path = out / BASELINES
    if not path.is_file():
        return []
    return [(clf, job, out / run) for clf, jobs in json.loads(path.read_text()).items()
            for job, runs in jobs.items() for run in runs]


def _is_baseline(name: str) -> bool:
    return name != "none" and not name.startswith("pursamere")


def robust_maps(out: Path) -> dict[tuple[str, str, str, str], dict[int, bool]]:
    """{(classifier, job, measure, defence): {index: robust}} of every test job: a suite job's
    measure is its worst case (on the images every member has reached: a running job's last
    batch may have the cheap members' rows only), a single-attack job's each attack (its
    `robust_correct`). The runs of OUT/baselines.json join their classifier's and job's keys."""
    maps = {}
    runs = [(p.parent.parent.name, p.parent.name, p.parent) for p in sorted(out.glob("test/*/*/summary.json"))]
    for clf, job, run in runs + baseline_runs(out):
        summary = json.loads((run / "summary.json").read_text())
        rows = read_run(str(run))
        if "paired" in summary:  # a suite job
            for e in summary["defences"]:
                members = [CLEAN, *(m["member"] for m in e["members"])]
                maps[(clf, job, WORST, e["defence"])] = robust_per_image(rows, e["defence"], members)
            continue
        for r in rows:
            if r["threat"] != CLEAN:
                maps.setdefault((clf, job, r["attack"], r["defence"]), {})[r["index"]] = r["robust_correct"]
    return maps


def comparisons(maps: Mapping) -> list[tuple]:
    """(claim, classifier, job, measure, first, second, paired) for each claim: under a
    deterministic white-box measure (the suite's worst case, BPDA-det), (i) each PurSAMERE
    defence against the undefended classifier, (iii) against each baseline (ADP and every other
    defence that is not PurSAMERE: those of OUT/baselines.json) and (iv) each defence with the
    augmented against the clean classifier; under every measure (ii) each PurSAMERE defence with
    SAM against its twin without (the same name with -nosam for -sam). A pair without a common
    image (a job not yet run for one side) is left out, not tallied as "no difference"."""
    out = []
    baselines = sorted({k[3] for k in maps if _is_baseline(k[3])}, key=lambda b: (b != "adp", b))
    for (clf, job, measure, d), robust in sorted(maps.items()):
        det = measure == WORST or measure.startswith("bpda-")
        other = {name: maps.get((clf, job, measure, name)) for name in ("none", *baselines)}
        if d.startswith("pursamere"):
            if det and other["none"] is not None:
                out.append(("(i)", clf, job, measure, d, "none", paired_robust(robust, other["none"])))
            twin = d.replace("pursamere-sam", "pursamere-nosam")
            if twin != d and (clf, job, measure, twin) in maps:
                out.append(("(ii)", clf, job, measure, d, twin, paired_robust(robust, maps[(clf, job, measure, twin)])))
            for b in baselines:
                if det and other[b] is not None:
                    out.append(("(iii)", clf, job, measure, d, b, paired_robust(robust, other[b])))
        if clf == "aug" and det and d != "none" and ("clean", job, measure, d) in maps:
            out.append(("(iv)", "aug vs clean", job, measure, f"{d}: aug", "clean classifier",
                        paired_robust(robust, maps[("clean", job, measure, d)])))
    return sorted((c for c in out if c[6]["n"]), key=lambda c: list(CLAIMS).index(c[0]))


def verdicts(maps: Mapping) -> list[str]:
    """Markdown lines: for each of the paper's claims (`CLAIMS`), a tally of its paired
    comparisons (`comparisons` of `robust_maps`: exact McNemar on the images both sides have,
    at the 5% level) and every comparison with its verdict. A claim's tally counts its
    comparisons, which share images and are not independent: it is a summary, not a test."""
    comps = comparisons(maps)
    if not comps:
        return []
    lines = ["", "## Verdicts", "",
             f"Paired on the same images, exact McNemar, {100 * LEVEL:g}% level; deterministic white-box "
             f"measures: the suite's worst case and BPDA-det.", "",
             "| claim | comparisons | first more robust | no difference shown | second more robust |",
             "|---|---|---|---|---|"]
    for claim, text in CLAIMS.items():
        ps = [c[-1] for c in comps if c[0] == claim]
        first = sum(p["p"] < LEVEL and p["a_only"] > p["b_only"] for p in ps)
        second = sum(p["p"] < LEVEL and p["b_only"] > p["a_only"] for p in ps)
        lines.append(f"| {claim} {text} | {len(ps)} | {first} | {len(ps) - first - second} | {second} |")
    lines += ["", "| claim | classifier | job | measure | comparison | n | only first robust | only second robust "
              "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for claim, clf, job, measure, a, b, p in comps:
        lines.append(f"| {claim} | {clf} | {job} | {measure} | {a} vs {b} | {p['n']} | {p['a_only']} | {p['b_only']} "
                     f"| {_verdict(a, b, p)} |")
    return lines


_JOBS = ("main", "suite", "bpda200")


def accuracy_panels(maps: Mapping) -> dict[tuple[str, str], dict[tuple[str, str], tuple[int, int]]]:
    """{(job, measure): {(classifier, defence): (robust images, n)}} of `robust_maps`, jobs in
    the driver's order, each job's measures sorted; entries without an image left out."""
    panels: dict = {}
    for (clf, job, measure, d), robust in maps.items():
        if robust:
            panels.setdefault((job, measure), {})[(clf, d)] = (sum(robust.values()), len(robust))
    order = {j: i for i, j in enumerate(_JOBS)}
    return {k: panels[k] for k in sorted(panels, key=lambda k: (order.get(k[0], len(order)), k))}


def defence_order(name: str) -> tuple:
    """The undefended classifier, ADP, the other baselines, PurSAMERE with SAM, without; rho in
    numeric order."""
    group = (0 if name == "none" else 1 if name == "adp" else 2 if _is_baseline(name) else 3 if "-sam" in name
             else 4)
    return group, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plot_report(maps: Mapping, path: str | os.PathLike) -> str | None:
    """Robust accuracy with 95% Wilson intervals: a panel per test job and measure, a row per
    defence, a marker per classifier, so that the paired claims can be read at a glance (the
    verdicts are the paired tests). Returns the path, or None when no test job has rows yet."""
    panels = accuracy_panels(maps)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    height = max(len({d for _, d in cells}) for cells in panels.values()) * 0.32 + 1.3
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, height * rows), squeeze=False)
    for ax, ((job, measure), cells) in zip(axes.flat, panels.items()):
        defences = sorted({d for _, d in cells}, key=defence_order)[::-1]  # the first at the top
        clfs = [c for c in CLASSIFIERS if any(k[0] == c for k in cells)]
        sizes = []
        for j, (clf, marker) in enumerate(zip(clfs, "os")):
            pts = [(y, cells[(clf, d)]) for y, d in enumerate(defences) if (clf, d) in cells]
            ys = [y + 0.18 * (j - (len(clfs) - 1) / 2) for y, _ in pts]
            acc = [100 * k / n for _, (k, n) in pts]
            ci = [wilson_interval(k, n) for _, (k, n) in pts]
            err = [[a - 100 * lo for a, (lo, _) in zip(acc, ci)], [100 * hi - a for a, (_, hi) in zip(acc, ci)]]
            ns = sorted({n for _, (_, n) in pts})
            sizes.append(f"{ns[0] if len(ns) == 1 else f'{ns[0]}-{ns[-1]}'} ({clf})")
            ax.errorbar(acc, ys, xerr=err, fmt=marker, capsize=2, markersize=4, label=f"{clf} classifier")
        ax.set_yticks(range(len(defences)), defences, fontsize=7)
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"{job}: {measure}\nn = {', '.join(sizes)}", fontsize=8)
        ax.set_xlabel("robust accuracy % (95% Wilson CI)", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    # One legend for the figure, outside the panels (each panel's title has its n).
    handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_report(out_dir: str | os.PathLike, title: str = "Protocol") -> str:
    """Write OUT/report.md and, once a test job has rows, its figure OUT/report.png; return the
    markdown."""
    text = report(out_dir, title, figure="report.png")
    Path(out_dir, "report.md").write_text(text)
    return text


def report(out_dir: str | os.PathLike, title: str = "Protocol", figure: str | None = None) -> str:
    """Markdown of a protocol run directory: the score model and its quality table, the
    classifiers, the choice, the figure, every evaluation's summary.md (test/<classifier>/<job>)
    as written by its run, then the verdicts. `figure`: a file name in the run directory to draw
    `plot_report` to and show, once a test job has rows."""
    out = Path(out_dir)
    maps = robust_maps(out)
    lines = [f"# {title}"]
    score = out / "train_score" / "metrics.json"
    if score.is_file():
        m = json.loads(score.read_text())
        lines += ["", "## Score model", "",
                  f"{m['arch']} {json.dumps(m['arch_config'])}: {m['params']:,} parameters, {m['steps']} steps on "
                  f"{m['train_images']} training images (the last {m['holdout']} held out), final loss (mean of the "
                  f"last 100 steps) {m['final_loss_mean_last_100']:.1f}."]
    quality = out / "score_quality" / "quality.md"
    if quality.is_file():
        lines += ["", "Score quality on held-out images (`pursamere-fast score-quality`; the first row is the "
                  "baseline):", "", quality.read_text()]
    lines += ["", "## Classifiers", "", "| classifier | training images | test accuracy % (n) |", "|---|---|---|"]
    for name in CLASSIFIERS:
        metrics = out / f"train_{name}" / "metrics.json"
        if metrics.is_file():
            m = json.loads(metrics.read_text())
            lines.append(f"| train_{name} | {m['train_n']} | {format_accuracy(m['test_accuracy'])} ({m['test_n']}) |")
    choice = out / "select" / CHOICE_MD
    if choice.is_file():
        lines += ["", "## Selection", "", choice.read_text()]
    if figure and plot_report(maps, out / figure):
        lines += ["", "## Robust accuracy", "", f"![robust accuracy of every test measure]({figure})"]
    for summary in sorted(out.glob("test/*/*/summary.md")):
        lines += ["", f"## {summary.parent.parent.name} classifier: {summary.parent.name}", "", summary.read_text()]
    for clf, job, run in baseline_runs(out):
        lines += ["", f"## {clf} classifier: {job}, baseline run `{run.relative_to(out)}`", "",
                  (run / "summary.md").read_text()]
    lines += verdicts(maps)
    return "\n".join(lines) + "\n"
