"""The `pursamere-fast` subcommands, one module each: its argparse parser, its `main`, and the step
from options or a TOML file to the library's typed objects.

The library never imports this package (tests/test_command_boundary.py); `pursamere_fast.cli`
dispatches to it. `options` holds what every parser is built from (one-line errors, checked
argparse types), `harness` what `evaluate`, `sanity` and `convergence` share, `training` what
the two trainers share.
"""
