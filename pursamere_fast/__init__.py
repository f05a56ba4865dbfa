"""pursamere_fast: fast, deterministic PurSAMERE adversarial purification.

    from pursamere_fast import purify
    x_pur = purify(x_adv, score)
"""

from .config import PurifyConfig, geometric_sigmas
from .graphs import clear_graph_cache
from .purifier import Purifier
from .purify import NonFiniteScoreError, make_noise, purify

__all__ = [
    "purify", "PurifyConfig", "Purifier", "make_noise", "geometric_sigmas", "NonFiniteScoreError", "clear_graph_cache",
]
__version__ = "0.1.0"
