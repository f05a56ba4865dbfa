"""The adaptive attack suite (SPEC section 7): the per-sample worst case over attacks and estimators.

An image counts as robust only when the deterministic defence classifies it correctly clean
and no member of the suite, nor any adversarial image transferred from another defence,
fools it. Members run in the order given. With `cascade` (the default) a member attacks
only the images every earlier member failed to break: the worst case is the same, and the
CPU goes where it is needed, so order members cheap to expensive. Without cascade every
member attacks every clean-correct image, which also gives each member's own accuracy and
the images only it broke.

Transfer (a gradient-masking check): once every defence has run its members on a batch,
each defence is shown the adversarial images found against the other defences (every
member's output, kept under out_dir/adv/) on the images it still classifies correctly.
Adversarials of one estimator scored on another need no extra step: every member's output
is judged by the same deterministic defence.

Seeds are per sample: member m's random starts for dataset index i come from
m.seed * 1_000_003 + i, so a row never depends on its batch, on the cascade's survivors,
on the number of processes or on where a run was interrupted.

Layout of out_dir: rows.jsonl (one row per defence, member and index: "ran" says whether the
member attacked that image, "broken" whether it fooled the defence there, "cpu_s" the
process CPU seconds it spent per attacked image), manifest.json (refuses a resume with other
settings, member order or cascade), adv/, summary.json and summary.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import checks
from .rows import (
    MANIFEST,
    ROWS,
    RowStore,
    barrier,
    check_indices,
    gather,
    merge_run,
    open_shard,
    rank_world,
    read_manifest,
    read_rows,
    read_run,
    take,
)
from .runner import eval_device, perturbation_size, setting_descriptions
from .stats import format_accuracy, paired_robust, wilson_interval
from .threats import AttackSpec, Defence, clean_predictions, predict, run_attack

CLEAN = "clean"
TRANSFER = "transfer"


def default_suite(norm: str = "linf", eps: float = 8 / 255, *, bpda_steps: int = 100, exact_steps: int = 20,
                  square_queries: int = 1000, alpha: float | None = None, seed: int = 0) -> list[AttackSpec]:
    """The shipped suite, cheapest member first (the budgets are justified in docs/evaluation.md).

    Args:
        norm: "linf" or "l2".
        eps: budget, > 0.
        bpda_steps: iterations of the identity-backward attacks.
        exact_steps: iterations of the exact-gradient attacks (each costs about 3 purifications).
        square_queries: Square's query budget (0: no Square member).
        alpha: PGD step size (None: eps / 4, fixed, so more steps only ever help the attacker).
        seed: base seed of every member.

    Returns:
        The members, in cascade order.
    """
    checks.choice("norm", norm, ("linf", "l2"))
    eps = checks.real("eps", eps, positive=True)
    alpha = eps / 4 if alpha is None else checks.real("alpha", alpha, positive=True)
    members = [
        AttackSpec("gpgd", norm, eps, 20, alpha=alpha, seed=seed),
        AttackSpec("bpda", norm, eps, bpda_steps, alpha=alpha, seed=seed),
        AttackSpec("bpda", norm, eps, bpda_steps, seed=seed, attack="apgd", loss="dlr"),
        AttackSpec("exact", norm, eps, exact_steps, alpha=alpha, seed=seed),
        AttackSpec("exact_st", norm, eps, exact_steps, seed=seed, attack="apgd", loss="ce"),
        AttackSpec("exact", norm, eps, exact_steps, seed=seed, attack="apgd", loss="dlr"),
    ]
    if checks.integer("square_queries", square_queries, 0):
        members.append(AttackSpec("blackbox", norm, eps, square_queries, seed=seed, attack="square", loss="cw"))
    return members


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _adv_path(out_dir: str, defence: str, member: str, first: int) -> str:
    return os.path.join(out_dir, "adv", _safe(defence), _safe(member), f"{first}.safetensors")


def _save_adv(path: str, x_adv: torch.Tensor, index: Sequence[int]) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    save_file({"x_adv": x_adv.detach().float().cpu().contiguous(), "index": torch.as_tensor(list(index))}, tmp)
    os.replace(tmp, path)  # a row is written only after its adversarials: never a half file


def _load_adv(path: str) -> tuple[torch.Tensor, list[int]]:
    from safetensors.torch import load_file

    t = load_file(path)
    return t["x_adv"], t["index"].tolist()


def _row(defence: str, member: str, index: int, label: int, clean_pred: int, **fields) -> dict:
    return {"defence": defence, "attack": member, "index": index, "label": label, "clean_pred": clean_pred,
            "clean_correct": clean_pred == label, **fields}


def run_suite(classifier: nn.Module, data, defences: Sequence[Defence], members: Sequence[AttackSpec], *,
              out_dir: str, indices: Sequence[int] | None = None, batch_size: int = 64, mean=None, std=None,
              device: str | torch.device | None = None, cascade: bool = True, transfer: bool = True,
              progress: bool = True) -> dict:
    """Run the suite on every defence and index; resumable and shardable like `evaluate`.

    Args:
        classifier: module from normalised images to logits (switched to eval mode).
        data: (images, labels) tensors, or a dataset of (image, label).
        defences: the defences; names must be unique.
        members: the attacks, in cascade order; labels must be unique; no "clean" member
            (clean accuracy is always measured).
        out_dir: results directory (created; reused to resume).
        indices: dataset indices (None: all).
        batch_size: images per batch, >= 1.
        mean, std: normalisation applied before the classifier.
        device: where to run (None: the classifier's device).
        cascade: attack with a member only the images earlier members did not break.
        transfer: score the other defences' adversarial images on each defence (needs two
            defences or more to do anything).
        progress: tqdm bar on rank 0.

    Returns:
        The summary (see `summarise_suite`).

    Raises:
        ValueError: on a bad argument or a resumed out_dir with different settings.
    """
    checks.integer("batch_size", batch_size, 1)
    cascade, transfer = checks.flag("cascade", cascade), checks.flag("transfer", transfer)
    defences, members = list(defences), list(members)
    if not defences or len({d.name for d in defences}) != len(defences):
        raise ValueError(f"defences must be a non-empty list with unique names, got {[d.name for d in defences]}")
    labels = [m.label for m in members]
    if not members or len(set(labels)) != len(labels) or {CLEAN, TRANSFER} & set(labels):
        raise ValueError(f"members must be a non-empty list of attacks with unique labels other than "
                         f"{CLEAN!r} and {TRANSFER!r}, got {labels}")
    if any(m.threat == "clean" for m in members):
        raise ValueError("members must not include a 'clean' attack: clean accuracy is always measured")
    transfer = transfer and len(defences) > 1
    indices = check_indices(data, indices)
    device = eval_device(classifier, device)

    rank, world = rank_world()
    image_shape = tuple(take(data, indices[:1])[0].shape[1:]) if indices else ()
    run = {"device": device.type, "batch_size": batch_size, "suite": labels, "cascade": cascade,
           "transfer": [d.name for d in defences] if transfer else False}
    store = open_shard(out_dir, setting_descriptions([(d, m) for d in defences for m in members], run, image_shape,
                                                     device))
    done = store.done

    names = [CLEAN, *labels] + ([TRANSFER] if transfer else [])
    batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    mine = batches[rank::world]
    from tqdm.auto import tqdm

    todo = [b for b in mine if any((d.name, n, i) not in done for d in defences for n in names for i in b)]
    bar = tqdm(total=len(todo) * len(defences) * len(names), disable=not progress or rank != 0, desc="suite",
               unit="member")
    with store:
        emit = store.append
        for batch in todo:
            x, y = take(data, batch)
            x = x.to(device=device, dtype=x.dtype if x.is_floating_point() else torch.float32)
            y = y.to(device=device, dtype=torch.int64)
            alive = {}
            for d in defences:
                alive[d.name] = _run_members(d, members, classifier, x, y, batch, done, emit, out_dir, cascade,
                                             transfer, mean, std, bar)
            if transfer:
                for d in defences:
                    _run_transfer(d, [o for o in defences if o is not d], members, classifier, x, y, batch, done,
                                  emit, alive[d.name], out_dir, mean, std)
                    bar.update(1)
    bar.close()
    gather([store.written])  # every shard is complete before rank 0 merges
    if rank == 0:
        order = {(d.name, m.label): i for i, (d, m) in enumerate((d, m) for d in defences for m in members)}
        rows = merge_run(out_dir, lambda r: (order.get((r["defence"], r["attack"]), len(order)), r["defence"],
                                             r["attack"], r["index"]))
        summary = summarise_suite(rows, [d.name for d in defences], names, indices, cascade=cascade)
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(suite_markdown(summary))
    barrier()
    return summarise_suite(read_rows(os.path.join(out_dir, ROWS)), [d.name for d in defences], names, indices,
                           cascade=cascade)


def _run_members(d, members, classifier, x, y, batch, done, emit, out_dir, cascade, transfer, mean, std, bar):
    """Clean row and member rows of defence d on one batch; returns the positions still not broken."""
    yl = y.tolist()
    rows = [done.get((d.name, CLEAN, i)) for i in batch]
    if any(r is None for r in rows):
        cp = clean_predictions(d, classifier, x, mean=mean, std=std).tolist()
        emit([_row(d.name, CLEAN, i, yl[j], cp[j], ran=False, broken=False)
              for j, i in enumerate(batch) if rows[j] is None])
        rows = [done[(d.name, CLEAN, i)] for i in batch]
    cp = [r["clean_pred"] for r in rows]
    bar.update(1)
    alive = [j for j in range(len(batch)) if cp[j] == yl[j]]
    for m in members:
        have = [done.get((d.name, m.label, i)) for i in batch]
        missing = [j for j, r in enumerate(have) if r is None]
        if missing:
            standing = set(alive) if cascade else {j for j in range(len(batch)) if cp[j] == yl[j]}
            targets = [j for j in missing if j in standing]
            new = {}
            if targets:
                sel = torch.as_tensor(targets, device=x.device)
                seeds = [m.seed * 1_000_003 + batch[j] for j in targets]
                t0 = time.process_time()
                x_adv, pred = run_attack(d, m, classifier, x[sel], y[sel], mean=mean, std=std, seed=seeds)
                cpu = (time.process_time() - t0) / len(targets)
                if transfer:
                    _save_adv(_adv_path(out_dir, d.name, m.label, batch[0]), x_adv, [batch[j] for j in targets])
                pert = perturbation_size(x_adv - x[sel], m.norm).tolist()
                for k, (j, p) in enumerate(zip(targets, pred.tolist())):
                    new[j] = dict(ran=True, adv_pred=p, broken=p != yl[j], cpu_s=cpu, perturbation=pert[k])
            emit([_row(d.name, m.label, batch[j], yl[j], cp[j], **new.get(j, dict(ran=False, broken=False)))
                  for j in missing])
            have = [done[(d.name, m.label, i)] for i in batch]
        broken = {j for j, r in enumerate(have) if r["broken"]}
        alive = [j for j in alive if j not in broken]
        bar.update(1)
    return alive


def _run_transfer(d, others, members, classifier, x, y, batch, done, emit, alive, out_dir, mean, std):
    if all((d.name, TRANSFER, i) in done for i in batch):
        return
    yl = y.tolist()
    cp = [done[(d.name, CLEAN, i)]["clean_pred"] for i in batch]
    pos = {i: j for j, i in enumerate(batch)}
    result = {}
    t0 = time.process_time()
    model = d.model(classifier, "none", mean=mean, std=std)
    for o in others:
        for m in members:
            path = _adv_path(out_dir, o.name, m.label, batch[0])
            if not alive or not os.path.exists(path):
                continue
            x_adv, idx = _load_adv(path)
            keep = [k for k, i in enumerate(idx) if pos[i] in alive and not result.get(pos[i], {}).get("broken")]
            if not keep:
                continue
            pred = predict(model, x_adv[keep].to(device=x.device, dtype=x.dtype)).tolist()
            for k, p in zip(keep, pred):
                j = pos[idx[k]]
                result[j] = dict(ran=True, adv_pred=p, broken=p != yl[j], source=f"{o.name} | {m.label}")
    cpu = (time.process_time() - t0) / max(1, len(result))
    emit([_row(d.name, TRANSFER, i, yl[j], cp[j], **({**result[j], "cpu_s": cpu} if j in result else
                                                    dict(ran=False, broken=False)))
          for j, i in enumerate(batch) if (d.name, TRANSFER, i) not in done])


def summarise_suite(rows: Sequence[dict], defences: Sequence[str], members: Sequence[str], indices: Sequence[int],
                    *, cascade: bool = True, z: float = 1.96) -> dict:
    """Worst case per defence, each member beside it, and paired comparisons of the defences.

    An image enters the worst case once every member (clean and transfer included) has a row
    for it; `n` counts those images.

    Returns:
        {"defences": [{name, n, clean/robust accuracy with Wilson interval, cpu_s_per_image,
        members: [{name, ran, broke, acc_on_ran, robust_after, only (no cascade), cpu_s}]}],
        "paired": [{a, b, n, a_only, b_only, p}] (exact McNemar on the worst case)}.
    """
    wanted = {int(i) for i in indices}
    by = {}
    for r in rows:
        if r["index"] in wanted:
            by.setdefault(r["defence"], {}).setdefault(r["index"], {})[r["attack"]] = r
    out, robust = [], {}
    for name in defences:
        images = {i: rs for i, rs in by.get(name, {}).items() if all(m in rs for m in members)}
        n = len(images)
        robust[name] = {i: rs[CLEAN]["clean_correct"] and not any(r["broken"] for r in rs.values())
                        for i, rs in images.items()}
        entry = {"defence": name, "n": n, "n_expected": len(wanted)}
        for what, k in (("clean", sum(rs[CLEAN]["clean_correct"] for rs in images.values())),
                        ("robust", sum(robust[name].values()))):
            entry[f"{what}_correct"] = k
            entry[f"{what}_acc"] = k / n if n else None
            entry[f"{what}_ci"] = list(wilson_interval(k, n, z)) if n else None
        entry["cpu_s_per_image"] = (sum(r.get("cpu_s", 0.0) for rs in images.values() for r in rs.values()
                                        if r["ran"]) / n) if n else None
        still = {i for i, rs in images.items() if rs[CLEAN]["clean_correct"]}
        stats = []
        for m in members[1:]:
            ran = [rs[m] for rs in images.values() if rs[m]["ran"]]
            broke = {i for i, rs in images.items() if rs[m]["broken"]}
            still -= broke
            s = {"member": m, "ran": len(ran), "broke": len(broke),
                 "acc_on_ran": 1 - len(broke) / len(ran) if ran else None,
                 "robust_after": len(still) / n if n else None,
                 "cpu_s": sum(r.get("cpu_s", 0.0) for r in ran) / len(ran) if ran else None}
            if not cascade:
                s["only"] = sum(1 for rs in images.values()
                                if rs[m]["broken"] and not any(rs[o]["broken"] for o in members[1:] if o != m))
            stats.append(s)
        entry["members"] = stats
        out.append(entry)
    paired = []
    for i, a in enumerate(defences):
        for b in defences[i + 1:]:
            r = paired_robust(robust[a], robust[b])
            paired.append({"a": a, "b": b, "n": r["n"], "a_only": r["a_only"], "b_only": r["b_only"], "p": r["p"]})
    return {"defences": out, "paired": paired, "cascade": cascade}


def robust_per_image(rows: Sequence[dict], defence: str | None = None,
                     members: Sequence[str] | None = None) -> dict[int, bool]:
    """{index: robust} of one defence's suite rows: clean-correct and broken by no member.

    Args:
        rows: suite rows (any defences; those of other defences are ignored).
        defence: the defence's name (None: every row).
        members: count only these members (the clean row among them); None: all the defence
            ran. Only images with a row for every counted member are returned.
    """
    by = {}
    for r in rows:
        if (defence is None or r["defence"] == defence) and (members is None or r["attack"] in members):
            by.setdefault(r["index"], {})[r["attack"]] = r
    wanted = set(members) if members is not None else {m for rs in by.values() for m in rs}
    return {i: rs[CLEAN]["clean_correct"] and not any(r["broken"] for r in rs.values())
            for i, rs in by.items() if set(rs) >= wanted}


def suite_markdown(summary: dict) -> str:
    """Markdown: the worst case per defence, then each member beside it, then the paired tests."""
    lines = ["| defence | n | clean acc % [95% CI] | worst-case robust acc % [95% CI] | CPU-s / image |",
             "|---|---|---|---|---|"]
    for e in summary["defences"]:
        cpu = "-" if e["cpu_s_per_image"] is None else f"{e['cpu_s_per_image']:.1f}"
        lines.append(f"| {e['defence']} | {e['n']} | {format_accuracy(e['clean_acc'], e['clean_ci'])} "
                     f"| {format_accuracy(e['robust_acc'], e['robust_ci'])} | {cpu} |")
    cascade = summary["cascade"]
    for e in summary["defences"]:
        lines += ["", f"**{e['defence']}** (n = {e['n']}; members in {'cascade' if cascade else 'full'} order)", "",
                  "| member | attacked | broke | acc % on attacked | robust % after it | "
                  + ("" if cascade else "only it broke | ") + "CPU-s / attacked image |",
                  "|---|---|---|---|---|" + ("" if cascade else "---|") + "---|"]
        for s in e["members"]:
            cpu = "-" if s["cpu_s"] is None else f"{s['cpu_s']:.2f}"
            only = "" if cascade else f"{s['only']} | "
            lines.append(f"| {s['member']} | {s['ran']} | {s['broke']} | {format_accuracy(s['acc_on_ran'])} "
                         f"| {format_accuracy(s['robust_after'])} | {only}{cpu} |")
    if summary["paired"]:
        lines += ["", "| paired (worst case) | n | only a robust | only b robust | exact McNemar p |",
                  "|---|---|---|---|---|"]
        lines += [f"| {p['a']} vs {p['b']} | {p['n']} | {p['a_only']} | {p['b_only']} | {p['p']:.3g} |"
                  for p in summary["paired"]]
    return "\n".join(lines) + "\n"


def autoattack_check(classifier: nn.Module, data, defence: Defence, *, suite_dir: str, norm: str, eps: float,
                     threat: str = "bpda", steps: int = 100, seed: int = 0, batch_size: int = 64, mean=None,
                     std=None, device=None, progress: bool = True, eot: int = 20,
                     indices: Sequence[int] | None = None) -> dict:
    """AutoAttack's APGD-CE + APGD-DLR (pyautoattack, one restart each) against a finished suite.

    SPEC section 7's last sanity check: AutoAttack, run through the same gradient estimator on
    the images the suite judged, must find no image the suite missed. Rows are appended to
    suite_dir/autoattack.<defence>.jsonl per batch and skipped on a rerun.

    Args:
        classifier, data, mean, std, device: as in `run_suite`.
        defence: a defence of the suite (its rows in suite_dir say which images it judged).
        suite_dir: out_dir of a `run_suite` run.
        norm, eps: the suite's budget ("linf" or "l2").
        threat: the gradient estimator AutoAttack differentiates ("bpda", "exact", ...), or a
            stochastic threat ("bpda_eot", "exact_eot"): AutoAttack's 'rand' version as DiffPure
            runs it, each gradient averaged over `eot` calls of a purifier that draws fresh
            noise per call (`FreshNoisePurifier`, from `seed`), judged on a fresh draw; its rows
            go to autoattack.<defence>.<threat>-eot<eot>.jsonl.
        steps: iterations of each APGD attack.
        seed: pyautoattack's seed.
        batch_size: images per AutoAttack call.
        progress: tqdm bar.
        eot: EoT draws per gradient of the stochastic threats (pyautoattack's 'rand': 20).
        indices: check only these of the judged images (None: all), e.g. the first n of a suite
            run larger than the check can afford.

    Returns:
        {"defence", "n", "threat", "steps", "eot" (stochastic threats), "suite_robust",
        "autoattack_robust", "autoattack_only": indices that AutoAttack broke and the suite did
        not, "suite_only": the reverse}.
    """
    from pyautoattack import AutoAttack

    from .threats import EOT_GRAD_MODE, GRAD_MODE
    from .wrappers import FreshNoisePurifier

    checks.choice("norm", norm, ("linf", "l2"))
    checks.choice("threat", threat, (*GRAD_MODE, *EOT_GRAD_MODE))
    eot = checks.integer("eot", eot, 1)
    stochastic = threat in EOT_GRAD_MODE
    rows = read_run(suite_dir)  # the merged rows, or the shards of a run still going or stopped
    wanted = None if indices is None else set(indices)
    by = {}
    for r in rows:
        if r["defence"] == defence.name:
            by.setdefault(r["index"], {})[r["attack"]] = r
    labels = {r["attack"] for r in rows if r["defence"] == defence.name}
    judged = sorted(i for i, rs in by.items() if set(rs) == labels and (indices is None or i in wanted))
    suite_robust = {i: by[i][CLEAN]["clean_correct"] and not any(r["broken"] for r in by[i].values())
                    for i in judged}
    tag = f".{threat}-eot{eot}" if stochastic else ""
    path = os.path.join(suite_dir, f"autoattack.{_safe(defence.name)}{tag}.jsonl")
    store = RowStore(path, key=lambda r: r["index"])
    done = store.done
    device = eval_device(classifier, device)
    if stochastic:
        attacked = FreshNoisePurifier(lambda s: defence.build(EOT_GRAD_MODE[threat], s), seed)
        target = defence.model(classifier, mean=mean, std=std, purifier=attacked)
        # A separate seed stream, so the judging draw is not one the attacker saw (as run_attack).
        judge = defence.model(classifier, mean=mean, std=std,
                              purifier=FreshNoisePurifier(lambda s: defence.build("none", s), seed + 1))
    else:
        target = defence.model(classifier, GRAD_MODE[threat], mean=mean, std=std)
    todo = [i for i in judged if i not in done and by[i][CLEAN]["clean_correct"]]
    from tqdm.auto import tqdm

    with store:
        for start in tqdm(range(0, len(todo), batch_size), disable=not progress, desc="autoattack"):
            batch = todo[start:start + batch_size]
            x, y = take(data, batch)
            x, y = x.to(device=device, dtype=torch.float32), y.to(device=device, dtype=torch.int64)
            aa = AutoAttack(target, attacks=["apgd-ce", "apgd-dlr"], version="custom", eps=eps,
                            norm={"linf": "Linf", "l2": "L2"}[norm], seed=seed, device=device)
            aa.apgd.n_restarts, aa.apgd.n_iter = 1, steps
            if stochastic:  # the 'rand' version: EoT over the purifier's fresh draws
                aa.apgd.eot_iter = eot
            aa.logger.disabled = True
            with torch.random.fork_rng(devices=[]):  # pyautoattack seeds the global RNG
                x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=len(batch))
            pred = (predict(judge, x_adv) if stochastic else
                    clean_predictions(defence, classifier, x_adv, mean=mean, std=std)).tolist()
            store.append({"index": i, "adv_pred": pred[j], "broken": pred[j] != int(y[j])} for j, i in enumerate(batch))
    aa_robust = {i: by[i][CLEAN]["clean_correct"] and not done.get(i, {}).get("broken", False) for i in judged
                 if i in done or not by[i][CLEAN]["clean_correct"]}
    common = sorted(aa_robust)
    return {"defence": defence.name, "n": len(common), "threat": threat, "steps": steps,
            **({"eot": eot} if stochastic else {}), "suite_robust": sum(suite_robust[i] for i in common),
            "autoattack_robust": sum(aa_robust[i] for i in common),
            "autoattack_only": [i for i in common if suite_robust[i] and not aa_robust[i]],
            "suite_only": [i for i in common if aa_robust[i] and not suite_robust[i]]}


def autoattack_markdown(results: Sequence[dict]) -> str:
    """Markdown of `autoattack_check` results, one row per defence."""
    lines = ["", "| AutoAttack check | n | suite robust | AutoAttack robust | only AutoAttack broke "
             "| only the suite broke |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['defence']} ({r['threat']}, APGD-CE + APGD-DLR x {r['steps']}"
              f"{', EoT ' + str(r['eot']) if 'eot' in r else ''}) | {r['n']} | {r['suite_robust']} "
              f"| {r['autoattack_robust']} | {len(r['autoattack_only'])} | {len(r['suite_only'])} |" for r in results]
    return "\n".join(lines) + "\n"


def summarise_rows(rows: Sequence[dict], settings: Mapping) -> dict:
    """The summary of a suite run's rows, finished or not, under its manifest's settings (the
    member order, cascade and defences come from there): each defence's n counts the images
    every member finished.

    Raises:
        ValueError: when settings are not a suite run's (no member order).
    """
    runs = [v.get("run", {}) for v in settings.values()]
    if not runs or "suite" not in runs[0]:
        raise ValueError("settings: not a suite run's (no member order)")
    run = runs[0]
    defences = run["transfer"] or sorted({k.split(" | ")[0] for k in settings})
    names = [CLEAN, *run["suite"]] + ([TRANSFER] if run["transfer"] else [])
    return summarise_suite(rows, defences, names, sorted({r["index"] for r in rows}), cascade=run["cascade"])


def summarise_dir(out_dir: str) -> dict:
    """`summarise_rows` of a suite run directory (every rank's shard), written to its
    summary.json and summary.md: a run stopped at its time budget still reports the images it
    finished.

    Raises:
        ValueError: when out_dir holds no suite manifest.
    """
    if not os.path.exists(os.path.join(out_dir, MANIFEST)):
        raise ValueError(f"out_dir {out_dir!r} has no {MANIFEST}")
    settings = read_manifest(out_dir)["settings"]
    rows = read_run(out_dir)
    try:
        summary = summarise_rows(rows, settings)
    except ValueError:
        raise ValueError(f"out_dir {out_dir!r} is not a suite run (its manifest has no member order)") from None
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(suite_markdown(summary))
    return summary
