"""NCSN++ / DDPM++ (score_sde's `ncsnpp` architecture), state_dict-compatible with the official one.

A U-Net over `len(ch_mult)` resolutions: `num_res_blocks` residual blocks per level (with
attention at `attn_resolutions`), resampling between levels, a middle res-attn-res stage, and
an upward path with one extra block per level fed by the skip stack. Options (all read from
the config): DDPM or BigGAN residual blocks, FIR or plain resampling, an input pyramid
(`progressive_input`: none / input_skip / residual), an output pyramid (`progressive`: none /
output_skip / residual), positional (label) or Fourier (log sigma) time embedding, and
`scale_by_sigma` (divide the output by sigma: the VE models' score parametrisation).

The modules live in one flat `all_modules` list, as in the official code, so that the keys
are `all_modules.<i>.<...>`; the forward pass walks it in construction order.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from . import layers
from .configs import ScoreSdeConfig, sigma_table

__all__ = ["NCSNpp"]


class NCSNpp(nn.Module):
    """score_sde's NCSN++ / DDPM++ network: `net(x, labels) -> output` of x's shape.

    Args:
        cfg: the parsed config (`configs.parse_config`), with `name == "ncsnpp"`.

    Inputs of forward: x (M, C, H, W) in the model's data range ([-1, 1] if `centered`, else
    [0, 1], which the network itself maps to [-1, 1]); labels (M,): 999 t for positional
    embedding (VP), sigma for Fourier embedding (VE).
    """

    def __init__(self, cfg: ScoreSdeConfig):
        super().__init__()
        if cfg.name != "ncsnpp":
            raise ValueError(f"cfg.name must be 'ncsnpp', got {cfg.name!r}")
        self.cfg = cfg
        self.act = act = layers.activation(cfg.nonlinearity)
        self.register_buffer("sigmas", sigma_table(cfg))
        nf, n_levels = cfg.nf, len(cfg.ch_mult)
        self.resolutions = [cfg.image_size // 2 ** i for i in range(n_levels)]
        self.attn_at = [r in cfg.attn_resolutions for r in self.resolutions]
        groups = layers.ncsnpp_groups

        resblock = functools.partial(
            layers.ResBlockBigGAN if cfg.resblock_type == "biggan" else layers.ResBlockDDPM,
            act=act, temb_dim=4 * nf, groups=groups, dropout=cfg.dropout, skip_rescale=cfg.skip_rescale,
            init_scale=cfg.init_scale)
        if cfg.resblock_type == "biggan":
            resblock = functools.partial(resblock, fir=cfg.fir, fir_kernel=cfg.fir_kernel)
        attn = functools.partial(layers.AttnBlock, groups=groups, skip_rescale=cfg.skip_rescale,
                                 init_scale=cfg.init_scale)
        resample = {"fir": cfg.fir, "fir_kernel": cfg.fir_kernel}

        modules: list[nn.Module] = []
        if cfg.embedding_type == "fourier":
            modules.append(layers.FourierEmbedding(nf, cfg.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if cfg.conditional:
            modules += [layers.dense(embed_dim, 4 * nf), layers.dense(4 * nf, 4 * nf)]

        # Parameter-free pyramid resamplers are attributes, not list entries (official keys).
        if cfg.progressive == "output_skip":
            self.pyramid_upsample = layers.Upsample(cfg.num_channels, **resample)
        if cfg.progressive_input == "input_skip":
            self.pyramid_downsample = layers.Downsample(cfg.num_channels, **resample)

        channels = cfg.num_channels
        modules.append(layers.conv(channels, nf))
        skip_channels = [nf]
        in_ch, pyramid_in_ch = nf, channels
        for level in range(n_levels):
            out_ch = nf * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks):
                modules.append(resblock(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.attn_at[level]:
                    modules.append(attn(channels=in_ch))
                skip_channels.append(in_ch)
            if level == n_levels - 1:
                continue
            if cfg.resblock_type == "ddpm":
                modules.append(layers.Downsample(in_ch, with_conv=cfg.resamp_with_conv, **resample))
            else:
                modules.append(resblock(in_ch=in_ch, down=True))
            if cfg.progressive_input == "input_skip":
                modules.append(layers.Combine(pyramid_in_ch, in_ch, method=cfg.progressive_combine))
                if cfg.progressive_combine == "cat":
                    in_ch *= 2
            elif cfg.progressive_input == "residual":
                modules.append(layers.Downsample(pyramid_in_ch, in_ch, with_conv=True, **resample))
                pyramid_in_ch = in_ch
            skip_channels.append(in_ch)

        in_ch = skip_channels[-1]
        modules += [resblock(in_ch=in_ch), attn(channels=in_ch), resblock(in_ch=in_ch)]

        pyramid_ch = 0
        for level in reversed(range(n_levels)):
            out_ch = nf * cfg.ch_mult[level]
            for _ in range(cfg.num_res_blocks + 1):
                modules.append(resblock(in_ch=in_ch + skip_channels.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.attn_at[level]:
                modules.append(attn(channels=in_ch))
            modules += self._output_pyramid_modules(level, in_ch, pyramid_ch)
            if cfg.progressive == "output_skip":
                pyramid_ch = channels
            elif cfg.progressive == "residual":
                pyramid_ch = in_ch
            if level != 0:
                if cfg.resblock_type == "ddpm":
                    modules.append(layers.Upsample(in_ch, with_conv=cfg.resamp_with_conv, **resample))
                else:
                    modules.append(resblock(in_ch=in_ch, up=True))
        assert not skip_channels

        if cfg.progressive != "output_skip":
            modules += [layers.group_norm(in_ch, groups), layers.conv(in_ch, channels, init_scale=cfg.init_scale)]
        self.all_modules = nn.ModuleList(modules)

    def _output_pyramid_modules(self, level: int, in_ch: int, pyramid_ch: int) -> list[nn.Module]:
        """The modules that feed the output pyramid after the upward blocks of `level`."""
        cfg = self.cfg
        top = level == len(cfg.ch_mult) - 1
        if cfg.progressive == "output_skip":
            return [layers.group_norm(in_ch, layers.ncsnpp_groups),
                    layers.conv(in_ch, cfg.num_channels, init_scale=cfg.init_scale)]
        if cfg.progressive == "residual":
            if top:
                return [layers.group_norm(in_ch, layers.ncsnpp_groups), layers.conv(in_ch, in_ch)]
            return [layers.Upsample(pyramid_ch, in_ch, with_conv=True, fir=cfg.fir, fir_kernel=cfg.fir_kernel)]
        return []

    def _embed(self, labels: torch.Tensor, modules) -> tuple[torch.Tensor | None, torch.Tensor, int]:
        """(time embedding or None, the sigmas used by scale_by_sigma, index of the next module)."""
        idx = 0
        if self.cfg.embedding_type == "fourier":
            used_sigmas = labels
            temb = modules[0](torch.log(labels))
            idx = 1
        else:
            # Official behaviour: the sigma table indexed by the truncated label; it only
            # matters when scale_by_sigma is set.
            used_sigmas = self.sigmas[labels.long()] if self.cfg.scale_by_sigma else labels
            temb = layers.timestep_embedding(labels, self.cfg.nf)
        if not self.cfg.conditional:
            return None, used_sigmas, idx
        dense0 = modules[idx]
        temb = dense0(temb.to(dense0.weight.dtype))
        temb = modules[idx + 1](self.act(temb))
        return temb, used_sigmas, idx + 2

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network output (a score for VE / scale_by_sigma models, a noise estimate for VP)."""
        cfg, modules = self.cfg, self.all_modules
        temb, used_sigmas, idx = self._embed(labels, modules)

        def step(*args):
            nonlocal idx
            out = modules[idx](*args)
            idx += 1
            return out

        if not cfg.centered:
            x = 2 * x - 1.0
        n_levels = len(cfg.ch_mult)
        input_pyramid = x if cfg.progressive_input != "none" else None
        hs = [step(x)]
        for level in range(n_levels):
            for _ in range(cfg.num_res_blocks):
                h = step(hs[-1], temb)
                if self.attn_at[level]:
                    h = step(h)
                hs.append(h)
            if level == n_levels - 1:
                continue
            h = step(hs[-1]) if cfg.resblock_type == "ddpm" else step(hs[-1], temb)
            if cfg.progressive_input == "input_skip":
                input_pyramid = self.pyramid_downsample(input_pyramid)
                h = step(input_pyramid, h)
            elif cfg.progressive_input == "residual":
                input_pyramid = self._merge(step(input_pyramid), h)
                h = input_pyramid
            hs.append(h)

        h = step(hs[-1], temb)
        h = step(h)
        h = step(h, temb)

        pyramid = None
        for level in reversed(range(n_levels)):
            for _ in range(cfg.num_res_blocks + 1):
                h = step(torch.cat([h, hs.pop()], dim=1), temb)
            if self.attn_at[level]:
                h = step(h)
            if cfg.progressive == "output_skip":
                out = step(self.act(step(h)))
                pyramid = out if pyramid is None else self.pyramid_upsample(pyramid) + out
            elif cfg.progressive == "residual":
                if level == n_levels - 1:
                    pyramid = step(self.act(step(h)))
                else:
                    pyramid = self._merge(step(pyramid), h)
                    h = pyramid
            if level != 0:
                h = step(h) if cfg.resblock_type == "ddpm" else step(h, temb)
        assert not hs

        if cfg.progressive == "output_skip":
            h = pyramid
        else:
            h = step(self.act(step(h)))
        assert idx == len(modules)
        if cfg.scale_by_sigma:
            h = h / used_sigmas.reshape(-1, *([1] * (h.dim() - 1)))
        return h

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Sum of two paths, divided by sqrt 2 when skip_rescale (keeps the variance)."""
        return (a + b) / math.sqrt(2.0) if self.cfg.skip_rescale else a + b
