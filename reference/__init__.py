"""The executable spec: plain PyTorch versions of the loop and of each fused op."""

from .purify import ere, ere_grad, purify_reference

__all__ = ["ere", "ere_grad", "purify_reference"]
