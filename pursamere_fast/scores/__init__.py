"""Score models and adapters to the `score(y, sigma)` protocol (SPEC section 5)."""

from .adapters import LabelIndexedScore, NoisePredictionScore, ScoreFn
from .ncsnv2 import NCSNv2, NCSNv2Score, load_ncsnv2

__all__ = ["ScoreFn", "NoisePredictionScore", "LabelIndexedScore", "NCSNv2", "NCSNv2Score", "load_ncsnv2"]
