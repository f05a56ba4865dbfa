"""score_sde's CIFAR-10 networks (issue 38): FLOPs and CPU time of the figures the GPU targets
are set from.

    OMP_NUM_THREADS=1 python -m pytest bench/bench_score_sde.py --benchmark-only

Models: DDPM++ deep continuous VP (DiffPure's `checkpoint_8.pth`, 106.6 M parameters) and
NCSN++ continuous VE (62.8 M), full size, random weights (official init), 3x32x32, through
`load_score_sde`'s adapter (`score_sde_network` + `score_sde_adapter`).

Figures (benchmark.extra_info):
- FLOPs of one forward + input-backward per image (FlopCounterMode on the meta device:
  convolutions and matmuls, which are the whole count);
- CPU ms of one forward + input-backward at batch 1 (`test_pass_time`), and the GFLOP/s
  that makes;
- CPU s of one purification of one image with the shipped PurifyConfig
  (`pursamere_fast.pretrained`: K = 10 steps x N = 2 samples = 20 score evaluations on a
  2-row batch; SAM off) (`test_purify_time`).

PURSAMERE_BENCH_SIZE=tiny (tests/test_bench_smoke.py): nf 8, ch_mult (1, 2), one res block,
16x16 images, the same code paths.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import TINY
from torch.utils.flop_counter import FlopCounterMode

from pursamere_fast import PurifyConfig, purify
from pursamere_fast.pretrained import recommended_config_dict
from pursamere_fast.scores.score_sde import preset, score_sde_adapter, score_sde_network

MODELS = ("cifar10_ddpmpp_deep_continuous", "cifar10_ncsnpp_continuous")
ROUNDS = 1 if TINY else 5
PURIFY_ROUNDS = 1


def model_config(name: str) -> dict:
    """The preset's config; at the tiny size its width, depth and image side are reduced."""
    config = preset(name)
    if TINY:
        config["model"].update(nf=8, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8])
        config["data"]["image_size"] = 16
    return config


def make_score(name: str):
    """The adapter around a freshly initialised network (seeded), in eval mode, on the CPU."""
    torch.manual_seed(0)
    config = model_config(name)
    return score_sde_adapter(score_sde_network(config).eval(), config).eval()


def image_shape(name: str) -> tuple[int, int, int]:
    return (3, model_config(name)["data"]["image_size"], model_config(name)["data"]["image_size"])


def forward_backward(score, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """One score evaluation and the input gradient of <s, 1>: what a purification step costs."""
    y = y.detach().requires_grad_(True)
    s = score(y, sigma)
    (grad,) = torch.autograd.grad(s, y, torch.ones_like(s))
    return grad


@functools.cache
def flops_per_image(name: str) -> tuple[int, int]:
    """(forward, input-backward) FLOPs of the network on one image, counted on the meta device."""
    config = model_config(name)
    with torch.device("meta"):
        net = score_sde_network(config).eval()
        y = torch.empty(1, *image_shape(name), requires_grad=True)
        labels = torch.full((1,), 0.5)
    with FlopCounterMode(display=False) as fwd:
        out = net(y, labels)
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(out, y, torch.ones_like(out))
    return fwd.get_total_flops(), bwd.get_total_flops()


@pytest.mark.parametrize("name", MODELS)
def test_flops(name):
    fwd, bwd = flops_per_image(name)
    # The input-backward of every conv and matmul costs what its forward does (no weight
    # gradients are asked for): a count far from the forward's means weight gradients leaked in.
    assert fwd > 0 and 0.9 * fwd <= bwd <= 1.1 * fwd, (fwd, bwd)


@pytest.mark.parametrize("name", MODELS)
def test_pass_time(benchmark, name):
    score = make_score(name)
    y = torch.rand((1, *image_shape(name)), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((1,), 0.1)
    forward_backward(score, y, sigma)  # warm-up (allocator, oneDNN primitives)
    benchmark.pedantic(forward_backward, args=(score, y, sigma), rounds=ROUNDS)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    fwd, bwd = flops_per_image(name)
    benchmark.extra_info.update(model=name, threads=torch.get_num_threads(), batch=1,
                                gflop_forward=fwd / 1e9, gflop_input_backward=bwd / 1e9,
                                ms_per_pass=median * 1e3, gflop_per_s=(fwd + bwd) / median / 1e9)
    assert torch.isfinite(forward_backward(score, y, sigma)).all()


@pytest.mark.parametrize("name", MODELS)
def test_purify_time(benchmark, name):
    cfg = PurifyConfig(**recommended_config_dict())
    if TINY:
        cfg = cfg.with_overrides(sigmas=cfg.sigmas[:1], steps_per_sigma=1)
    score = make_score(name)
    x = torch.rand((1, *image_shape(name)), generator=torch.Generator().manual_seed(0))
    out = benchmark.pedantic(purify, args=(x, score, cfg), kwargs=dict(backend="torch"), rounds=PURIFY_ROUNDS)
    median = benchmark.stats.stats.median if benchmark.stats else float("nan")
    evaluations = cfg.num_steps * cfg.n_samples * (2 if cfg.sam_radius > 0 else 1)
    benchmark.extra_info.update(model=name, threads=torch.get_num_threads(), batch=1, steps=cfg.num_steps,
                                n_samples=cfg.n_samples, score_evaluations=evaluations, s_per_purify=median)
    assert out.shape == x.shape and torch.isfinite(out).all()
