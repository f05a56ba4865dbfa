"""Official score_sde networks (NCSN++, DDPM++, DDPM) and `load_score_sde` (SPEC section 11).

This library's own implementation of yang-song/score_sde_pytorch's `ncsnpp` and `ddpm`
architectures, with the official state_dict keys, so that official checkpoints (DiffPure's
CIFAR-10 DDPM++ deep continuous VP model among them) load strictly and reproduce the official
outputs. `load_score_sde` returns the SPEC section 11 score adapter.
"""

from .configs import PRESETS, ScoreSdeConfig, parse_config, preset
from .ddpm import DDPM
from .loader import (
    cifar10_ddpm_continuous,
    cifar10_ddpmpp_continuous,
    cifar10_ddpmpp_deep_continuous,
    cifar10_ncsnpp_continuous,
    cifar10_ncsnpp_deep_continuous,
    load_score_sde,
    load_score_sde_state,
    score_sde_adapter,
    score_sde_network,
)
from .ncsnpp import NCSNpp

__all__ = ["load_score_sde", "load_score_sde_state", "score_sde_network", "score_sde_adapter", "parse_config",
           "preset", "PRESETS", "ScoreSdeConfig", "NCSNpp", "DDPM", "cifar10_ddpmpp_continuous",
           "cifar10_ddpmpp_deep_continuous", "cifar10_ncsnpp_continuous", "cifar10_ncsnpp_deep_continuous",
           "cifar10_ddpm_continuous"]
