"""The evaluation protocol of issue 13 (docs/protocol.md) for any dataset: score model, clean
classifier, selection on held-out images, augmented classifier, test jobs, report.

A protocol is one TOML file (`configs/<name>_protocol.toml`) and the evaluation templates it
names (`pursamere-fast evaluate` configs once resolved), all written before any run:

- [protocol]: `title` (the report's heading), `driver` (the script that runs it, named in its
  messages), `dataset` (`--dataset` of the trainers), `data` (the evaluate data factory, called
  with root, part = "validation" or "test" and holdout), `score` (the evaluate score factory,
  called with path), `out` (the default output directory; `_smoke` appended under --smoke),
  `select` and `tests` (template files next to the protocol file: the selection template and
  {job: template} of the test jobs), optionally `score_arg` and `data_arg` (how the driver
  names its score and data inputs in messages; default --score and --data-root).
- [train]: `train-classifier` options of both classifiers; its `holdout` (the last training
  images, kept out of every training) is the selection's data and is passed to train-score too.
- [train_score] (optional): `train-score` options; when present the protocol trains its own
  score model on the held-out split (stage train_score) unless --score gives one, which must
  then say in its training metadata that it held the same images out.
- [score_quality] (optional): `score-quality` options and `baseline`, a score file (relative
  to the protocol file) put first in the table; measured on the held-out images (--split
  validation; n at most the holdout).
- [pursamere], [adp]: the base of every PurSAMERE and ADP defence of the templates.
- [selection]: the rule (below). [smoke]: the smoke profile.

    pursamere-fast protocol run --protocol P [--smoke] [--score S] [--data-root D] \\
        [--test-n N] [OUT]
    pursamere-fast protocol config --protocol P --score S [--data-root D] \\
        [--choice CHOICE] [--smoke] --out-dir D TEMPLATE...                 # evaluate configs in D
    pursamere-fast protocol select --protocol P [--smoke] --config D/<select>.toml \\
        --out RUN                                          # RUN/choice.json, choice.md, augment.json
    pursamere-fast protocol report --protocol P OUT  # OUT/report.md, report.png

The report also reads OUT/baselines.json when present: runs of other defences (DiffPure, the
heterogeneous purifier) on a job's images and members, which join claim (iii)'s comparisons.

`run` calls `train-score`, `score-quality`, `train-classifier`, `evaluate` and the steps above in
one process (a torch import per stage would cost more than a smoke run's work) and logs each
stage with its equivalent command line, so that any stage can be rerun alone.

Resolving a template: the protocol's [pursamere] and [adp] tables go under the template's
(the template's keys win), the protocol's score and data factories with the score file and
the data directory fill score, data, [score_kwargs] and [data_kwargs], and a [[defence]] entry
with `choice = "sam"`, `"nosam"` or `"adp"` takes the selection's choice for that group; a
`rho` in a PurSAMERE entry moves the ball to that radius and scales the SAM radius with it
(the grid's r is a fraction of rho). `--smoke` then applies the protocol's [smoke] table: its
n and batch_size, every [[attack]]'s steps capped at max_steps (Square's queries at
max_queries), and its [smoke.pursamere] and [smoke.adp] fields over every PurSAMERE and ADP
setting; [smoke.train], [smoke.train_score], [smoke.score_quality] and [smoke.selection] go
over their tables, so that the same pipeline runs on a handful of synthetic images.

Selection rule (`select`, written in the protocol file before the run): on the held-out
images, each grid point's robust accuracy is the worst case over the selection suite's
members (the selection template's [[attack]] array). Separately for PurSAMERE with SAM (r >
0), PurSAMERE without SAM (r = 0) and, when the grid has ADP points, ADP: among the points
whose clean accuracy is at most clean_tol below the undefended classifier's (or one image,
whichever is larger), keep those whose worst case is at most robust_tol below the best of
them and take the cheapest (score evaluations per purification); ties go to the higher worst
case, then the higher clean accuracy, then the earlier point of the grid
(`sweep.choose_config`).
"""

from .report import (
                     BASELINES,
                     CLAIMS,
                     accuracy_panels,
                     baseline_runs,
                     comparisons,
                     defence_order,
                     plot_report,
                     report,
                     robust_maps,
                     verdicts,
                     write_report,
)
from .selection import augmentation_config, choice_markdown, select
from .spec import (
                     AUGMENT,
                     CHOICE,
                     CHOICE_MD,
                     CLASSIFIERS,
                     DATASETS,
                     GROUPS,
                     LEVEL,
                     check_held_out,
                     data_root,
                     dump_toml,
                     options,
                     quality_options,
                     resolve,
                     score_training_options,
                     selection_rule,
                     spec,
                     training_options,
)

__all__ = [
    "AUGMENT", "BASELINES", "CHOICE", "CHOICE_MD", "CLAIMS", "CLASSIFIERS", "DATASETS", "GROUPS", "LEVEL",
    "ProtocolSpec", "accuracy_panels", "baseline_runs",
    "comparisons", "defence_order", "robust_maps",
    "augmentation_config", "check_held_out", "choice_markdown", "data_root", "dump_toml", "options", "plot_report",
    "quality_options", "report", "resolve", "score_training_options", "select", "selection_rule", "spec",
    "training_options", "verdicts", "write_report",
]
