"""Attack harness: PGD, APGD, Square, threat models, the resumable evaluation runner, sanity checks.

The purifiers it attacks besides PurSAMERE live in `pursamere_fast.purifiers`.

    from pursamere_fast.attacks import pgd, PurifiedClassifier, AttackSpec, Defence, evaluate
"""

from .apgd import apgd
from .pgd import attack_loss, pgd, project_l1
from .rows import RowStore, open_shard, read_rows, read_run
from .runner import evaluate, markdown_table, summarise
from .sanity import run_sanity
from .square import square
from .stats import format_accuracy, mcnemar_exact, wilson_interval
from .threats import (
    THREATS,
    AttackSpec,
    Defence,
    clean_predictions,
    cosine_per_sample,
    grid,
    input_gradients,
    run_attack,
)
from .wrappers import (
    FreshNoisePurifier,
    IdentityPurifier,
    PurifiedClassifier,
    StraightThrough,
    VotingClassifier,
)

__all__ = [
    "THREATS", "AttackSpec", "Defence", "FreshNoisePurifier", "IdentityPurifier", "PurifiedClassifier", "RowStore",
    "StraightThrough", "VotingClassifier", "apgd", "attack_loss", "clean_predictions", "cosine_per_sample",
    "evaluate", "format_accuracy", "grid", "input_gradients", "markdown_table", "mcnemar_exact", "open_shard",
    "pgd", "project_l1", "read_rows", "read_run", "run_attack", "run_sanity", "square", "summarise",
    "wilson_interval",
]
