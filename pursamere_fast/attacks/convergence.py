"""Convergence of PGD (SPEC section 7): robust accuracy against steps and restarts at a fixed step size.

One run of `steps` iterations per restart gives every shorter run too: PGD keeps the
per-sample worst iterate, and the iterates of a run of s steps are the first s of a longer
run at the same step size and start. So each restart is attacked once with
`return_history=True`, the row keeps the first iterate that fooled the model, and the
accuracy at (s steps, r restarts) counts the images that no iterate <= s of the first r
restarts fooled. A step rule like 2.5 * eps / steps would change the path with the count;
here alpha is fixed, so a longer attack can only find more.

The verdict on an iterate is the attacked model's own forward (for "exact" the unrolled
loop, equal to the deterministic defence up to float rounding). Restarts are independent
runs with their own random starts (seeded per sample and restart), not a cascade, so the
curve over restarts is an honest best-of-r.

Layout of out_dir: rows.jsonl (one row per restart and index), manifest.json,
convergence.json (the accuracy grid), convergence.png.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from .pgd import NORMS, pgd
from .rows import ROWS, RowStore, check_indices, pin_settings, read_rows, take
from .runner import eval_device
from .stats import format_accuracy, wilson_interval
from .threats import GRAD_MODE, Defence, clean_predictions


def run_convergence(classifier: nn.Module, data, defence: Defence, *, out_dir: str, threat: str = "bpda",
                    norm: str = "linf", eps: float = 8 / 255, alpha: float | None = None, steps: int = 200,
                    restarts: int = 5, loss: str = "ce", seed: int = 0, indices: Sequence[int] | None = None,
                    batch_size: int = 16, mean=None, std=None, device=None, progress: bool = True,
                    steps_grid: Sequence[int] = (10, 20, 50, 100, 200), restarts_grid: Sequence[int] = (1, 3, 5)
                    ) -> dict:
    """Attack every image `restarts` times for `steps` iterations and tabulate accuracy(s, r).

    Args:
        classifier: module from normalised images to logits.
        data: (images, labels) tensors or a dataset of (image, label).
        defence: the defence.
        out_dir: results directory (created; reused to resume: finished restarts of a batch
            are kept).
        threat: "gpgd", "bpda", "exact", "exact_st" or "exact_st_proj".
        norm, eps: the budget.
        alpha: fixed step size (None: eps / 4).
        steps: iterations per restart, >= 1.
        restarts: independent restarts, >= 1.
        loss: "ce", "cw" or "dlr".
        seed: base seed of the random starts.
        indices: dataset indices (None: all).
        batch_size: images per attack call.
        mean, std: normalisation before the classifier.
        device: where to run (None: the classifier's device).
        progress: tqdm bar.
        steps_grid, restarts_grid: where to read the table (values above steps/restarts dropped).

    Returns:
        {"n", "clean_correct", "grid": [{steps, restarts, robust_correct, acc, ci}], "settings"}.
    """
    checks.choice("threat", threat, ("gpgd", *GRAD_MODE))
    checks.choice("norm", norm, NORMS)
    eps = checks.real("eps", eps, positive=True)
    alpha = eps / 4 if alpha is None else checks.real("alpha", alpha, positive=True)
    steps = checks.integer("steps", steps, 1)
    restarts = checks.integer("restarts", restarts, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    seed = checks.seed("seed", seed)
    indices = check_indices(data, indices)
    device = eval_device(classifier, device)
    settings = {"defence": defence.name, "description": dict(defence.description), "threat": threat, "norm": norm,
                "eps": eps, "alpha": alpha, "steps": steps, "loss": loss, "seed": seed, "device": device.type}
    settings = pin_settings(out_dir, settings, "convergence run")

    path = os.path.join(out_dir, ROWS)
    store = RowStore(path, key=lambda r: (r["restart"], r["index"]))
    done = store.done
    grad_mode = None if threat == "gpgd" else GRAD_MODE[threat]
    target = defence.model(classifier, grad_mode, mean=mean, std=std)
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    from tqdm.auto import tqdm

    bar = tqdm(total=len(batches) * restarts, disable=not progress, desc="convergence", unit="batch")
    with store:
        # Restart-major: a run stopped early still has the whole steps curve of its first restarts.
        for r in range(restarts):
            for batch in batches:
                if all((r, i) in done for i in batch):
                    bar.update(1)
                    continue
                x, y = take(data, batch)
                x, y = x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.int64)
                cp = clean_predictions(defence, classifier, x, mean=mean, std=std).tolist()
                seeds = [(seed + r) * 1_000_003 + i for i in batch]
                _, first = pgd(target, x, y, norm=norm, eps=eps, alpha=alpha, steps=steps, seed=seeds, loss=loss,
                               return_history=True)
                store.append({"restart": r, "index": i, "label": int(y[j]), "clean_correct": cp[j] == int(y[j]),
                              "first_broken": int(first[j])} for j, i in enumerate(batch) if (r, i) not in done)
                bar.update(1)
    bar.close()
    table = convergence_table(read_rows(path), indices, steps, restarts, steps_grid, restarts_grid)
    table["settings"] = settings
    with open(os.path.join(out_dir, "convergence.json"), "w") as f:
        json.dump(table, f, indent=1)
    plot_convergence(table, os.path.join(out_dir, "convergence.png"))
    return table


def convergence_table(rows: Sequence[dict], indices: Sequence[int], steps: int, restarts: int,
                      steps_grid: Sequence[int] = (10, 20, 50, 100, 200), restarts_grid: Sequence[int] = (1, 3, 5),
                      z: float = 1.96) -> dict:
    """Robust accuracy at each (s, r) over the images the first r restarts have rows for.

    An image is robust at (s, r) when it is classified correctly clean and, in each of the
    first r restarts, no iterate with step index <= s fooled the model (first_broken is -1 or
    above s; the start point has index 0). Each cell carries its own n (a run stopped early
    has fewer images for its later restarts); "n" is that of the first restart.
    """
    by = {}
    for row in rows:
        by.setdefault(row["index"], {})[row["restart"]] = row
    grid = []
    for r in [r for r in restarts_grid if r <= restarts]:
        wanted = [i for i in indices if i in by and all(q in by[i] for q in range(r))]
        n = len(wanted)
        for s in sorted({*[s for s in steps_grid if s <= steps], steps}):
            k = sum(1 for i in wanted if by[i][0]["clean_correct"]
                    and all(not 0 <= by[i][q]["first_broken"] <= s for q in range(r)))
            grid.append({"steps": s, "restarts": r, "n": n, "robust_correct": k, "acc": k / n if n else None,
                         "ci": list(wilson_interval(k, n, z)) if n else None})
    first = [i for i in indices if i in by and 0 in by[i]]
    return {"n": len(first), "clean_correct": sum(1 for i in first if by[i][0]["clean_correct"]), "grid": grid}


def plot_convergence(table: dict, path: str) -> str:
    """Accuracy against steps, one line per restart count, with 95% Wilson bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in sorted({g["restarts"] for g in table["grid"]}):
        pts = [g for g in table["grid"] if g["restarts"] == r and g["acc"] is not None]
        if not pts:
            continue
        xs = [g["steps"] for g in pts]
        ys = [100 * g["acc"] for g in pts]
        err = [[100 * (g["acc"] - g["ci"][0]) for g in pts], [100 * (g["ci"][1] - g["acc"]) for g in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3,
                    label=f"best of {r} restart{'s' if r > 1 else ''} (n={pts[0]['n']})")
    s = table.get("settings", {})
    ax.set_xscale("log")
    ticks = sorted({g["steps"] for g in table["grid"]})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("PGD steps (fixed step size)")
    ax.set_ylabel("robust accuracy % (95% Wilson CI)")
    ax.set_title(f"{s.get('defence', '')} {s.get('threat', '')} {s.get('norm', '')} eps={s.get('eps', 0):.4g} "
                 f"alpha={s.get('alpha', 0):.3g} (n={table['n']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def convergence_markdown(table: dict) -> str:
    """Markdown grid: rows = restarts, columns = steps."""
    steps = sorted({g["steps"] for g in table["grid"]})
    lines = ["| restarts \\ steps | n | " + " | ".join(map(str, steps)) + " |", "|---|---|" + "---|" * len(steps)]
    for r in sorted({g["restarts"] for g in table["grid"]}):
        cells = {g["steps"]: g for g in table["grid"] if g["restarts"] == r}
        lines.append(f"| {r} | {next(iter(cells.values()))['n']} | " + " | ".join(
            format_accuracy(cells[s]["acc"], cells[s]["ci"], digits=0)
            if s in cells and cells[s]["acc"] is not None else "-" for s in steps) + " |")
    return f"n = {table['n']} (clean correct {table['clean_correct']})\n\n" + "\n".join(lines) + "\n"
