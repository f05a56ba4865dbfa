"""The executable spec: plain PyTorch versions of the loop and of each fused op."""

from .diffpure import diffpure_reference
from .hetero import hetero_reference
from .purify import ere, ere_grad, purify_reference

__all__ = ["ere", "ere_grad", "purify_reference", "hetero_reference", "diffpure_reference"]
