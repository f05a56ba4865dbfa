"""`pursamere-fast convergence`: robust accuracy against PGD steps and restarts (see `attacks.convergence`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..attacks.convergence import convergence_markdown, run_convergence
from ..attacks.defences import DefenceEntry
from ..attacks.sweep import validation_split
from ..attacks.threats import GRAD_MODE
from .harness import DEFENCES, build_common, build_defences, harness_parser, parse_with_config
from .options import choice, integer, real


def main(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast convergence`: the accuracy-vs-steps/restarts study of one defence and estimator."""
    p = harness_parser("pursamere-fast convergence", "Robust accuracy against PGD steps and restarts (fixed step).")
    p.add_argument("--out", default="runs/convergence", help="results directory")
    p.add_argument("--defence", default="pursamere", choices=DEFENCES)
    p.add_argument("--threat", default="bpda", type=choice(("gpgd", *GRAD_MODE)))
    p.add_argument("--eps", type=real(positive=True), default="8/255")
    p.add_argument("--steps", type=integer(1), default=200)
    p.add_argument("--loss", default="ce", type=choice(("ce", "cw", "dlr")))
    p.add_argument("--validation", type=integer(0), default=0,
                   help="attack the last N Fashion-MNIST training images (held out from selection) instead of "
                        "--data")
    args, cfg = parse_with_config(p, argv)
    common = build_common(p, args, cfg)
    entry = DefenceEntry(args.defence, args.defence)
    (defence,) = build_defences(p, [entry], args, cfg, classifier=common["classifier"])
    data, indices = common["data"], common["indices"]
    if args.validation:
        data = validation_split(args.validation)
        indices = list(range(args.validation))
    table = run_convergence(common["classifier"], data, defence, out_dir=args.out, threat=args.threat,
                            norm=args.norm, eps=args.eps, alpha=args.alpha, steps=args.steps,
                            restarts=args.restarts, loss=args.loss, seed=args.seed, indices=indices,
                            batch_size=args.batch_size, mean=common["mean"], std=common["std"],
                            device=common["device"], progress=not args.no_progress)
    sys.stdout.write(convergence_markdown(table))
    return 0
