"""Attack harness: PGD, threat models, baselines, the resumable evaluation runner, sanity checks.

    from pursamere_fast.attacks import pgd, PurifiedClassifier, AttackSpec, Defence, evaluate
"""

from .baselines import ADPPurifier
from .pgd import pgd, project_l1
from .cli import main_evaluate, main_sanity
from .runner import evaluate, markdown_table, read_rows, summarise
from .sanity import run_sanity
from .stats import mcnemar_exact, wilson_interval
from .threats import (THREATS, AttackSpec, Defence, clean_predictions, cosine_per_sample, grid, input_gradients,
                      run_attack)
from .wrappers import FreshNoisePurifier, IdentityPurifier, PurifiedClassifier, StraightThrough

__all__ = [
    "ADPPurifier", "AttackSpec", "Defence", "FreshNoisePurifier", "IdentityPurifier", "PurifiedClassifier",
    "StraightThrough", "THREATS", "clean_predictions", "cosine_per_sample", "evaluate", "grid", "input_gradients",
    "main_evaluate", "main_sanity", "markdown_table", "mcnemar_exact", "pgd", "project_l1", "read_rows", "run_attack",
    "run_sanity", "summarise", "wilson_interval",
]
