"""Argument checks for every public entry point, with one wording.

Each check raises `ValueError("<name> must be <what>, got <value>")` and returns the value
in its canonical type (a Python int, float, tuple), so callers validate and convert in one
line. The core, the harness, the trainers and the CLI all use these; nothing here imports
anything of the package.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Set

import torch

# torch.Generator.manual_seed takes at most 2**64 - 1; the harness derives seeds as
# seed + offset (restarts, EoT draws, runs), so the user's seed keeps 2**63 of headroom.
MAX_SEED = 2**63 - 1
# Images are in [0, 1]; this much slack admits values that went through a float32
# normalise/denormalise round trip.
IMAGE_SLACK = 1e-6
INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _bounds(minimum, maximum, strict_min=False) -> str:
    def fmt(v):
        return f"{v:g}" if isinstance(v, float) else str(v)

    low = None if minimum is None else f"{'>' if strict_min else '>='} {fmt(minimum)}"
    high = None if maximum is None else f"<= {fmt(maximum)}"
    return " and ".join(b for b in (low, high) if b)


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (not a bool, not a float) in [minimum, maximum]; returned as int."""
    bounds = _bounds(minimum, maximum)
    what = f"an integer {bounds}" if bounds else "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def seed(name: str, value) -> int:
    """A random seed: an integer in [0, MAX_SEED]."""
    return integer(name, value, 0, MAX_SEED)


def real(name: str, value, minimum: float | None = None, maximum: float | None = None, *,
         positive: bool = False) -> float:
    """A finite real number (not a bool) in [minimum, maximum] (> 0 if `positive`); returned as float."""
    if positive:
        minimum = 0 if minimum is None else minimum
    bounds = _bounds(minimum, maximum, strict_min=positive)
    what = f"a finite number {bounds}" if bounds else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if positive else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def reals(name: str, values, *, length: int | None = None) -> tuple[float, ...]:
    """A non-empty sequence of finite real numbers (a list, tuple, 1-D array or tensor).

    A string, a mapping or a set is refused: tuple("54") would be ('5', '4') and a dict
    would give its keys.
    """
    what = f"a sequence of {length or 'one or more'} finite numbers"
    if hasattr(values, "ndim") and hasattr(values, "tolist"):  # numpy array or torch tensor
        if values.ndim != 1:
            raise ValueError(f"{name} must be {what}, got an array of shape {tuple(values.shape)}")
        values = values.tolist()
    if isinstance(values, (str, bytes, Mapping, Set)) or not isinstance(values, Iterable):
        raise ValueError(f"{name} must be {what}, got {values!r}")
    out = tuple(values)
    bad = [v for v in out if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)]
    if not out or bad or (length is not None and len(out) != length):
        raise ValueError(f"{name} must be {what}, got {values!r}")
    return tuple(float(v) for v in out)


def choice(name: str, value, options):
    """One of `options` (compared by ==, after checking the type so that ['linf'] is refused)."""
    if not any(type(value) is type(o) and value == o for o in options):
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    """True or False (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def function(name: str, value):
    """A callable."""
    if not callable(value):
        raise ValueError(f"{name} must be callable, got {type(value).__name__} {value!r:.60}")
    return value


def images(name: str, x, *, allow_empty: bool = False) -> torch.Tensor:
    """A (B, C, H, W) floating tensor with finite values in [0, 1] (within IMAGE_SLACK)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got ndim={x.dim()}, shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        if allow_empty:
            return x
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    d = x.detach()
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    lo, hi = float(d.min()), float(d.max())
    if lo < -IMAGE_SLACK or hi > 1 + IMAGE_SLACK:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    return x


def labels(name: str, y, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """Integer class labels of shape (batch,), in [0, num_classes) when that is given."""
    if not isinstance(y, torch.Tensor) or y.dtype not in INT_DTYPES:
        raise ValueError(f"{name} must be an integer torch.Tensor, got {getattr(y, 'dtype', type(y).__name__)}")
    if tuple(y.shape) != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or (num_classes is not None and int(y.max()) >= num_classes)):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise ValueError(f"{name} must be class indices in {bound}, got values in [{int(y.min())}, {int(y.max())}]")
    return y


def tensor(name: str, t, shape: tuple) -> torch.Tensor:
    """A floating tensor of exactly `shape` with finite values."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating torch.Tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{name} contains NaN or Inf")
    return t
