"""SAM-family optimisers (SPEC section 9), wrappers around a constructed base optimiser.

    from pursamere_fast.optim import SAM, ImbSAM, SSESAM, stage_rho_head
"""

from .sam import SAM, SSESAM, ImbSAM, stage_rho_head

__all__ = ["SAM", "ImbSAM", "SSESAM", "stage_rho_head"]
