"""Issue 41, item 3: the paired tables of results/fmnist_protocol/diffpure/README.md from the rows on disk.

    python scripts/diffpure_fmnist_tables.py select RUN_DIR [CONFIG]  # the rule on a grid (default DiffPure's)
    python scripts/diffpure_fmnist_tables.py main RUN_DIR     # paired with test/aug/main
    python scripts/diffpure_fmnist_tables.py suite RUN_DIR    # paired with test/aug/suite
    python scripts/diffpure_fmnist_tables.py eot RUN_DIR      # the fresh-noise (BPDA+EoT) rows, every norm
    python scripts/diffpure_fmnist_tables.py pair RUN_A RUN_B # two runs' defences against each other
    python scripts/diffpure_fmnist_tables.py rand SUITE_DIR   # its 'rand' AutoAttack rows beside eot/ and the suite

The runs may hold DiffPure or the heterogeneous purifier (configs/fmnist_select_hetero.toml).

Every test is on the images both runs have (the first n test images), exact McNemar
(`attacks.stats.paired_robust`), 95% Wilson intervals (`attacks.stats.wilson_interval`).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import tomllib

from pursamere_fast.attacks.defences import settings_cost
from pursamere_fast.attacks.rows import read_run
from pursamere_fast.attacks.stats import format_accuracy, paired_robust, wilson_interval
from pursamere_fast.attacks.suite import CLEAN, robust_per_image, summarise_dir
from pursamere_fast.attacks.sweep import choose_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROTOCOL = os.path.join(ROOT, "results", "fmnist_protocol")
AUG_MAIN = os.path.join(PROTOCOL, "test", "aug", "main")
AUG_SUITE = os.path.join(PROTOCOL, "test", "aug", "suite")
NAMES = {"diffpure-t0.1-S20": "DiffPure, fixed noise", "pursamere-nosam-rho12": "PurSAMERE default",
         "pursamere-nosam": "PurSAMERE default",
         "pursamere-sam": "PurSAMERE, SAM on", "adp": "ADP (sigma 0.025)", "none": "undefended"}


def label(name: str) -> str:
    return NAMES.get(name, "heterogeneous" if name.startswith("hetero") else name)


def acc(k: int, n: int) -> str:
    return format_accuracy(k / n, wilson_interval(k, n))


def pair_line(label: str, a: dict, b: dict) -> str:
    t = paired_robust(a, b)
    return (f"| {label} | {t['n']} | {t['a']} vs {t['b']} | {t['a_only']} vs {t['b_only']} | {t['p']:.2g} |")


def select(run: str, config_path: str = os.path.join(ROOT, "configs", "fmnist_select_diffpure.toml")) -> None:
    with open(os.path.join(ROOT, "configs", "fmnist_protocol.toml"), "rb") as f:
        rule = tomllib.load(f)["selection"]
    with open(config_path, "rb") as f:
        config = tomllib.load(f)
    summary = summarise_dir(run)
    # Score calls per prediction, as the registry counts them for each kind.
    costs = {e["name"]: settings_cost(e["kind"], {k: v for k, v in e.items() if k not in ("name", "kind")})
             for e in config["defence"] if e["kind"] != "none"}
    entries = []
    for e in summary["defences"]:
        entries += [{"defence": e["defence"], "attack": "clean", "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["clean_acc"], "robust_ci": e["clean_ci"]},
                    {"defence": e["defence"], "attack": "worst", "n": e["n"], "clean_acc": e["clean_acc"],
                     "robust_acc": e["robust_acc"], "robust_ci": e["robust_ci"]}]
    ns = {e["defence"]: e["n"] for e in summary["defences"]}
    res = choose_config(entries, costs, undefended="none", clean="clean", robust="worst", tiebreak="clean",
                        clean_tol=rule["clean_tol"], robust_tol=rule["robust_tol"])
    print(f"Rule (configs/fmnist_protocol.toml [selection]): clean accuracy at least the undefended "
          f"classifier's {100 * res['undefended_clean']:.1f}% less {100 * res['allowed_drop']:.1f} pp "
          f"(clean_tol {rule['clean_tol']}, or one image); among those, the cheapest (score calls per "
          f"prediction) whose worst case is within {100 * rule['robust_tol']:.1f} pp of the best eligible "
          f"worst case ({100 * res['best_robust']:.1f}%); ties: higher worst case, then higher clean accuracy. "
          f"n per point: {sorted(set(ns.values()))}.\n")
    print("| point | score calls | n | clean % | worst-case robust % [95% CI] | eligible | within tol | chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        near = r["eligible"] and r["robust_acc"] >= res["best_robust"] - rule["robust_tol"] - 1e-12
        lo, hi = r["robust_ci"]
        print(f"| {r['defence']} | {r['cost']} | {r['n']} | {100 * r['clean_acc']:.1f} | "
              f"{100 * r['robust_acc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {'yes' if r['eligible'] else 'no'} | "
              f"{'yes' if near else 'no'} | {'**yes**' if r['defence'] == res['chosen'] else ''} |")
    print(f"\nchosen: {res['chosen']}")


def main_maps(run: str, norm: str = "linf") -> dict:
    """{(defence, threat): {index: correct}} of a non-suite run's rows at `norm` (and the clean
    rows); threat 'clean', 'gpgd', 'bpda', 'bpda_eot', 'worst' (of gpgd and bpda)."""
    out = defaultdict(dict)
    for r in read_run(run):
        if r["threat"] != "clean" and r["norm"] != norm:
            continue
        t = r["threat"]
        out[(r["defence"], t)][r["index"]] = bool(r["robust_correct"] if t != "clean" else r["clean_correct"])
    for d in {d for d, _ in out}:
        g, b = out.get((d, "gpgd"), {}), out.get((d, "bpda"), {})
        out[(d, "worst")] = {i: g[i] and b[i] for i in set(g) & set(b)}
    return out


def main(run: str) -> None:
    ours = main_maps(run)
    theirs = main_maps(AUG_MAIN)
    dp = sorted({d for d, _ in ours})
    for d in dp:
        n = min(len(ours[(d, t)]) for t in ("clean", "gpgd", "bpda"))
        idx = set(range(n))
        print(f"\n### {d}: first n = {n} test images (indices 0-{n - 1})\n")
        print("| defence | n | clean % [95% CI] | gPGD-20 % | BPDA-det-20 % | worst of the two % |")
        print("|---|---|---|---|---|---|")
        rows = [(d, ours)] + [(o, theirs) for o in ("pursamere-nosam-rho12", "adp", "none")]
        for name, src in rows:
            cells = []
            for t in ("clean", "gpgd", "bpda", "worst"):
                m = {i: v for i, v in src[(name, t)].items() if i in idx}
                cells.append(acc(sum(m.values()), len(m)))
            print(f"| {NAMES.get(name, name)} | {n} | " + " | ".join(cells) + " |")
        print(f"\nPaired, exact McNemar (a = {label(d)}; 'a vs b' robust counts; discordant a-only vs b-only):\n")
        print("| comparison | n | robust a vs b | discordant | p |")
        print("|---|---|---|---|---|")
        for o in ("pursamere-nosam-rho12", "adp"):
            for t, lab in (("bpda", "BPDA-det-20"), ("gpgd", "gPGD-20"), ("worst", "worst of the two"),
                           ("clean", "clean")):
                a = {i: v for i, v in ours[(d, t)].items() if i in idx}
                b = {i: v for i, v in theirs[(o, t)].items() if i in idx}
                print(pair_line(f"{label(d)} vs {NAMES[o]}, {lab}", a, b))


def suite_maps(run: str, skip=()) -> dict:
    """{defence: {index: robust under every member}} of a suite run (members in `skip` ignored;
    finished images only)."""
    rows = read_run(run)
    members = {}
    for r in rows:
        members.setdefault(r["defence"], set()).add(r["attack"])
    return {d: robust_per_image(rows, d, sorted(m - set(skip))) for d, m in members.items()}


def suite(run: str) -> None:
    ours, theirs = suite_maps(run), suite_maps(AUG_SUITE)
    theirs_nt = suite_maps(AUG_SUITE, skip=("transfer",))
    for d, m in ours.items():
        idx = sorted(m)
        n = len(idx)
        assert idx == list(range(n)), "the suite rows are not the first n images"
        print(f"\n### {d}: the suite's worst case, first n = {n} test images\n")
        print("| defence | n | worst-case robust % [95% CI] |")
        print("|---|---|---|")
        print(f"| {label(d)} ({d}) | {n} | {acc(sum(m.values()), n)} |")
        for o in ("pursamere-nosam", "pursamere-sam", "adp"):
            b = {i: theirs[o][i] for i in idx}
            print(f"| {NAMES[o]} | {n} | {acc(sum(b.values()), n)} |")
        print("\n| comparison | n | robust a vs b | discordant | p |")
        print("|---|---|---|---|---|")
        for o in ("pursamere-nosam", "pursamere-sam", "adp"):
            print(pair_line(f"{label(d)} vs {NAMES[o]}", m, {i: theirs[o][i] for i in idx}))
            print(pair_line(f"{label(d)} vs {NAMES[o]} (its transfer member left out)", m,
                            {i: theirs_nt[o][i] for i in idx}))


def eot(run: str) -> None:
    """Fresh-noise DiffPure and ADP under BPDA+EoT (this run, same images: paired), and beside them
    the deterministic BPDA-det PGD-200 rows of test/aug/bpda200 at the same norm (another threat
    model: the PurSAMERE default and ADP judged with their fixed noise) on the same images."""
    norms = sorted({r["norm"] for r in read_run(run) if r["threat"] == "bpda_eot"})
    for norm in norms:
        ours = main_maps(run, norm)
        theirs = main_maps(os.path.join(PROTOCOL, "test", "aug", "bpda200"), norm)
        lab = {"bpda_eot": "BPDA+EoT-20 PGD-50 (fresh noise)", "bpda": "BPDA-det PGD-200 (fixed noise)"}
        n = min(len(v) for (d, t), v in ours.items() if t in ("clean", "bpda_eot"))
        idx = set(range(n))
        for (_, t), m in ours.items():
            assert t not in ("clean", "bpda_eot") or set(range(n)) <= set(m), "not the first n images"
        print(f"\n### {norm}: first n = {n} test images\n")
        print("| defence | threat | n | clean % [95% CI] | robust % [95% CI] |")
        print("|---|---|---|---|---|")

        def cut(m, idx=idx):
            return {i: v for i, v in m.items() if i in idx}

        for d in ("diffpure-t0.1-S20", "adp"):
            c, r = cut(ours[(d, "clean")]), cut(ours[(d, "bpda_eot")])
            print(f"| {'DiffPure' if d.startswith('diffpure') else label(d)} ({d}) | {lab['bpda_eot']} | {n} | "
                  f"{acc(sum(c.values()), n)} "
                  f"| {acc(sum(r.values()), n)} |")
        for d in ("pursamere-nosam", "adp"):
            c, r = cut(theirs[(d, "clean")]), cut(theirs[(d, "bpda")])
            print(f"| {label(d)} (test/aug/bpda200) | {lab['bpda']} | {n} | {acc(sum(c.values()), n)} | "
                  f"{acc(sum(r.values()), n)} |")
        print("\n| comparison | n | robust a vs b | discordant | p |")
        print("|---|---|---|---|---|")
        dp = cut(ours[("diffpure-t0.1-S20", "bpda_eot")])
        print(pair_line("DiffPure vs ADP, both BPDA+EoT (fresh noise)", dp, cut(ours[("adp", "bpda_eot")])))
        print(pair_line("DiffPure BPDA+EoT vs PurSAMERE default BPDA-det-200 (different threat models)", dp,
                        cut(theirs[("pursamere-nosam", "bpda")])))
        print(pair_line("ADP BPDA+EoT vs ADP BPDA-det-200 (fresh vs fixed noise)", cut(ours[("adp", "bpda_eot")]),
                        cut(theirs[("adp", "bpda")])))
        if norm == "linf":  # DiffPure's own fixed-noise rows (main/, suite/) on the same images
            fixed = main_maps(os.path.join(PROTOCOL, "diffpure", "main"))[("diffpure-t0.1-S20", "bpda")]
            worst = suite_maps(os.path.join(PROTOCOL, "diffpure", "suite"))["diffpure-t0.1-S20"]
            print(pair_line("DiffPure BPDA+EoT (fresh) vs DiffPure BPDA-det-20 (fixed noise)", dp, cut(fixed)))
            print(pair_line("DiffPure BPDA+EoT (fresh) vs DiffPure's suite worst case (fixed noise)", dp, cut(worst)))


def pair(run_a: str, run_b: str) -> None:
    """Every defence of run A against every defence of run B on the images both finished: suite runs
    by their worst case, others by each threat they share (linf)."""
    def maps(run):
        if any("broken" in r for r in read_run(run)):  # only suite rows say which member broke an image
            return {(d, "worst"): m for d, m in suite_maps(run).items()}
        return main_maps(run)

    a, b = maps(run_a), maps(run_b)
    print("| comparison | n | robust a vs b | discordant | p |")
    print("|---|---|---|---|---|")
    for (da, t), ma in sorted(a.items()):
        for (db, tb), mb in sorted(b.items()):
            if t == tb and da != db and da != "none" and db != "none":
                both = set(ma) & set(mb)
                print(pair_line(f"{label(da)} vs {label(db)}, {t}", {i: ma[i] for i in both},
                                {i: mb[i] for i in both}))


def rand(run: str, defence: str = "diffpure-t0.1-S20", tag: str = "bpda_eot-eot20") -> None:
    """The 'rand' AutoAttack check of a suite run (autoattack.<defence>.<tag>.jsonl, fresh noise)
    on the images it finished, beside the same images' fresh-noise BPDA+EoT rows (diffpure/eot)
    and the suite's fixed-noise worst case; the fresh-noise worst case is over both attacks."""
    with open(os.path.join(run, f"autoattack.{defence}.{tag}.jsonl")) as f:
        broken = {r["index"]: r["broken"] for r in map(json.loads, f)}
    clean = {r["index"]: r["clean_correct"] for r in read_run(run) if r["defence"] == defence and r["attack"] == CLEAN}
    n = 0  # the first n images: each misclassified clean or checked
    while n in clean and (not clean[n] or n in broken):
        n += 1
    idx = range(n)
    aa = {i: clean[i] and not broken.get(i, False) for i in idx}
    fresh = main_maps(os.path.join(PROTOCOL, "diffpure", "eot"))[(defence, "bpda_eot")]
    fresh = {i: fresh[i] for i in idx}
    worst = {i: aa[i] and fresh[i] for i in idx}
    fixed = suite_maps(run)[defence]
    fixed = {i: fixed[i] for i in idx}
    print(f"\n### {label(defence)}: 'rand' AutoAttack ({tag}), first n = {n} test images\n")
    print("| attack | n | robust % [95% CI] |")
    print("|---|---|---|")
    for name, m in (("'rand' AutoAttack (APGD-CE + APGD-DLR), fresh noise", aa),
                    ("BPDA+EoT-20 PGD-50, fresh noise (eot/)", fresh),
                    ("fresh-noise worst case over the two", worst),
                    ("the suite's worst case, fixed noise", fixed)):
        print(f"| {name} | {n} | {acc(sum(m.values()), n)} |")
    print("\n| comparison | n | robust a vs b | discordant | p |")
    print("|---|---|---|---|---|")
    print(pair_line("'rand' AutoAttack vs BPDA+EoT-20 PGD-50 (both fresh noise)", aa, fresh))
    print(pair_line("'rand' AutoAttack (fresh) vs the suite's worst case (fixed noise)", aa, fixed))


if __name__ == "__main__":
    {"select": select, "main": main, "suite": suite, "eot": eot, "pair": pair, "rand": rand}[sys.argv[1]](*sys.argv[2:])
