"""Command lines `pursamere-fast evaluate` and `pursamere-fast sanity` (argparse + a TOML `--config`).

Every long option can also be a key of the TOML file (dashes or underscores); flags given
on the command line win over the file. Models and data come from factories named
"package.module:factory[.field]".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from .runner import _dist, _len, evaluate, markdown_table
from .sanity import run_sanity, sanity_markdown
from .threats import THREATS, AttackSpec, Defence, grid


def load_object(spec: str, kwargs: dict | None = None):
    """Build an object from "package.module:factory" or "package.module:factory.field".

    The factory is called with kwargs (an attribute that is not callable is used as is);
    ".field" then takes that attribute of the result, e.g.
    "pursamere_fast.pretrained:fashion_mnist.classifier".

    Raises:
        ValueError: when spec is not of that form, cannot be imported, or lacks the field.
    """
    import importlib

    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"factory must look like 'package.module:factory[.field]', got {spec!r}")
    mod, attr = spec.split(":")
    name, *fields = attr.split(".")
    try:
        obj = getattr(importlib.import_module(mod), name)
        obj = obj(**(kwargs or {})) if callable(obj) else obj
        for f in fields:
            obj = getattr(obj, f)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from None
    return obj


def _float(s: str) -> float:
    s = str(s).strip()
    if "/" in s:
        a, b = s.split("/")
        return float(a) / float(b)
    return float(s)


def _list(value, conv) -> list:
    if isinstance(value, (list, tuple)):
        return [conv(v) for v in value]
    return [conv(v) for v in str(value).split(",") if v.strip()]


def _kv(items) -> dict:
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for it in items or []:
        if "=" not in it:
            raise ValueError(f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            try:
                out[k.strip()] = _float(v)  # a fraction such as 8/255
            except ValueError:
                out[k.strip()] = v
    return out


def _common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help="TOML file; its keys are the long options (dashes or underscores), "
                                    "plus tables [classifier_kwargs], [score_kwargs], [data_kwargs], "
                                    "[pursamere], [adp] and an optional [[attack]] array of AttackSpec fields")
    p.add_argument("--classifier", default="pursamere_fast.attacks.toy:make_classifier",
                   help="factory 'module:attr' returning the classifier nn.Module")
    p.add_argument("--score", default="pursamere_fast.attacks.toy:make_score",
                   help="factory 'module:attr' returning the score model")
    p.add_argument("--data", default="pursamere_fast.attacks.toy:synthetic_data",
                   help="factory 'module:attr' returning (images, labels) tensors or a dataset of (image, label)")
    p.add_argument("--mean", default=None, help="comma-separated per-channel mean for the classifier")
    p.add_argument("--std", default=None, help="comma-separated per-channel std for the classifier")
    p.add_argument("--purify-config", default=None,
                   help="factory 'module:attr' returning the base PurifyConfig of the pursamere defence, e.g. "
                        "pursamere_fast.pretrained:fashion_mnist.config (default: PurifyConfig())")
    p.add_argument("--pursamere", action="append", default=[], metavar="KEY=VALUE",
                   help="PurifyConfig override for the pursamere defence (repeatable; VALUE is JSON or a "
                        "fraction such as 8/255)")
    p.add_argument("--adp", action="append", default=[], metavar="KEY=VALUE", help="ADPPurifier argument")
    p.add_argument("--backend", default="auto", help="purify backend")
    p.add_argument("--norm", default="linf", choices=["linf", "l2", "l1"])
    p.add_argument("--alpha", default=None, help="step size (default 2.5 * eps / steps)")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--eot", type=int, default=1, help="EoT draws (bpda_eot only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None, help="number of samples (default: all)")
    p.add_argument("--start", type=int, default=0, help="first sample index")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


_TABLES = ("classifier_kwargs", "score_kwargs", "data_kwargs", "pursamere", "adp", "attack")


def _parse(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict]:
    pre, _ = parser.parse_known_args(argv)
    tables = {}
    if pre.config:
        with open(pre.config, "rb") as f:
            cfg = tomllib.load(f)
        dests = {a.dest for a in parser._actions}
        flat = {}
        for k, v in cfg.items():
            k = k.replace("-", "_")
            if k in _TABLES:
                tables[k] = v
            elif k in dests and k != "config":
                flat[k] = v
            else:
                raise ValueError(f"unknown key {k!r} in {pre.config}")
        parser.set_defaults(**flat)
    return parser.parse_args(argv), tables


def _build_common(args, cfg) -> dict:
    classifier = load_object(args.classifier, cfg.get("classifier_kwargs"))
    data = load_object(args.data, cfg.get("data_kwargs"))
    size = _len(data)
    start = args.start
    n = size - start if args.n is None else args.n
    if start < 0 or n < 1 or start + n > size:
        raise ValueError(f"start={start}, n={n} do not fit a dataset of {size} samples")
    device = args.device
    if device is not None:
        classifier = classifier.to(device)
    return {"classifier": classifier, "data": data, "indices": list(range(start, start + n)),
            "mean": None if args.mean is None else _list(args.mean, float),
            "std": None if args.std is None else _list(args.std, float), "device": device}


def _load_score(args, cfg):
    score = load_object(args.score, cfg.get("score_kwargs"))
    if args.device is not None and isinstance(score, nn.Module):
        score = score.to(args.device)
    return score


def _base_config(args):
    if args.purify_config is None:
        return None
    cfg = load_object(args.purify_config)
    if isinstance(cfg, dict):
        from pursamere_fast import PurifyConfig

        cfg = PurifyConfig(**cfg)
    return cfg


def _defences(names, args, cfg, score=None) -> list[Defence]:
    out = []
    for name in names:
        if name == "none":
            out.append(Defence.none())
            continue
        if score is None:
            score = _load_score(args, cfg)
        if name == "pursamere":
            out.append(Defence.pursamere(score, _base_config(args), backend=args.backend,
                                         **{**_kv(cfg.get("pursamere")), **_kv(args.pursamere)}))
        elif name == "adp":
            out.append(Defence.adp(score, **{**_kv(cfg.get("adp")), **_kv(args.adp)}))
        else:
            raise ValueError(f"defence must be one of ('none', 'pursamere', 'adp'), got {name!r}")
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
        Process exit code (0).
    """
    p = _common_parser("pursamere-fast evaluate", "Evaluate defences under adaptive attacks (resumable).")
    p.add_argument("--out", default="runs/evaluate", help="results directory")
    p.add_argument("--defences", default="none,pursamere", help="comma list of none, pursamere, adp")
    p.add_argument("--threats", default="gpgd,bpda", help=f"comma list of {', '.join(THREATS)}")
    p.add_argument("--eps", default="8/255", help="comma list of budgets (fractions like 8/255 allowed)")
    p.add_argument("--steps", default="10", help="comma list of PGD step counts")
    p.add_argument("--no-plots", action="store_true")
    args, cfg = _parse(p, argv)
    if args.device is not None and str(args.device).startswith("cuda") and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    _init_distributed(args.device)
    common = _build_common(args, cfg)
    defences = _defences(_list(args.defences, str), args, cfg)
    alpha = None if args.alpha in (None, "", "none") else _float(args.alpha)
    if cfg.get("attack"):
        attacks = [AttackSpec(**a) for a in cfg["attack"]]
    else:
        attacks = list(dict.fromkeys(
            AttackSpec("clean", args.norm) if t == "clean" else
            AttackSpec(threat=t, norm=args.norm, eps=e, steps=s, alpha=alpha, restarts=args.restarts,
                       eot=args.eot if t == "bpda_eot" else 1, seed=args.seed)
            for t in _list(args.threats, str) for e in _list(args.eps, _float) for s in _list(args.steps, int)))
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
        0 if no check failed, else 1.
    """
    p = _common_parser("pursamere-fast sanity", "Sanity checks of an evaluation (SPEC section 7).")
    p.add_argument("--out", default="runs/sanity", help="results directory")
    p.add_argument("--defence", default="pursamere", choices=["pursamere", "adp", "none"])
    p.add_argument("--threat", default="bpda", choices=["gpgd", "bpda", "bpda_eot", "exact"])
    p.add_argument("--eps-list", default="0,4/255,8/255,32/255,0.5")
    p.add_argument("--steps-list", default="5,10,20")
    p.add_argument("--eps-steps", default="8/255", help="eps of the steps sweep and the rho = 0 check")
    p.add_argument("--tol", type=float, default=0.02)
    p.add_argument("--zero-tol", type=float, default=0.05)
    p.add_argument("--grad-n", type=int, default=8)
    args, cfg = _parse(p, argv)
    common = _build_common(args, cfg)
    score = None if args.defence == "none" else _load_score(args, cfg)
    (defence,) = _defences([args.defence], args, cfg, score)
    rho_zero = None
    if args.defence == "pursamere":
        over = {**_kv(cfg.get("pursamere")), **_kv(args.pursamere), "rho": 0.0}
        rho_zero = Defence.pursamere(score, _base_config(args), name="pursamere-rho0", backend=args.backend, **over)
    report = run_sanity(common["classifier"], common["data"], defence, out_dir=args.out, indices=common["indices"],
                        rho_zero=rho_zero, threat=args.threat, norm=args.norm, eps_list=_list(args.eps_list, _float),
                        steps_list=_list(args.steps_list, int), eps_steps=_float(args.eps_steps), tol=args.tol,
                        zero_tol=args.zero_tol, grad_n=args.grad_n, batch_size=args.batch_size, mean=common["mean"],
                        std=common["std"], device=common["device"], seed=args.seed, progress=not args.no_progress)
    sys.stdout.write(sanity_markdown(report))
    return 1 if any(c["passed"] is False for c in report["checks"]) else 0
