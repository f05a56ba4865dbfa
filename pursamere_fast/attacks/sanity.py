"""Sanity checks every evaluation can run (SPEC section 7; Carlini et al. 2019, "On Evaluating
Adversarial Robustness"):

1. eps sweep: robust accuracy falls to ~0 as eps grows (an attack that cannot break the
   model with a huge budget is broken, not the defence strong);
2. steps sweep: more attack steps never help the defence (non-increasing within `tol`);
3. rho = 0: the purifier is the identity, so its numbers equal the undefended ones;
4. BPDA and exact-gradient input gradients side by side, with their cosine similarity.

All attacks go through `evaluate`, so the checks are resumable and leave rows, a summary
and the accuracy-vs-eps / accuracy-vs-steps plots in `out_dir`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from torch import nn

from .. import checks
from .rows import data_size, read_rows, take
from .runner import evaluate, markdown_table
from .threats import AttackSpec, Defence, cosine_per_sample, input_gradients


def run_sanity(classifier: nn.Module, data, defence: Defence, *, out_dir: str, indices: Sequence[int] | None = None,
               rho_zero: Defence | None = None, threat: str = "bpda", norm: str = "linf",
               eps_list: Sequence[float] = (0.0, 4 / 255, 8 / 255, 32 / 255, 0.5),
               steps_list: Sequence[int] = (5, 10, 20), eps_steps: float = 8 / 255, sweep_steps: int | None = None,
               tol: float = 0.02, zero_tol: float = 0.05, grad_n: int = 8, batch_size: int = 64, mean=None, std=None,
               device=None, seed: int = 0, progress: bool = True) -> dict:
    """Run the four sanity checks on `defence`.

    Args:
        classifier: module from normalised images to logits.
        data: (images, labels) tensors or a dataset of (image, label).
        defence: the defence under test.
        out_dir: results directory (resumable).
        indices: samples to use (None: all).
        rho_zero: the same defence with rho = 0 (None: check 3 is reported as skipped).
        threat: threat model of the sweeps ("bpda", "exact", "gpgd", "bpda_eot").
        norm: budget norm.
        eps_list: budgets of the eps sweep; the largest should break any model.
        steps_list: step counts of the steps sweep.
        eps_steps: budget of the steps sweep and of the rho = 0 check.
        sweep_steps: steps of the eps sweep (None: max(steps_list)).
        tol: allowed accuracy increase between consecutive sweep points.
        zero_tol: robust accuracy at the largest eps must be <= zero_tol.
        grad_n: samples of the gradient comparison (0: skip).
        batch_size, mean, std, device, progress: as in `evaluate`.
        seed: attack seed.

    Returns:
        {"checks": [{"name", "passed" (True/False/None), "detail", ...}], "summary": [...]}.
    """
    if not eps_list or not steps_list:
        raise ValueError(f"eps_list and steps_list must not be empty, got {eps_list}, {steps_list}")
    checks.real("tol", tol, 0.0, 1.0)
    checks.real("zero_tol", zero_tol, 0.0, 1.0)
    eps_list = sorted(float(e) for e in eps_list)
    steps_list = sorted(int(s) for s in steps_list)
    sweep_steps = max(steps_list) if sweep_steps is None else sweep_steps
    # A fixed step (eps / 4) in both sweeps: a rule like 2.5 * eps / steps would shrink the step
    # as the count grows and turn "more steps" into a different attack.
    eps_attacks = [AttackSpec(threat, norm, e, sweep_steps, alpha=e / 4 if e > 0 else None, seed=seed)
                   for e in eps_list]
    step_attacks = [AttackSpec(threat, norm, eps_steps, s, alpha=eps_steps / 4, seed=seed) for s in steps_list]
    base = AttackSpec(threat, norm, eps_steps, max(steps_list), alpha=eps_steps / 4, seed=seed)
    attacks = list(dict.fromkeys(eps_attacks + step_attacks))
    settings = [(defence, a) for a in attacks]
    if rho_zero is not None:
        undefended = Defence.none()
        if undefended.name in (defence.name, rho_zero.name):
            raise ValueError(f"defence names must differ from {undefended.name!r}")
        settings += [(undefended, base), (rho_zero, base)]
    summary = evaluate(classifier, data, settings, out_dir=out_dir, indices=indices, batch_size=batch_size,
                       mean=mean, std=std, device=device, progress=progress)
    acc = {(e["defence"], e["attack"]): e for e in summary}
    results = []

    ys = [acc[(defence.name, a.label)]["robust_acc"] for a in eps_attacks]
    rises = [(eps_list[i], eps_list[i + 1]) for i in range(len(ys) - 1) if ys[i + 1] > ys[i] + tol]
    results.append({"name": "eps sweep falls to ~0", "passed": ys[-1] <= zero_tol and not rises,
                   "detail": f"robust acc {[round(y, 4) for y in ys]} at eps {eps_list}; last <= {zero_tol}: "
                             f"{ys[-1] <= zero_tol}; rises > {tol}: {rises}",
                   "eps": eps_list, "robust_acc": ys})

    ys = [acc[(defence.name, a.label)]["robust_acc"] for a in step_attacks]
    rises = [(steps_list[i], steps_list[i + 1]) for i in range(len(ys) - 1) if ys[i + 1] > ys[i] + tol]
    results.append({"name": "more steps never help", "passed": not rises,
                   "detail": f"robust acc {[round(y, 4) for y in ys]} at steps {steps_list}; rises > {tol}: {rises}",
                   "steps": steps_list, "robust_acc": ys})

    if rho_zero is None:
        results.append({"name": "rho = 0 reproduces undefended", "passed": None,
                       "detail": "skipped (no rho_zero defence)"})
    else:
        rows = read_rows(os.path.join(out_dir, "rows.jsonl"))
        wanted = None if indices is None else set(int(i) for i in indices)
        per = {}
        for r in rows:
            if r["attack"] == base.label and r["defence"] in (undefended.name, rho_zero.name) and (
                    wanted is None or r["index"] in wanted):
                per.setdefault(r["index"], {})[r["defence"]] = (r["clean_pred"], r["adv_pred"])
        same = sum(1 for v in per.values() if v.get(undefended.name) == v.get(rho_zero.name))
        a0, a1 = acc[(undefended.name, base.label)], acc[(rho_zero.name, base.label)]
        results.append({"name": "rho = 0 reproduces undefended", "passed": bool(per) and same == len(per),
                       "detail": f"{same}/{len(per)} samples with identical clean and adversarial predictions; "
                                 f"robust acc undefended {a0['robust_acc']:.4f} vs rho=0 {a1['robust_acc']:.4f}",
                       "agree": same, "n": len(per)})

    if grad_n > 0:
        idx = (list(range(data_size(data))) if indices is None else list(indices))[:grad_n]
        x, y = take(data, idx)
        dev = device if device is not None else next(iter(classifier.parameters())).device
        x, y = x.to(device=dev, dtype=torch.float32), y.to(dev)
        g_bpda = input_gradients(defence, classifier, x, y, "bpda", mean=mean, std=std)
        g_full = input_gradients(defence, classifier, x, y, "full", mean=mean, std=std)
        cos = cosine_per_sample(g_bpda, g_full)
        ratio = (g_bpda.flatten(1).norm(dim=1) / g_full.flatten(1).norm(dim=1).clamp_min(1e-30)).double()
        finite = bool(torch.isfinite(g_bpda).all() and torch.isfinite(g_full).all())
        results.append({"name": "BPDA vs exact gradient", "passed": None if finite else False,
                       "detail": f"cosine mean {cos.mean():.4f} min {cos.min():.4f} max {cos.max():.4f}; "
                                 f"|g_bpda|/|g_exact| median {ratio.median():.4g} (n={len(idx)})",
                       "cosine": cos.tolist(), "norm_ratio": ratio.tolist()})
    report = {"checks": results, "summary": summary}
    with open(os.path.join(out_dir, "sanity.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "sanity.md"), "w") as f:
        f.write(sanity_markdown(report))
    return report


def sanity_markdown(report: dict) -> str:
    """Markdown of a sanity report: the checks, then the summary table."""
    mark = {True: "PASS", False: "FAIL", None: "info"}
    lines = ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['name']} | {mark[c['passed']]} | {c['detail']} |" for c in report["checks"]]
    return "\n".join(lines) + "\n\n" + markdown_table(report["summary"])
