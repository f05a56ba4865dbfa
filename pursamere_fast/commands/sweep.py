"""`pursamere-fast sweep {run,collect,compare}`: the validation sweep, summaries of run directories,
and the paired test of two defences (the library: `pursamere_fast.attacks.sweep`).

    pursamere-fast sweep run --config configs/fmnist_sweep.toml
    pursamere-fast sweep collect --out results/fmnist runs/fmnist/test_none runs/fmnist/final/*
    pursamere-fast sweep compare runs/fmnist/final/sam_main runs/fmnist/final/nosam_main \\
        --attack bpda-linf-eps0.0313725-s20     # paired: same images, exact McNemar p-value
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Sequence

import torch

from ..attacks.loading import load_toml
from ..attacks.rows import rank_world
from ..attacks.runner import evaluate, markdown_table, plot_summary
from ..attacks.sweep import SweepRun, choose_config, collect, collect_markdown, compare, sweep_markdown
from ..attacks.threats import grid
from .harness import init_distributed
from .options import ArgumentParser, existing_dir, existing_file, integer, option_errors


def compare_command(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast sweep compare",
                       description="Paired (same images) comparison of two defences: accuracies, "
                                   "discordant counts and the exact McNemar p-value.")
    p.add_argument("a", help="run_dir or run_dir:defence")
    p.add_argument("b", help="run_dir or run_dir:defence")
    p.add_argument("--attack", required=True, help="attack label, e.g. bpda-linf-eps0.0313725-s20")
    p.add_argument("--attack-b", default=None, help="attack label in b if it differs")
    p.add_argument("--clean", action="store_true", help="compare clean instead of robust correctness")
    args = p.parse_args(argv)
    try:
        r = compare(args.a, args.b, args.attack, args.attack_b,
                    field="clean_correct" if args.clean else "robust_correct")
    except ValueError as e:  # the runs or labels named do not fit (the message names them)
        p.error(str(e))
    sys.stdout.write(f"n={r['n']} acc_a={100 * r['acc_a']:.1f}% acc_b={100 * r['acc_b']:.1f}% "
                     f"only_a={r['only_a']} only_b={r['only_b']} p={r['p_value']:.3g}\n")
    return 0


def run_command(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast sweep run",
                       description="Evaluate a grid of PurSAMERE configs on a validation split and pick one.")
    p.add_argument("--config", type=existing_file, required=True,
                   help="TOML: classifier, score, data, purify_config, out, n, batch_size, clean_tol, robust_tol, "
                        "[data_kwargs], [grid] (field -> list) or [[point]] (overrides, optional defence = 'adp'), "
                        "[[attack]] (AttackSpec fields), select = {clean, robust, tiebreak} attack labels. "
                        "Its factories are code that is imported and called: only run configs you trust")
    p.add_argument("--n", type=integer(1), default=None, help="override n of the TOML")
    p.add_argument("--threads", type=integer(1), default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with option_errors(p, "--config"):
        run = SweepRun.from_toml(load_toml(args.config), args.config)
    if args.n is not None:
        if args.n > run.size:
            p.error(f"argument --n: value must be <= {run.size} (the samples of data), got {args.n}")
        run = dataclasses.replace(run, n=args.n)
    init_distributed(None)
    summary = evaluate(run.classifier, run.data, grid(run.defences, run.attacks), out_dir=run.out,
                       indices=range(run.n), batch_size=run.batch_size, progress=not args.no_progress)
    if rank_world()[0] != 0:
        return 0
    sel, costs = run.select, run.costs
    choice = choose_config(summary, costs, undefended="none", clean=sel["clean"], robust=sel["robust"],
                           tiebreak=sel["tiebreak"], clean_tol=run.clean_tol, robust_tol=run.robust_tol)
    chosen = None if choice["chosen"] is None else dict(run.points[list(costs).index(choice["chosen"])])
    report = {"choice": choice, "chosen_overrides": chosen, "fixed_overrides": run.fixed, "summary": summary}
    with open(os.path.join(run.out, "sweep.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(run.out, "sweep.md"), "w") as f:
        f.write(sweep_markdown(choice) + "\n" + markdown_table(summary))
    sys.stdout.write(sweep_markdown(choice))
    return 0


def collect_command(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="pursamere-fast sweep collect",
                       description="Summarise the rows of several run directories (finished or stopped) "
                                   "into summary.json, summary.md and the accuracy plots.")
    p.add_argument("--out", required=True, help="directory for summary.json and summary.md")
    p.add_argument("--all-rows", action="store_true",
                   help="keep every row (default: per directory, only samples with a row for every setting)")
    p.add_argument("runs", nargs="+", type=existing_dir, help="run directories")
    args = p.parse_args(argv)
    with option_errors(p, "runs"):
        entries = collect(args.runs, complete_only=not args.all_rows)
    with option_errors(p, "--out"):
        os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(entries, f, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(collect_markdown(entries))
    # Runs of the same defence name with different configs are told apart by their directory.
    plot_summary([{**e, "defence": f"{os.path.basename(e['run'].rstrip('/'))}:{e['defence']}"} for e in entries],
                 args.out)
    sys.stdout.write(collect_markdown(entries))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: `run` (validation sweep), `collect` (summaries of run directories) or
    `compare` (paired test of two defences)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run": run_command, "collect": collect_command, "compare": compare_command}
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write("usage: pursamere-fast sweep {run,collect,compare} [options]\n")
        return 0
    if not argv or argv[0] not in commands:
        sys.stderr.write("usage: pursamere-fast sweep {run,collect,compare} [options]\n")
        return 2
    return commands[argv[0]](argv[1:])
