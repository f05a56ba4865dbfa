"""DDPM's U-Net (score_sde's `ddpm` architecture), state_dict-compatible with the official one.

Ho et al.'s network as score_sde ports it: DDPM residual blocks (GroupNorm with 32 groups,
no skip rescaling), attention at `attn_resolutions`, nearest / average-pool resampling (with a
3x3 conv when `resamp_with_conv`), and a positional embedding of the label (999 t for the
continuous VP model). Modules sit in one flat `all_modules` list, as in the official code.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from . import layers
from .configs import ScoreSdeConfig, sigma_table

__all__ = ["DDPM"]


class DDPM(nn.Module):
    """score_sde's DDPM network: `net(x, labels) -> noise estimate` of x's shape.

    Args:
        cfg: the parsed config (`configs.parse_config`), with `name == "ddpm"`.

    Inputs of forward: x (M, C, H, W) in the model's data range; labels (M,) real time labels.
    """

    def __init__(self, cfg: ScoreSdeConfig):
        super().__init__()
        if cfg.name != "ddpm":
            raise ValueError(f"cfg.name must be 'ddpm', got {cfg.name!r}")
        self.cfg = cfg
        self.act = act = layers.activation(cfg.nonlinearity)
        self.register_buffer("sigmas", sigma_table(cfg))
        nf, n_levels = cfg.nf, len(cfg.ch_mult)
        self.attn_at = [cfg.image_size // 2 ** i in cfg.attn_resolutions for i in range(n_levels)]
        groups = layers.ddpm_groups
        resblock = functools.partial(layers.ResBlockDDPM, act=act, temb_dim=4 * nf, groups=groups,
                                     dropout=cfg.dropout, init_scale=0.0)
        attn = functools.partial(layers.AttnBlock, groups=groups)

        modules: list[nn.Module] = [layers.dense(nf, 4 * nf), layers.dense(4 * nf, 4 * nf)]
        modules.append(layers.conv(cfg.num_channels, nf))
        skip_channels = [nf]
        in_ch = nf
        for level in range(n_levels):
            for _ in range(cfg.num_res_blocks):
                modules.append(resblock(in_ch=in_ch, out_ch=nf * cfg.ch_mult[level]))
                in_ch = nf * cfg.ch_mult[level]
                if self.attn_at[level]:
                    modules.append(attn(channels=in_ch))
                skip_channels.append(in_ch)
            if level != n_levels - 1:
                modules.append(layers.Downsample(in_ch, with_conv=cfg.resamp_with_conv))
                skip_channels.append(in_ch)

        in_ch = skip_channels[-1]
        modules += [resblock(in_ch=in_ch), attn(channels=in_ch), resblock(in_ch=in_ch)]
        for level in reversed(range(n_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                modules.append(resblock(in_ch=in_ch + skip_channels.pop(), out_ch=nf * cfg.ch_mult[level]))
                in_ch = nf * cfg.ch_mult[level]
            if self.attn_at[level]:
                modules.append(attn(channels=in_ch))
            if level != 0:
                modules.append(layers.Upsample(in_ch, with_conv=cfg.resamp_with_conv))
        assert not skip_channels
        modules += [layers.group_norm(in_ch, groups), layers.conv(in_ch, cfg.num_channels, init_scale=0.0)]
        self.all_modules = nn.ModuleList(modules)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network output (the noise estimate of a VP model)."""
        cfg, modules = self.cfg, self.all_modules
        idx = 0

        def step(*args):
            nonlocal idx
            out = modules[idx](*args)
            idx += 1
            return out

        temb = layers.timestep_embedding(labels, cfg.nf).to(modules[0].weight.dtype)
        temb = step(temb)
        temb = step(self.act(temb))
        h = x if cfg.centered else 2 * x - 1.0
        hs = [step(h)]
        n_levels = len(cfg.ch_mult)
        for level in range(n_levels):
            for _ in range(cfg.num_res_blocks):
                h = step(hs[-1], temb)
                if self.attn_at[level]:
                    h = step(h)
                hs.append(h)
            if level != n_levels - 1:
                hs.append(step(hs[-1]))

        h = step(hs[-1], temb)
        h = step(h)
        h = step(h, temb)
        for level in reversed(range(n_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = step(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at[level]:
                h = step(h)
            if level != 0:
                h = step(h)
        assert not hs
        h = step(self.act(step(h)))
        assert idx == len(modules)
        return h
