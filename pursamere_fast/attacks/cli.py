"""Command lines `pursamere-fast evaluate` and `pursamere-fast sanity` (argparse + a TOML `--config`).

Every long option can also be a key of the TOML file (dashes or underscores); flags given
on the command line win over the file. Models and data come from factories named
"package.module:factory[.field]". A config's factories are code: they are imported and
called, so only run configs you trust.

A bad value ends the command with one line, `prog: error: argument --option: ...`, and exit
code 2: argparse checks single values, `option_errors` the values that can only be checked
when used (factories, TOML keys and tables, KEY=VALUE overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import checks
from ..cli import (ArgumentParser, choice, device, existing_file, integer, listed, number, option_errors, random_seed,
                   real)
from ..purify import BACKENDS
from .defences import KINDS, DefenceContext, build_defence, check_keywords, kind_names
from .pgd import NORMS
from .runner import _dist, _get, _len, evaluate, markdown_table
from .sanity import run_sanity, sanity_markdown
from .suite import autoattack_check, autoattack_markdown, default_suite, run_suite, suite_markdown, summarise_dir
from .threats import EOT_GRAD_MODE, THREATS, AttackSpec, Defence, grid

DEFENCES = kind_names()
_TABLES = ("classifier_kwargs", "score_kwargs", "data_kwargs", *DEFENCES[1:], "attack", "defence")
_ARRAYS = ("attack", "defence")
_ATTACK_FIELDS = tuple(f.name for f in dataclasses.fields(AttackSpec))


def load_toml(path) -> dict:
    """Read a TOML file with tomllib (Python >= 3.11) or its backport tomli (Python 3.10).

    Raises:
        ValueError: naming the file, when it cannot be read or is not valid TOML.
    """
    try:
        import tomllib
    except ImportError:
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # TOMLDecodeError, or bytes that are not UTF-8
        raise ValueError(f"{path} is not valid TOML: {e}") from None


def load_object(spec: str, kwargs: dict | None = None):
    """Build an object from "package.module:factory" or "package.module:factory.field".

    The factory is called with kwargs (an attribute that is not callable is used as is);
    ".field" then takes that attribute of the result, e.g.
    "pursamere_fast.pretrained:fashion_mnist.classifier". The module is imported and the
    factory called: only load specs you trust.

    Raises:
        ValueError: when spec is not of that form, cannot be imported, lacks the field, or
            the factory takes no argument of one of kwargs' names.
    """
    import importlib

    mod, _, attr = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    name, *fields = attr.split(".")
    if not mod or mod.startswith(".") or not name or spec.count(":") != 1:
        raise ValueError(f"factory must look like 'package.module:factory[.field]', got {spec!r}")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from None
    if callable(obj):
        check_keywords(repr(spec), obj, kwargs or {})
        obj = obj(**(kwargs or {}))
    for f in fields:
        if not hasattr(obj, f):
            raise ValueError(f"cannot load {spec!r}: {type(obj).__name__} has no attribute {f!r}")
        obj = getattr(obj, f)
    return obj


def load_model(spec: str, kwargs: dict | None = None):
    """A network from a .safetensors file written by `nets.save_net`, else `load_object(spec, kwargs)`.

    Raises:
        ValueError: as `load_object` or `nets.load_net`, or kwargs given with a file.
    """
    if isinstance(spec, str) and spec.endswith(".safetensors"):
        from ..nets import load_net

        if kwargs:
            raise ValueError(f"{spec!r} is a weights file: it takes no keyword arguments, got {sorted(kwargs)}")
        if not os.path.isfile(spec):
            raise ValueError(f"no such file: {spec!r}")
        return load_net(spec)
    return load_object(spec, kwargs)


def _number_or_text(value):
    """A string such as "0.1" or "8/255" as a float; any other value unchanged, for its own check to judge."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return number(value)
    return value


def _kv(items) -> dict:
    """KEY=VALUE strings (VALUE is JSON, a fraction such as 8/255, or text), or a TOML table."""
    if isinstance(items, dict):
        return {k: _number_or_text(v) for k, v in items.items()}
    out = {}
    for it in items or []:
        k, eq, v = it.partition("=")
        if not eq or not k.strip():
            raise ValueError(f"expected KEY=VALUE, got {it!r}")
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = _number_or_text(v)
    return out


def attack_specs(entries) -> list[AttackSpec]:
    """AttackSpecs from a TOML [[attack]] array; eps and alpha may be fractions such as "8/255".

    Raises:
        ValueError: an entry that is not a table, has an unknown key or an invalid value.
    """
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"[[attack]] must be a non-empty array of tables, got {entries!r}")
    specs = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ValueError(f"[[attack]] entry {i} must be a table, got {entry!r}")
        unknown = sorted(set(entry) - set(_ATTACK_FIELDS))
        if unknown:
            raise ValueError(f"[[attack]] entry {i} has unknown keys {unknown}; valid: {', '.join(_ATTACK_FIELDS)}")
        try:
            specs.append(AttackSpec(**{k: _number_or_text(v) if k in ("eps", "alpha") else v
                                       for k, v in entry.items()}))
        except ValueError as e:
            raise ValueError(f"[[attack]] entry {i}: {e}") from None
    return specs


def _alpha(value):
    """argparse type: a step size > 0, or "none" for the default rule."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return real(positive=True)(value)


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=existing_file,
                   help="TOML file; its keys are the long options (dashes or underscores), "
                        "plus tables [classifier_kwargs], [score_kwargs], [data_kwargs], "
                        f"{', '.join(f'[{k}]' for k in DEFENCES[1:])}, an optional [[attack]] array of AttackSpec fields and an "
                        "optional [[defence]] array of named defences (name, kind = one of "
                        f"{', '.join(DEFENCES)}, and that kind's settings), which replaces --defences. "
                        "Its factories are code that is imported and called: only run configs you trust")
    p.add_argument("--classifier", default="pursamere_fast.attacks.toy:make_classifier",
                   help="factory 'module:attr' returning the classifier nn.Module, or a .safetensors file written "
                        "by pursamere_fast.nets.save_net (e.g. by train-classifier --export)")
    p.add_argument("--score", default="pursamere_fast.attacks.toy:make_score",
                   help="factory 'module:attr' returning the score model, or a save_net .safetensors file")
    p.add_argument("--data", default="pursamere_fast.attacks.toy:synthetic_data",
                   help="factory 'module:attr' returning (images, labels) tensors or a dataset of (image, label)")
    p.add_argument("--mean", type=listed(real()), default=None,
                   help="comma-separated per-channel mean for the classifier")
    p.add_argument("--std", type=listed(real(positive=True)), default=None,
                   help="comma-separated per-channel std for the classifier")
    p.add_argument("--purify-config", default=None,
                   help="factory 'module:attr' returning the base PurifyConfig of the pursamere defence, e.g. "
                        "pursamere_fast.pretrained:fashion_mnist.config (default: PurifyConfig())")
    p.add_argument("--pursamere", action="append", default=[], metavar="KEY=VALUE",
                   help="PurifyConfig override for the pursamere defence (repeatable; VALUE is JSON or a "
                        "fraction such as 8/255)")
    for kind in DEFENCES[2:]:  # each kind's settings, e.g. --adp KEY=VALUE (the registry's kinds)
        p.add_argument(f"--{kind}", action="append", default=[], metavar="KEY=VALUE",
                       help=f"setting of the {kind} defence: {KINDS[kind].summary} (repeatable)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="purify backend")
    p.add_argument("--score-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="precision of the pursamere score network (bfloat16: autocast, for the attack and the "
                        "judge alike; recorded in the manifest)")
    p.add_argument("--norm", default="linf", choices=NORMS)
    p.add_argument("--alpha", type=_alpha, default=None, help="step size (default 2.5 * eps / steps)")
    p.add_argument("--restarts", type=integer(1), default=1)
    p.add_argument("--eot", type=integer(1), default=1, help="EoT draws (bpda_eot and exact_eot only)")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--n", type=integer(1), default=None, help="number of samples (default: all)")
    p.add_argument("--start", type=integer(0), default=0, help="first sample index")
    p.add_argument("--batch-size", type=integer(1), default=64)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _option_value(action: argparse.Action, value, where: str):
    """A TOML value for an option, checked as argparse checks the command line."""
    if action.nargs == 0:  # a flag such as --no-progress
        return checks.flag(where, value)
    if action.type is not None:
        try:
            return action.type(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{where}: {e}") from None
    if not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r}")
    if action.choices is not None:
        checks.choice(where, value, tuple(action.choices))
    return value


def _parse(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict]:
    pre, _ = parser.parse_known_args(argv)
    tables = {}
    if pre.config:
        with option_errors(parser, "--config"):
            cfg = load_toml(pre.config)
            actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
            defaults = {}
            for key, value in cfg.items():
                k = key.replace("-", "_")
                # sanity's --defence (one name) is the key "defence" there; evaluate's is the array.
                if k in _TABLES and not (k == "defence" and k in actions):
                    what = "an array of tables" if k in _ARRAYS else "a table"
                    if not isinstance(value, list if k in _ARRAYS else dict):
                        raise ValueError(f"{key!r} in {pre.config} must be {what}, got {value!r}")
                    tables[k] = value
                elif k in actions:
                    defaults[k] = _option_value(actions[k], value, f"key {key!r} of {pre.config}")
                else:
                    raise ValueError(f"unknown key {key!r} in {pre.config}")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv), tables


def _build_common(p: argparse.ArgumentParser, args, cfg) -> dict:
    with option_errors(p, "--classifier"):
        classifier = checks.function("classifier", load_model(args.classifier, cfg.get("classifier_kwargs")))
    with option_errors(p, "--data"):
        data = load_object(args.data, cfg.get("data_kwargs"))
        if not hasattr(data, "__len__"):
            raise ValueError(f"data must be (images, labels) tensors or a dataset, got {type(data).__name__}")
        size = _len(data)
    if args.start >= size:
        p.error(f"argument --start: value must be < {size} (the number of samples), got {args.start}")
    n = size - args.start if args.n is None else args.n
    if args.start + n > size:
        p.error(f"argument --n: value must be <= {size - args.start} (the samples from --start {args.start} on), "
                f"got {n}")
    with option_errors(p, "--data"):
        channels = _get(data, [args.start])[0].shape[1]
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and len(values) not in (1, channels):
            p.error(f"argument {option}: value must have one entry or one per image channel ({channels}), "
                    f"got {len(values)}")
    if args.device is not None and isinstance(classifier, nn.Module):
        classifier = classifier.to(args.device)
    return {"classifier": classifier, "data": data, "indices": list(range(args.start, args.start + n)),
            "mean": args.mean, "std": args.std, "device": args.device}


def _load_score(p: argparse.ArgumentParser, args, cfg):
    with option_errors(p, "--score"):
        score = checks.function("score", load_model(args.score, cfg.get("score_kwargs")))
    if args.device is not None and isinstance(score, nn.Module):
        score = score.to(args.device)
    return score


def load_purify_config(spec: str):
    """The PurifyConfig a factory spec gives (directly or as a dict of its fields).

    Raises:
        ValueError: as `load_object`, or when the object is neither.
    """
    from pursamere_fast import PurifyConfig

    cfg = load_object(spec)
    if isinstance(cfg, dict):
        cfg = PurifyConfig().with_overrides(**cfg)
    if not isinstance(cfg, PurifyConfig):
        raise ValueError(f"{spec!r} must give a PurifyConfig or a dict of its fields, got {type(cfg).__name__}")
    return cfg


def _base_config(p: argparse.ArgumentParser, args):
    if args.purify_config is None:
        return None
    with option_errors(p, "--purify-config"):
        return load_purify_config(args.purify_config)


def _pursamere_overrides(cfg, args) -> dict:
    return {**_kv(cfg.get("pursamere")), **_kv(args.pursamere)}


def _score_dtype(args):
    return torch.bfloat16 if args.score_dtype == "bfloat16" else None


def _defence_entries(p: argparse.ArgumentParser, args, cfg) -> list[tuple[str, str, dict]]:
    """(name, kind, settings) of each defence: the config's [[defence]] array, else --defences."""
    if "defence" not in cfg:
        names = "none,pursamere" if args.defences is None else args.defences
        if isinstance(names, str):
            names = listed(choice(DEFENCES))(names)
        return [(kind, kind, {}) for kind in dict.fromkeys(names)]
    if args.defences is not None:
        p.error("argument --defences: not allowed with a config's [[defence]] array, which names the defences")
    out = []
    with option_errors(p, "--config"):
        entries = cfg["defence"]
        if not entries:
            raise ValueError("[[defence]] must be a non-empty array of tables")
        for i, entry in enumerate(entries, 1):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(f"[[defence]] entry {i} must be a table with a non-empty string 'name', got {entry!r}")
            settings = dict(entry)
            name, kind = settings.pop("name"), settings.pop("kind", None)
            if kind not in DEFENCES:
                raise ValueError(f"[[defence]] entry {i} ({name!r}): kind must be one of {', '.join(DEFENCES)}, "
                                 f"got {kind!r}")
            if kind == "none" and settings:
                raise ValueError(f"[[defence]] entry {i} ({name!r}): kind 'none' takes no settings, got {settings}")
            if name in (e[0] for e in out):
                raise ValueError(f"[[defence]] entry {i}: name {name!r} is used twice")
            out.append((name, kind, settings))
    return out


def _defences(p: argparse.ArgumentParser, entries, args, cfg, score=None, classifier=None) -> list[Defence]:
    """The defences of `entries` ((name, kind, settings) as `_defence_entries` gives; settings
    override the kind's table and KEY=VALUE options), built by the registry of `defences`."""
    out = []
    for name, kind, settings in entries:
        if KINDS[kind].needs_score and score is None:
            score = _load_score(p, args, cfg)
        base = _base_config(p, args) if kind == "pursamere" else None
        context = DefenceContext(score, classifier, base, args.backend, _score_dtype(args))
        with option_errors(p, "--config" if settings else f"--{kind}"):
            merged = {**_kv(cfg.get(kind)), **_kv(getattr(args, kind, None)), **_kv(settings)}
            out.append(build_defence(kind, merged, context, name=name))
    return out


def _init_distributed(device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast evaluate`: run the (defence x attack) grid and write rows, summary and plots.

    Returns:
        Process exit code (0; 2 for a bad argument, with a one-line message).
    """
    p = _common_parser("pursamere-fast evaluate", "Evaluate defences under adaptive attacks (resumable).")
    p.add_argument("--out", default="runs/evaluate", help="results directory")
    p.add_argument("--defences", type=listed(choice(DEFENCES)), default=None,
                   help=f"comma list of {', '.join(DEFENCES)} (default none,pursamere)")
    p.add_argument("--threats", type=listed(choice(THREATS)), default="gpgd,bpda",
                   help=f"comma list of {', '.join(THREATS)}")
    p.add_argument("--eps", type=listed(real(positive=True)), default="8/255",
                   help="comma list of budgets > 0 (fractions like 8/255 allowed)")
    p.add_argument("--steps", type=listed(integer(1)), default="10", help="comma list of PGD step counts")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--suite", action="store_true",
                   help="run the attacks as one adaptive suite: the per-sample worst case over all of them (the "
                        "[[attack]] array of --config, else the default suite at --norm and the one --eps), cheapest "
                        "first, with a transfer of adversarials between --defences")
    p.add_argument("--no-cascade", action="store_true",
                   help="with --suite, attack every image with every member (slower; gives the images only one "
                        "member broke)")
    p.add_argument("--no-transfer", action="store_true", help="with --suite, skip the transfer between defences")
    p.add_argument("--bpda-steps", type=integer(1), default=100, help="default suite: steps of the BPDA members")
    p.add_argument("--exact-steps", type=integer(1), default=20, help="default suite: steps of the exact members")
    p.add_argument("--square-queries", type=integer(0), default=1000,
                   help="default suite: Square's query budget (0: no Square member)")
    p.add_argument("--autoattack", action="store_true",
                   help="with --suite, then run AutoAttack's APGD-CE + APGD-DLR (pyautoattack, BPDA, 100 steps) on "
                        "the same images and count what it broke that the suite did not")
    p.add_argument("--autoattack-only", action="store_true",
                   help="with --suite, run only the AutoAttack check, on the images --out's suite has finished (a "
                        "run still going or stopped at its budget)")
    args, cfg = _parse(p, argv)
    if args.device is not None and str(args.device).startswith("cuda") and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    _init_distributed(args.device)
    common = _build_common(p, args, cfg)
    defences = _defences(p, _defence_entries(p, args, cfg), args, cfg, classifier=common["classifier"])
    if args.suite:
        if cfg.get("attack"):
            with option_errors(p, "--config"):
                members = attack_specs(cfg["attack"])
        else:
            if len(args.eps) != 1:
                p.error(f"argument --eps: --suite takes one budget, got {len(args.eps)}")
            with option_errors(p, "--norm"):
                members = default_suite(args.norm, args.eps[0], bpda_steps=args.bpda_steps,
                                        exact_steps=args.exact_steps, square_queries=args.square_queries,
                                        alpha=args.alpha, seed=args.seed)
        if args.autoattack_only:
            with option_errors(p, "--out"):
                summary = summarise_dir(args.out)
        else:
            summary = run_suite(common["classifier"], common["data"], defences, members, out_dir=args.out,
                                indices=common["indices"], batch_size=args.batch_size, mean=common["mean"],
                                std=common["std"], device=common["device"], cascade=not args.no_cascade,
                                transfer=not args.no_transfer, progress=not args.no_progress)
        if _dist()[0] == 0:
            sys.stdout.write(suite_markdown(summary))
            if args.autoattack or args.autoattack_only:
                norm = members[0].norm
                eps = members[0].eps
                checks_ = [autoattack_check(common["classifier"], common["data"], d, suite_dir=args.out, norm=norm,
                                            eps=eps, batch_size=args.batch_size, mean=common["mean"],
                                            std=common["std"], device=common["device"], progress=not args.no_progress)
                           for d in defences]
                with open(os.path.join(args.out, "autoattack.json"), "w") as f:
                    json.dump(checks_, f, indent=1)
                sys.stdout.write(autoattack_markdown(checks_))
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 0
    if cfg.get("attack"):
        with option_errors(p, "--config"):
            attacks = attack_specs(cfg["attack"])
    else:
        attacks = list(dict.fromkeys(
            AttackSpec("clean", args.norm) if t == "clean" else
            AttackSpec(threat=t, norm=args.norm, eps=e, steps=s, alpha=args.alpha, restarts=args.restarts,
                       eot=args.eot if t in EOT_GRAD_MODE else 1, seed=args.seed)
            for t in args.threats for e in args.eps for s in args.steps))
    summary = evaluate(common["classifier"], common["data"], grid(defences, attacks), out_dir=args.out,
                       indices=common["indices"], batch_size=args.batch_size, mean=common["mean"], std=common["std"],
                       device=common["device"], progress=not args.no_progress, plots=not args.no_plots)
    if _dist()[0] == 0:
        sys.stdout.write(markdown_table(summary))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main_sanity(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast sanity`: run the sanity checks; exit code 1 when a check fails.

    Returns:
        0 if no check failed, else 1 (2 for a bad argument, with a one-line message).
    """
    p = _common_parser("pursamere-fast sanity", "Sanity checks of an evaluation (SPEC section 7).")
    p.add_argument("--out", default="runs/sanity", help="results directory")
    p.add_argument("--defence", default="pursamere", choices=DEFENCES)
    p.add_argument("--threat", default="bpda", choices=["gpgd", "bpda", "bpda_eot", "exact"])
    p.add_argument("--eps-list", type=listed(real(0)), default="0,4/255,8/255,32/255,0.5")
    p.add_argument("--steps-list", type=listed(integer(1)), default="5,10,20")
    p.add_argument("--eps-steps", type=real(positive=True), default="8/255",
                   help="eps of the steps sweep and the rho = 0 check")
    p.add_argument("--tol", type=real(0, 1), default=0.02)
    p.add_argument("--zero-tol", type=real(0, 1), default=0.05)
    p.add_argument("--grad-n", type=integer(0), default=8)
    args, cfg = _parse(p, argv)
    common = _build_common(p, args, cfg)
    score = None if args.defence == "none" else _load_score(p, args, cfg)
    (defence,) = _defences(p, [(args.defence, args.defence, {})], args, cfg, score, common["classifier"])
    rho_zero = None
    if args.defence == "pursamere":
        over = {**_pursamere_overrides(cfg, args), "rho": 0.0}
        rho_zero = Defence.pursamere(score, _base_config(p, args), name="pursamere-rho0", backend=args.backend,
                                     score_dtype=_score_dtype(args), **over)
    report = run_sanity(common["classifier"], common["data"], defence, out_dir=args.out, indices=common["indices"],
                        rho_zero=rho_zero, threat=args.threat, norm=args.norm, eps_list=args.eps_list,
                        steps_list=args.steps_list, eps_steps=args.eps_steps, tol=args.tol,
                        zero_tol=args.zero_tol, grad_n=args.grad_n, batch_size=args.batch_size, mean=common["mean"],
                        std=common["std"], device=common["device"], seed=args.seed, progress=not args.no_progress)
    sys.stdout.write(sanity_markdown(report))
    return 1 if any(c["passed"] is False for c in report["checks"]) else 0
