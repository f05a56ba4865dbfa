"""The `pursamere-fast` command line: it only dispatches a subcommand to its module in `pursamere_fast.commands`.

Each subcommand lives in its own module there (its argparse parser, its `main`, the steps from
options or a TOML file to the library's typed objects); the library itself imports no
argparse and no command. `pursamere-fast SUBCOMMAND --help` describes each.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module of pursamere_fast.commands, function taking argv and returning the exit code)
COMMANDS = {
    "example": ("example", "main"),
    "demo": ("demo", "main"),
    "train-score": ("train_score", "main_train_score"),
    "train-classifier": ("train_classifier", "main_train_classifier"),
    "score-quality": ("quality", "main"),
    "evaluate": ("evaluate", "main_evaluate"),
    "sanity": ("sanity", "main_sanity"),
    "convergence": ("convergence", "main"),
    "suite-summary": ("suite_summary", "main"),
    "sweep": ("sweep", "main"),
    "protocol": ("protocol", "main"),
    "summarise": ("summarise", "main"),
}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    usage = "usage: pursamere-fast {" + ",".join(COMMANDS) + "} [options]  (each takes --help)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    module, name = COMMANDS[argv[0]]
    return getattr(importlib.import_module(f"pursamere_fast.commands.{module}"), name)(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
