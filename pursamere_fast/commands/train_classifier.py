"""``pursamere-fast train-classifier``: options to `OptimizerConfig`, `RegulariserConfig` and `train_classifier`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..train.checkpoint import ResumeError
from ..train.classifier import (
    ARCHS,
    AUGMENTS,
    DEFAULT_LR,
    FIELDS_USED,
    OPTIMIZERS,
    REGULARISED_OPTIMIZERS,
    REGULARISER_FIELDS_USED,
    REGULARISERS,
    SCHEDULES,
    WRN_DEPTH,
    WRN_WIDEN,
    OptimizerConfig,
    RegulariserConfig,
    evaluate_classifier,
    load_purify_score,
    per_class_accuracy,
    train_classifier,
)
from ..train.longtail import long_tailed_subset, tail_classes
from .options import ArgumentParser, device, existing_file, integer, option_errors, random_seed, real
from .training import common_args, load_datasets

# Options that only some optimisers read, and the OptimizerConfig field each sets.
_OPTIMIZER_OPTIONS = {"--momentum": "momentum", "--rho": "rho", "--rho-head": "rho_head",
                      "--rho-tail": "rho_tail", "--gamma": "gamma", "--tail-threshold": "tail_threshold"}


# The options that set a RegulariserConfig field, which only some regularisers read.
_REGULARISER_OPTIONS = {"--reg-eps": "eps", "--reg-alpha": "alpha", "--reg-steps": "steps", "--reg-lambda": "lam"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    # An option whose default depends on another option says so in its help: "(default: None)"
    # would be wrong.
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _optimizer_from_args(p: argparse.ArgumentParser, args) -> OptimizerConfig:
    given = {field: getattr(args, field) for field in _OPTIMIZER_OPTIONS.values()
             if getattr(args, field) is not None}
    for option, field in _OPTIMIZER_OPTIONS.items():
        if field in given and field not in FIELDS_USED[args.optimizer]:
            users = ", ".join(name for name, used in FIELDS_USED.items() if field in used)
            p.error(f"argument {option}: does not apply to --optimizer {args.optimizer} (only to {users})")
    # real(0, 1) admits 1, which OptimizerConfig refuses: say so here, naming the option.
    if given.get("momentum") == 1:
        p.error(f"argument --momentum: value must be a finite number >= 0 and < 1, got {args.momentum!r}")
    return OptimizerConfig(name=args.optimizer, weight_decay=args.weight_decay, schedule=args.schedule, **given)


def _regulariser_from_args(p: argparse.ArgumentParser, args) -> RegulariserConfig:
    option, name = ("--lfr", "lfr") if args.lfr else ("--regulariser", args.regulariser)
    given = {}
    for opt, field in _REGULARISER_OPTIONS.items():
        value = getattr(args, opt[2:].replace("-", "_"))
        if value is None:
            continue
        if field not in REGULARISER_FIELDS_USED[name]:
            users = ", ".join(n for n, used in REGULARISER_FIELDS_USED.items() if field in used)
            p.error(f"argument {opt}: does not apply to --regulariser {name} (only to {users})")
        given[field] = value
    if name != "none" and args.optimizer not in REGULARISED_OPTIMIZERS:
        p.error(f"argument {option}: {name} needs --optimizer {' or '.join(REGULARISED_OPTIMIZERS)}, "
                f"got {args.optimizer}")
    if name != "none" and args.purify_score:
        p.error(f"argument {option}: {name} does not combine with --purify-score")
    return RegulariserConfig(name=name, **given)


def _arch_from_args(p: argparse.ArgumentParser, args) -> None:
    """Check the network options against --arch and fill in the defaults that depend on it."""
    if args.arch == "smallcnn":
        for option in ("--wrn-depth", "--wrn-widen"):
            if getattr(args, option[2:].replace("-", "_")) is not None:
                p.error(f"argument {option}: does not apply to --arch smallcnn")
        args.width = 32 if args.width is None else args.width
        args.activation = "relu" if args.activation is None else args.activation
        return
    for option in ("--width", "--activation"):
        if getattr(args, option[2:]) is not None:
            p.error(f"argument {option}: does not apply to --arch wrn (its width is --wrn-widen, its "
                    f"activation ReLU)")
    args.activation = "relu"
    args.wrn_depth = WRN_DEPTH if args.wrn_depth is None else args.wrn_depth
    args.wrn_widen = WRN_WIDEN if args.wrn_widen is None else args.wrn_widen
    if (args.wrn_depth - 4) % 6:
        p.error(f"argument --wrn-depth: value must be 6n + 4 (10, 16, 22, 28, ...), got {args.wrn_depth}")


def main_train_classifier(argv: Sequence[str] | None = None) -> int:
    """``pursamere-fast train-classifier``: train a SmallCNN or WideResNet, measure test accuracy, export it."""
    from pursamere_fast.nets import ACTIVATIONS, SmallCNN, WideResNet, save_net

    d, r = OptimizerConfig(), RegulariserConfig()
    p = ArgumentParser(prog="pursamere-fast train-classifier", formatter_class=HelpFormatter,
                       description="Train a classifier, a SmallCNN or a WideResNet (optionally with purified "
                                   "augmentation, crops and flips, a SAM-family optimiser, a local-flatness or "
                                   "gradient penalty or PGD adversarial training, a long-tailed training subset), "
                                   "measure its test accuracy overall and per class, export it. The defaults "
                                   "reproduce the shipped Fashion-MNIST classifier.")
    # --width and --activation are None when not given, so that --arch wrn can refuse them.
    common_args(p, lr_help=f"peak learning rate (default: {DEFAULT_LR['adam']:g} for adam, "
                           f"{DEFAULT_LR['sgd']:g} for the others)",
                width_default=None, width_help="SmallCNN's hidden channels (smallcnn; default: 32)")
    p.set_defaults(batch_size=128, lr=None)
    p.add_argument("--arch", choices=ARCHS, default="smallcnn",
                   help="smallcnn (--width, --activation) or wrn: WideResNet, RobustBench's module names "
                        "(--wrn-depth, --wrn-widen)")
    p.add_argument("--wrn-depth", type=integer(10), default=None,
                   help=f"WideResNet depth 6n + 4 (wrn; default: {WRN_DEPTH})")
    p.add_argument("--wrn-widen", type=integer(1), default=None,
                   help=f"WideResNet widen factor (wrn; default: {WRN_WIDEN})")
    p.add_argument("--augment", choices=AUGMENTS, default="none",
                   help="crop-flip: pad 4, random crop, random left-right flip per image and step (the standard "
                        "CIFAR-10 augmentation)")
    p.add_argument("--device", type=device, default="cpu", help="where to train (cpu, cuda, cuda:<index>)")
    p.add_argument("--epochs", type=integer(1), default=4,
                   help="passes over the training set (a resumed run goes up to it)")
    p.add_argument("--checkpoint-every", type=integer(1), default=200, help="steps between checkpoints")
    p.add_argument("--purify-score", type=existing_file, default=None,
                   help="score model for purified augmentation: a safetensors file from train-score, or an "
                        "official NCSNv2 checkpoint (.pth or .pt; its width and sigma ladder are read from it)")
    p.add_argument("--purify-config", default=None,
                   help="JSON object of PurifyConfig fields for the augmentation (sam_radius is forced to 0; "
                        "needs --purify-score)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.name,
                   help="adam or sgd (torch), or sam, imbsam, ssesam around that sgd (SPEC 9)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning rate: constant, or cosine decay from --lr to 0 over the run")
    p.add_argument("--weight-decay", type=real(0), default=d.weight_decay, help="L2 weight decay")
    p.add_argument("--momentum", type=real(0, 1), default=None,
                   help=f"SGD momentum, < 1 (sgd, sam, imbsam, ssesam; default: {d.momentum:g})")
    p.add_argument("--rho", type=real(0), default=None,
                   help=f"ascent radius (sam; imbsam: of the tail loss; default: {d.rho:g})")
    p.add_argument("--rho-head", type=real(0), default=None,
                   help=f"ssesam head radius in phase 1 (default: {d.rho_head:g})")
    p.add_argument("--rho-tail", type=real(0), default=None, help=f"ssesam tail radius (default: {d.rho_tail:g})")
    p.add_argument("--gamma", type=real(0, 1), default=None,
                   help=f"ssesam: the head radius drops to 0 from epoch gamma * epochs on (default: {d.gamma:g})")
    p.add_argument("--tail-threshold", type=integer(1), default=None,
                   help=f"imbsam, ssesam: tail classes have fewer training images than this "
                        f"(default: {d.tail_threshold})")
    p.add_argument("--activation", choices=tuple(ACTIVATIONS), default=None,
                   help="SmallCNN's activation (default: relu); lfr and gradpen train through input gradients, "
                        "which a smooth one (softplus, gelu) suits: ReLU's second derivative is zero almost everywhere")
    reg = p.add_mutually_exclusive_group()
    reg.add_argument("--regulariser", choices=REGULARISERS, default=r.name,
                     help="lfr: CE + lambda * local-flatness penalty (SPEC 10); gradpen: CE + lambda * the input "
                          "gradient's l1 norm at the clean image (lfr's control); pgd-at: CE at linf PGD "
                          "examples (Madry). Each needs --optimizer adam or sgd and no --purify-score")
    reg.add_argument("--lfr", action="store_true", help="shorthand for --regulariser lfr")
    p.add_argument("--reg-eps", type=real(0), default=None,
                   help=f"linf radius of the inner maximisation, e.g. 8/255 (lfr, pgd-at; default: {r.eps:g}, "
                        f"Fashion-MNIST's usual budget; SPEC 10's MNIST setting is 0.3)")
    p.add_argument("--reg-alpha", type=real(0), default=None,
                   help=f"its step size (lfr, pgd-at; default: {r.alpha:g}, SPEC 10's MNIST value)")
    p.add_argument("--reg-steps", type=integer(0), default=None,
                   help=f"its signed-gradient steps (lfr, pgd-at; default: {r.steps}; SPEC 10's MNIST setting "
                        f"is 40); at 10 a training step costs ~20 plain ones with lfr, ~8 with pgd-at "
                        f"(bench/bench_lfr.py)")
    p.add_argument("--reg-lambda", type=real(0), default=None,
                   help=f"weight of the penalty (lfr, gradpen; default: {r.lam:g}, SPEC 10's MNIST value)")
    p.add_argument("--imbalance-ratio", type=real(1), default=None,
                   help="train on a long-tailed subset: class c keeps floor(n_max * R^(-c/(C-1))) images "
                        "(n_max: the smallest class's count, C: the classes); the test set stays whole "
                        "(default: all images)")
    p.add_argument("--subset-seed", type=random_seed, default=None,
                   help="chooses the images of the long-tailed subset (needs --imbalance-ratio; default: 0)")
    args = p.parse_args(argv)
    _arch_from_args(p, args)
    optimizer = _optimizer_from_args(p, args)
    regulariser = _regulariser_from_args(p, args)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    if args.subset_seed is not None and args.imbalance_ratio is None:
        p.error("argument --subset-seed: needs --imbalance-ratio")
    config = None
    if args.purify_score:
        from pursamere_fast import PurifyConfig

        with option_errors(p, "--purify-config"):
            fields = json.loads(args.purify_config or "{}")
            if not isinstance(fields, dict):  # option_errors turns a ValueError into the one-line error
                raise ValueError(f"value must be a JSON object, got {args.purify_config!r}")  # noqa: TRY004
            config = PurifyConfig().with_overrides(**fields)
    elif args.purify_config:
        p.error("argument --purify-config: needs --purify-score")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    (images, labels), (test_x, test_y) = load_datasets(p, args)
    score = None
    if args.purify_score:
        with option_errors(p, "--purify-score"):
            score = load_purify_score(args.purify_score, images.shape[1], images.shape[-1]).to(args.device)
    if args.imbalance_ratio is not None:
        with option_errors(p, "--imbalance-ratio"):
            keep = long_tailed_subset(labels, args.imbalance_ratio, args.subset_seed or 0)
        images, labels = images[keep], labels[keep]
    counts = torch.bincount(torch.as_tensor(labels), minlength=10).tolist()
    tail = tail_classes(labels, optimizer.tail_threshold) if optimizer.splits_head_tail else None
    if tail is not None and len(tail) in (0, len(counts)):
        print(f"note: {'no' if not tail else 'every'} class has fewer than {optimizer.tail_threshold} training "
              f"images (--tail-threshold), so {args.optimizer} has {'no tail' if not tail else 'no head'} group",
              file=sys.stderr)
    if regulariser.name in ("lfr", "gradpen") and args.activation == "relu":
        print(f"note: {regulariser.name} with --activation relu: the penalty's input gradient ignores where "
              f"ReLUs switch (zero second derivative); SPEC 10 advises softplus or gelu", file=sys.stderr)
    torch.manual_seed(args.seed)
    if args.arch == "wrn":
        model = WideResNet(args.wrn_depth, args.wrn_widen, 10, images.shape[1])
    else:
        model = SmallCNN(images.shape[1], 10, args.width, images.shape[-1], activation=args.activation)
    model = model.to(args.device)
    t0 = time.time()
    try:
        result = train_classifier(model, images, labels, epochs=args.epochs, batch_size=args.batch_size,
                                  lr=args.lr, out_dir=args.out, seed=args.seed, purify_score=score,
                                  purify_config=config, optimizer=optimizer, regulariser=regulariser,
                                  augment=args.augment, resume=not args.no_resume,
                                  checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    except ResumeError as e:
        p.error(f"argument --out: {e}")
    seconds = time.time() - t0
    acc = evaluate_classifier(result.model, test_x, test_y)
    per_class = per_class_accuracy(result.model, test_x, test_y, num_classes=10)
    metrics = {"kind": "classifier", "args": vars(args), "steps": result.step,
               "seconds_this_invocation": round(seconds, 1), "test_accuracy": acc, "test_n": len(test_y),
               "purified_augmentation": bool(args.purify_score), "optimizer": optimizer.used(),
               "regulariser": regulariser.used(), "activation": args.activation,
               "arch": type(result.model).__name__, "arch_config": result.model.config, "augment": args.augment,
               "train_n": len(labels), "train_class_counts": counts, "tail_classes": tail,
               "test_accuracy_per_class": per_class,
               "test_class_counts": torch.bincount(torch.as_tensor(test_y), minlength=10).tolist()}
    Path(args.out, "metrics.json").write_text(json.dumps(metrics, indent=2))
    save_net(result.model, Path(args.out) / "classifier.safetensors", {"training": json.dumps(metrics)})
    if args.export:
        save_net(result.model, args.export, {"training": json.dumps(metrics)})
    print(f"test accuracy {acc:.4f} on {len(test_y)} images")
    return 0
