"""Every purifier other than the PurSAMERE loop, each with `Purifier`'s grad modes
("none", "bpda", "full", ...; `pursamere_fast.purifier.GRAD_MODES`).

- `adp.py`: `ADPPurifier`, ADP-style noise injection and score ascent (Yoon et al., 2021).
- `hetero.py`: `HeteroPurifier`, heterogeneous-noise diffusion purification (Pei et al.,
  CVPR 2025; SPEC 8): strong noise on the classifier's salient pixels, weak noise elsewhere,
  DDIM back; with its building block `ddim_step`, and in `saliency.py` the classifier's
  saliency (`saliency_map`, `saliency_mask`, `SALIENCY_STAGES`).
- `diffpure.py`: `DiffPurePurifier`, DiffPure (Nie et al., ICML 2022; SPEC 12): VP diffusion
  to t*, then the reverse SDE or the probability-flow ODE back to t = 0.
"""

from .adp import ADPPurifier
from .diffpure import DiffPurePurifier
from .hetero import MASKS, HeteroNoise, HeteroPurifier, ddim_step, vp_alpha_bar
from .saliency import SALIENCY_STAGES, saliency_map, saliency_mask

__all__ = ["ADPPurifier", "HeteroPurifier", "HeteroNoise", "MASKS", "SALIENCY_STAGES", "saliency_map",
           "saliency_mask", "ddim_step", "vp_alpha_bar", "DiffPurePurifier"]
