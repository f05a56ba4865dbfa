"""Quality and cost of score models side by side: ``pursamere-fast score-quality`` (issue 13).

For each score file (`nets.save_net` safetensors) it measures
- Tweedie denoising: per-pixel MSE of x_hat = y + sigma^2 s(y, sigma) against the clean image,
  y = x + sigma z, on the first n Fashion-MNIST test images (or the last n training images,
  the validation split, with ``--split validation``), at sigma 0.01, 0.05, 0.1, 0.25, 0.5
  (`evaluate_denoiser`, one z per image from the seed, the same z for every sigma and score);
- its size: parameters, and FLOPs of one score forward + input-gradient backward per image
  (torch's FlopCounterMode; convolutions and matrix products only);
- its cost on this CPU: ms per image of one score evaluation with its input gradient (the
  forward and the input-only backward that purification runs per step and sample), run the
  way `purify` runs it (`purify.score_plan`: channels_last on the CPU), at batch `--batch`;
  and ms per image of one whole `purify` call with the shipped Fashion-MNIST config.

Every score is timed in alternation with the others, round after round (the starting score
rotating), and each figure is the median over rounds, so a change of machine load hits all of
them alike; the ratio columns divide by the first score's figures (the baseline). Absolute ms
depend on the machine and its load; the ratios are what to compare. With ``--out`` the table is
written as quality.json and quality.md, and quality.png plots MSE and gain against sigma.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from pursamere_fast import checks

from .score import evaluate_denoiser

SIGMAS = (0.01, 0.05, 0.1, 0.25, 0.5)
# The sigma of the timed score calls; the cost of the networks here does not depend on it.
_TIMING_SIGMA = 0.1


def flops_per_image(score: nn.Module, image_shape: Sequence[int]) -> int:
    """FLOPs of one score forward + input-gradient backward on one image (frozen weights, so
    the backward is the input gradient only, as in purification)."""
    from torch.utils.flop_counter import FlopCounterMode

    frozen = copy.deepcopy(score).requires_grad_(False)
    y = torch.rand(1, *image_shape).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:  # (it cannot count under torch.autograd.grad)
        frozen(y, torch.full((1,), _TIMING_SIGMA)).sum().backward()
    return counter.get_total_flops()


def _alternating(calls: Sequence[Callable[[], None]], repeats: int) -> list[float]:
    """Median seconds of each call, timed `repeats` rounds in alternation after one warm-up
    round; round r starts with call r mod len(calls)."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for r in range(repeats):
        for j in range(len(calls)):
            i = (r + j) % len(calls)
            t0 = time.perf_counter()
            calls[i]()
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def _prepared(score: nn.Module, image_shape: Sequence[int]):
    # As purify runs it on the CPU: its score_plan, applied by graphs.prepare_score (which
    # converts the module to channels_last in place when the plan says so).
    from pursamere_fast import graphs
    from pursamere_fast.purify import score_plan

    plan = score_plan(score, image_shape, torch.device("cpu"))
    return graphs.prepare_score(score, graphs.ScoreOptions(channels_last=plan["channels_last"]))


def score_eval_ms(scores: Sequence[nn.Module], image_shape: Sequence[int], *, batch: int = 64,
                  repeats: int = 9) -> list[float]:
    """CPU ms per image of one score forward + input-gradient backward at `batch` rows, for
    each score, timed in alternation (`repeats` rounds, median). The scores should be frozen
    (requires_grad False) as purification's are; channels_last is applied in place."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(batch, *image_shape, generator=g)
    upstream = torch.randn(batch, *image_shape, generator=g)
    sigma = torch.full((batch,), _TIMING_SIGMA)

    def call(fn):
        def run():
            yy = y.detach().requires_grad_(True)
            torch.autograd.grad(fn(yy, sigma), yy, upstream)
        return run

    seconds = _alternating([call(_prepared(s, image_shape)) for s in scores], repeats)
    return [1e3 * t / batch for t in seconds]


def purify_ms(scores: Sequence[nn.Module], images: torch.Tensor, config, *, repeats: int = 3) -> list[float]:
    """CPU ms per image of one `purify(images, score, config)` call (default backend and score
    plan) for each score, timed in alternation (`repeats` rounds, median)."""
    from pursamere_fast import purify

    def call(score):
        return lambda: purify(images, score, config)

    return [1e3 * t / len(images) for t in _alternating([call(s) for s in scores], repeats)]


def shipped_config():
    """The shipped Fashion-MNIST PurifyConfig (pursamere_fast.pretrained's JSON)."""
    from pursamere_fast import PurifyConfig
    from pursamere_fast.pretrained import recommended_config_dict

    fields = recommended_config_dict()
    fields["sigmas"] = tuple(fields["sigmas"])
    return PurifyConfig(**fields)


def _training_steps(path) -> int | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        training = (f.metadata() or {}).get("training")
    return json.loads(training).get("steps") if training else None


def _ratio(base: float, value: float) -> float:
    return base / value if value > 0 else float("inf")


def quality_rows(paths: Sequence[str], scores: Sequence[nn.Module], images: torch.Tensor, *, seed: int = 0,
                 batch: int = 64, repeats: int = 9, purify_images: int = 64, purify_repeats: int = 3,
                 config=None) -> list[dict]:
    """One row per score: denoising MSEs, size, cost, and ratios against the first score.

    Args:
        paths: a label per score (its file).
        scores: score modules (frozen and converted to channels_last in place by the timing).
        images: clean (n, C, H, W) images for the denoising figures; the first
            `purify_images` of them are purified for the purify timing.
        seed: seed of the denoising noise z.
        batch, repeats: rows per timed score evaluation, rounds of its timing.
        purify_images, purify_repeats: images per timed purify call, rounds of its timing.
        config: PurifyConfig of the purify timing (None: `shipped_config()`).

    Returns:
        Dicts with score, arch, arch_config, params, mflop_per_image, tweedie_mse and
        noisy_mse ({sigma: MSE}), mse_gain ({sigma: first score's MSE / this one's}: above 1
        is better), score_ms_per_image, score_cost_ratio, purify_ms_per_image,
        purify_cost_ratio (this / first's).

    Raises:
        ValueError: no scores, paths and scores of other lengths, a count < 1 (naming it), or
            evaluate_denoiser's (bad images).
    """
    if not scores or len(paths) != len(scores):
        raise ValueError(f"scores must be a non-empty sequence with one entry of paths each, got {len(scores)} "
                         f"scores and {len(paths)} paths")
    for name, value in (("batch", batch), ("repeats", repeats), ("purify_images", purify_images),
                        ("purify_repeats", purify_repeats)):
        checks.integer(name, value, 1)
    config = shipped_config() if config is None else config
    shape = tuple(images.shape[1:])
    rows = []
    for path, score in zip(paths, scores):
        score.requires_grad_(False)
        denoise = evaluate_denoiser(score, images, SIGMAS, seed=seed)
        rows.append({"score": str(path), "arch": type(score).__name__, "arch_config": getattr(score, "config", None),
                     "training_steps": _training_steps(path),
                     "params": sum(p.numel() for p in score.parameters()),
                     "mflop_per_image": flops_per_image(score, shape) / 1e6, "n": images.shape[0], "seed": seed,
                     "tweedie_mse": {s: v["tweedie_mse"] for s, v in denoise.items()},
                     "noisy_mse": {s: v["noisy_mse"] for s, v in denoise.items()}})
    score_ms = score_eval_ms(scores, shape, batch=batch, repeats=repeats)
    pur_ms = purify_ms(scores, images[:purify_images], config, repeats=purify_repeats)
    base = rows[0]
    for row, t_score, t_pur in zip(rows, score_ms, pur_ms):
        row["mse_gain"] = {s: _ratio(base["tweedie_mse"][s], v) for s, v in row["tweedie_mse"].items()}
        row.update(score_ms_per_image=t_score, score_cost_ratio=t_score / score_ms[0],
                   purify_ms_per_image=t_pur, purify_cost_ratio=t_pur / pur_ms[0])
    return rows


def markdown(rows: Sequence[dict], setup: str) -> str:
    """The rows as a markdown table, `setup` (what was measured how) above it."""
    head = ("| score | arch | steps | params | MFLOP/img | "
            + " | ".join(f"MSE sigma={s:g} (gain)" for s in SIGMAS)
            + " | score eval ms/img (x) | purify ms/img (x) |\n")
    sep = "|" + "---|" * (5 + len(SIGMAS) + 2) + "\n"
    lines = []
    for r in rows:
        mse = " | ".join(f"{r['tweedie_mse'][s]:.3g} ({r['mse_gain'][s]:.2f}x)" for s in SIGMAS)
        steps = "" if r["training_steps"] is None else str(r["training_steps"])
        lines.append(f"| {r['score']} | {r['arch']} {json.dumps(r['arch_config'])} | {steps} | {r['params']:,} | "
                     f"{r['mflop_per_image']:.1f} | {mse} | {r['score_ms_per_image']:.2f} "
                     f"({r['score_cost_ratio']:.2f}x) | {r['purify_ms_per_image']:.1f} "
                     f"({r['purify_cost_ratio']:.2f}x) |")
    return setup + "\n\n" + head + sep + "\n".join(lines) + "\n"


def plot_quality(rows: Sequence[dict], path: str | os.PathLike) -> None:
    """PNG of the rows: Tweedie MSE against sigma (the noisy input's dashed) and each score's
    gain over the first, log axes (matplotlib, Agg, no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    mse, gain = fig.subplots(1, 2)
    sigmas = list(rows[0]["tweedie_mse"])
    mse.plot(sigmas, [rows[0]["noisy_mse"][s] for s in sigmas], "k--", lw=1, label="noisy input")
    for r in rows:
        label = f"{r['arch']} ({os.path.basename(r['score'])})"
        mse.plot(sigmas, [r["tweedie_mse"][s] for s in sigmas], "o-", label=label)
        gain.plot(sigmas, [r["mse_gain"][s] for s in sigmas], "o-", label=label)
    mse.set(xscale="log", yscale="log", xlabel="sigma", ylabel="per-pixel MSE against the clean image",
            title=f"Tweedie denoising, n = {rows[0]['n']}")
    gain.axhline(1.0, color="k", lw=0.5)
    gain.set(xscale="log", xlabel="sigma", ylabel="first row's MSE / this MSE", title="gain over the first score")
    mse.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.fspath(path))
