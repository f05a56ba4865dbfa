"""Threat models (SPEC section 7) and the defence / attack descriptions the runner iterates over.

Threats, each a PGD whose gradient passes the purifier differently:
- "clean":    no attack (the adversarial image is the clean one).
- "gpgd":     gray-box: PGD on the classifier alone, then purify.
- "bpda":     PGD through classifier(purify(x)) with identity backward; the purifier's
              noise is fixed and known (deterministic white-box).
- "bpda_eot": the purifier is stochastic (fresh noise per call); BPDA gradients averaged
              over `eot` draws; the final prediction is one more fresh draw.
- "exact_eot": as "bpda_eot" with the exact gradient (grad_mode="full") of each draw.
- "exact":    PGD through the unrolled purification (grad_mode="full").
- "exact_st", "exact_st_proj": the exact gradient with Adam's normaliser held constant in
              the backward (and, for "_proj", the clamp and the projection passed straight
              through): grad modes "full_st" and "full_st_proj" (see pursamere_fast.exact).
- "blackbox": no gradient at all: a query attack (Square) on the deterministic defence.
Each threat is an estimator of the defended model's gradient; the attack algorithm on top
(`AttackSpec.attack`: PGD, APGD or Square) is a separate choice. Clean predictions and
the verdict on an adversarial image always use the deterministic defence (its own seed),
except under "bpda_eot" and "exact_eot", which judge on a fresh draw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import checks
from ..purifiers import ADPPurifier
from .apgd import APGD_NORMS, apgd
from .pgd import LOSSES, NORMS, pgd
from .square import SQUARE_LOSSES, SQUARE_NORMS, square
from .wrappers import FreshNoisePurifier, IdentityPurifier, PurifiedClassifier, VotingClassifier

THREATS = ("clean", "gpgd", "bpda", "bpda_eot", "exact", "exact_st", "exact_st_proj", "blackbox", "exact_eot")
# The stochastic threats (fresh noise per call, EoT) and the grad mode of each draw.
EOT_GRAD_MODE = {"bpda_eot": "bpda", "exact_eot": "full"}


@dataclass(frozen=True)
class AttackAlgorithm:
    """One attack algorithm of `ATTACK_TABLE`: what AttackSpec allows with it and how it runs.

    Attributes:
        run: (model, x, y, AttackSpec, seed) -> adversarial images.
        norms, losses: the norms and losses it takes.
        own_step: it sets its own step size (AttackSpec.alpha must be None).
        queries: a query attack (threat "blackbox", no gradient; steps is the query budget).
    """

    run: Callable
    norms: tuple[str, ...]
    losses: tuple[str, ...]
    own_step: bool = False
    queries: bool = False


def _run_pgd(model, x, y, attack, seed):
    return pgd(model, x, y, norm=attack.norm, eps=attack.eps, alpha=attack.step_size, steps=attack.steps,
               random_start=attack.random_start, seed=seed, restarts=attack.restarts, eot=attack.eot,
               loss=attack.loss)


def _run_apgd(model, x, y, attack, seed):
    return apgd(model, x, y, norm=attack.norm, eps=attack.eps, steps=attack.steps, loss=attack.loss,
                restarts=attack.restarts, seed=seed, eot=attack.eot)


def _run_square(model, x, y, attack, seed):
    # pyautoattack draws a whole batch's squares from one stream: Square takes one seed per
    # call (the first sample's), so it alone depends on which images share its batch.
    return square(model, x, y, norm=attack.norm, eps=attack.eps, queries=attack.steps,
                  seed=seed if isinstance(seed, int) else int(seed[0]), loss=attack.loss)


# The one table of attack algorithms: AttackSpec checks a setting against it, `run_attack` runs it.
ATTACK_TABLE = {
    "pgd": AttackAlgorithm(_run_pgd, NORMS, LOSSES),  # l1: sparse l1 descent
    "apgd": AttackAlgorithm(_run_apgd, APGD_NORMS, LOSSES, own_step=True),  # Croce & Hein 2020
    "square": AttackAlgorithm(_run_square, tuple(SQUARE_NORMS), tuple(SQUARE_LOSSES), own_step=True, queries=True),
}
ATTACKS = tuple(ATTACK_TABLE)
# The purifier's grad mode behind each gradient-based threat.
GRAD_MODE = {"bpda": "bpda", "exact": "full", "exact_st": "full_st", "exact_st_proj": "full_st_proj"}


@dataclass(frozen=True)
class AttackSpec:
    """One attack setting.

    Args:
        threat: one of THREATS (how the gradient passes the purifier).
        norm: "linf", "l2" or "l1" (APGD: "linf" or "l2"; Square: "linf" or "l2").
        eps: budget, >= 0 ("clean" stores 0).
        steps: iterations, >= 0 ("clean" stores 0); for Square the query budget.
        alpha: PGD step size; None means 2.5 * eps / steps (Madry et al. 2018), or eps when
            steps = 0. A convergence study fixes it: the rule shrinks the step as steps grow.
            APGD and Square choose their own steps and refuse it.
        restarts: runs per sample, >= 1; more than one needs random_start.
        eot: EoT draws per gradient, >= 1 (only PGD and APGD under "bpda_eot" or "exact_eot" use
            more than 1).
        random_start: start each restart at a random point of the ball.
        seed: base seed of the random starts and of the fresh noise of "bpda_eot"/"exact_eot".
        name: label in the results; None derives one from the fields.
        attack: "pgd", "apgd" (Croce & Hein 2020) or "square" (needs threat "blackbox").
        loss: "ce" (cross-entropy), "cw" (logit margin) or "dlr" (Croce & Hein's scaled margin).

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
    attack: str = "pgd"
    loss: str = "ce"

    def __post_init__(self):
        checks.choice("threat", self.threat, THREATS)
        checks.choice("norm", self.norm, NORMS)
        checks.choice("attack", self.attack, ATTACKS)
        checks.choice("loss", self.loss, LOSSES)
        algorithm = ATTACK_TABLE[self.attack]
        query = [name for name, a in ATTACK_TABLE.items() if a.queries]
        if algorithm.queries != (self.threat == "blackbox") and self.threat != "clean":
            raise ValueError(f"attack {' or '.join(map(repr, query))} and threat 'blackbox' go together (a query "
                             f"attack needs no gradient), got attack={self.attack!r}, threat={self.threat!r}")
        if self.norm not in algorithm.norms:
            able = [name for name, a in ATTACK_TABLE.items() if self.norm in a.norms]
            raise ValueError(f"norm {self.norm!r} needs attack {' or '.join(map(repr, able))}, "
                             f"got attack={self.attack!r}")
        if algorithm.own_step and self.alpha is not None:
            raise ValueError(f"alpha must be None for attack {self.attack!r}, which sets its own step, "
                             f"got {self.alpha!r}")
        if self.loss not in algorithm.losses:
            raise ValueError(f"loss must be {' or '.join(map(repr, algorithm.losses))} for attack {self.attack!r}, "
                             f"got {self.loss!r}")
        checks.real("eps", self.eps, 0.0)
        for name, lo in (("steps", 0), ("restarts", 1), ("eot", 1)):
            checks.integer(name, getattr(self, name), lo)
        checks.seed("seed", self.seed)
        if self.alpha is not None:
            checks.real("alpha", self.alpha, positive=True)
        if self.eot > 1 and (self.threat not in EOT_GRAD_MODE or self.attack == "square"):
            raise ValueError(f"eot > 1 needs a gradient attack with threat 'bpda_eot' or 'exact_eot', got "
                             f"attack={self.attack!r}, threat={self.threat!r}, eot={self.eot}")
        if self.restarts > 1 and not self.random_start:
            raise ValueError(f"restarts > 1 needs random_start (each restart would repeat the same path), "
                             f"got restarts={self.restarts}")
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"name must be a non-empty string or None, got {self.name!r}")
        if self.threat == "clean":
            # No attack, no budget: rows and tables should not show one.
            object.__setattr__(self, "eps", 0.0)
            object.__setattr__(self, "steps", 0)
            object.__setattr__(self, "attack", "pgd")
            object.__setattr__(self, "loss", "ce")

    @property
    def step_size(self) -> float:
        """The step size actually used (APGD: its initial step 2 * eps; Square: eps, its patch value)."""
        if self.attack == "apgd":
            return 2.0 * self.eps
        if self.attack == "square":
            return float(self.eps)
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
        # PGD on cross-entropy keeps the short labels of the results written before APGD existed.
        kind = self.threat if (self.attack, self.loss) == ("pgd", "ce") else f"{self.attack}-{self.loss}-{self.threat}"
        s = f"{kind}-{self.norm}-eps{self.eps:.6g}-{'q' if self.attack == 'square' else 's'}{self.steps}"
        if self.alpha is not None:
            s += f"-a{self.alpha:.4g}"
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
            draw (used by the stochastic threats "bpda_eot" and "exact_eot").
        description: JSON-able settings, stored in the run manifest so that a resumed
            run refuses rows produced by different settings.
        plan: optional callable (image_shape, device) -> JSON-able dict of how the defence
            runs there (purify's resolved score options), stored in the manifest beside
            the description.
        runs: purification runs per prediction; above 1 the defended model is a
            `VotingClassifier` (majority vote) and the purifier must have `purify_runs`.
    """

    name: str
    build: Callable[[str, int | None], nn.Module]
    description: Mapping = field(default_factory=dict)
    plan: Callable[[tuple, torch.device], Mapping] | None = None
    runs: int = 1

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        checks.function("build", self.build)
        checks.integer("runs", self.runs, 1)

    def model(self, classifier: nn.Module, grad_mode: str | None = "none", seed: int | None = None, *,
              mean=None, std=None, purifier: nn.Module | None = None) -> nn.Module:
        """The defended model: [0, 1] images -> logits (a vote over `runs` runs when runs > 1).

        Args:
            classifier: module from normalised images to logits.
            grad_mode: the purifier's grad mode; None puts no purifier in front (the gray-box
                target, the classifier alone).
            seed: as `build`'s.
            mean, std: normalisation before the classifier.
            purifier: use this purifier instead of `build(grad_mode, seed)` (a
                `FreshNoisePurifier` for the stochastic threat).
        """
        if grad_mode is None:
            return PurifiedClassifier(IdentityPurifier(), classifier, mean, std)
        purifier = self.build(grad_mode, seed) if purifier is None else purifier
        if self.runs == 1:
            return PurifiedClassifier(purifier, classifier, mean, std)
        return VotingClassifier(purifier, classifier, self.runs, mean, std)

    @staticmethod
    def none(name: str = "none") -> Defence:
        """No defence (identity purifier)."""
        return Defence(name, lambda grad_mode, seed: IdentityPurifier(), {"kind": "identity"})

    @staticmethod
    def pursamere(score: Callable, config=None, *, name: str = "pursamere", backend: str = "auto",
                  score_dtype=None, **overrides) -> Defence:
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
    def adp(score: Callable, *, name: str = "adp", **kwargs) -> Defence:
        """ADP-style score-ascent baseline (see `ADPPurifier` for kwargs)."""
        base_seed = kwargs.pop("seed", 0)
        ADPPurifier(score, seed=base_seed, **kwargs)  # validates kwargs now, not at first use

        def build(grad_mode: str, seed: int | None) -> nn.Module:
            return ADPPurifier(score, seed=base_seed if seed is None else seed, grad_mode=grad_mode, **kwargs)

        return Defence(name, build, {"kind": "adp", "seed": base_seed, **kwargs})

    @staticmethod
    def hetero(score: Callable, classifier: nn.Module, *, name: str = "hetero", runs: int = 1,
               **kwargs) -> Defence:
        """Heterogeneous-noise diffusion purification, predicting by majority vote over `runs`
        runs (seeds seed .. seed + runs - 1; see `HeteroPurifier` for kwargs).

        Args:
            score: a score model of this library, or a noise predictor (see `HeteroPurifier`).
            classifier: the module whose stage activations give the saliency mask, taking
                [0, 1] images (wrap a classifier that expects normalised inputs).
        """
        from ..purifiers import HeteroPurifier

        base_seed = kwargs.pop("seed", 0)
        HeteroPurifier(score, classifier, seed=base_seed, **kwargs)  # validates kwargs now, not at first use

        def build(grad_mode: str, seed: int | None) -> nn.Module:
            return HeteroPurifier(score, classifier, seed=base_seed if seed is None else seed, grad_mode=grad_mode,
                                  **kwargs)

        description = {"kind": "hetero", "seed": base_seed, "runs": runs,
                       **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}
        return Defence(name, build, description, runs=runs)


def _eval_model(defence: Defence, classifier: nn.Module, mean, std) -> nn.Module:
    return defence.model(classifier, "none", mean=mean, std=std)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """argmax of model(x) without a graph."""
    return model(x).argmax(dim=1)


def clean_predictions(defence: Defence, classifier: nn.Module, x: torch.Tensor, *, mean=None, std=None) -> torch.Tensor:
    """Predictions of the deterministic defence on clean images."""
    return predict(_eval_model(defence, classifier, mean, std), x)


def run_attack(defence: Defence, attack: AttackSpec, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
               *, mean=None, std=None, seed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attack one batch under `attack.threat` and predict on the result.

    Args:
        defence: the defence.
        attack: the attack setting.
        classifier: module from normalised images to logits (eval mode).
        x: clean images (B, C, H, W) in [0, 1].
        y: labels (B,).
        mean, std: normalisation applied before the classifier.
        seed: seed of this batch (None: attack.seed), or one seed per sample (a sequence of
            B ints) so that a sample's random start does not depend on its batch.

    Returns:
        (x_adv, adv_pred): adversarial images and the defended predictions on them.
    """
    seed = attack.seed if seed is None else seed
    t = attack.threat
    if t == "clean":
        return x, clean_predictions(defence, classifier, x, mean=mean, std=std)
    if t in EOT_GRAD_MODE:
        base = seed if isinstance(seed, int) else int(seed[0])
        attacked = FreshNoisePurifier(lambda s: defence.build(EOT_GRAD_MODE[t], s), base)
        x_adv = _attack(defence.model(classifier, mean=mean, std=std, purifier=attacked), x, y, attack, seed)
        # A separate seed stream, so the evaluating draw is not one the attacker saw.
        judge = FreshNoisePurifier(lambda s: defence.build("none", s), base + 1)
        return x_adv, predict(defence.model(classifier, mean=mean, std=std, purifier=judge), x_adv)
    if t == "gpgd":
        target = defence.model(classifier, None, mean=mean, std=std)
    elif t == "blackbox":
        target = _eval_model(defence, classifier, mean, std)
    else:
        target = defence.model(classifier, GRAD_MODE[t], mean=mean, std=std)
    x_adv = _attack(target, x, y, attack, seed)
    return x_adv, clean_predictions(defence, classifier, x_adv, mean=mean, std=std)


def _attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackSpec, seed) -> torch.Tensor:
    return ATTACK_TABLE[attack.attack].run(model, x, y, attack, seed)


def input_gradients(defence: Defence, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor, grad_mode: str,
                    *, mean=None, std=None) -> torch.Tensor:
    """Per-sample gradient of the cross-entropy of classifier(purify(x)) w.r.t. x.

    Args:
        grad_mode: "bpda", "full", "full_st" or "full_st_proj".

    Returns:
        Tensor of x's shape.
    """
    checks.choice("grad_mode", grad_mode, tuple(GRAD_MODE.values()))
    model = defence.model(classifier, grad_mode, mean=mean, std=std)
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
