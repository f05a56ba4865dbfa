"""Training of score models and classifiers: resumable, deterministic, no pickle.

- `score.py`: `train_score` (NCSN denoising score matching, EMA), `evaluate_denoiser`,
  (the ``pursamere-fast train-score`` command is `pursamere_fast.commands.train_score`).
- `classifier.py`: `train_classifier` with Adam, SGD, SAM, ImbSAM or SSE-SAM
  (`OptimizerConfig`) and optionally a regulariser (`RegulariserConfig`: LFR, gradient
  penalty, PGD adversarial training), `evaluate_classifier`, `per_class_accuracy`, the
  ``pursamere-fast train-classifier`` command in `pursamere_fast.commands.train_classifier`.
- `lfr.py`: local flatness regularisation (SPEC 10): `lfr_penalty`, the clean-point
  `gradient_penalty`, and `pgd_examples` for adversarial training.
- `longtail.py`: long-tailed subsets (`long_tailed_subset`) and the head/tail split.
- `checkpoint.py`: the run directory every trainer keeps (checkpoint, loss log, plot).
- `quality.py`: what ``pursamere-fast score-quality`` prints, score files side by side: Tweedie denoising
  MSE, parameters, FLOPs and CPU cost per score evaluation and per purification.
"""

from .checkpoint import (
    CHECKPOINT,
    LOSS_LOG,
    LOSS_PNG,
    ResumeError,
    TrainResult,
    plot_losses,
)
from .classifier import (
    OPTIMIZERS,
    REGULARISERS,
    SCHEDULES,
    OptimizerConfig,
    RegulariserConfig,
    evaluate_classifier,
    per_class_accuracy,
    train_classifier,
)
from .lfr import gradient_penalty, lfr_penalty, pgd_examples
from .longtail import long_tailed_counts, long_tailed_subset, tail_classes
from .score import evaluate_denoiser, score_matching_loss, train_score

__all__ = [
    "CHECKPOINT", "LOSS_LOG", "LOSS_PNG", "OPTIMIZERS", "REGULARISERS", "SCHEDULES", "OptimizerConfig",
    "RegulariserConfig", "ResumeError", "TrainResult", "evaluate_classifier", "evaluate_denoiser",
    "gradient_penalty", "lfr_penalty", "long_tailed_counts", "long_tailed_subset", "per_class_accuracy",
    "pgd_examples", "plot_losses", "score_matching_loss", "tail_classes", "train_classifier", "train_score",
]
