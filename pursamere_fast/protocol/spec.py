"""The protocol file (configs/<name>_protocol.toml): its tables checked, its templates resolved into
`pursamere-fast evaluate` configs and written as TOML (see `pursamere_fast.protocol`)."""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType

from .. import checks
from ..attacks.loading import number_or_text

# The selection's groups, each chosen separately: PurSAMERE with and without SAM (every grid
# has both) and ADP (when the grid has ADP points: the baseline re-tuned on the same images).
GROUPS = {"sam": "PurSAMERE, SAM on (r > 0)", "nosam": "PurSAMERE, SAM off (r = 0)", "adp": "ADP"}
REQUIRED_GROUPS = ("sam", "nosam")
_KIND = {"sam": "pursamere", "nosam": "pursamere", "adp": "adp"}
CHOICE, CHOICE_MD, AUGMENT = "choice.json", "choice.md", "augment.json"
CLASSIFIERS = ("clean", "aug")
DATASETS = ("fashion-mnist", "cifar10")
# The worst case enters `choose_config` as an attack label of its own.
WORST, CLEAN = "worst case", "clean"
# The verdicts' significance level (exact McNemar, two-sided).
LEVEL = 0.05


# ---------------------------------------------------------------------------------- the protocol file

def _table(cfg: Mapping, key: str, where: str) -> dict:
    value = cfg.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"[{key}] in {where} must be a table, got {value!r}")
    return dict(value)


@dataclass(frozen=True)
class ProtocolSpec:
    """The protocol's [protocol] table, checked (see `pursamere_fast.protocol` for each key).

    Attributes:
        title: the report's heading. driver: the script that runs it, named in its messages.
        dataset: `--dataset` of the trainers (one of DATASETS). data, score: the evaluate data
            and score factories. out: the default output directory. select: the selection
            template; tests: {job: template} of the test jobs (files next to the protocol file).
        score_arg, data_arg: how the driver names its score and data inputs in messages.
    """

    title: str
    driver: str
    dataset: str
    data: str
    score: str
    out: str
    select: str
    tests: Mapping[str, str]
    score_arg: str = "--score"
    data_arg: str = "--data-root"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "tests" and (not isinstance(value, str) or not value):
                raise ValueError(f"[protocol] {f.name} must be a non-empty string, got {value!r}")
        checks.choice("[protocol] dataset", self.dataset, DATASETS)
        tests = self.tests
        if not isinstance(tests, Mapping) or not tests or not all(isinstance(v, str) for v in tests.values()):
            raise ValueError(f"[protocol] tests must be a non-empty table of job = template file, got {tests!r}")
        object.__setattr__(self, "tests", MappingProxyType(dict(tests)))


def spec(protocol: Mapping) -> ProtocolSpec:
    """The protocol's [protocol] table as a `ProtocolSpec`.

    Raises:
        ValueError: a key missing, unknown or of the wrong type, naming it.
    """
    table = _table(protocol, "protocol", "the protocol")
    names = [f.name for f in fields(ProtocolSpec)]
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise ValueError(f"[protocol] has unknown keys {unknown}; valid: {', '.join(names)}")
    for key in names:
        if key not in table and key not in ("score_arg", "data_arg"):
            what = "a non-empty table of job = template file" if key == "tests" else "a non-empty string"
            raise ValueError(f"[protocol] {key} must be {what}, got None")
    return ProtocolSpec(**table)


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


def data_root(protocol_spec: ProtocolSpec, given: str | None) -> str:
    """The data directory: the given one, else (Fashion-MNIST) `data.fashion_mnist_dir()`.

    Raises:
        ValueError: none given for CIFAR-10.
    """
    if given is not None:
        return given
    if protocol_spec.dataset == "fashion-mnist":
        from ..data import fashion_mnist_dir

        return str(fashion_mnist_dir())
    raise ValueError(f"required for dataset {protocol_spec.dataset}")


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


def numeric(table: Mapping) -> dict:
    """A settings table with fractions such as "8/255" as floats."""
    return {k: number_or_text(v) for k, v in table.items()}


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
        rho = checks.real(f"rho of [[defence]] {name!r}", number_or_text(entry["rho"]), positive=True)
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
    cfg.setdefault("score", factories.score)
    cfg.setdefault("data", factories.data)
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
