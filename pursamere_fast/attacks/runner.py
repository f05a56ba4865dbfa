"""Resumable, shardable evaluation of (defence, attack) settings over a dataset.

Layout of `out_dir`:
- rows.rank<r>.jsonl: per-sample rows of rank r, appended and flushed after every batch;
- rows.jsonl: all rows, merged by rank 0 at the end (sorted by setting, then index);
- manifest.json: the description of every setting; a resumed run whose settings differ
  under the same labels is refused;
- summary.json, summary.md: n, clean and robust accuracy with 95% Wilson intervals;
- acc_vs_eps.png, acc_vs_steps.png.

Batches are fixed by the index list and `batch_size`, batch b goes to rank b % world_size,
and every random choice of a batch is seeded from its first index: a sample's row does
not depend on the number of processes nor on where a run was interrupted. A row is
written once its whole batch is done; on restart, rows already on disk are skipped and a
batch is recomputed only for its missing rows.

robust_correct = clean_correct and adv_correct (a sample misclassified clean counts as
broken, as in RobustBench).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from .rows import (
    ROWS,
    barrier,
    check_indices,
    gather,
    jsonable,
    merge_run,
    open_shard,
    rank_world,
    read_rows,
    row_key,
    take,
)
from .stats import format_accuracy, wilson_interval
from .threats import AttackSpec, Defence, clean_predictions, run_attack


def eval_device(classifier: nn.Module, device) -> torch.device:
    """`device`, or the classifier's (CPU without parameters); puts the classifier in eval mode."""
    if device is None:
        p = next(iter(classifier.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    classifier.eval()
    return torch.device(device)


def setting_descriptions(settings: Sequence[tuple[Defence, AttackSpec]], run: dict, image_shape,
                         device: torch.device) -> dict:
    """{"defence | attack": description} of each setting for the manifest: the defence's and the
    attack's settings and how it ran (`run`, and the defence's plan there: purify's resolved
    score options), which change results too."""
    out = {}
    for d, a in settings:
        here = {**run, **(d.plan(image_shape, device) if d.plan is not None else {})}
        out[f"{d.name} | {a.label}"] = jsonable({"defence": dict(d.description), "attack": a.describe(), "run": here})
    return out


def perturbation_size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-image norm ("linf", "l2" or "l1") of a batch of perturbations, in float64."""
    p = {"linf": math.inf, "l2": 2, "l1": 1}[norm]
    return torch.linalg.vector_norm(delta.flatten(1).double(), ord=p, dim=1)


def summarise(rows: Sequence[dict], settings: Sequence[tuple[Defence, AttackSpec]], indices: Sequence[int],
              z: float = 1.96) -> list[dict]:
    """Per-setting n, clean and robust accuracy with Wilson intervals (rows restricted to `indices`).

    Returns:
        One dict per setting, in settings order.
    """
    wanted = set(int(i) for i in indices)
    by = {}
    for r in rows:
        if r["index"] in wanted:
            by.setdefault((r["defence"], r["attack"]), []).append(r)
    out = []
    for d, a in settings:
        rs = by.get((d.name, a.label), [])
        n = len(rs)
        entry = {"defence": d.name, "attack": a.label, "threat": a.threat, "norm": a.norm, "eps": a.eps,
                 "steps": a.steps, "step_size": a.step_size, "restarts": a.restarts, "eot": a.eot,
                 "n": n, "n_expected": len(wanted)}
        for what, field in (("clean", "clean_correct"), ("robust", "robust_correct")):
            k = sum(bool(r[field]) for r in rs)
            entry[f"{what}_correct"] = k
            entry[f"{what}_acc"] = k / n if n else None
            entry[f"{what}_ci"] = list(wilson_interval(k, n, z)) if n else None
        out.append(entry)
    return out


def _fmt_acc(e: dict, what: str) -> str:
    return format_accuracy(e[f"{what}_acc"], e[f"{what}_ci"])


def markdown_table(summary: Sequence[dict]) -> str:
    """Markdown table of a summary (accuracies in %, 95% Wilson intervals in brackets)."""
    head = ("| defence | attack | threat | norm | eps | steps | step size | n | clean acc % [95% CI] "
            "| robust acc % [95% CI] |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {e['defence']} | {e['attack']} | {e['threat']} | {e['norm']} | {e['eps']:.6g} | {e['steps']} "
             f"| {e['step_size']:.4g} | {e['n']} | {_fmt_acc(e, 'clean')} | {_fmt_acc(e, 'robust')} |"
             for e in summary]
    return head + "\n".join(lines) + "\n"


def plot_summary(summary: Sequence[dict], out_dir: str) -> list[str]:
    """Write acc_vs_eps.png and acc_vs_steps.png (robust accuracy with Wilson error bars).

    Returns:
        Paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for x_field, fname, fixed in (("eps", "acc_vs_eps.png", ("steps",)), ("steps", "acc_vs_steps.png", ("eps",))):
        groups = {}
        for e in summary:
            if e["threat"] == "clean" or e["n"] == 0:
                continue
            key = (e["defence"], e["threat"], e["norm"], e["restarts"], e["eot"]) + tuple(e[f] for f in fixed)
            groups.setdefault(key, []).append(e)
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, es in sorted(groups.items(), key=lambda kv: str(kv[0])):
            es = sorted(es, key=lambda e: e[x_field])
            xs = [e[x_field] for e in es]
            ys = [100 * e["robust_acc"] for e in es]
            err = [[100 * (e["robust_acc"] - e["robust_ci"][0]) for e in es],
                   [100 * (e["robust_ci"][1] - e["robust_acc"]) for e in es]]
            label = f"{key[0]} {key[1]} {key[2]} {fixed[0]}={key[-1]:.4g}"
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xlabel(x_field)
        ax.set_ylabel("robust accuracy % (95% Wilson CI)")
        ax.set_ylim(-2, 102)
        if groups:
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def evaluate(classifier: nn.Module, data, settings: Sequence[tuple[Defence, AttackSpec]], *, out_dir: str,
             indices: Sequence[int] | None = None, batch_size: int = 64, mean=None, std=None,
             device: str | torch.device | None = None, progress: bool = True, plots: bool = True) -> list[dict]:
    """Evaluate every (defence, attack) setting on every index; resumable and shardable.

    Under torch.distributed (e.g. torchrun) each rank takes every world_size-th batch and
    writes its own shard; rank 0 merges the shards and writes the summary.

    Args:
        classifier: module from normalised images to logits (switched to eval mode).
        data: (images (N, C, H, W) in [0, 1], labels (N,)) tensors, or a dataset whose
            items are (image, label).
        settings: (defence, attack) pairs; (defence name, attack label) must be unique.
        out_dir: results directory (created; reused to resume).
        indices: dataset indices to evaluate (None: all), in batch order.
        batch_size: images per batch, >= 1.
        mean, std: normalisation applied before the classifier.
        device: where to run (None: the classifier's device).
        progress: tqdm bar on rank 0.
        plots: write the PNG plots.

    Returns:
        The summary (see `summarise`); on ranks other than 0 the summary of all rows on disk.

    Raises:
        ValueError: on a bad argument or a resumed out_dir with different settings.
    """
    checks.integer("batch_size", batch_size, 1)
    if not settings:
        raise ValueError("settings must not be empty")
    labels = [(d.name, a.label) for d, a in settings]
    if len(set(labels)) != len(labels):
        raise ValueError(f"settings must have unique (defence, attack) labels, got {labels}")
    indices = check_indices(data, indices)
    device = eval_device(classifier, device)

    rank, world = rank_world()
    image_shape = tuple(take(data, indices[:1])[0].shape[1:]) if indices else ()
    manifest = setting_descriptions(settings, {"device": device.type, "batch_size": batch_size}, image_shape, device)
    store = open_shard(out_dir, manifest)
    done = store.done

    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    mine = batches[rank::world]
    todo = sum(1 for b in mine for d, a in settings if any((d.name, a.label, i) not in done for i in b))
    skipped = sum(1 for b in mine for d, a in settings for i in b if (d.name, a.label, i) in done)
    from tqdm.auto import tqdm

    bar = tqdm(total=todo, disable=not progress or rank != 0, desc="evaluate", unit="batch")
    with store:
        for batch in mine:
            x, y = None, None
            clean = {}
            for d, a in settings:
                missing = [i for i in batch if (d.name, a.label, i) not in done]
                if not missing:
                    continue
                if x is None:
                    x, y = take(data, batch)
                    x = x.to(device=device, dtype=x.dtype if x.is_floating_point() else torch.float32)
                    y = y.to(device=device, dtype=torch.int64)
                if d.name not in clean:
                    clean[d.name] = clean_predictions(d, classifier, x, mean=mean, std=std)
                x_adv, adv_pred = run_attack(d, a, classifier, x, y, mean=mean, std=std,
                                             seed=a.seed * 1_000_003 + batch[0])
                pert = perturbation_size(x_adv - x, a.norm).tolist()
                cp, ap, yl = clean[d.name].tolist(), adv_pred.tolist(), y.tolist()
                want = set(missing)
                store.append({"index": idx, "label": yl[j], "defence": d.name, "attack": a.label,
                              "threat": a.threat, "norm": a.norm, "eps": a.eps, "steps": a.steps,
                              "step_size": a.step_size, "restarts": a.restarts, "eot": a.eot,
                              "clean_pred": cp[j], "adv_pred": ap[j], "clean_correct": cp[j] == yl[j],
                              "adv_correct": ap[j] == yl[j], "robust_correct": cp[j] == yl[j] and ap[j] == yl[j],
                              "perturbation": pert[j]} for j, idx in enumerate(batch) if idx in want)
                bar.update(1)
    bar.close()
    counts = gather([store.written, skipped])
    if rank == 0:
        order = {(d.name, a.label): i for i, (d, a) in enumerate(settings)}
        rows = merge_run(out_dir, lambda r: (order.get((r["defence"], r["attack"]), len(order)), *row_key(r)))
        summary = summarise(rows, settings, indices)
        run = {"rows_written": sum(c[0] for c in counts), "rows_skipped": sum(c[1] for c in counts),
               "rows_written_per_rank": [c[0] for c in counts], "world_size": world, "batch_size": batch_size}
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump({"settings": summary, "run": run}, f, indent=1)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(markdown_table(summary))
        if plots:
            plot_summary(summary, out_dir)
    barrier()
    return summarise(read_rows(os.path.join(out_dir, ROWS)), settings, indices)
