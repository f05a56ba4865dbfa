"""The pieces every `pursamere-fast` subcommand builds its parser from.

`ArgumentParser` (one-line errors), argparse `type=` functions that check a value with
`pursamere_fast.checks` (`integer`, `real`, `choice`, `listed`, `device`, `existing_file`, ...)
and `option_errors` for values that can only be checked once they are used (factories, TOML
keys, KEY=VALUE overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import os

from .. import checks
from ..attacks.loading import number


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error, `prog: error: message`, and exit code 2.

    argparse prints the usage block first; one line naming the option reads better in a log,
    and the usage is one --help away.
    """

    def error(self, message):
        # Messages of loaders and factories may span lines.
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


@contextlib.contextmanager
def option_errors(parser: argparse.ArgumentParser, option: str):
    """Turn a ValueError or OSError raised inside the block into a parser error naming `option`.

    For values that can only be checked when they are used: a factory is imported and
    called, a TOML file read, an override applied. Only the code inside the block is
    covered, so a bug elsewhere still shows its traceback.
    """
    try:
        yield
    except (ValueError, OSError) as e:
        parser.error(f"argument {option}: {e}")


def checked(check, parse):
    """An argparse type: `parse` a command-line string, then `check` the value.

    A value that is not a string (a TOML number) goes to the check as it is, and so does a
    string that does not parse: the check refuses it in its own words.
    """
    def convert(value):
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = parse(value.strip())
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def integer(minimum: int | None = None, maximum: int | None = None):
    """argparse type: an integer in [minimum, maximum]."""
    return checked(lambda v: checks.integer("value", v, minimum, maximum), int)


def real(minimum: float | None = None, maximum: float | None = None, *, positive: bool = False):
    """argparse type: a finite number in [minimum, maximum] (> 0 if `positive`); fractions such as 8/255 allowed."""
    return checked(lambda v: checks.real("value", v, minimum, maximum, positive=positive), number)


def choice(options):
    """argparse type: one of the strings `options` (for the items of a `listed` option)."""
    return checked(lambda v: checks.choice("value", v, tuple(options)), str)


def listed(item):
    """argparse type: a comma-separated list (or a TOML array) of values of the type `item`."""
    def convert(value):
        items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise argparse.ArgumentTypeError(f"value must be a non-empty comma-separated list, got {value!r}")
        return [item(v) for v in items]
    return convert


random_seed = integer(0, checks.MAX_SEED)


def device(text: str) -> str:
    """argparse type: "cpu", "cuda" or "cuda:<index>" of a GPU that this machine has."""
    import torch

    try:
        d = torch.device(text) if isinstance(text, str) else None
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"value must be 'cpu', 'cuda' or 'cuda:<index>', got {text!r}")
    if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"value must be a GPU of this machine ({torch.cuda.device_count()} "
                                         f"found), got {text!r}")
    return text


def existing_file(text: str) -> str:
    """argparse type: the path of an existing file."""
    if not isinstance(text, str) or not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"value must be an existing file, got {text!r}")
    return text


def existing_dir(text: str) -> str:
    """argparse type: the path of an existing directory."""
    if not isinstance(text, str) or not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"value must be an existing directory, got {text!r}")
    return text



