"""What `evaluate`, `sanity` and `convergence` share: one parser, its TOML `--config`, and the
steps from parsed options to the library's objects (classifier, data, defences).

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
import os

import torch
import torch.distributed as dist
from torch import nn

from .. import checks
from ..attacks.defences import KINDS, DefenceContext, DefenceEntry, build_defence, kind_names
from ..attacks.defences import defence_entries as parse_defence_entries
from ..attacks.loading import key_values, load_model, load_object, load_purify_config, load_toml
from ..attacks.pgd import NORMS
from ..attacks.rows import data_size, take
from ..attacks.threats import Defence
from ..purify import BACKENDS
from .options import ArgumentParser, choice, device, existing_file, integer, listed, option_errors, random_seed, real

DEFENCES = kind_names()
TABLES = ("classifier_kwargs", "score_kwargs", "data_kwargs", *DEFENCES[1:], "attack", "defence")
_ARRAYS = ("attack", "defence")


def alpha(value):
    """argparse type: a step size > 0, or "none" for the default rule."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return real(positive=True)(value)


def harness_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", type=existing_file,
                   help="TOML file; its keys are the long options (dashes or underscores), "
                        "plus tables [classifier_kwargs], [score_kwargs], [data_kwargs], "
                        f"{', '.join(f'[{k}]' for k in DEFENCES[1:])}, an optional [[attack]] array of AttackSpec "
                        "fields and an "
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
    p.add_argument("--alpha", type=alpha, default=None, help="step size (default 2.5 * eps / steps)")
    p.add_argument("--restarts", type=integer(1), default=1)
    p.add_argument("--eot", type=integer(1), default=1, help="EoT draws (bpda_eot and exact_eot only)")
    p.add_argument("--seed", type=random_seed, default=0)
    p.add_argument("--n", type=integer(1), default=None, help="number of samples (default: all)")
    p.add_argument("--start", type=integer(0), default=0, help="first sample index")
    p.add_argument("--batch-size", type=integer(1), default=64)
    p.add_argument("--device", type=device, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def option_value(action: argparse.Action, value, where: str):
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


def parse_with_config(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, dict]:
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
                if k in TABLES and not (k == "defence" and k in actions):
                    what = "an array of tables" if k in _ARRAYS else "a table"
                    if not isinstance(value, list if k in _ARRAYS else dict):
                        raise ValueError(f"{key!r} in {pre.config} must be {what}, got {value!r}")
                    tables[k] = value
                elif k in actions:
                    defaults[k] = option_value(actions[k], value, f"key {key!r} of {pre.config}")
                else:
                    raise ValueError(f"unknown key {key!r} in {pre.config}")
        parser.set_defaults(**defaults)
    return parser.parse_args(argv), tables


def build_common(p: argparse.ArgumentParser, args, cfg) -> dict:
    with option_errors(p, "--classifier"):
        classifier = checks.function("classifier", load_model(args.classifier, cfg.get("classifier_kwargs")))
    with option_errors(p, "--data"):
        data = load_object(args.data, cfg.get("data_kwargs"))
        if not hasattr(data, "__len__"):
            raise ValueError(f"data must be (images, labels) tensors or a dataset, got {type(data).__name__}")
        size = data_size(data)
    if args.start >= size:
        p.error(f"argument --start: value must be < {size} (the number of samples), got {args.start}")
    n = size - args.start if args.n is None else args.n
    if args.start + n > size:
        p.error(f"argument --n: value must be <= {size - args.start} (the samples from --start {args.start} on), "
                f"got {n}")
    with option_errors(p, "--data"):
        # The first sample stands for the dataset's format (dtype, layout, range): a factory that
        # gives uint8 or normalised images is named here, in one line, not by a traceback later.
        first = checks.images("--data images", take(data, [args.start])[0])
        channels = first.shape[1]
    for option, values in (("--mean", args.mean), ("--std", args.std)):
        if values is not None and len(values) not in (1, channels):
            p.error(f"argument {option}: value must have one entry or one per image channel ({channels}), "
                    f"got {len(values)}")
    if args.device is not None and isinstance(classifier, nn.Module):
        classifier = classifier.to(args.device)
    return {"classifier": classifier, "data": data, "indices": list(range(args.start, args.start + n)),
            "mean": args.mean, "std": args.std, "device": args.device}


def load_score(p: argparse.ArgumentParser, args, cfg):
    with option_errors(p, "--score"):
        score = checks.function("score", load_model(args.score, cfg.get("score_kwargs")))
    if args.device is not None and isinstance(score, nn.Module):
        score = score.to(args.device)
    return score


def base_config(p: argparse.ArgumentParser, args):
    if args.purify_config is None:
        return None
    with option_errors(p, "--purify-config"):
        return load_purify_config(args.purify_config)


def pursamere_overrides(cfg, args) -> dict:
    return {**key_values(cfg.get("pursamere")), **key_values(args.pursamere)}


def score_dtype(args):
    return torch.bfloat16 if args.score_dtype == "bfloat16" else None


def defence_entries(p: argparse.ArgumentParser, args, cfg) -> list[DefenceEntry]:
    """The named defences: the config's [[defence]] array (`defences.defence_entries`), else --defences."""
    if "defence" not in cfg:
        names = "none,pursamere" if args.defences is None else args.defences
        if isinstance(names, str):
            names = listed(choice(DEFENCES))(names)
        return [DefenceEntry(kind, kind) for kind in dict.fromkeys(names)]
    if args.defences is not None:
        p.error("argument --defences: not allowed with a config's [[defence]] array, which names the defences")
    with option_errors(p, "--config"):
        return parse_defence_entries(cfg["defence"])


def build_defences(p: argparse.ArgumentParser, entries, args, cfg, score=None, classifier=None) -> list[Defence]:
    """The defences of `entries` (`DefenceEntry`s; an entry's settings override the kind's table and
    KEY=VALUE options), built by the registry of `defences`."""
    out = []
    for entry in entries:
        kind = entry.kind
        if KINDS[kind].needs_score and score is None:
            score = load_score(p, args, cfg)
        base = base_config(p, args) if kind == "pursamere" else None
        context = DefenceContext(score, classifier, base, args.backend, score_dtype(args))
        with option_errors(p, "--config" if entry.settings else f"--{kind}"):
            merged = {**key_values(cfg.get(kind)), **key_values(getattr(args, kind, None)),
                      **key_values(dict(entry.settings))}
            out.append(build_defence(kind, merged, context, name=entry.name))
    return out


def init_distributed(device) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = device is not None and str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
