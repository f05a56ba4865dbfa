"""Argument checks for every public entry point, with one wording.

Each check raises `ValueError("<name> must be <what>, got <value>")` and returns the value
in its canonical type (a Python int, float, tuple), so callers validate and convert in one
line. The core, the harness, the trainers and the CLI all use these; nothing here imports
anything of the package.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
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


def image_shape(name: str, value) -> tuple[int, int, int]:
    """An image shape (C, H, W) of three positive integers; returned as a tuple of ints."""
    try:
        shape = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be (C, H, W), got {value!r}") from None
    if len(shape) != 3:
        raise ValueError(f"{name} must be (C, H, W), got {shape}")
    return tuple(integer(f"{name} entries", d, 1) for d in shape)


def images(name: str, x, *, allow_empty: bool = False) -> torch.Tensor:
    """A (B, C, H, W) floating tensor with finite values in [0, 1] (within IMAGE_SLACK).

    Every purifier and `purify` check their images here, so the wording is one. Each message
    starts "<name> must ..." (or "<name> contains NaN or Inf") and, where the mistake is a
    common one, ends with the fix: a (C, H, W) image needs a batch dimension, channels-last
    (B, H, W, C) images need `x.permute(0, 3, 1, 2)`, uint8 or [0, 255] images need `/ 255`,
    [-1, 1] or mean/std-normalised images belong to the classifier's side
    (`PurifiedClassifier(mean=, std=)`).

    Args:
        name: how the message names the argument.
        x: the images.
        allow_empty: accept a batch of zero images.

    Returns:
        x, unchanged.

    Raises:
        ValueError: not a tensor, not 4-D, channels-last, not floating, empty, NaN/Inf, or
            values outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        hint = "; convert a NumPy array with torch.from_numpy(x)" if hasattr(x, "__array__") else ""
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}{hint}")
    if x.device.type == "meta":
        raise ValueError(f"{name} must hold data, got a tensor on the meta device (shape {tuple(x.shape)})")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got ndim={x.dim()}, shape {tuple(x.shape)}"
                         f"{_NDIM_HINTS.get(x.dim(), '')}")
    if _channels_last_shape(x.shape):
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}, which looks channels-last "
                         f"(B, H, W, C) with C={x.shape[-1]}: permute it with x.permute(0, 3, 1, 2)")
    if not x.is_floating_point():
        hint = ""
        if x.dtype in INT_DTYPES:
            hint = "; integer images hold [0, 255] pixel values: convert them with x.float() / 255"
        elif x.dtype == torch.bool:
            hint = "; convert a binary image with x.float()"
        raise ValueError(f"{name} must be a floating-point tensor with values in [0, 1], got dtype {x.dtype}{hint}")
    if x.numel() == 0:
        if allow_empty:
            return x
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    d = x.detach()
    finite = torch.isfinite(d)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        raise ValueError(f"{name} contains NaN or Inf ({len(bad)} of {d.numel()} values, the first at index "
                         f"{tuple(bad[0].tolist())})")
    lo, hi = float(d.min()), float(d.max())
    if lo < -IMAGE_SLACK or hi > 1 + IMAGE_SLACK:
        raise ValueError(f"{name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]{_range_hint(lo, hi)}")
    return x


# What a wrong number of dimensions usually means.
_NDIM_HINTS = {
    2: "; a single (H, W) image needs batch and channel dimensions: x[None, None]",
    3: "; a single (C, H, W) image needs a batch dimension: x.unsqueeze(0)",
    5: "; a stack of batches such as (runs, B, C, H, W) is flattened with x.flatten(0, 1)",
}


def _channels_last_shape(shape) -> bool:
    """(B, H, W, C) with C in {1, 3, 4} and H, W > 4: channels-last images. A (B, C, H, W)
    image with more than four channels and a width of at most four is not an image anyone
    purifies, so this does not refuse real input."""
    return shape[1] > 4 and shape[2] > 4 and shape[3] in (1, 3, 4)


def _range_hint(lo: float, hi: float) -> str:
    """The likely cause of values outside [0, 1], for the error message."""
    # 0.01: a rounding or interpolation overshoot, not another convention.
    if lo >= -0.01 and hi <= 1.01:
        return "; values just outside [0, 1] (an interpolation or rounding overshoot?) need x.clamp(0, 1)"
    if lo >= -IMAGE_SLACK and hi <= 255 + IMAGE_SLACK:
        return "; these look like [0, 255] pixel values: divide them by 255"
    if lo < 0:
        return ("; negative values are [-1, 1] or mean/std-normalised images: purifiers take [0, 1] images "
                "(map [-1, 1] with (x + 1) / 2) and the classifier normalises after purification, as "
                "PurifiedClassifier(purifier, classifier, mean=..., std=...) does (with torchattacks, use that "
                "instead of set_normalization_used)")
    return ""


class ModelInputError(ValueError, RuntimeError):
    """A score or classifier could not take the images it was given (`score_error`).

    A ValueError, since the input is what is wrong, and a RuntimeError, which the model's own
    error was, so that code catching either keeps working.
    """


class ModelCallError(ValueError, TypeError):
    """A score or classifier could not be called as the purifier calls it (a TypeError inside the
    call, e.g. a score that takes one argument): a ValueError and a TypeError."""


def score_error(error: BaseException, name: str, y: torch.Tensor, *,
                images: str = "x") -> ModelInputError | ModelCallError | None:
    """A ValueError that says why a call of a score (or classifier) on `y` failed, or None.

    Purifiers wrap their model calls with this (`model_errors`), so that images the model
    cannot take are named at the first call instead of surfacing as a convolution's
    RuntimeError: the wrong channel count (both counts named), another device, another dtype,
    and any other RuntimeError of the model (an image size its layers were not built for),
    named with the images' shape, dtype and device. Out-of-memory and CUDA errors are not
    about the images and pass through (None), as does anything that is not a RuntimeError.

    Args:
        error: what the call raised.
        name: the callable, e.g. "score".
        y: its input (M, C, H, W).
        images: how the message names the purifier's images.

    Returns:
        ModelInputError (a RuntimeError), ModelCallError (a TypeError), or None for an error
        that is not about the images or the call.
    """
    msg = str(error)
    first = msg.strip().splitlines()[0] if msg.strip() else type(error).__name__
    if isinstance(error, TypeError) and not isinstance(error, ValueError):
        how = " (a score is called as score(y, sigma), y (M, C, H, W), sigma (M,))" if name == "score" else ""
        return ModelCallError(f"the {name} model could not be called on {images}{how}: {first}")
    if isinstance(error, torch.OutOfMemoryError) or not isinstance(error, RuntimeError) or "CUDA error" in msg:
        return None
    channels = re.search(r"to have (\d+) channels, but got (\d+) channels", msg)
    if channels:
        want, got = int(channels.group(1)), int(channels.group(2))
        hint = ""
        if y.dim() == 4 and y.shape[-1] == want:
            hint = f"; if {images} is channels-last (B, H, W, C), permute it with x.permute(0, 3, 1, 2)"
        return ModelInputError(f"{images} has C={got} channels but the {name} model takes C={want} (its first "
                          f"convolution's input channels): use a {name} model for {got}-channel images or images "
                          f"with {want} channels{hint}")
    if re.search(r"same device|Expected all tensors to be on|cuda\.\w*Tensor|is on \w+ but|device type", msg):
        return ModelInputError(f"{images} is on {y.device} but the {name} model is elsewhere ({first}): "
                          f"move the {name} model to the images' device (model.to(x.device))")
    if re.search(r"dtype|scalar type|Input type \(\w+\) and (weight|bias) type", msg):
        return ModelInputError(f"the {name} model cannot take {images}'s dtype {y.dtype} ({first}): "
                          f"cast the images (x.float()) or the model (model.to(x.dtype)) so that they agree")
    return ModelInputError(f"the {name} model failed on {images} (its input of shape {tuple(y.shape)}, {y.dtype}, on "
                      f"{y.device}): {first}; check that it takes images of this shape (channels and size)")


@contextlib.contextmanager
def model_errors(name: str, y: torch.Tensor, *, images: str = "x"):
    """Within this context a model's RuntimeError about its input becomes the `ModelInputError`
    of `score_error`, a TypeError its `ModelCallError` (chained to the original); anything else
    passes through unchanged."""
    try:
        yield
    except (RuntimeError, TypeError) as e:
        named = score_error(e, name, y, images=images)
        if named is None:
            raise
        raise named from e


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
