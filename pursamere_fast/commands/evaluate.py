"""`pursamere-fast evaluate`: the (defence x attack) grid or the adaptive suite (argparse + a TOML `--config`;
see `harness`)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from ..attacks.loading import attack_specs
from ..attacks.rows import rank_world
from ..attacks.runner import evaluate, markdown_table
from ..attacks.suite import (
    autoattack_check,
    autoattack_markdown,
    default_suite,
    run_suite,
    suite_markdown,
    summarise_dir,
)
from ..attacks.threats import EOT_GRAD_MODE, GRAD_MODE, THREATS, AttackSpec, grid
from .harness import (
    DEFENCES,
    build_common,
    build_defences,
    defence_entries,
    harness_parser,
    init_distributed,
    parse_with_config,
)
from .options import choice, integer, listed, option_errors, real


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast evaluate`: run the (defence x attack) grid and write rows, summary and plots.

    Returns:
        Process exit code (0; 2 for a bad argument, with a one-line message).
    """
    p = harness_parser("pursamere-fast evaluate", "Evaluate defences under adaptive attacks (resumable).")
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
                   help="with --suite, run only the AutoAttack check, on the images of --n / --start that --out's "
                        "suite has finished (a run still going or stopped at its budget)")
    p.add_argument("--autoattack-threat", type=choice((*GRAD_MODE, *EOT_GRAD_MODE)), default="bpda",
                   help="the gradient AutoAttack differentiates; a stochastic threat (bpda_eot, exact_eot) is "
                        "AutoAttack's 'rand' version as DiffPure runs it: fresh noise per call, EoT over "
                        "--autoattack-eot draws, judged on a fresh draw")
    p.add_argument("--autoattack-eot", type=integer(1), default=20,
                   help="EoT draws per gradient of a stochastic --autoattack-threat (pyautoattack's 'rand': 20)")
    args, cfg = parse_with_config(p, argv)
    if args.device is not None and str(args.device).startswith("cuda") and "LOCAL_RANK" in os.environ:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    init_distributed(args.device)
    common = build_common(p, args, cfg)
    defences = build_defences(p, defence_entries(p, args, cfg), args, cfg, classifier=common["classifier"])
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
        if rank_world()[0] == 0:
            sys.stdout.write(suite_markdown(summary))
            if args.autoattack or args.autoattack_only:
                norm = members[0].norm
                eps = members[0].eps
                threat, eot = args.autoattack_threat, args.autoattack_eot
                checks_ = [autoattack_check(common["classifier"], common["data"], d, suite_dir=args.out, norm=norm,
                                            eps=eps, threat=threat, eot=eot, indices=common["indices"],
                                            batch_size=args.batch_size,
                                            mean=common["mean"], std=common["std"], device=common["device"],
                                            progress=not args.no_progress)
                           for d in defences]
                # One file per gradient estimator, so a 'rand' check does not overwrite the BPDA one.
                tag = "" if threat == "bpda" else f".{threat}" + (f"-eot{eot}" if threat in EOT_GRAD_MODE else "")
                with open(os.path.join(args.out, f"autoattack{tag}.json"), "w") as f:
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
    if rank_world()[0] == 0:
        sys.stdout.write(markdown_table(summary))
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0
