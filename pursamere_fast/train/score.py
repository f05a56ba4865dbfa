"""Score-model training: NCSN's multi-sigma denoising score matching with an EMA.

`train_score` keeps one checkpoint (`checkpoint.py`): model weights ("model.*"), the EMA
shadow ("ema.*"), Adam's state tensors ("optim.*"). A run started again with ``resume=True``
continues from it and ends with the same weights as a run that was never interrupted: every
step draws its batch and noise from a generator seeded by (seed, step), and the learning
rate is constant, so nothing else needs saving. `steps` may grow on a resume.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from pursamere_fast import checks

from .checkpoint import (
    ResumeError,
    RunDirectory,
    TrainResult,
    as_image_tensor,
    load_model_tensors,
    load_optimizer,
    model_device,
    optimizer_tensors,
    step_generator,
)


def _sigmas(sigmas) -> tuple[float, ...]:
    sigmas = checks.reals("sigmas", sigmas)
    if min(sigmas) <= 0:
        raise ValueError(f"sigmas must be positive numbers, got {sigmas}")
    return sigmas


def score_matching_loss(model: Callable, x: torch.Tensor, sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """NCSN's multi-sigma denoising score matching loss with lambda(sigma) = sigma^2.

    loss = mean_b 0.5 * || sigma_b * s(x_b + sigma_b z_b, sigma_b) + z_b ||^2 (sum over C,H,W).

    Args:
        model: score(y, sigma) with y (B, C, H, W), sigma (B,).
        x: clean images (B, C, H, W).
        sigma: per-image noise levels (B,).
        z: standard normal noise like x.
    """
    s4 = sigma.view(-1, 1, 1, 1)
    residual = s4 * model(x + s4 * z, sigma) + z
    return 0.5 * residual.pow(2).flatten(1).sum(1).mean()


def train_score(model: nn.Module, images, *, sigmas: Sequence[float], steps: int, batch_size: int,
                lr: float, ema: float = 0.999, out_dir: str | os.PathLike, seed: int, resume: bool = True,
                checkpoint_every: int = 500, progress: bool = True) -> TrainResult:
    """Train a score model by multi-sigma denoising score matching (NCSN), with an EMA.

    Each step draws `batch_size` images (with replacement), a sigma per image uniformly from
    the ladder `sigmas`, and z ~ N(0, I), all from a generator seeded by (seed, step); the loss
    is `score_matching_loss`; Adam at a constant `lr`; the EMA shadow follows every step.

    Args:
        model: score(y, sigma) network, trained in place (raw weights); on its device.
        images: float (N, C, H, W) in [0, 1] (tensor or numpy), kept on the CPU.
        sigmas: the noise ladder (positive).
        steps: total optimizer steps (a resumed run continues up to it).
        batch_size, lr: as usual.
        ema: EMA decay in [0, 1).
        out_dir: checkpoint, loss.csv and loss.png go here.
        seed: fixes every random draw of the run.
        resume: continue from `out_dir`'s checkpoint if there is one (False starts over).
        checkpoint_every: steps between checkpoints (also written at the end).
        progress: show a tqdm bar.

    Returns:
        TrainResult whose model is a copy holding the EMA weights.

    Raises:
        ValueError: bad arguments.
        ResumeError: (a ValueError) the checkpoint in `out_dir` was made with other
            hyperparameters, other images, for another model (class or `config`), or is past
            `steps`.
    """
    images = as_image_tensor(images)
    sig = torch.tensor(_sigmas(sigmas), dtype=torch.float32)
    steps = checks.integer("steps", steps, 1)
    batch_size = checks.integer("batch_size", batch_size, 1)
    lr = checks.real("lr", lr, positive=True)
    checkpoint_every = checks.integer("checkpoint_every", checkpoint_every, 1)
    seed = checks.seed("seed", seed)
    # ema = 1 would freeze the exported weights at their initialization.
    if checks.real("ema", ema, 0, 1) == 1:
        raise ValueError(f"ema must be a finite number >= 0 and < 1, got {ema!r}")
    device = model_device(model)
    # The network's class and constructor arguments: two ConvScoreNets that differ only in
    # dilations have the same weight shapes, so the state dict alone would not refuse a resume.
    net = {"arch": type(model).__name__, "config": json.loads(json.dumps(getattr(model, "config", None)))}
    hparams = {"sigmas": [float(s) for s in sig], "batch_size": batch_size, "lr": lr, "ema": ema,
               "seed": seed, "images": list(images.shape), "images_sum": round(float(images.double().sum()), 3),
               "net": net}
    run = RunDirectory(out_dir, "score", hparams, resume)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    params = dict(model.named_parameters())
    shadow = {k: p.detach().clone() for k, p in params.items()}
    start = 0
    loaded = run.load()
    if loaded is not None:
        start, tensors = loaded
        if start > steps:
            raise ResumeError(f"checkpoint in {run.dir} is at step {start}, past steps={steps}")
        load_model_tensors(model, tensors, "model.", run.ckpt)
        for k, v in shadow.items():
            v.copy_(tensors[f"ema.{k}"])
        load_optimizer(opt, tensors)

    def state() -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v for k, v in model.state_dict().items()}
        out.update({f"ema.{k}": v for k, v in shadow.items()})
        out.update(optimizer_tensors(opt))
        return out

    model.train()
    names = list(params)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="train-score", dynamic_ncols=True)
    for step in range(start, steps):
        g = step_generator(seed, step)
        idx = torch.randint(images.shape[0], (batch_size,), generator=g)
        level = torch.randint(sig.numel(), (batch_size,), generator=g)
        z = torch.randn((batch_size, *images.shape[1:]), generator=g)
        loss = score_matching_loss(model, images[idx].to(device), sig[level].to(device), z.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_([shadow[k] for k in names], [params[k].detach() for k in names], 1.0 - ema)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"score loss is {value} at step {step}; lower lr")
        run.record(step, value)
        bar.update(1)
        bar.set_postfix(loss=f"{value:.2f}", refresh=False)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            run.save(step + 1, state(), final=step + 1 == steps)
    bar.close()
    model.eval()
    ema_model = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in ema_model.named_parameters():
            p.copy_(shadow[k])
    return TrainResult(ema_model.eval(), steps, run.losses, run.dir)


@torch.no_grad()
def evaluate_denoiser(score: Callable, images, sigmas: Sequence[float], *, seed: int = 0,
                      batch_size: int = 500) -> dict[float, dict[str, float]]:
    """Tweedie denoising error of a score model: x_hat = y + sigma^2 s(y, sigma), y = x + sigma z.

    Args:
        score: score(y, sigma).
        images: clean float (N, C, H, W) in [0, 1].
        sigmas: noise levels to test.
        seed: seed of z (the same z for every sigma).
        batch_size: images per forward.

    Returns:
        {sigma: {"tweedie_mse": ..., "noisy_mse": ..., "n": N}}, MSE per pixel averaged over
        the images (noisy_mse is the error of the noisy input y itself).
    """
    images = as_image_tensor(images)
    sigmas = _sigmas(sigmas)
    batch_size = checks.integer("batch_size", batch_size, 1)
    z = torch.randn(images.shape, generator=step_generator(checks.seed("seed", seed), 0))
    out: dict[float, dict[str, float]] = {}
    device = model_device(score) if isinstance(score, nn.Module) else torch.device("cpu")
    for sigma in sigmas:
        se_tw = se_noisy = 0.0
        for i in range(0, images.shape[0], batch_size):
            x = images[i:i + batch_size].to(device).double()
            y = (x + sigma * z[i:i + batch_size].to(device).double()).float()
            s = score(y, torch.full((y.shape[0],), float(sigma), device=device))
            x_hat = y.double() + sigma ** 2 * s.double()
            se_tw += float((x_hat - x).pow(2).sum())
            se_noisy += float((y.double() - x).pow(2).sum())
        count = images.numel()
        out[float(sigma)] = {"tweedie_mse": se_tw / count, "noisy_mse": se_noisy / count, "n": images.shape[0]}
    return out
