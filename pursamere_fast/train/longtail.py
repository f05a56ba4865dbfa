"""Long-tailed subsets of a balanced training set and the head/tail split of SPEC 9.

The exponential profile of Cao et al. (LDAM, NeurIPS 2019), used by ImbSAM and SSE-SAM for
CIFAR-LT: class c (in label order) keeps n_c = floor(n_max * R^(-c / (C - 1))) samples, so
class 0 keeps n_max and class C - 1 keeps n_max / R. With Fashion-MNIST (n_max = 6000) and
R = 100 the counts are 6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pursamere_fast import checks


def long_tailed_counts(n_max: int, ratio: float, num_classes: int) -> list[int]:
    """Samples kept per class: n_c = floor(n_max * ratio^(-c / (num_classes - 1))).

    Args:
        n_max: samples of class 0 (>= 1).
        ratio: the imbalance ratio R = n_0 / n_{C-1}, in [1, n_max] (so every class keeps one).
        num_classes: C (>= 2).

    Returns:
        The C counts, non-increasing.

    Raises:
        ValueError: an argument out of range.
    """
    n_max = checks.integer("n_max", n_max, 1)
    num_classes = checks.integer("num_classes", num_classes, 2)
    ratio = checks.real("ratio", ratio, 1, n_max)
    return [math.floor(n_max * ratio ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tailed_subset(labels, ratio: float, seed: int = 0) -> np.ndarray:
    """Indices of a long-tailed subset of a labelled set (`long_tailed_counts` per class).

    n_max is the count of the smallest class of `labels` (6000 for Fashion-MNIST), so every
    class can supply its n_c; the classes are 0 .. max(labels). Which samples of class c are
    kept is a uniform draw without replacement from a numpy generator seeded by `seed`, so the
    subset depends on (labels, ratio, seed) only.

    Args:
        labels: integer class labels (N,) (numpy or torch), every class 0 .. max present.
        ratio: the imbalance ratio R (see `long_tailed_counts`).
        seed: chooses the samples.

    Returns:
        int64 indices into `labels`, ascending.

    Raises:
        ValueError: labels not 1-D non-negative integers, fewer than two classes, a class with
            no sample, or `ratio` out of range.
    """
    y = checks.labels("labels", torch.as_tensor(labels), len(labels)).numpy()
    seed = checks.seed("seed", seed)
    counts = np.bincount(y)
    if len(counts) < 2 or counts.min() == 0:
        raise ValueError(f"labels must hold every class 0 .. {len(counts) - 1} and at least two classes, "
                         f"got counts {counts.tolist()}")
    keep = long_tailed_counts(int(counts.min()), ratio, len(counts))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:n] for c, n in enumerate(keep)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def tail_classes(labels, tail_threshold: int) -> list[int]:
    """The tail classes of SPEC 9: classes 0 .. max(labels) with fewer than `tail_threshold`
    samples in `labels` (a class with no sample counts as tail).

    Raises:
        ValueError: labels not 1-D non-negative integers, or `tail_threshold` < 1.
    """
    y = checks.labels("labels", torch.as_tensor(labels), len(labels))
    tail_threshold = checks.integer("tail_threshold", tail_threshold, 1)
    counts = torch.bincount(y.long()) if len(y) else torch.zeros(0, dtype=torch.long)
    return [c for c, n in enumerate(counts.tolist()) if n < tail_threshold]
