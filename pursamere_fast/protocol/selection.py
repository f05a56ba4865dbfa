"""The protocol's selection rule on the held-out images: per group (SAM on, SAM off, ADP) the
cheapest point within tolerance of the best worst case (see `pursamere_fast.protocol`)."""

from __future__ import annotations

from collections.abc import Mapping

from ..attacks.defences import check_settings, settings_cost
from ..attacks.stats import format_accuracy
from ..attacks.sweep import choose_config
from .spec import CLEAN, GROUPS, REQUIRED_GROUPS, WORST, numeric


def _grid(config: Mapping) -> dict[str, tuple[str, dict, int]]:
    """{name: (group, the entry's fields, score evaluations per purification)} of the config's
    PurSAMERE and ADP [[defence]] entries, each over its kind's base table (costs and checks
    from the defence-kind registry)."""
    from pursamere_fast import PurifyConfig

    bases = {kind: numeric(config.get(kind, {})) for kind in ("pursamere", "adp")}
    points = {}
    for e in config.get("defence", []):
        kind = e.get("kind")
        if kind not in bases:
            continue
        fields = numeric({k: v for k, v in e.items() if k not in ("name", "kind")})
        settings = {**bases[kind], **fields}
        group = kind
        if kind == "pursamere":
            group = "sam" if PurifyConfig().with_overrides(**settings).sam_radius > 0 else "nosam"
        try:
            check_settings(kind, settings)
        except ValueError as err:
            raise ValueError(f"[[defence]] {e['name']!r}: {err}") from None
        points[e["name"]] = (group, fields, settings_cost(kind, settings))
    return points


def select(summary: Mapping, config: Mapping, rule: Mapping) -> dict:
    """Apply the selection rule to a finished validation suite.

    Args:
        summary: the suite's summary (`suite.summarise_dir`).
        config: the resolved selection config: its "none" defence and its PurSAMERE and ADP
            [[defence]] entries (the grid) over its [pursamere] and [adp] bases, and n.
        rule: clean_tol and robust_tol (`selection_rule`).

    Returns:
        {"rule", "n", "groups": {group: `choose_config`'s result}, "chosen": {group: the chosen
        entry's fields (for PurSAMERE rho, sam_radius, steps_per_sigma, n_samples as the grid
        sets them) or None}}; the ADP group only when the grid has ADP points.

    Raises:
        ValueError: a defence of the config lacks rows for some of the n images (the run is not
            finished), or the grid has no PurSAMERE point of a group.
    """
    n = config.get("n")
    by_name = {e["defence"]: e for e in summary["defences"]}
    points = _grid(config)
    for name in ["none", *points]:
        got = by_name.get(name, {}).get("n", 0)
        if got != n:
            raise ValueError(f"the selection needs the suite's rows of all n = {n} images; defence {name!r} has "
                             f"{got}: finish the evaluation first")
    entries = []
    for name, e in by_name.items():
        entries += [{"defence": name, "attack": CLEAN, "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["clean_acc"], "robust_ci": e["clean_ci"]},
                    {"defence": name, "attack": WORST, "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["robust_acc"], "robust_ci": e["robust_ci"]}]
    out = {"rule": dict(rule), "n": n, "groups": {}, "chosen": {}}
    for group in GROUPS:
        costs = {name: cost for name, (g, _, cost) in points.items() if g == group}
        if not costs:
            if group in REQUIRED_GROUPS:
                raise ValueError(f"the grid has no {group!r} point (sam_radius {'> 0' if group == 'sam' else '= 0'})")
            continue
        result = choose_config(entries, costs, undefended="none", clean=CLEAN, robust=WORST, tiebreak=CLEAN,
                               clean_tol=rule["clean_tol"], robust_tol=rule["robust_tol"])
        out["groups"][group] = result
        out["chosen"][group] = None if result["chosen"] is None else points[result["chosen"]][1]
    return out


def choice_markdown(choice: Mapping) -> str:
    """Markdown of a `select` result: per group, every point and the chosen one."""
    rule = choice["rule"]
    lines = [f"Selection on n = {choice['n']} held-out images; rule: clean accuracy at most "
             f"{100 * rule['clean_tol']:.1f} pp (or one image) below the undefended classifier's, then the "
             f"cheapest point within {100 * rule['robust_tol']:.1f} pp of the best worst case over the "
             f"selection suite's members."]
    for group, result in choice["groups"].items():
        lines += ["", f"**{GROUPS[group]}** (undefended clean {format_accuracy(result['undefended_clean'])}%; chosen: "
                  f"{result['chosen']})", "",
                  "| point | score evals / purification | n | clean % | worst-case robust % [95% CI] "
                  "| eligible | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            lines.append(f"| {r['defence']} | {r['cost']} | {r['n']} | {format_accuracy(r['clean_acc'])} "
                         f"| {format_accuracy(r['robust_acc'], r['robust_ci'])} | {'yes' if r['eligible'] else 'no'} "
                         f"| {'**yes**' if r['defence'] == result['chosen'] else ''} |")
    return "\n".join(lines) + "\n"


def augmentation_config(config: Mapping, choice: Mapping) -> dict:
    """The PurifyConfig fields of the augmented classifier's training purification: the
    selection config's [pursamere] base with the chosen SAM-off point (train-classifier forces
    sam_radius = 0, as the paper purifies its training data without SAM).

    Raises:
        ValueError: the choice has no SAM-off config.
    """
    chosen = choice["chosen"].get("nosam")
    if chosen is None:
        raise ValueError("no SAM-off config was eligible, so there is none to purify the training data with")
    return {**numeric(config.get("pursamere", {})), **chosen}
