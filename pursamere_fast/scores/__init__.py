"""Score models and adapters to the `score(y, sigma)` protocol (SPEC sections 5 and 11), and from
it to VP noise predictors eps_hat(x_t, t) (SPEC section 8). Which one to call: docs/scores.md."""

from .adapters import (
    ContinuousVPScore,
    LabelIndexedScore,
    NativeNoisePredictor,
    NoisePredictionScore,
    NoisePredictor,
    ScoreAdapter,
    ScoreAsVPModel,
    ScoreFn,
    VEScore,
    VPNoisePredictor,
    VPScore,
    vp_alpha_bar,
)
from .boundary import NonFiniteScoreError, ScoreCall
from .diffusers_io import from_diffusers, load_diffusers
from .ncsnv2 import NCSNv2, NCSNv2Score, load_ncsnv2, ncsnv2_score
from .schedules import ContinuousVPSchedule, DiscreteVPSchedule
from .score_sde import load_score_sde, score_sde_network

__all__ = ["ScoreFn", "ScoreAdapter", "VPScore", "ContinuousVPScore", "VEScore", "NoisePredictionScore",
           "LabelIndexedScore", "ScoreAsVPModel", "from_diffusers", "load_diffusers", "DiscreteVPSchedule",
           "ContinuousVPSchedule", "ScoreCall", "NonFiniteScoreError", "NCSNv2", "NCSNv2Score", "load_ncsnv2",
           "ncsnv2_score", "vp_alpha_bar", "NoisePredictor", "VPNoisePredictor", "NativeNoisePredictor",
           "load_score_sde", "score_sde_network"]
