"""The classifier's saliency for the heterogeneous-noise purifier (SPEC 8; `hetero.py`): forward
hooks on the last activation of each stage, A_s = sum over channels of F_s^2 upsampled to H x W and
min-max scaled per image, A = max over stages, and the strong-noise mask M = 1[A >= tau] (or the
top q fraction of pixels). Nothing is differentiated.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..scores.boundary import model_dtype

__all__ = ["SALIENCY_STAGES", "saliency_map", "saliency_mask", "stage_names"]

# The stage outputs whose activations make the saliency map, per classifier class name: the
# last activation of each stage (for SmallCNN the ReLU before each MaxPool). Add an entry to
# register another architecture, or pass `stages=` per call.
# WideResNet: the WRN-28-10 of the CIFAR-10 protocol with RobustBench's module names (4 blocks
# per stage): each stage's last block's second ReLU, then the final ReLU, the layers the
# official code hooks.
SALIENCY_STAGES: dict[str, tuple[str, ...]] = {
    "SmallCNN": ("features.3", "features.8"),
    "WideResNet": ("block1.layer.3.relu2", "block2.layer.3.relu2", "block3.layer.3.relu2", "relu"),
}
def stage_names(classifier, stages) -> tuple[str, ...]:
    """The validated stage names for `classifier`."""
    if stages is None:
        name = type(classifier).__name__
        if name not in SALIENCY_STAGES:
            raise ValueError(f"stages must name the classifier's stage modules: {name} has no entry in "
                             f"SALIENCY_STAGES ({sorted(SALIENCY_STAGES)}), got stages=None")
        return SALIENCY_STAGES[name]
    if isinstance(stages, str) or not isinstance(stages, Sequence) or not stages \
            or not all(isinstance(s, str) for s in stages):
        raise ValueError(f"stages must be a non-empty sequence of module names, got {stages!r}")
    modules = dict(classifier.named_modules()) if isinstance(classifier, nn.Module) else {}
    missing = [s for s in stages if s not in modules]
    if missing:
        raise ValueError(f"stages must name modules of the classifier, got {list(stages)} ({missing} not found)")
    return tuple(stages)


def saliency_map(classifier: nn.Module, x: torch.Tensor, *, stages: Sequence[str] | None = None) -> torch.Tensor:
    """The classifier's attention map A in [0, 1], per pixel (nothing is differentiated).

    A forward pass of x.detach() under no_grad with forward hooks on the stage modules;
    per stage A_s = sum over channels of F_s^2, bilinearly upsampled to H x W
    (align_corners=False) and min-max scaled per image (a constant map scales to 0);
    A = max over stages. Every step is per image, so A does not depend on the batch (for a
    classifier in eval mode). The hooks are removed afterwards, also on an exception.

    Args:
        classifier: nn.Module taking x as given ([0, 1] images).
        x: (B, C, H, W) images.
        stages: names (as in `named_modules()`) of the modules whose outputs (B, C_s, h, w)
            are the stage activations; default `SALIENCY_STAGES[type(classifier).__name__]`.

    Returns:
        (B, 1, H, W) tensor of x's dtype with values in [0, 1].

    Raises:
        ValueError: stages is None for an unregistered classifier, names a module the
            classifier lacks, or a stage's output is not a 4-D tensor or is not produced.
    """
    names = stage_names(classifier, stages)
    modules = dict(classifier.named_modules())
    energy: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                raise ValueError(f"stages must name modules with (B, C, h, w) outputs, {name!r} gave "
                                 f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}")
            # Reduced now: a later in-place op of the classifier must not change it.
            energy[name] = output.detach().pow(2).sum(1, keepdim=True)
        return hook

    handles = []
    try:
        for name in names:
            handles.append(modules[name].register_forward_hook(keep(name)))
        # The classifier sees the images in its parameters' dtype (float64 images, float32
        # classifier); the maps come back in x's dtype below.
        dtype = model_dtype(classifier) or x.dtype
        with torch.no_grad(), checks.model_errors("classifier", x):
            classifier(x.detach().to(dtype))
    finally:
        for handle in handles:
            handle.remove()
    absent = [n for n in names if n not in energy]
    if absent:
        raise ValueError(f"stages must name modules that run in the forward pass, {absent} did not")
    out = None
    for name in names:
        a = F.interpolate(energy[name].to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
        lo, hi = a.amin((2, 3), keepdim=True), a.amax((2, 3), keepdim=True)
        span = hi - lo
        a = torch.where(span > 0, (a - lo) / torch.where(span > 0, span, 1), 0)
        out = a if out is None else torch.maximum(out, a)
    return out


def _top_count(top_q: float, pixels: int) -> int:
    return max(1, round(top_q * pixels))


def saliency_mask(classifier: nn.Module, x: torch.Tensor, *, stages: Sequence[str] | None = None,
                  tau: float = 0.9, top_q: float | None = None) -> torch.Tensor:
    """The strong-noise region: the pixels the classifier attends to (SPEC 8).

    Args:
        classifier, x, stages: as `saliency_map`.
        tau: threshold in [0, 1]: M = 1[A >= tau].
        top_q: if given, in (0, 1]: instead of tau, the round(top_q * H * W) pixels (at least
            one) of highest A per image; ties go to the earlier pixel in raster order.

    Returns:
        bool (B, 1, H, W).

    Raises:
        ValueError: a bad tau or top_q, or as `saliency_map`.
    """
    tau = checks.real("tau", tau, 0.0, 1.0)
    if top_q is not None:
        top_q = checks.real("top_q", top_q, maximum=1.0, positive=True)
    a = saliency_map(classifier, x, stages=stages)
    if top_q is None:
        return a >= tau
    flat = a.flatten(1)
    order = flat.sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=a.device).expand_as(order))
    return (rank < _top_count(top_q, flat.shape[1])).view_as(a)
