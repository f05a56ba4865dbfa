"""Cost of the score models users bring (SPEC 11) inside purify(), beside NCSNv2: the figures
the GPU targets are set from (issue 37, item 6).

Models (random weights, CIFAR-10 shapes 3x32x32):
- "diffusers-ddpm": diffusers' `UNet2DModel` in the architecture of the DDPM CIFAR-10
  pipeline (google/ddpm-cifar10-32: 128-256-256-256 channels, 2 res blocks, attention at
  16x16; 35.7 M parameters), through `from_diffusers` with a linear `DDPMScheduler`;
- "ncsnv2-ngf128": the NCSNv2 CIFAR-10 network (29.7 M parameters) through `NCSNv2Score`.
(score_sde's DDPM++ / NCSN++ are in bench_score_sde.py.)

Figures per model, in `benchmark.extra_info`:
- gflop_fwd, gflop_bwd: FlopCounterMode counts of one forward and one input-only backward per
  image-sample (on the meta device: no weights are materialised);
- the timed function is one purify() of one image with the shipped Fashion-MNIST config
  (K = 10, N = 2, SAM off: 20 forward + input-backward passes on a 2-row batch), backend
  "torch", float32; ms_per_purification and the network's share of it are derived.
PURSAMERE_BENCH_SIZE=tiny runs the same code on 8x8 images with 8-channel networks.
"""

from __future__ import annotations

from conftest import TINY  # isort: skip  (conftest sets TRITON_INTERPRET before triton loads)

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pursamere_fast import PurifyConfig, purify
from pursamere_fast.pretrained import recommended_config_dict
from pursamere_fast.scores import NCSNv2, NCSNv2Score

diffusers = pytest.importorskip("diffusers")

SIZE = 8 if TINY else 32


def diffusers_ddpm(device="cpu"):
    width = (8, 8, 8, 8) if TINY else (128, 256, 256, 256)
    with torch.device(device):
        return diffusers.UNet2DModel(
            sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=width,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4 if TINY else 32, dropout=0.1).eval()


def ncsnv2(device="cpu"):
    with torch.device(device):
        return NCSNv2(image_size=SIZE, channels=3, ngf=8 if TINY else 128, num_classes=232).eval()


def score_of(name, net):
    if name == "diffusers-ddpm":
        from pursamere_fast.scores import from_diffusers

        return from_diffusers(net, diffusers.DDPMScheduler())
    return NCSNv2Score(net)


MODELS = {"diffusers-ddpm": diffusers_ddpm, "ncsnv2-ngf128": ncsnv2}


def gflop_per_image_sample(name):
    """(forward, input-backward) GFLOP of one image-sample, counted on the meta device."""
    score = score_of(name, MODELS[name]("meta"))
    y = torch.rand(1, 3, SIZE, SIZE, device="meta", requires_grad=True)
    sigma = torch.full((1,), 0.1, device="meta")
    with FlopCounterMode(display=False) as fwd:
        s = score(y, sigma)
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(s, y, grad_outputs=torch.ones_like(s))
    return fwd.get_total_flops() / 1e9, bwd.get_total_flops() / 1e9


@pytest.mark.parametrize("name", list(MODELS))
def test_purify_cost(benchmark, name):
    torch.manual_seed(0)
    net = MODELS[name]()
    score = score_of(name, net)
    fields = recommended_config_dict()
    config = PurifyConfig(**{**fields, "sigmas": tuple(fields["sigmas"])})
    x = torch.rand(1, 3, SIZE, SIZE)
    out = benchmark.pedantic(lambda: purify(x, score, config, backend="torch"), rounds=1 if TINY else 3,
                             warmup_rounds=0 if TINY else 1)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())
    gf_fwd, gf_bwd = gflop_per_image_sample(name)
    passes = config.score_evaluations
    benchmark.extra_info.update(
        params_m=sum(p.numel() for p in net.parameters()) / 1e6, gflop_fwd=gf_fwd, gflop_bwd=gf_bwd,
        passes_per_purification=passes, gflop_per_purification=passes * (gf_fwd + gf_bwd),
        threads=torch.get_num_threads())
    if benchmark.stats:  # None under --benchmark-disable (the smoke test)
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(ms_per_purification=seconds * 1e3,
                                    achieved_gflops=passes * (gf_fwd + gf_bwd) / seconds)
