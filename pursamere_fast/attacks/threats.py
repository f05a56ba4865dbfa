"""Threat models (SPEC section 7) and the defence / attack descriptions the runner iterates over.

Threats, each a PGD whose gradient passes the purifier differently:
- "clean":    no attack (the adversarial image is the clean one).
- "gpgd":     gray-box: PGD on the classifier alone, then purify.
- "bpda":     PGD through classifier(purify(x)) with identity backward; the purifier's
              noise is fixed and known (deterministic white-box).
- "bpda_eot": the purifier is stochastic (fresh noise per call); BPDA gradients averaged
              over `eot` draws; the final prediction is one more fresh draw.
- "exact":    PGD through the unrolled purification (grad_mode="full").
Clean predictions always use the deterministic defence (its own seed).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks

from .baselines import ADPPurifier
from .pgd import NORMS, pgd
from .wrappers import FreshNoisePurifier, IdentityPurifier, PurifiedClassifier

THREATS = ("clean", "gpgd", "bpda", "bpda_eot", "exact")


@dataclass(frozen=True)
class AttackSpec:
    """One attack setting.

    Args:
        threat: one of THREATS.
        norm: "linf", "l2" or "l1".
        eps: budget, >= 0 ("clean" stores 0).
        steps: PGD iterations, >= 0 ("clean" stores 0).
        alpha: step size; None means 2.5 * eps / steps (Madry et al. 2018), or eps when steps = 0.
        restarts: random restarts, >= 1.
        eot: EoT draws per gradient, >= 1 (only "bpda_eot" uses more than 1).
        random_start: start each restart at a random point of the ball.
        seed: base seed of the random starts and of the fresh noise of "bpda_eot".
        name: label in the results; None derives one from the fields.

    Raises:
        ValueError: on a bad field (named in the message).
    """

    threat: str
    norm: str = "linf"
    eps: float = 8 / 255
    steps: int = 10
    alpha: float | None = None
    restarts: int = 1
    eot: int = 1
    random_start: bool = True
    seed: int = 0
    name: str | None = None

    def __post_init__(self):
        checks.choice("threat", self.threat, THREATS)
        checks.choice("norm", self.norm, NORMS)
        checks.real("eps", self.eps, 0.0)
        for name, lo in (("steps", 0), ("restarts", 1), ("eot", 1)):
            checks.integer(name, getattr(self, name), lo)
        checks.seed("seed", self.seed)
        if self.alpha is not None:
            checks.real("alpha", self.alpha, positive=True)
        if self.eot > 1 and self.threat != "bpda_eot":
            raise ValueError(f"eot > 1 needs threat='bpda_eot', got threat={self.threat!r}, eot={self.eot}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"name must be a non-empty string or None, got {self.name!r}")
        if self.threat == "clean":
            # No attack, no budget: rows and tables should not show one.
            object.__setattr__(self, "eps", 0.0)
            object.__setattr__(self, "steps", 0)

    @property
    def step_size(self) -> float:
        """The PGD step size actually used."""
        if self.alpha is not None:
            return float(self.alpha)
        if self.eps == 0:
            return 1.0
        return 2.5 * self.eps / self.steps if self.steps > 0 else float(self.eps)

    @property
    def label(self) -> str:
        """Name of the setting in result rows and tables."""
        if self.name is not None:
            return self.name
        if self.threat == "clean":
            return "clean"
        s = f"{self.threat}-{self.norm}-eps{self.eps:.6g}-s{self.steps}"
        if self.restarts > 1:
            s += f"-r{self.restarts}"
        if self.eot > 1:
            s += f"-eot{self.eot}"
        return s

    def describe(self) -> dict:
        """JSON-able description (all fields, plus the resolved step size)."""
        d = dataclasses.asdict(self)
        d["step_size"] = self.step_size
        d["label"] = self.label
        return d


@dataclass(frozen=True)
class Defence:
    """A named defence: a factory of its purifier for each gradient mode.

    Args:
        name: label in the results.
        build: callable (grad_mode, seed) -> purifier nn.Module; grad_mode in {"none",
            "bpda", "full"}; seed None means the defence's own fixed seed, an int a fresh
            draw (used by the stochastic threat "bpda_eot").
        description: JSON-able settings, stored in the run manifest so that a resumed
            run refuses rows produced by different settings.
        plan: optional callable (image_shape, device) -> JSON-able dict of how the defence
            runs there (purify's resolved score options), stored in the manifest beside
            the description.
    """

    name: str
    build: Callable[[str, int | None], nn.Module]
    description: Mapping = field(default_factory=dict)
    plan: Callable[[tuple, torch.device], Mapping] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        checks.function("build", self.build)

    @staticmethod
    def none(name: str = "none") -> "Defence":
        """No defence (identity purifier)."""
        return Defence(name, lambda grad_mode, seed: IdentityPurifier(), {"kind": "identity"})

    @staticmethod
    def pursamere(score: Callable, config=None, *, name: str = "pursamere", backend: str = "auto",
                  score_dtype=None, **overrides) -> "Defence":
        """PurSAMERE through `pursamere_fast.Purifier` (grad_mode "full" -> exact gradient).

        Args:
            score: score callable or module.
            config: PurifyConfig (None: defaults).
            name: label.
            backend: purify backend for grad modes "none" and "bpda".
            score_dtype: None (fp32) or torch.bfloat16: the score network under bf16 autocast
                in every grad mode, so the attack and the judge run the same function.
            **overrides: PurifyConfig fields.
        """
        from pursamere_fast import Purifier, PurifyConfig
        from pursamere_fast.purify import score_plan

        cfg = (config if config is not None else PurifyConfig()).with_overrides(**overrides)
        options = {} if score_dtype is None else {"score_dtype": score_dtype}

        def build(grad_mode: str, seed: int | None) -> nn.Module:
            c = cfg if seed is None else dataclasses.replace(cfg, seed=seed)
            return Purifier(score, c, grad_mode=grad_mode, backend=backend, purify_options=options)

        def plan(image_shape, device) -> dict:
            return {**score_plan(score, image_shape, device), "score_dtype": str(score_dtype or torch.float32)}

        Purifier(score, cfg, purify_options=options)  # validates the options now, not at first use
        return Defence(name, build, {"kind": "pursamere", "backend": backend, **dataclasses.asdict(cfg)}, plan)

    @staticmethod
    def adp(score: Callable, *, name: str = "adp", **kwargs) -> "Defence":
        """ADP-style score-ascent baseline (see `ADPPurifier` for kwargs)."""
        base_seed = kwargs.pop("seed", 0)
        ADPPurifier(score, seed=base_seed, **kwargs)  # validates kwargs now, not at first use

        def build(grad_mode: str, seed: int | None) -> nn.Module:
            return ADPPurifier(score, seed=base_seed if seed is None else seed, grad_mode=grad_mode, **kwargs)

        return Defence(name, build, {"kind": "adp", "seed": base_seed, **kwargs})


def _eval_model(defence: Defence, classifier: nn.Module, mean, std) -> nn.Module:
    return PurifiedClassifier(defence.build("none", None), classifier, mean, std)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of model(x) without a graph."""
    return model(x).argmax(dim=1)


def clean_predictions(defence: Defence, classifier: nn.Module, x: torch.Tensor, *, mean=None, std=None) -> torch.Tensor:
    """Predictions of the deterministic defence on clean images."""
    return predict(_eval_model(defence, classifier, mean, std), x)


def run_attack(defence: Defence, attack: AttackSpec, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
               *, mean=None, std=None, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack one batch under `attack.threat` and predict on the result.

    Args:
        defence: the defence.
        attack: the attack setting.
        classifier: module from normalised images to logits (eval mode).
        x: clean images (B, C, H, W) in [0, 1].
        y: labels (B,).
        mean, std: normalisation applied before the classifier.
        seed: seed of this batch (None: attack.seed).

    Returns:
        (x_adv, adv_pred): adversarial images and the defended predictions on them.
    """
    seed = attack.seed if seed is None else seed
    kw = dict(norm=attack.norm, eps=attack.eps, alpha=attack.step_size, steps=attack.steps,
              random_start=attack.random_start, seed=seed, restarts=attack.restarts)
    t = attack.threat
    if t == "clean":
        return x, clean_predictions(defence, classifier, x, mean=mean, std=std)
    if t == "bpda_eot":
        attacked = FreshNoisePurifier(lambda s: defence.build("bpda", s), seed)
        x_adv = pgd(PurifiedClassifier(attacked, classifier, mean, std), x, y, eot=attack.eot, **kw)
        # A separate seed stream, so the evaluating draw is not one the attacker saw.
        judge = FreshNoisePurifier(lambda s: defence.build("none", s), seed + 1)
        return x_adv, predict(PurifiedClassifier(judge, classifier, mean, std), x_adv)
    if t == "gpgd":
        target = PurifiedClassifier(IdentityPurifier(), classifier, mean, std)
    else:
        target = PurifiedClassifier(defence.build("bpda" if t == "bpda" else "full", None), classifier, mean, std)
    x_adv = pgd(target, x, y, **kw)
    return x_adv, clean_predictions(defence, classifier, x_adv, mean=mean, std=std)


def input_gradients(defence: Defence, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, grad_mode: str,
                    *, mean=None, std=None) -> torch.Tensor:
    """Per-sample gradient of the cross-entropy of classifier(purify(x)) w.r.t. x.

    Args:
        grad_mode: "bpda" or "full".

    Returns:
        Tensor of x's shape.
    """
    checks.choice("grad_mode", grad_mode, ("bpda", "full"))
    model = PurifiedClassifier(defence.build(grad_mode, None), classifier, mean, std)
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xg), y.to(x.device), reduction="sum")
        (g,) = torch.autograd.grad(loss, xg)
    return g


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened per-sample tensors, (B,)."""
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-30)


def grid(defences: Sequence[Defence], attacks: Sequence[AttackSpec]) -> list[tuple[Defence, AttackSpec]]:
    """All (defence, attack) pairs, defences outer."""
    return [(d, a) for d in defences for a in attacks]
