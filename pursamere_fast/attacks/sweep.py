"""Validation sweep of PurSAMERE configs, the rule that picks one, and result collection.

The recommended config is chosen on a validation split carved from the END of the
Fashion-MNIST training set (`validation_split`), never on the test set:

    pursamere-fast sweep run --config configs/fmnist_sweep.toml
    pursamere-fast sweep collect --out results/fmnist runs/fmnist/test_none runs/fmnist/final/*
    pursamere-fast sweep compare runs/fmnist/final/sam_main runs/fmnist/final/nosam_main \
        --attack bpda-linf-eps0.0313725-s20     # paired: same images, exact McNemar p-value

Selection rule (`choose_config`): among the configs whose clean accuracy is at most
`clean_tol` below the undefended classifier's (or one sample, whichever is larger, so that a
small n does not rule out everything for one image), keep those whose BPDA-det robust
accuracy is at most `robust_tol` below the best of them and take the cheapest (fewest score
evaluations per purification); ties go to the higher BPDA-det robust accuracy, then to the
higher gray-box robust accuracy, then to the earlier config of the grid. With robust_tol = 0
this is "the most robust config, cost only breaking ties". A tolerance buys speed where the
validation data cannot tell configs apart: evaluation at useful n is bounded by purification
cost, so a 4x cheaper config that is as robust is worth more than a point estimate.

Under torchrun each process takes every world_size-th batch (as `evaluate` does). The command
is `pursamere_fast.commands.sweep`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import checks
from . import defences as registry
from .loading import attack_specs, key_values, load_object, load_purify_config, number_or_text
from .rows import data_size, read_run
from .stats import format_accuracy, paired_robust, wilson_interval
from .threats import Defence


def validation_split(size: int = 256, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `size` images of the Fashion-MNIST training set (the validation split).

    Args:
        size: number of images, 1..60000.
        root: Fashion-MNIST directory (None: see `pursamere_fast.data.load_fashion_mnist`).

    Returns:
        (images float32 (size, 1, 28, 28) in [0, 1], labels int64 (size,)), in file order.

    Raises:
        ValueError: size out of range, or the loader's errors.
    """
    from pursamere_fast.data import holdout_split, load_fashion_mnist

    images, labels = load_fashion_mnist("train", root)
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= len(images):
        raise ValueError(f"size must be an int in 1..{len(images)}, got {size!r}")
    _, (images, labels) = holdout_split(images, labels, size)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def config_grid(axes: Mapping[str, Sequence]) -> list[dict]:
    """Cartesian product of PurifyConfig overrides, first axis outermost.

    Args:
        axes: field name -> non-empty list of values.

    Returns:
        One dict of overrides per grid point.

    Raises:
        ValueError: when an axis is empty or not a list.
    """
    for k, v in axes.items():
        if not isinstance(v, (list, tuple)) or not v:
            raise ValueError(f"grid axis {k!r} must be a non-empty list, got {v!r}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def config_name(overrides: Mapping) -> str:
    """Label of a grid point, e.g. "rho=16/255,sam_radius=4/255" (multiples of 1/255 shown so)."""
    parts = []
    for k, v in overrides.items():
        if isinstance(v, float) and v > 0 and abs(v * 255 - round(v * 255)) < 1e-6:
            v = f"{round(v * 255)}/255"
        parts.append(f"{k}={v}")
    return ",".join(parts) or "base"


def evaluations_per_purification(config) -> int:
    """Score forward+backward passes per image of one purification (`PurifyConfig.score_evaluations`)."""
    return config.score_evaluations


def choose_config(summary: Sequence[dict], candidates: Mapping[str, int], *, undefended: str, clean: str,
                  robust: str, tiebreak: str, clean_tol: float = 0.02, robust_tol: float = 0.0) -> dict:
    """Pick the config by the module's selection rule.

    Args:
        summary: entries with defence, attack, n, clean_acc, robust_acc (as `evaluate` returns).
        candidates: defence name -> its cost (score evaluations per purification).
        undefended: defence name of the undefended classifier.
        clean: attack label whose clean accuracy is compared (e.g. "clean").
        robust: attack label to maximise (BPDA-det).
        tiebreak: attack label of the gray-box tie-break.
        clean_tol: allowed clean-accuracy drop below the undefended one, in [0, 1].
        robust_tol: allowed robust-accuracy shortfall below the best eligible config, in
            [0, 1], within which the cheapest config wins.

    Returns:
        {"chosen": name or None, "allowed_drop", "undefended_clean", "robust_tol", "best_robust",
        "rows": [per-candidate dict]}.

    Raises:
        ValueError: bad clean_tol or robust_tol, or a needed entry is missing or has n = 0.
    """
    for name, tol in (("clean_tol", clean_tol), ("robust_tol", robust_tol)):
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {tol!r}")
    acc = {(e["defence"], e["attack"]): e for e in summary}

    def get(defence: str, attack: str) -> dict:
        e = acc.get((defence, attack))
        if e is None or not e["n"]:
            raise ValueError(f"summary has no rows for defence {defence!r}, attack {attack!r}")
        return e

    base = get(undefended, clean)
    allowed = max(clean_tol, 1 / base["n"])
    rows = []
    for order, (name, cost) in enumerate(candidates.items()):
        c, r, t = get(name, clean), get(name, robust), get(name, tiebreak)
        rows.append({"defence": name, "cost": cost, "n": r["n"], "clean_acc": c["clean_acc"],
                     "robust_acc": r["robust_acc"], "robust_ci": r["robust_ci"], "tiebreak_acc": t["robust_acc"],
                     "eligible": c["clean_acc"] >= base["clean_acc"] - allowed - 1e-12, "order": order})
    eligible = [r for r in rows if r["eligible"]]
    top = max((r["robust_acc"] for r in eligible), default=None)
    near = [r for r in eligible if r["robust_acc"] >= top - robust_tol - 1e-12]
    best = min(near, key=lambda r: (r["cost"], -r["robust_acc"], -r["tiebreak_acc"], r["order"]), default=None)
    return {"chosen": None if best is None else best["defence"], "allowed_drop": allowed,
            "undefended_clean": base["clean_acc"], "robust_tol": robust_tol, "best_robust": top, "rows": rows}


def _complete(rows: Sequence[dict]) -> list[dict]:
    """The rows of the samples that have a row for every (defence, attack) setting present."""
    indices: dict[tuple[str, str], set[int]] = {}
    for r in rows:
        indices.setdefault((r["defence"], r["attack"]), set()).add(r["index"])
    common = set.intersection(*indices.values()) if indices else set()
    return [r for r in rows if r["index"] in common]


def collect(out_dirs: Sequence[str], z: float = 1.96, complete_only: bool = True) -> list[dict]:
    """Summaries of the rows on disk in several run directories (finished or interrupted runs).

    Args:
        out_dirs: directories written by `evaluate`.
        z: normal quantile of the Wilson interval.
        complete_only: keep, per directory, only the samples that have a row for every
            setting of that directory, so that a run stopped inside a batch compares its
            settings on the same images.

    Returns:
        One entry per (directory, defence, attack) with n, clean and robust accuracy and
        their intervals, plus the defence description from the run's manifest.
    """
    out = []
    for d in out_dirs:
        manifest = {}
        path = os.path.join(d, "manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                manifest = json.load(f).get("settings", {})
        rows = read_run(d)
        groups: dict[tuple[str, str], list[dict]] = {}
        for r in _complete(rows) if complete_only else rows:
            groups.setdefault((r["defence"], r["attack"]), []).append(r)
        for (defence, attack), rs in groups.items():
            if not rs:
                continue
            first = rs[0]
            e = {"run": d, "defence": defence, "attack": attack, "n": len(rs),
                 **{k: first[k] for k in ("threat", "norm", "eps", "steps", "step_size", "restarts", "eot")},
                 "description": manifest.get(f"{defence} | {attack}", {}).get("defence", {})}
            for what, field in (("clean", "clean_correct"), ("robust", "robust_correct")):
                k = sum(bool(r[field]) for r in rs)
                e[f"{what}_correct"], e[f"{what}_acc"] = k, k / len(rs)
                e[f"{what}_ci"] = list(wilson_interval(k, len(rs), z))
            out.append(e)
    return out


def compare(a: str, b: str, attack: str, attack_b: str | None = None, *, field: str = "robust_correct",
            complete_only: bool = True) -> dict:
    """Paired comparison of two defences on the images both were evaluated on.

    Args:
        a, b: "run_dir" or "run_dir:defence" (the defence is needed when a run holds several).
        attack: attack label in a; attack_b: its label in b (default: the same), e.g. the
            undefended run's "bpda-..." for a gray-box row, which is the same PGD there.
        field: per-sample boolean to compare ("robust_correct" or "clean_correct").
        complete_only: as in `collect`, use per run only the samples that have a row for every
            setting of that run, so that the pairs are the images `collect` reports.

    Returns:
        {"n", "acc_a", "acc_b", "only_a", "only_b", "p_value"} over the common indices; only_a
        counts images a gets right and b does not. p_value: exact McNemar (`mcnemar_exact`).

    Raises:
        ValueError: a setting is missing or ambiguous, or the two share no image.
    """
    def pick(spec: str, label: str) -> dict[int, dict]:
        run, _, defence = spec.partition(":")
        every = _complete(read_run(run)) if complete_only else read_run(run)
        rows = [r for r in every if r["attack"] == label and (not defence or r["defence"] == defence)]
        if len({r["defence"] for r in rows}) > 1:
            raise ValueError(f"{spec!r} holds several defences for {label!r}: name one as run_dir:defence")
        if not rows:
            raise ValueError(f"no rows for attack {label!r} in {spec!r}")
        return {r["index"]: r for r in rows}

    ra, rb = pick(a, attack), pick(b, attack_b or attack)
    common = sorted(set(ra) & set(rb))
    if not common:
        raise ValueError(f"{a!r} and {b!r} share no image for {attack!r}")
    for i in common:
        if ra[i]["label"] != rb[i]["label"]:
            raise ValueError(f"image {i} has label {ra[i]['label']} in {a!r} but {rb[i]['label']} in {b!r}")
    pair = paired_robust({i: bool(ra[i][field]) for i in common}, {i: bool(rb[i][field]) for i in common})
    return {"n": pair["n"], "acc_a": pair["a"] / pair["n"], "acc_b": pair["b"] / pair["n"],
            "only_a": pair["a_only"], "only_b": pair["b_only"], "p_value": pair["p"]}


def _points(cfg: Mapping) -> list[dict]:
    """Grid points of a sweep TOML: the product of [grid], or the explicit [[point]] list.

    A point's optional "defence" key is "pursamere" (default), "adp" or "hetero"; its other
    keys are PurifyConfig overrides, ADPPurifier arguments, or HeteroPurifier arguments and
    runs. Strings like "8/255" become floats.
    """
    if ("grid" in cfg) == ("point" in cfg):
        raise ValueError("a sweep config needs exactly one of [grid] and [[point]]")
    if "grid" in cfg:
        if not isinstance(cfg["grid"], dict):
            raise ValueError(f"[grid] must be a table of lists, got {cfg['grid']!r}")
        return [{k: number_or_text(v) for k, v in point.items()} for point in config_grid(cfg["grid"])]
    if not isinstance(cfg["point"], list) or not all(isinstance(pt, dict) for pt in cfg["point"]):
        raise ValueError(f"[[point]] must be an array of tables, got {cfg['point']!r}")
    points = []
    for pt in cfg["point"]:
        pt = {k: (v if k == "defence" else number_or_text(v)) for k, v in pt.items()}
        kinds = registry.kind_names()[1:]
        if pt.get("defence", "pursamere") not in kinds:
            raise ValueError(f"point defence must be one of {', '.join(map(repr, kinds))}, got {pt['defence']!r}")
        points.append(pt)
    return points


_SWEEP_KEYS = ("classifier", "score", "data", "purify_config", "out", "n", "batch_size", "clean_tol", "robust_tol",
               "select", "classifier_kwargs", "score_kwargs", "data_kwargs", "pursamere", "grid", "point", "attack")
_SWEEP_REQUIRED = ("classifier", "score", "data", "out", "attack", "select")


@dataclass(frozen=True)
class SweepRun:
    """Everything a sweep TOML describes, checked before the (long) evaluation starts.

    Attributes:
        classifier, data: the loaded classifier and validation data; size: len(data).
        points: the grid points (overrides, a point's optional "defence" kind popped by the builder).
        fixed: PurifyConfig overrides under every PurSAMERE point ([pursamere]).
        defences: "none" then one Defence per point; costs: {defence name: score evaluations
            per purification} of the points.
        attacks: the [[attack]] array; select: {"clean", "robust", "tiebreak"} attack labels.
        out: results directory; n, batch_size, clean_tol, robust_tol: the run's numbers.
    """

    classifier: Any
    data: Any
    size: int
    points: list
    fixed: dict
    defences: list
    costs: dict
    attacks: list
    select: dict
    out: str
    n: int
    batch_size: int
    clean_tol: float
    robust_tol: float

    @classmethod
    def from_toml(cls, cfg: Mapping, path: str) -> SweepRun:
        """The run of a sweep TOML (read with `loading.load_toml`); `path` names it in messages.

        Raises:
            ValueError: naming the key, for an unknown or missing key or a bad value.
        """
        return cls(**_setup(cfg, path))


def _setup(cfg: Mapping, path: str) -> dict:
    unknown = sorted(set(cfg) - set(_SWEEP_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {path}; valid: {', '.join(_SWEEP_KEYS)}")
    missing = [k for k in _SWEEP_REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}")
    for key in ("classifier_kwargs", "score_kwargs", "data_kwargs", "pursamere", "select"):
        if not isinstance(cfg.get(key, {}), dict):
            raise ValueError(f"{key} in {path} must be a table, got {cfg[key]!r}")
    if not isinstance(cfg["out"], str):
        raise ValueError(f"out in {path} must be a string, got {cfg['out']!r}")
    classifier = checks.function("classifier", load_object(cfg["classifier"], cfg.get("classifier_kwargs")))
    score = checks.function("score", load_object(cfg["score"], cfg.get("score_kwargs")))
    data = load_object(cfg["data"], cfg.get("data_kwargs"))
    base = load_purify_config(cfg["purify_config"]) if "purify_config" in cfg else None
    fixed = key_values(cfg.get("pursamere", {}))
    points = _points(cfg)
    defences, costs = [Defence.none()], {}
    for point in points:
        point = dict(point)
        kind = point.pop("defence", "pursamere")
        context = registry.DefenceContext(score, classifier, base)
        if kind == "pursamere":
            d = registry.build_defence(kind, {**fixed, **point}, context, name=config_name(point))
        else:
            d = registry.build_defence(kind, point, context, name=f"{kind}:" + config_name(point))
        defences.append(d)
        costs[d.name] = registry.cost(d.description)
    attacks = attack_specs(cfg["attack"])
    labels = [a.label for a in attacks]
    select = {k: cfg["select"].get(k) for k in ("clean", "robust", "tiebreak")}
    for k, label in select.items():
        if label not in labels:
            raise ValueError(f"select.{k} in {path} must be one of the attack labels {labels}, got {label!r}")
    size = data_size(data)
    return {"classifier": classifier, "data": data, "size": size, "points": points, "fixed": fixed,
            "defences": defences, "costs": costs, "attacks": attacks, "select": select, "out": cfg["out"],
            "n": checks.integer("n", cfg.get("n", size), 1, size),
            "batch_size": checks.integer("batch_size", cfg.get("batch_size", 16), 1),
            "clean_tol": checks.real("clean_tol", cfg.get("clean_tol", 0.02), 0, 1),
            "robust_tol": checks.real("robust_tol", cfg.get("robust_tol", 0.0), 0, 1)}


def sweep_markdown(choice: Mapping) -> str:
    """Markdown table of a `choose_config` result, the chosen row marked."""
    lines = [f"undefended clean accuracy {100 * choice['undefended_clean']:.1f}%; allowed clean drop "
             f"{100 * choice['allowed_drop']:.1f} pp; allowed BPDA-det shortfall from the best "
             f"{100 * choice.get('robust_tol', 0.0):.1f} pp; chosen: {choice['chosen']}", "",
             "| config | score evals / purification | n | clean % | gray-box robust % | BPDA-det robust % [95% CI] "
             "| eligible | chosen |", "|---|---|---|---|---|---|---|---|"]
    for r in choice["rows"]:
        lo, hi = r["robust_ci"]
        lines.append(f"| {r['defence']} | {r['cost']} | {r['n']} | {100 * r['clean_acc']:.1f} "
                     f"| {100 * r['tiebreak_acc']:.1f} "
                     f"| {format_accuracy(r['robust_acc'], (lo, hi))} "
                     f"| {'yes' if r['eligible'] else 'no'} "
                     f"| {'**yes**' if r['defence'] == choice['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def _fmt(e: Mapping, what: str) -> str:
    return format_accuracy(e[f"{what}_acc"], e[f"{what}_ci"])


def collect_markdown(entries: Sequence[Mapping]) -> str:
    """Markdown table of `collect` entries (accuracies in %, 95% Wilson intervals)."""
    lines = ["| run | defence | attack | threat | norm | eps | steps | step size | n | clean % [95% CI] "
             "| robust % [95% CI] |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {os.path.basename(e['run'].rstrip('/'))} | {e['defence']} | {e['attack']} | {e['threat']} "
                     f"| {e['norm']} | {e['eps']:.6g} | {e['steps']} | {e['step_size']:.4g} | {e['n']} "
                     f"| {_fmt(e, 'clean')} | {_fmt(e, 'robust')} |")
    return "\n".join(lines) + "\n"
