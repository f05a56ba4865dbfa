"""Fused ops of the purification loop: Triton launchers and torch fallbacks of the same semantics.

Each op lives in its own file (`ere_residual.py`, `mc_reduce_sam.py`, `adam_project.py`) with a
private `_<op>_kernel`, a launcher `<op>(...)` and a fallback `<op>_torch(...)`; the plain
float64-capable versions that define the semantics are in `pursamere_fast.reference`. What the
ops share, the one gate that decides whether Triton runs (`use_triton`) among it, is in
`common.py`. The package imports on machines without Triton (non-Linux): the launchers then
raise `RuntimeError` when called and the `*_torch` fallbacks still work. Nothing here queries
the GPU at import time.
"""

from .adam_project import adam_project, adam_project_torch
from .common import block_size, triton_available, use_triton
from .ere_residual import ere_residual, ere_residual_torch
from .mc_reduce_sam import mc_reduce_sam, mc_reduce_sam_torch

__all__ = [
    "ere_residual",
    "ere_residual_torch",
    "mc_reduce_sam",
    "mc_reduce_sam_torch",
    "adam_project",
    "adam_project_torch",
    "use_triton",
    "triton_available",
    "block_size",
]
