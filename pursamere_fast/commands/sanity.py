"""`pursamere-fast sanity`: the sanity checks of an evaluation (argparse + a TOML `--config`; see `harness`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..attacks.defences import DefenceEntry
from ..attacks.sanity import run_sanity, sanity_markdown
from ..attacks.threats import Defence
from .harness import (
    DEFENCES,
    base_config,
    build_common,
    build_defences,
    harness_parser,
    load_score,
    parse_with_config,
    pursamere_overrides,
    score_dtype,
)
from .options import integer, listed, real


def main_sanity(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast sanity`: run the sanity checks; exit code 1 when a check fails.

    Returns:
        0 if no check failed, else 1 (2 for a bad argument, with a one-line message).
    """
    p = harness_parser("pursamere-fast sanity", "Sanity checks of an evaluation (SPEC section 7).")
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
    args, cfg = parse_with_config(p, argv)
    common = build_common(p, args, cfg)
    score = None if args.defence == "none" else load_score(p, args, cfg)
    (defence,) = build_defences(p, [DefenceEntry(args.defence, args.defence)], args, cfg, score, common["classifier"])
    rho_zero = None
    if args.defence == "pursamere":
        over = {**pursamere_overrides(cfg, args), "rho": 0.0}
        rho_zero = Defence.pursamere(score, base_config(p, args), name="pursamere-rho0", backend=args.backend,
                                     score_dtype=score_dtype(args), **over)
    report = run_sanity(common["classifier"], common["data"], defence, out_dir=args.out, indices=common["indices"],
                        rho_zero=rho_zero, threat=args.threat, norm=args.norm, eps_list=args.eps_list,
                        steps_list=args.steps_list, eps_steps=args.eps_steps, tol=args.tol,
                        zero_tol=args.zero_tol, grad_n=args.grad_n, batch_size=args.batch_size, mean=common["mean"],
                        std=common["std"], device=common["device"], seed=args.seed, progress=not args.no_progress)
    sys.stdout.write(sanity_markdown(report))
    return 1 if any(c["passed"] is False for c in report["checks"]) else 0
