"""`pursamere-fast suite-summary OUT_DIR`: summarise a suite run (evaluate --suite), finished or not."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..attacks.suite import suite_markdown, summarise_dir
from .options import ArgumentParser, option_errors


def main(argv: Sequence[str] | None = None) -> int:
    """`pursamere-fast suite-summary OUT_DIR`: summarise a suite run, finished or not."""
    p = ArgumentParser(prog="pursamere-fast suite-summary",
                       description="Summarise a suite run (evaluate --suite) from its rows.")
    p.add_argument("out_dir", help="the run's --out directory")
    args = p.parse_args(argv)
    with option_errors(p, "out_dir"):
        summary = summarise_dir(args.out_dir)
    sys.stdout.write(suite_markdown(summary))
    return 0
