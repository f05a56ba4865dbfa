"""`pursamere-fast summarise RUN`: rewrite a run's (or a results copy's) summary.md and summary.json
from its rows and manifest; a protocol's output directory gets its report.md.

    pursamere-fast summarise results/fmnist/suite                             # from the committed rows
    pursamere-fast summarise results/fmnist/suite --from runs/fmnist/final/suite   # copy the run's rows first
    pursamere-fast summarise runs/fmnist_protocol --protocol configs/fmnist_protocol.toml
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..attacks.loading import load_toml
from ..attacks.summary import copy_run, summarise_run
from ..protocol.report import write_report
from ..protocol.spec import spec
from .options import ArgumentParser, existing_dir, existing_file, option_errors


def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="pursamere-fast summarise",
                       description="Summarise a run directory (evaluate, evaluate --suite with its AutoAttack check, "
                                   "sweep run, sanity) from its rows, finished or not; with --protocol, write a "
                                   "protocol output directory's report.md.")
    p.add_argument("run", metavar="RUN", help="the run directory, or the results directory to write")
    p.add_argument("--from", dest="source", type=existing_dir, default=None,
                   help="first copy this run directory's rows (every shard, gzipped), manifest and AutoAttack rows "
                        "into RUN")
    p.add_argument("--protocol", type=existing_file, default=None,
                   help="RUN is the output directory of this protocol (configs/<name>_protocol.toml): write its "
                        "report.md and report.png")
    args = p.parse_args(argv)
    if args.protocol is not None:
        with option_errors(p, "--protocol"):
            title = spec(load_toml(args.protocol)).title
        with option_errors(p, "RUN"):
            if not os.path.isdir(args.run):
                raise ValueError(f"no such directory: {args.run!r}")
            sys.stdout.write(write_report(args.run, title))
        return 0
    if args.source is not None:
        with option_errors(p, "--from"):
            copy_run(args.source, args.run)
    with option_errors(p, "RUN"):
        _, text = summarise_run(args.run)
    sys.stdout.write(text)
    return 0
