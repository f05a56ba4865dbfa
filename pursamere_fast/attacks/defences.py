"""The defence kinds: one registry, name -> builder, that evaluate, sanity, convergence, sweep and protocol read.

A defence kind is what a `[[defence]]` entry's `kind = "..."` names (and `--defences`,
`--defence`, a sweep point's `defence = "..."`). Each kind is one `DefenceKind` in `KINDS`:

- `build(settings, context, name)` -> `Defence`: the settings are the kind's keyword
  arguments (its TOML table `[<kind>]`, its `--<kind> KEY=VALUE` options and the entry's own
  keys, merged in that order); `context` holds what the command loaded (score, classifier,
  base PurifyConfig, backend, score dtype).
- `check(settings)`: refuses, by name, a key the kind does not take (a typo in a table),
  before any model is loaded.
- `cost(description)`: score evaluations per purified image, from the `Defence.description`
  the builder stored (the sweep's and the protocol's selection rules compare by it).

Adding a kind (e.g. DiffPure) is one entry at the bottom of this module:

    def _diffpure(settings, context, name):
        from ..purifiers import DiffPurePurifier
        check_keywords("DiffPurePurifier", DiffPurePurifier, settings, exclude=("score", "grad_mode"))
        seed = settings.pop("seed", 0)
        DiffPurePurifier(context.score, seed=seed, **settings)          # validate now
        return Defence(name, lambda grad_mode, s: DiffPurePurifier(context.score, seed=seed if s is None else s,
                                                                   grad_mode=grad_mode, **settings),
                       {"kind": "diffpure", "seed": seed, **settings})

    register(DefenceKind("diffpure", _diffpure, cost=lambda d: ..., summary="DiffPure (Nie et al. 2022)"))

Its settings table comes with the entry: the evaluate/sanity/convergence parsers then take a
`[diffpure]` TOML table and `--diffpure KEY=VALUE` options, `--defences` accepts the name, and
sweep points and protocol `[[defence]]` entries may use `kind = "diffpure"`. Nothing else
changes.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import checks
from .threats import Defence


def check_keywords(what: str, func, kwargs: Mapping, exclude: Sequence[str] = ()) -> None:
    """ValueError naming `what` when `func` takes no keyword argument of one of kwargs' keys (a typo in a table)."""
    params = inspect.signature(func).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in exclude]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(f"{what} takes no argument {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class DefenceContext:
    """What a builder may use besides its settings.

    Attributes:
        score: the score model (None for a kind with needs_score False).
        classifier: the classifier (hetero's saliency mask reads its activations).
        base_config: the PurifyConfig that the pursamere kind's settings override (None: defaults).
        backend: purify backend of the pursamere kind.
        score_dtype: None (fp32) or torch.bfloat16 (the pursamere kind's score under autocast).
    """

    score: Any = None
    classifier: Any = None
    base_config: Any = None
    backend: str = "auto"
    score_dtype: Any = None


@dataclass(frozen=True)
class DefenceKind:
    """One defence kind of the registry.

    Attributes:
        name: the kind's name, also the name of its settings table and `--<name>` option.
        build: (settings dict, DefenceContext, name) -> Defence; ValueError for a bad setting.
        check: settings -> None, ValueError naming an unknown key (None: no check before build).
        cost: Defence.description -> score evaluations per purified image.
        needs_score: whether the builder uses context.score (the command loads it only then).
        summary: one line for help texts.
    """

    name: str
    build: Callable[[dict, DefenceContext, str], Defence]
    cost: Callable[[Mapping], int]
    check: Callable[[Mapping], None] | None = None
    needs_score: bool = True
    summary: str = ""


KINDS: dict[str, DefenceKind] = {}


def register(kind: DefenceKind) -> DefenceKind:
    """Add `kind` to the registry (ValueError if its name is taken or not an identifier)."""
    if not isinstance(kind.name, str) or not kind.name.isidentifier() or kind.name in KINDS:
        raise ValueError(f"defence kind name must be a new identifier, got {kind.name!r} (taken: {sorted(KINDS)})")
    KINDS[kind.name] = kind
    return kind


def kind_names() -> tuple[str, ...]:
    """The registered kinds, in registration order ("none" first)."""
    return tuple(KINDS)


def get_kind(name: str) -> DefenceKind:
    """The kind called `name` (ValueError listing the kinds otherwise)."""
    if name not in KINDS:
        raise ValueError(f"defence kind must be one of {', '.join(KINDS)}, got {name!r}")
    return KINDS[name]


def check_settings(kind: str, settings: Mapping) -> None:
    """ValueError naming the key, for a setting the kind does not take (no model loaded)."""
    k = get_kind(kind)
    if k.check is not None:
        k.check(settings)


@dataclass(frozen=True)
class DefenceEntry:
    """One named defence of a config: an entry of a TOML [[defence]] array, or a kind named alone.

    Attributes:
        name: its label in the results.
        kind: a registered kind.
        settings: the kind's keyword arguments given with the entry (over the kind's table).
    """

    name: str
    kind: str
    settings: Mapping = dataclasses.field(default_factory=dict)


def defence_entries(entries) -> list[DefenceEntry]:
    """The entries of a TOML [[defence]] array: tables with a unique non-empty `name`, a
    registered `kind`, and that kind's settings.

    Raises:
        ValueError: naming the entry, for an empty array, a missing name or kind, a name used
            twice, or settings given to kind "none".
    """
    if not entries:
        raise ValueError("[[defence]] must be a non-empty array of tables")
    kinds = kind_names()
    out = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"[[defence]] entry {i} must be a table with a non-empty string 'name', got {entry!r}")
        settings = dict(entry)
        name, kind = settings.pop("name"), settings.pop("kind", None)
        if kind not in kinds:
            raise ValueError(f"[[defence]] entry {i} ({name!r}): kind must be one of {', '.join(kinds)}, "
                             f"got {kind!r}")
        if kind == "none" and settings:
            raise ValueError(f"[[defence]] entry {i} ({name!r}): kind 'none' takes no settings, got {settings}")
        if name in (e.name for e in out):
            raise ValueError(f"[[defence]] entry {i}: name {name!r} is used twice")
        out.append(DefenceEntry(name, kind, settings))
    return out


def build_defence(kind: str, settings: Mapping | None = None, context: DefenceContext | None = None, *,
                  name: str | None = None) -> Defence:
    """The `Defence` of kind `kind` called `name` (default: the kind's name).

    Raises:
        ValueError: an unknown kind, an unknown setting or a bad value (the purifier's checks).
    """
    k = get_kind(kind)
    settings = dict(settings or {})
    check_settings(kind, settings)
    context = context or DefenceContext()
    if k.needs_score and context.score is None:
        raise ValueError(f"defence kind {kind!r} needs a score model")
    return k.build(settings, context, name or kind)


def settings_cost(kind: str, settings: Mapping) -> int:
    """Score evaluations per purified image of a kind at these settings, without a score model
    (for selection rules that compare configurations before any is built)."""
    return get_kind(kind).cost({"kind": kind, **settings})


def cost(description: Mapping) -> int:
    """Score evaluations per purified image of a Defence, from its description's "kind"."""
    kind = description.get("kind", "none")
    return get_kind("none" if kind == "identity" else kind).cost(description)


# ------------------------------------------------------------------------------------ the kinds

def _none(settings, context, name):
    if settings:
        raise ValueError(f"kind 'none' takes no settings, got {settings}")
    return Defence.none(name=name)


def _pursamere_check(settings):
    from ..config import PurifyConfig

    names = [f.name for f in dataclasses.fields(PurifyConfig)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ValueError(f"unknown PurifyConfig field(s) {unknown}; valid: {sorted(names)}")


def _pursamere(settings, context, name):
    return Defence.pursamere(context.score, context.base_config, name=name, backend=context.backend,
                             score_dtype=context.score_dtype, **settings)


def _pursamere_cost(description):
    from ..config import PurifyConfig

    fields = {f.name for f in dataclasses.fields(PurifyConfig)}
    return PurifyConfig(**{k: v for k, v in description.items() if k in fields}).score_evaluations


def _adp_check(settings):
    from ..purifiers import ADPPurifier

    # The defence passes score and grad_mode itself.
    check_keywords("ADPPurifier", ADPPurifier, settings, exclude=("score", "grad_mode"))
    ADPPurifier(lambda y, sigma: y, **settings)  # its checks of the values; the stand-in score is not called


def _adp(settings, context, name):
    return Defence.adp(context.score, name=name, **settings)


def _adp_cost(description):
    from ..purifiers import ADPPurifier

    # One forward score evaluation per ascent step (ADPPurifier knows the default).
    steps = description.get("steps", inspect.signature(ADPPurifier).parameters["steps"].default)
    return checks.integer("steps", steps, 1)


def _hetero_check(settings):
    from ..purifiers import HeteroPurifier

    check_keywords("HeteroPurifier", HeteroPurifier, {k: v for k, v in settings.items() if k != "runs"},
                   exclude=("score", "classifier", "grad_mode"))


def _hetero(settings, context, name):
    runs = checks.integer("runs", settings.pop("runs", 1), 1)
    return Defence.hetero(context.score, context.classifier, name=name, runs=runs, **settings)


def _hetero_cost(description):
    # One score call per grid step from t_l down, per run.
    stride = description.get("T", 1000) // description.get("grid_steps", 500)
    return description.get("runs", 1) * -(-description.get("t_l", 200) // stride)


def _diffpure_check(settings):
    from ..purifiers import DiffPurePurifier

    if "noise" in settings:
        # The harness owns the noise: the kind builds the fixed-noise purifier (the deterministic
        # threats) and the stochastic threats draw a fresh seed per call (FreshNoisePurifier).
        raise ValueError(f"DiffPurePurifier takes no argument 'noise' here, got noise={settings['noise']!r}: the "
                         "defence is the fixed-noise purifier under gpgd/bpda/exact*, and threats bpda_eot and "
                         "exact_eot draw fresh noise per call (AttackSpec.eot draws per gradient)")
    check_keywords("DiffPurePurifier", DiffPurePurifier, settings, exclude=("score", "grad_mode", "noise"))


def _diffpure(settings, context, name):
    from ..purifiers import DiffPurePurifier

    _diffpure_check(settings)
    settings = dict(settings)
    base_seed = settings.pop("seed", 0)
    purifier = DiffPurePurifier(context.score, seed=base_seed, **settings)  # validates now, not at first use

    def build(grad_mode, seed):
        # seed None: the defence's own fixed noise; an int: one fresh draw (stochastic threats).
        return DiffPurePurifier(context.score, seed=base_seed if seed is None else seed, grad_mode=grad_mode,
                                **settings)

    # Every setting that changes a result, defaults resolved, so that manifests compare exactly.
    description = {"kind": "diffpure", "seed": base_seed, "t_star": purifier.t_star, "steps": purifier.steps,
                   "method": purifier.method, "beta_min": purifier.beta_min, "beta_max": purifier.beta_max}
    return Defence(name, build, description)


def _diffpure_cost(description):
    from ..purifiers import DiffPurePurifier

    # One score call per reverse step.
    steps = description.get("steps", inspect.signature(DiffPurePurifier).parameters["steps"].default)
    return checks.integer("steps", steps, 1)


register(DefenceKind("none", _none, cost=lambda d: 0, needs_score=False, summary="no defence (identity purifier)"))
register(DefenceKind("pursamere", _pursamere, cost=_pursamere_cost, check=_pursamere_check,
                     summary="PurSAMERE (settings: PurifyConfig fields over --purify-config)"))
register(DefenceKind("adp", _adp, cost=_adp_cost, check=_adp_check,
                     summary="ADP-style score ascent (settings: ADPPurifier arguments)"))
register(DefenceKind("hetero", _hetero, cost=_hetero_cost, check=_hetero_check,
                     summary="heterogeneous-noise diffusion (settings: HeteroPurifier arguments, runs = R votes)"))
register(DefenceKind("diffpure", _diffpure, cost=_diffpure_cost, check=_diffpure_check,
                     summary="DiffPure, Nie et al. 2022 (settings: DiffPurePurifier arguments but noise)"))
