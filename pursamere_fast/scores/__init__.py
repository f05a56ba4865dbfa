"""Score models and adapters to the `score(y, sigma)` protocol (SPEC section 5), and from it
to VP noise predictors eps_hat(xb_t, t) (SPEC section 8)."""

from .adapters import (
    LabelIndexedScore,
    NativeNoisePredictor,
    NoisePredictionScore,
    NoisePredictor,
    ScoreFn,
    VPNoisePredictor,
    vp_alpha_bar,
)
from .ncsnv2 import NCSNv2, NCSNv2Score, load_ncsnv2, ncsnv2_score

__all__ = ["ScoreFn", "NoisePredictionScore", "LabelIndexedScore", "NCSNv2", "NCSNv2Score", "load_ncsnv2",
           "ncsnv2_score", "vp_alpha_bar", "NoisePredictor", "VPNoisePredictor", "NativeNoisePredictor"]
