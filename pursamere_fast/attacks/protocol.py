"""The evaluation protocol of issue 13 (docs/protocol.md) for any dataset: score model, clean
classifier, selection on held-out images, augmented classifier, test jobs, report.

A protocol is one TOML file (`configs/<name>_protocol.toml`) and the evaluation templates it
names (`pursamere-fast evaluate` configs once resolved), all written before any run:

- [protocol]: `title` (the report's heading), `driver` (the script that runs it, named in its
  messages), `dataset` (`--dataset` of the trainers), `data` (the evaluate data factory, called
  with root, part = "validation" or "test" and holdout), `score` (the evaluate score factory,
  called with path), `out` (the default output directory; `_smoke` appended under --smoke),
  `select` and `tests` (template files next to the protocol file: the selection template and
  {job: template} of the test jobs), optionally `score_arg` and `data_arg` (how the driver
  names its score and data inputs in messages; default --score and --data-root).
- [train]: `train-classifier` options of both classifiers; its `holdout` (the last training
  images, kept out of every training) is the selection's data and is passed to train-score too.
- [train_score] (optional): `train-score` options; when present the protocol trains its own
  score model on the held-out split (stage train_score) unless --score gives one, which must
  then say in its training metadata that it held the same images out.
- [score_quality] (optional): `score-quality` options and `baseline`, a score file (relative
  to the protocol file) put first in the table; measured on the held-out images (--split
  validation; n at most the holdout).
- [pursamere], [adp]: the base of every PurSAMERE and ADP defence of the templates.
- [selection]: the rule (below). [smoke]: the smoke profile.

    python -m pursamere_fast.attacks.protocol run --protocol P [--smoke] [--score S] [--data-root D] \\
        [--test-n N] [OUT]
    python -m pursamere_fast.attacks.protocol config --protocol P --score S [--data-root D] \\
        [--choice CHOICE] [--smoke] --out-dir D TEMPLATE...                 # evaluate configs in D
    python -m pursamere_fast.attacks.protocol select --protocol P [--smoke] --config D/<select>.toml \\
        --out RUN                                          # RUN/choice.json, choice.md, augment.json
    python -m pursamere_fast.attacks.protocol report --protocol P OUT  # OUT/report.md, report.png

`run` calls `train-score`, `score-quality`, `train-classifier`, `evaluate` and the steps above in
one process (a torch import per stage would cost more than a smoke run's work) and logs each
stage with its equivalent command line, so that any stage can be rerun alone.

Resolving a template: the protocol's [pursamere] and [adp] tables go under the template's
(the template's keys win), the protocol's score and data factories with the score file and
the data directory fill score, data, [score_kwargs] and [data_kwargs], and a [[defence]] entry
with `choice = "sam"`, `"nosam"` or `"adp"` takes the selection's choice for that group; a
`rho` in a PurSAMERE entry moves the ball to that radius and scales the SAM radius with it
(the grid's r is a fraction of rho). `--smoke` then applies the protocol's [smoke] table: its
n and batch_size, every [[attack]]'s steps capped at max_steps (Square's queries at
max_queries), and its [smoke.pursamere] and [smoke.adp] fields over every PurSAMERE and ADP
setting; [smoke.train], [smoke.train_score], [smoke.score_quality] and [smoke.selection] go
over their tables, so that the same pipeline runs on a handful of synthetic images.

Selection rule (`select`, written in the protocol file before the run): on the held-out
images, each grid point's robust accuracy is the worst case over the selection suite's
members (the selection template's [[attack]] array). Separately for PurSAMERE with SAM (r >
0), PurSAMERE without SAM (r = 0) and, when the grid has ADP points, ADP: among the points
whose clean accuracy is at most clean_tol below the undefended classifier's (or one image,
whichever is larger), keep those whose worst case is at most robust_tol below the best of
them and take the cheapest (score evaluations per purification); ties go to the higher worst
case, then the higher clean accuracy, then the earlier point of the grid
(`sweep.choose_config`).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import checks
from ..cli import ArgumentParser, existing_dir, existing_file, integer, option_errors
from .cli import _number_or_text, load_object, load_toml
from .defences import check_settings
from .runner import _all_rows
from .stats import wilson_interval
from .suite import paired_robust, robust_per_image, summarise_dir
from .sweep import choose_config

# The selection's groups, each chosen separately: PurSAMERE with and without SAM (every grid
# has both) and ADP (when the grid has ADP points: the baseline re-tuned on the same images).
GROUPS = {"sam": "PurSAMERE, SAM on (r > 0)", "nosam": "PurSAMERE, SAM off (r = 0)", "adp": "ADP"}
_REQUIRED = ("sam", "nosam")
_KIND = {"sam": "pursamere", "nosam": "pursamere", "adp": "adp"}
CHOICE, CHOICE_MD, AUGMENT = "choice.json", "choice.md", "augment.json"
CLASSIFIERS = ("clean", "aug")
DATASETS = ("fashion-mnist", "cifar10")
# The worst case enters `choose_config` as an attack label of its own.
_WORST, _CLEAN = "worst case", "clean"
# The verdicts' significance level (exact McNemar, two-sided).
LEVEL = 0.05


# ---------------------------------------------------------------------------------- the protocol file

def _table(cfg: Mapping, key: str, where: str) -> dict:
    value = cfg.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"[{key}] in {where} must be a table, got {value!r}")
    return dict(value)


def spec(protocol: Mapping) -> dict:
    """The protocol's [protocol] table, checked, with the defaults of score_arg and data_arg.

    Raises:
        ValueError: a key missing or of the wrong type, naming it.
    """
    table = _table(protocol, "protocol", "the protocol")
    out = {"score_arg": "--score", "data_arg": "--data-root", **table}
    for key in ("title", "driver", "dataset", "data", "score", "out", "select", "score_arg", "data_arg"):
        if not isinstance(out.get(key), str) or not out[key]:
            raise ValueError(f"[protocol] {key} must be a non-empty string, got {out.get(key)!r}")
    checks.choice("[protocol] dataset", out["dataset"], DATASETS)
    tests = out.get("tests")
    if not isinstance(tests, Mapping) or not tests or not all(isinstance(v, str) for v in tests.values()):
        raise ValueError(f"[protocol] tests must be a non-empty table of job = template file, got {tests!r}")
    return out


def options(protocol: Mapping, key: str, smoke: bool = False) -> dict:
    """The protocol's [key] table, with [smoke.key] over it under the smoke profile."""
    table = _table(protocol, key, "the protocol")
    if smoke:
        table.update(_table(_table(protocol, "smoke", "the protocol"), key, "the protocol's [smoke]"))
    return table


def training_options(protocol: Mapping, smoke: bool = False) -> dict:
    """The protocol's [train] table (train-classifier options, among them holdout), with
    [smoke.train] over it.

    Raises:
        ValueError: the table is missing or holdout is not an integer >= 1.
    """
    train = options(protocol, "train", smoke)
    checks.integer("[train] holdout", train.get("holdout"), 1)
    return train


def score_training_options(protocol: Mapping, smoke: bool = False) -> dict | None:
    """The protocol's [train_score] table (train-score options), with [smoke.train_score] over
    it; None when the protocol trains no score model.

    Raises:
        ValueError: the table names holdout ([train] holdout applies to both trainings).
    """
    if "train_score" not in protocol:
        return None
    table = options(protocol, "train_score", smoke)
    if "holdout" in table:
        raise ValueError("[train_score] takes no holdout: [train] holdout applies to both trainings")
    return table


def quality_options(protocol: Mapping, path: str | os.PathLike, smoke: bool = False) -> dict | None:
    """The protocol's [score_quality] table (score-quality options), with [smoke.score_quality]
    over it and its baseline made a path; None when the protocol has none.

    Raises:
        ValueError: no baseline file, or n larger than [train] holdout (the table would then
            measure on training images).
    """
    if "score_quality" not in protocol:
        return None
    table = options(protocol, "score_quality", smoke)
    baseline = Path(path).parent / str(table.get("baseline", ""))
    if not baseline.is_file():
        raise ValueError(f"[score_quality] baseline must be a score file relative to the protocol file, got "
                         f"{table.get('baseline')!r}")
    holdout = training_options(protocol, smoke)["holdout"]
    checks.integer("[score_quality] n", table.get("n"), 1, holdout)
    return {**table, "baseline": str(baseline)}


def selection_rule(protocol: Mapping, smoke: bool = False) -> dict:
    """The protocol's [selection] table (clean_tol, robust_tol), with [smoke.selection] over it.

    Raises:
        ValueError: a tolerance missing or outside [0, 1].
    """
    rule = options(protocol, "selection", smoke)
    return {k: checks.real(f"selection {k}", rule.get(k), 0, 1) for k in ("clean_tol", "robust_tol")}


def data_root(protocol_spec: Mapping, given: str | None) -> str:
    """The data directory: the given one, else (Fashion-MNIST) `data.fashion_mnist_dir()`.

    Raises:
        ValueError: none given for CIFAR-10.
    """
    if given is not None:
        return given
    if protocol_spec["dataset"] == "fashion-mnist":
        from ..data import fashion_mnist_dir

        return str(fashion_mnist_dir())
    raise ValueError(f"required for dataset {protocol_spec['dataset']}")


def check_held_out(path: str | os.PathLike, dataset: str, holdout: int) -> None:
    """Refuse a score file whose training metadata (as train-score writes it) does not show that
    the last `holdout` training images of `dataset` were left out of its training.

    Raises:
        ValueError: naming the file and what its metadata says.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            training = (f.metadata() or {}).get("training")
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file: {e}") from None
    m = json.loads(training) if training else {}
    if m.get("kind") != "score" or m.get("args", {}).get("dataset") != dataset:
        raise ValueError(f"{path} carries no train-score metadata for --dataset {dataset}, so nothing shows that "
                         f"its training left out the last {holdout} training images (the selection's)")
    if (m.get("holdout") or 0) < holdout:
        raise ValueError(f"{path} was trained with --holdout {m.get('holdout') or 0}: the last {holdout} training "
                         f"images (the selection's) were not all left out")


# ---------------------------------------------------------------------------------- configs

def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write the non-finite number {value!r} to TOML")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes); ensure_ascii=False keeps
        # non-ASCII characters as they are, which TOML allows and \\u escapes of surrogates not.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {type(value).__name__} {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def dump_toml(cfg: Mapping) -> str:
    """A TOML document of `cfg`: top-level values, then tables, then arrays of tables (one level
    deep, the shape of an evaluate config; deeper tables are written inline)."""
    def pairs(table: Mapping) -> list[str]:
        return [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items()]

    def is_array(v) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(e, Mapping) for e in v)

    lines = pairs({k: v for k, v in cfg.items() if not isinstance(v, Mapping) and not is_array(v)})
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            lines += ["", f"[{_toml_key(k)}]", *pairs(v)]
    for k, v in cfg.items():
        if is_array(v):
            for entry in v:
                lines += ["", f"[[{_toml_key(k)}]]", *pairs(entry)]
    return "\n".join(lines) + "\n"


def _numbers(table: Mapping) -> dict:
    """A settings table with fractions such as "8/255" as floats."""
    return {k: _number_or_text(v) for k, v in table.items()}


def _chosen(entry: dict, choice: Mapping, where: str) -> dict:
    """A [[defence]] entry with `choice = GROUP` as the selection's choice of that group, its own
    keys on top; a PurSAMERE entry's rho scales the chosen SAM radius with the ball."""
    entry = dict(entry)
    group, name = entry.pop("choice"), entry.get("name")
    if group not in GROUPS:
        raise ValueError(f"[[defence]] {name!r} in {where}: choice must be one of {sorted(GROUPS)}, got {group!r}")
    if entry.get("kind") != _KIND[group]:
        raise ValueError(f"[[defence]] {name!r} in {where}: choice {group!r} is for kind {_KIND[group]!r}, the entry's "
                         f"kind is {entry.get('kind')!r}")
    chosen = choice.get("chosen", {}).get(group)
    if chosen is None:
        raise ValueError(f"the choice file has no chosen {group!r} config (the selection found none eligible, or "
                         f"its grid had no such point)")
    out = dict(chosen)
    if _KIND[group] == "pursamere" and "rho" in entry:
        rho = checks.real(f"rho of [[defence]] {name!r}", _number_or_text(entry["rho"]), positive=True)
        out["sam_radius"] = chosen["sam_radius"] / chosen["rho"] * rho
    return {**out, **entry}


def resolve(template: Mapping, protocol: Mapping, *, score: str, data_root: str, holdout: int,
            choice: Mapping | None = None, smoke: bool = False, where: str = "template") -> dict:
    """The evaluate config of a template (see the module docstring).

    Args:
        template: the template TOML as read.
        protocol: the protocol TOML as read.
        score: the score file ([score_kwargs] path).
        data_root: the data directory ([data_kwargs] root).
        holdout: the validation split's size ([data_kwargs] holdout, part "validation" only).
        choice: the selection's choice.json, for [[defence]] entries with a `choice` key.
        smoke: apply the protocol's [smoke] table.
        where: the template's name, for messages.

    Returns:
        The config, ready for `dump_toml`.

    Raises:
        ValueError: a malformed table or entry, or a `choice` entry without a choice (naming it).
    """
    factories = spec(protocol)
    cfg = copy.deepcopy(dict(template))
    cfg.setdefault("score", factories["score"])
    cfg.setdefault("data", factories["data"])
    for key in ("pursamere", "adp"):
        cfg[key] = {**_table(protocol, key, "the protocol"), **_table(cfg, key, where)}
    cfg["score_kwargs"] = {**_table(cfg, "score_kwargs", where), "path": os.path.abspath(score)}
    data = {**_table(cfg, "data_kwargs", where), "root": os.path.abspath(data_root)}
    if data.get("part") == "validation":
        data["holdout"] = checks.integer("holdout", holdout, 1)
    cfg["data_kwargs"] = data
    defences = []
    for entry in cfg.get("defence", []):
        if "choice" in entry:
            if choice is None:
                raise ValueError(f"[[defence]] {entry.get('name')!r} in {where} takes the selection's choice: "
                                 f"pass --choice")
            entry = _chosen(entry, choice, where)
        defences.append(entry)
    if defences:
        cfg["defence"] = defences
    if smoke:
        _shrink(cfg, _table(protocol, "smoke", "the protocol"))
    return cfg


def _shrink(cfg: dict, smoke: Mapping) -> None:
    """Apply the smoke profile to a resolved config, in place."""
    for key in ("n", "batch_size"):
        if key in smoke:
            cfg[key] = smoke[key]
    caps = {"square": smoke.get("max_queries"), "other": smoke.get("max_steps")}
    for attack in cfg.get("attack", []):
        cap = caps["square" if attack.get("attack") == "square" else "other"]
        if cap is not None and "steps" in attack:
            attack["steps"] = min(attack["steps"], cap)
    for kind in ("pursamere", "adp"):
        fields = _table(smoke, kind, "the protocol's [smoke]")
        cfg[kind].update(fields)
        for entry in cfg.get("defence", []):
            if entry.get("kind") == kind:
                entry.update(fields)


# ---------------------------------------------------------------------------------- selection

def _grid(config: Mapping) -> dict[str, tuple[str, dict, int]]:
    """{name: (group, the entry's fields, score evaluations per purification)} of the config's
    PurSAMERE and ADP [[defence]] entries, each over its kind's base table."""
    from pursamere_fast import PurifyConfig

    from ..purifiers import ADPPurifier

    bases = {kind: _numbers(config.get(kind, {})) for kind in ("pursamere", "adp")}
    points = {}
    for e in config.get("defence", []):
        kind = e.get("kind")
        if kind not in bases:
            continue
        fields = _numbers({k: v for k, v in e.items() if k not in ("name", "kind")})
        if kind == "pursamere":
            cfg = PurifyConfig().with_overrides(**{**bases[kind], **fields})
            points[e["name"]] = ("sam" if cfg.sam_radius > 0 else "nosam", fields, cfg.score_evaluations)
        else:
            # One score evaluation per ascent step. ADPPurifier checks the fields and knows the
            # default steps; the identity stands in for the score, which it does not call here.
            settings = {**bases[kind], **fields}
            try:
                check_settings("adp", settings)
            except ValueError as err:
                raise ValueError(f"[[defence]] {e['name']!r}: {err}") from None
            adp = ADPPurifier(lambda y, sigma: y, **settings)
            points[e["name"]] = ("adp", fields, adp.steps)
    return points


def select(summary: Mapping, config: Mapping, rule: Mapping) -> dict:
    """Apply the selection rule to a finished validation suite.

    Args:
        summary: the suite's summary (`suite.summarise_dir`).
        config: the resolved selection config: its "none" defence and its PurSAMERE and ADP
            [[defence]] entries (the grid) over its [pursamere] and [adp] bases, and n.
        rule: clean_tol and robust_tol (`selection_rule`).

    Returns:
        {"rule", "n", "groups": {group: `choose_config`'s result}, "chosen": {group: the chosen
        entry's fields (for PurSAMERE rho, sam_radius, steps_per_sigma, n_samples as the grid
        sets them) or None}}; the ADP group only when the grid has ADP points.

    Raises:
        ValueError: a defence of the config lacks rows for some of the n images (the run is not
            finished), or the grid has no PurSAMERE point of a group.
    """
    n = config.get("n")
    by_name = {e["defence"]: e for e in summary["defences"]}
    points = _grid(config)
    for name in ["none", *points]:
        got = by_name.get(name, {}).get("n", 0)
        if got != n:
            raise ValueError(f"the selection needs the suite's rows of all n = {n} images; defence {name!r} has "
                             f"{got}: finish the evaluation first")
    entries = []
    for name, e in by_name.items():
        entries += [{"defence": name, "attack": _CLEAN, "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["clean_acc"], "robust_ci": e["clean_ci"]},
                    {"defence": name, "attack": _WORST, "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["robust_acc"], "robust_ci": e["robust_ci"]}]
    out = {"rule": dict(rule), "n": n, "groups": {}, "chosen": {}}
    for group in GROUPS:
        costs = {name: cost for name, (g, _, cost) in points.items() if g == group}
        if not costs:
            if group in _REQUIRED:
                raise ValueError(f"the grid has no {group!r} point (sam_radius {'> 0' if group == 'sam' else '= 0'})")
            continue
        result = choose_config(entries, costs, undefended="none", clean=_CLEAN, robust=_WORST, tiebreak=_CLEAN,
                               clean_tol=rule["clean_tol"], robust_tol=rule["robust_tol"])
        out["groups"][group] = result
        out["chosen"][group] = None if result["chosen"] is None else points[result["chosen"]][1]
    return out


def _pct(acc, ci=None) -> str:
    return f"{100 * acc:.1f}" + ("" if ci is None else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]")


def choice_markdown(choice: Mapping) -> str:
    """Markdown of a `select` result: per group, every point and the chosen one."""
    rule = choice["rule"]
    lines = [f"Selection on n = {choice['n']} held-out images; rule: clean accuracy at most "
             f"{100 * rule['clean_tol']:.1f} pp (or one image) below the undefended classifier's, then the "
             f"cheapest point within {100 * rule['robust_tol']:.1f} pp of the best worst case over the "
             f"selection suite's members."]
    for group, result in choice["groups"].items():
        lines += ["", f"**{GROUPS[group]}** (undefended clean {_pct(result['undefended_clean'])}%; chosen: "
                  f"{result['chosen']})", "",
                  "| point | score evals / purification | n | clean % | worst-case robust % [95% CI] "
                  "| eligible | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['defence']} | {r['cost']} | {r['n']} | {_pct(r['clean_acc'])} "
                         f"| {_pct(r['robust_acc'], r['robust_ci'])} | {'yes' if r['eligible'] else 'no'} "
                         f"| {'**yes**' if r['defence'] == result['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def augmentation_config(config: Mapping, choice: Mapping) -> dict:
    """The PurifyConfig fields of the augmented classifier's training purification: the
    selection config's [pursamere] base with the chosen SAM-off point (train-classifier forces
    sam_radius = 0, as the paper purifies its training data without SAM).

    Raises:
        ValueError: the choice has no SAM-off config.
    """
    chosen = choice["chosen"].get("nosam")
    if chosen is None:
        raise ValueError("no SAM-off config was eligible, so there is none to purify the training data with")
    return {**_numbers(config.get("pursamere", {})), **chosen}


# ---------------------------------------------------------------------------------- report

def _verdict(a: str, b: str, pair: Mapping) -> str:
    if pair["p"] >= LEVEL:
        return f"no difference shown (p = {pair['p']:.3g})"
    return f"**{a if pair['a_only'] > pair['b_only'] else b}** more robust (p = {pair['p']:.3g})"


# The paper's claims (issue 13), each tested by the paired comparisons `_comparisons` makes.
CLAIMS = {
    "(i)": "far above the undefended classifier under BPDA-det",
    "(ii)": "SAM improves robustness",
    "(iii)": "at least as robust as the stochastic baseline (ADP) under the deterministic white-box attacks",
    "(iv)": "purified augmentation helps",
}


def _robust_maps(out: Path) -> dict[tuple[str, str, str, str], dict[int, bool]]:
    """{(classifier, job, measure, defence): {index: robust}} of every test job: a suite job's
    measure is its worst case (on the images every member has reached: a running job's last
    batch may have the cheap members' rows only), a single-attack job's each attack (its
    `robust_correct`)."""
    maps = {}
    for path in sorted(out.glob("test/*/*/summary.json")):
        clf, job = path.parent.parent.name, path.parent.name
        summary = json.loads(path.read_text())
        rows = _all_rows(str(path.parent))
        if "paired" in summary:  # a suite job
            for e in summary["defences"]:
                members = [_CLEAN, *(m["member"] for m in e["members"])]
                maps[(clf, job, _WORST, e["defence"])] = robust_per_image(rows, e["defence"], members)
            continue
        for r in rows:
            if r["threat"] != _CLEAN:
                maps.setdefault((clf, job, r["attack"], r["defence"]), {})[r["index"]] = r["robust_correct"]
    return maps


def _comparisons(maps: Mapping) -> list[tuple]:
    """(claim, classifier, job, measure, first, second, paired) for each claim: under a
    deterministic white-box measure (the suite's worst case, BPDA-det), (i) each PurSAMERE
    defence against the undefended classifier, (iii) against ADP and (iv) each defence with the
    augmented against the clean classifier; under every measure (ii) each PurSAMERE defence with
    SAM against its twin without (the same name with -nosam for -sam). A pair without a common
    image (a job not yet run for one side) is left out, not tallied as "no difference"."""
    out = []
    for (clf, job, measure, d), robust in sorted(maps.items()):
        det = measure == _WORST or measure.startswith("bpda-")
        other = {name: maps.get((clf, job, measure, name)) for name in ("none", "adp")}
        if d.startswith("pursamere"):
            if det and other["none"] is not None:
                out.append(("(i)", clf, job, measure, d, "none", paired_robust(robust, other["none"])))
            twin = d.replace("pursamere-sam", "pursamere-nosam")
            if twin != d and (clf, job, measure, twin) in maps:
                out.append(("(ii)", clf, job, measure, d, twin, paired_robust(robust, maps[(clf, job, measure, twin)])))
            if det and other["adp"] is not None:
                out.append(("(iii)", clf, job, measure, d, "adp", paired_robust(robust, other["adp"])))
        if clf == "aug" and det and d != "none" and ("clean", job, measure, d) in maps:
            out.append(("(iv)", "aug vs clean", job, measure, f"{d}: aug", "clean classifier",
                        paired_robust(robust, maps[("clean", job, measure, d)])))
    return sorted((c for c in out if c[6]["n"]), key=lambda c: list(CLAIMS).index(c[0]))


def verdicts(maps: Mapping) -> list[str]:
    """Markdown lines: for each of the paper's claims (`CLAIMS`), a tally of its paired
    comparisons (`_comparisons` of `_robust_maps`: exact McNemar on the images both sides have,
    at the 5% level) and every comparison with its verdict. A claim's tally counts its
    comparisons, which share images and are not independent: it is a summary, not a test."""
    comps = _comparisons(maps)
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
    """{(job, measure): {(classifier, defence): (robust images, n)}} of `_robust_maps`, jobs in
    the driver's order, each job's measures sorted; entries without an image left out."""
    panels: dict = {}
    for (clf, job, measure, d), robust in maps.items():
        if robust:
            panels.setdefault((job, measure), {})[(clf, d)] = (sum(robust.values()), len(robust))
    order = {j: i for i, j in enumerate(_JOBS)}
    return {k: panels[k] for k in sorted(panels, key=lambda k: (order.get(k[0], len(order)), k))}


def _defence_order(name: str) -> tuple:
    """The undefended classifier, ADP, PurSAMERE with SAM, without; rho in numeric order."""
    group = 0 if name == "none" else 1 if name == "adp" else 2 if "-sam" in name else 3
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
        defences = sorted({d for _, d in cells}, key=_defence_order)[::-1]  # the first at the top
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
    maps = _robust_maps(out)
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
            lines.append(f"| train_{name} | {m['train_n']} | {_pct(m['test_accuracy'])} ({m['test_n']}) |")
    choice = out / "select" / CHOICE_MD
    if choice.is_file():
        lines += ["", "## Selection", "", choice.read_text()]
    if figure and plot_report(maps, out / figure):
        lines += ["", "## Robust accuracy", "", f"![robust accuracy of every test measure]({figure})"]
    for summary in sorted(out.glob("test/*/*/summary.md")):
        lines += ["", f"## {summary.parent.parent.name} classifier: {summary.parent.name}", "", summary.read_text()]
    lines += verdicts(maps)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- the run

def _argv(table: Mapping) -> list[str]:
    """Command-line options from a table: key -> --key value (a true flag alone, a false one dropped)."""
    out = []
    for key, value in table.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out += [flag] if value else []
        else:
            out += [flag, str(value)]
    return out


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _stage(out: Path, name: str, command: str, func, argv: Sequence[str]) -> None:
    """Run one stage in this process, its output appended to out/logs/<name>.log (each run starts
    with its UTC time and the equivalent command, to rerun it alone): appended, because a stage
    resumed over sessions (or stopped to be rerun at a larger n) keeps the log of its earlier
    passes. A failure prints the log's end and exits. A stage's --threads (score-quality sets 1)
    does not carry over to the next."""
    log = out / "logs" / f"{name}.log"
    print(f"{_now()} {name} ...", flush=True)
    t0, threads = time.monotonic(), torch.get_num_threads()
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        if f.tell():
            print()
        print(f"# {_now()}\n$ {command} {shlex.join(argv)}", flush=True)
        try:
            code = func(list(argv))
        except SystemExit as e:  # argparse's one-line errors end a command so
            code = e.code
        except Exception:  # noqa: BLE001 - the traceback goes to the stage's log, the driver stops below
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
    if code not in (0, None):
        sys.stderr.write("\n".join(log.read_text().splitlines()[-5:]) + f"\nstage {name} failed (log: {log})\n")
        raise SystemExit(1)
    print(f"{_now()} {name} done in {time.monotonic() - t0:.0f} s", flush=True)


def _sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a safetensors file's tensors (names and bytes), not of its header: the trainers
    rewrite the header (timings) each time they run, also when a finished run only resumes."""
    from safetensors.torch import load_file

    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(os.fspath(path)).items()):
        digest.update(name.encode())
        digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _digest(path: str | os.PathLike) -> str:
    return _weights_sha256(path) if os.fspath(path).endswith(".safetensors") else _sha256(path)


def _pin(run: Path, inputs: Mapping[str, str]) -> None:
    """Record what a run's results depend on (run/inputs.json: weights' sha256, settings) and
    refuse to continue it with others: evaluate's manifest knows the settings, not the weights.

    Raises:
        ValueError: run holds results made with other inputs (one line, naming inputs.json).
    """
    path = run / "inputs.json"
    if path.is_file() and json.loads(path.read_text()) != dict(inputs):
        raise ValueError(f"{run} holds results made with other weights or settings than "
                         f"{', '.join(f'{k} {str(v)[:12]}' for k, v in inputs.items())} ({path}); remove {run} to "
                         f"redo it")
    run.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(inputs), indent=1))


def _run_cmd(argv: Sequence[str]) -> int:
    from ..cli import device as device_type
    from ..train import main_train_classifier, main_train_score
    from ..train.quality import main as main_score_quality
    from .cli import main_evaluate

    p = ArgumentParser(prog="python -m pursamere_fast.attacks.protocol run",
                       description="An evaluation protocol (docs/protocol.md): train the score model (if the "
                                   "protocol does), the clean classifier, choose the PurSAMERE (and ADP) "
                                   "configurations on held-out images, train the augmented classifier, evaluate "
                                   "both on the test set, write OUT_DIR/report.md. Rerunning continues.")
    p.add_argument("out", metavar="OUT_DIR", nargs="?", default=None,
                   help="results (default: the protocol's [protocol] out, with _smoke appended under --smoke)")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--score", type=existing_file, default=None,
                   help="the score file (required unless the protocol trains one: then a finished train-score "
                        "file whose metadata shows the same held-out images, instead of the train_score stage)")
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="the data directory (Fashion-MNIST: default $PURSAMERE_FASHION_MNIST, then Debian's)")
    p.add_argument("--smoke", action="store_true", help="the smoke profile ([smoke] of the protocol)")
    p.add_argument("--device", type=lambda t: t if t == "auto" else device_type(t), default="auto",
                   help="cpu, cuda, cuda:<index> or auto (cuda when available)")
    p.add_argument("--test-n", type=integer(1), default=None,
                   help="this pass evaluates at most the first TEST_N images of every test job (each job of "
                        "both classifiers, then the report, at that n); rerun with a larger one or without it to "
                        "extend the same runs (a row depends only on its image)")
    args = p.parse_args(argv)
    configs = Path(args.protocol).parent
    with option_errors(p, "--protocol"):
        protocol = load_toml(args.protocol)
        names = spec(protocol)
        train = training_options(protocol, args.smoke)
        train_score = score_training_options(protocol, args.smoke)
        quality = quality_options(protocol, args.protocol, args.smoke)
        selection_rule(protocol, args.smoke)  # checked now; the choose stage applies it
        templates = {name: load_toml(configs / name) for name in [names["select"], *names["tests"].values()]}
    p.prog = names["driver"]
    holdout = train["holdout"]
    if args.score is None and train_score is None:
        p.error(f"argument {names['score_arg']}: required (the protocol trains no score model)")
    # The inputs are checked before hours of training: the score loads, the test images read.
    if args.score is not None:
        with option_errors(p, names["score_arg"]):
            load_object(names["score"], {"path": args.score})
            if train_score is not None:
                check_held_out(args.score, names["dataset"], holdout)
    with option_errors(p, names["data_arg"]):
        root = data_root(names, args.data_root)
        load_object(names["data"], {"root": root, "part": "test"})
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    out = Path(args.out or (names["out"] + ("_smoke" if args.smoke else "")))
    for sub in ("logs", "models", "configs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    data = ["--dataset", names["dataset"], "--data-root", root]

    def pin(run: Path, inputs: Mapping[str, str]) -> None:
        with option_errors(p, "OUT_DIR"):
            _pin(run, inputs)

    score = args.score
    if score is None:
        score = str(out / "models" / "score.safetensors")
        _stage(out, "train_score", "pursamere-fast train-score", main_train_score,
               [*data, *_argv(train_score), "--holdout", str(holdout), "--no-progress",
                "--out", str(out / "train_score"), "--export", score])
    score_digest = {"score": _digest(score)}
    if quality is not None:
        run = out / "score_quality"
        extra = _argv({k: v for k, v in quality.items() if k != "baseline"})
        pin(run, {"baseline": _digest(quality["baseline"]), **score_digest, "options": shlex.join(extra)})
        if not (run / "quality.md").is_file():
            _stage(out, "score_quality", "pursamere-fast score-quality", main_score_quality,
                   ["--score", quality["baseline"], "--score", score, "--split", "validation",
                    "--data-root", root, *extra, "--out", str(run)])
    paths = {"score": score, "data_root": root, "holdout": holdout, "smoke": args.smoke}

    def write_config(name: str, choice: Mapping | None = None, cap: int | None = None) -> str:
        path = out / "configs" / name
        with option_errors(p, "--protocol"):
            cfg = resolve(templates[name], protocol, choice=choice, where=name, **paths)
            if cap is not None and isinstance(cfg.get("n"), int):
                cfg["n"] = min(cfg["n"], cap)
            if cfg.get("data_kwargs", {}).get("part") == "validation":
                checks.integer(f"n of {name} (at most [train] holdout)", cfg.get("n"), 1, holdout)
        path.write_text(dump_toml(cfg))
        return str(path)

    arch = train.get("arch", "smallcnn")

    def train_classifier(name: str, *extra: str) -> None:
        _stage(out, f"train_{name}", "pursamere-fast train-classifier", main_train_classifier,
               [*data, *_argv(train), "--device", device, "--no-progress", "--out", str(out / f"train_{name}"),
                "--export", str(out / "models" / f"{arch}_{name}.safetensors"), *extra])

    def evaluate(name: str, config: str, run: Path, classifier: str) -> None:
        weights = out / "models" / f"{arch}_{classifier}.safetensors"
        pin(run, {**score_digest, "classifier": _weights_sha256(weights)})
        _stage(out, name, "pursamere-fast evaluate", main_evaluate,
               ["--config", config, "--out", str(run), "--device", device, "--classifier", str(weights)])

    select_config = write_config(names["select"])
    train_classifier("clean")
    evaluate("select", select_config, out / "select", "clean")
    _stage(out, "choose", "python -m pursamere_fast.attacks.protocol select", _select_cmd,
           ["--protocol", args.protocol, *(["--smoke"] if args.smoke else []), "--config", select_config,
            "--out", str(out / "select")])
    sys.stdout.write((out / "select" / CHOICE_MD).read_text())
    choice = json.loads((out / "select" / CHOICE).read_text())
    augment = json.loads((out / "select" / AUGMENT).read_text())
    pin(out / "train_aug", score_digest)  # its hyperparameters pin the rest
    train_classifier("aug", "--purify-score", score, "--purify-config", json.dumps(augment))
    tests = {job: write_config(name, choice, args.test_n) for job, name in names["tests"].items()}
    # Job by job, both classifiers each: a pass that stops early leaves complete comparisons.
    for job, config in tests.items():
        for classifier in CLASSIFIERS:
            evaluate(f"test_{classifier}_{job}", config, out / "test" / classifier / job, classifier)
    write_report(out, names["title"])
    print(f"{_now()} done: {out / 'report.md'}")
    return 0


# ---------------------------------------------------------------------------------- command line

def _config_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m pursamere_fast.attacks.protocol config",
                       description="Resolve protocol templates into evaluate configs.")
    p.add_argument("templates", nargs="+", type=existing_file, help="template TOML files (configs/<name>_*.toml)")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--score", type=existing_file, required=True, help="the score file")
    p.add_argument("--data-root", type=existing_dir, default=None,
                   help="the data directory (Fashion-MNIST: default $PURSAMERE_FASHION_MNIST, then Debian's)")
    p.add_argument("--choice", type=existing_file, default=None, help="the selection's choice.json")
    p.add_argument("--smoke", action="store_true", help="apply the protocol's [smoke] table")
    p.add_argument("--out-dir", required=True, help="where the configs go (same file names)")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        protocol = load_toml(args.protocol)
        names = spec(protocol)
        holdout = training_options(protocol, args.smoke)["holdout"]
    with option_errors(p, "--data-root"):
        root = data_root(names, args.data_root)
    choice = None
    if args.choice:
        with option_errors(p, "--choice"):
            choice = json.loads(Path(args.choice).read_text())
    with option_errors(p, "--out-dir"):
        os.makedirs(args.out_dir, exist_ok=True)
    for template in args.templates:
        with option_errors(p, "templates"):
            cfg = resolve(load_toml(template), protocol, score=args.score, data_root=root, holdout=holdout,
                          choice=choice, smoke=args.smoke, where=template)
            Path(args.out_dir, os.path.basename(template)).write_text(dump_toml(cfg))
    return 0


def _select_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m pursamere_fast.attacks.protocol select",
                       description="Apply the protocol's selection rule to the finished validation suite; write "
                                   "choice.json, choice.md and augment.json (the augmented classifier's purification).")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml")
    p.add_argument("--config", type=existing_file, required=True, help="the resolved selection config")
    p.add_argument("--out", type=existing_dir, required=True, help="the selection run's directory")
    p.add_argument("--smoke", action="store_true", help="the smoke profile's rule ([smoke.selection])")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        rule = selection_rule(load_toml(args.protocol), args.smoke)
    with option_errors(p, "--config"):
        config = load_toml(args.config)
    with option_errors(p, "--out"):
        choice = select(summarise_dir(args.out), config, rule)
    Path(args.out, CHOICE).write_text(json.dumps(choice, indent=1))
    Path(args.out, CHOICE_MD).write_text(choice_markdown(choice))
    sys.stdout.write(choice_markdown(choice))
    missing = [group for group, chosen in choice["chosen"].items() if chosen is None]
    if missing:
        p.error(f"argument --out: no eligible config for {', '.join(missing)} (see {CHOICE_MD})")
    Path(args.out, AUGMENT).write_text(json.dumps(augmentation_config(config, choice)))
    return 0


def _report_cmd(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="python -m pursamere_fast.attacks.protocol report",
                       description="Write OUT/report.md (and its figure, report.png): score model, classifiers, "
                                   "selection, every evaluation summary and the verdicts.")
    p.add_argument("out", type=existing_dir, help="the protocol's output directory")
    p.add_argument("--protocol", type=existing_file, required=True, help="configs/<name>_protocol.toml (its title)")
    args = p.parse_args(argv)
    with option_errors(p, "--protocol"):
        title = spec(load_toml(args.protocol))["title"]
    sys.stdout.write(write_report(args.out, title))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `run` (configs/run_<name>.sh), `config`, `select` or `report` (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": _run_cmd, "config": _config_cmd, "select": _select_cmd, "report": _report_cmd}
    if not argv or argv[0] not in commands:
        sys.stderr.write("usage: python -m pursamere_fast.attacks.protocol {run,config,select,report} [options]\n")
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
