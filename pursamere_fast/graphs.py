"""CUDA graphs for the fused loop, and how the score network is run inside it.

`run_graphed` captures the fused loop (`purify._FusedLoop`, whose step reads its index,
sigma, lr and noise from device tensors) once per score, config, batch shape, dtype and
options, and replays it on later calls: one call then costs copying the inputs in, the
replays, and copying the outputs out. Two capture modes behind one switch, `CAPTURE_MODE`:
"step" captures one step and replays it K times; "loop" captures all K steps in one graph.
Both launch the same kernels in the same order on the same buffers, so they give the same
bits; which is faster is for bench/bench_ncsnv2.py to say (docs/gpu.md).

`prepare_score` applies the score options of `purify` (bf16 autocast, channels_last,
torch.compile) in one wrapper that both `purify` and the benchmarks' bare-network timing
use, so the network is timed exactly the way the loop runs it.

Nothing here touches the GPU at import time.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from itertools import chain
from typing import NamedTuple

import torch
from torch import nn

from .scores.boundary import model_dtype

__all__ = ["CAPTURE_MODE", "ScoreOptions", "prepare_score", "wrap_score", "run_graphed", "clear_graph_cache",
           "module_of"]

# Internal switch, read at call time (and part of the cache key): "step" or "loop". "step" is
# the default because its graph is K times smaller (NCSNv2 with SAM: ~2,100 nodes instead of
# ~210,000 at K = 100) for at most K - 1 more graph launches (a few microseconds each against
# milliseconds of network per step); not yet measured on a GPU.
CAPTURE_MODE = "step"
CAPTURE_MODES = ("step", "loop")
# Eager steps on a side stream before capture. The first initialises cuDNN/cuBLAS handles,
# Triton and torch.compile compilation and the allocator's pools; the second runs with all of
# them warm, so nothing is initialised during capture (make_graphed_callables warms up the same
# way).
WARMUP_STEPS = 2
# Captured loops kept for reuse. Each keeps its graph's private memory pool (about one step's
# peak: for NCSNv2 at ngf 128 in fp32, ~52 MiB of activations per image-sample, so ~26 GiB at
# B*N = 512); two entries cover a batch split by max_batch into full chunks and a tail.
CACHE_SIZE = 2
# torch.compile arguments for compile_score. Not mode="reduce-overhead": its own CUDA graphs
# (cudagraph trees) cannot nest inside the loop's capture. Tests swap in backend="aot_eager"
# to check the plumbing on the CPU without Inductor's C++ compile.
COMPILE_OPTIONS = {"backend": "inductor", "dynamic": False}
# Prepared scores kept (a compiled score must not be compiled again on every call).
PREPARED_CACHE_SIZE = 4

_RUNNERS: OrderedDict = OrderedDict()
_PREPARED: OrderedDict = OrderedDict()


class ScoreOptions(NamedTuple):
    """How `purify` runs the score network (its `score_dtype`, `channels_last`, `compile_score`)."""

    dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False


def clear_graph_cache(scores: bool = True) -> None:
    """Drop every captured loop, releasing the graphs' memory pools, and the prepared scores.

    Call it after changing Python-side state of a score that a captured graph has frozen
    (attributes other than parameters and buffers), or to give the memory back.

    Args:
        scores: also drop the prepared (compiled) scores; False keeps the compilations.
    """
    _RUNNERS.clear()
    if scores:
        _PREPARED.clear()


def module_of(score) -> nn.Module | None:
    """The nn.Module behind `score`: the score itself, the owner of a bound method, or None."""
    if isinstance(score, nn.Module):
        return score
    owner = getattr(score, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def prepare_score(score, options: ScoreOptions):
    """The score as the loop calls it under `options` (see `purify`).

    Args:
        score: callable score(y, sigma).
        options: ScoreOptions; all off returns `score` unchanged.

    Returns:
        A callable score(y, sigma) (cached per score, options and parameter storage).
    """
    if options == ScoreOptions():
        return score
    module = module_of(score)
    if options.channels_last and module is not None and not _is_channels_last(module):
        module.to(memory_format=torch.channels_last)
    ident, refs = _identity(score)
    compiler = tuple(sorted(COMPILE_OPTIONS.items())) if options.compile else ()
    key = (ident, options, compiler, _fingerprint(module))
    entry = _PREPARED.get(key)
    if entry is None:
        entry = _PREPARED[key] = (refs, _PreparedScore(score, options))
        while len(_PREPARED) > PREPARED_CACHE_SIZE:
            _PREPARED.popitem(last=False)
    _PREPARED.move_to_end(key)
    return entry[1]


def wrap_score(score, options: ScoreOptions):
    """`score` under uncompiled `options` (autocast, channels_last inputs), uncached: for
    per-call closures such as the exact-gradient path's, which cannot be compiled (AOTAutograd
    has no double backward)."""
    assert not options.compile
    return score if options == ScoreOptions() else _PreparedScore(score, options)


class _PreparedScore:
    """score(y, sigma) under autocast / channels_last / torch.compile."""

    def __init__(self, score, options: ScoreOptions):
        self.options = options
        self._call = score
        self._module = module_of(score)
        if options.compile and isinstance(score, nn.Module):
            # AOTAutograd's compiled backward computes the gradient of every input that
            # requires one; detached parameters leave only y's, the one the loop asks for.
            # Detached tensors share storage, so in-place updates of the weights are seen.
            tensors = {name: t.detach() for name, t in chain(score.named_parameters(), score.named_buffers())}

            def call(y, sigma):
                return torch.func.functional_call(score, tensors, (y, sigma))

            self._call = call
        self._fn = torch.compile(self._forward, **COMPILE_OPTIONS) if options.compile else self._forward

    def __call__(self, y, sigma):
        return self._fn(y, sigma)

    def _forward(self, y, sigma):
        if self.options.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        if self.options.dtype is None:
            # The score-call boundary's rule, which cannot see the module through this wrapper:
            # a module runs in its parameters' dtype, its output comes back in y's.
            dtype = model_dtype(self._module)
            if dtype is None or dtype == y.dtype:
                return self._call(y, sigma)
            out = self._call(y.to(dtype), sigma.to(dtype))
            return out.to(y.dtype) if isinstance(out, torch.Tensor) and out.is_floating_point() else out
        # cache_enabled=False: cached weight casts made during capture would be freed when the
        # autocast region exits and then read by every replay.
        with torch.autocast(y.device.type, dtype=self.options.dtype, cache_enabled=False):
            return self._call(y, sigma)


def run_graphed(make_loop, x_adv, noise, *, score, key, strict):
    """Run the fused loop on one chunk through a cached CUDA graph (capturing it if needed).

    Args:
        make_loop: () -> a fresh `purify._FusedLoop` for this chunk's shape.
        x_adv: (b, C, H, W) chunk on a CUDA device, in the compute dtype.
        noise: (K, N, C, H, W) noise in the compute dtype.
        score: the caller's score (its identity and its parameters' storage join the key).
        key: hashable description of everything else the loop depends on (config, backend,
            score options).
        strict: raise when capture fails instead of warning and running eagerly.

    Returns:
        What `_FusedLoop.result()` returns, as fresh tensors not aliasing the cached buffers.

    Raises:
        RuntimeError: strict and the capture failed.
    """
    if CAPTURE_MODE not in CAPTURE_MODES:
        raise ValueError(f"graphs.CAPTURE_MODE must be one of {CAPTURE_MODES}, got {CAPTURE_MODE!r}")
    ident, refs = _identity(score)
    full_key = (ident, _fingerprint(module_of(score)), key, tuple(x_adv.shape), x_adv.dtype, x_adv.device,
                CAPTURE_MODE)
    entry = _RUNNERS.get(full_key)
    if entry is None:
        # Evict first: the old pool is freed before the new capture needs its memory.
        while len(_RUNNERS) >= CACHE_SIZE:
            _RUNNERS.popitem(last=False)
        entry = _RUNNERS[full_key] = (refs, _capture(make_loop, x_adv, noise, strict))
    _RUNNERS.move_to_end(full_key)
    graphed = entry[1]
    if graphed is None:
        loop = make_loop()
        loop.load(x_adv, noise)
        loop.run()
        return loop.result()
    return graphed.run(x_adv, noise)


class _GraphedLoop:
    """A `_FusedLoop` and its captured graph: `run` loads the inputs and replays."""

    def __init__(self, loop, graph, replays):
        self.loop, self.graph, self.replays = loop, graph, replays

    def run(self, x_adv, noise):
        self.loop.load(x_adv, noise)
        for _ in range(self.replays):
            self.graph.replay()
        return tuple(None if t is None else t.clone() for t in self.loop.result())


def _capture(make_loop, x_adv, noise, strict):
    """Warm up and capture a fresh loop; None when capture failed and not strict."""
    loop = make_loop()
    loop.load(x_adv, noise)
    current = torch.cuda.current_stream(loop.device)
    side = torch.cuda.Stream(loop.device)
    side.wait_stream(current)
    # Errors of the score itself (a wrong shape, a crash) surface here, eagerly, as they are.
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            loop.reset()
            loop.step()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    steps = loop.num_steps if CAPTURE_MODE == "loop" else 1
    try:
        with torch.cuda.graph(graph):
            for _ in range(steps):
                loop.step()
    except RuntimeError as err:
        # torch.cuda.graph's exit raises before it restores the caller's stream.
        torch.cuda.set_stream(current)
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if strict:
            raise RuntimeError(f"CUDA graph capture of the purification loop failed ({reason}); "
                               "pass cuda_graph='auto' to fall back to eager, or False") from err
        warnings.warn(
            f"CUDA graph capture of the purification loop failed ({reason}); running it eagerly. A score "
            "that syncs with the host (.item(), printing a tensor, a Python branch on a tensor) cannot be "
            "captured; pass cuda_graph=False to skip the attempt.",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    return _GraphedLoop(loop, graph, 1 if CAPTURE_MODE == "loop" else loop.num_steps)


def _identity(fn):
    """(hashable identity, objects to keep alive so the ids stay unique) of a callable.

    A bound method is a new object at every attribute access; its owner and function are not.
    """
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if owner is not None and func is not None:
        return (id(owner), id(func)), (owner, func)
    return (id(fn),), (fn,)


def _fingerprint(module):
    """Storage, layout and mode of a module's tensors: a graph reads parameters by address, so a
    moved or reallocated parameter (`.to()`, `.cuda()`, `.half()`) must mean a new capture.
    Host metadata only; no sync."""
    if module is None:
        return ()
    tensors = tuple((t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())
                    for t in chain(module.parameters(), module.buffers()))
    return tensors + tuple(m.training for m in module.modules())


def _is_channels_last(module):
    return all(t.dim() != 4 or t.is_contiguous(memory_format=torch.channels_last)
               for t in chain(module.parameters(), module.buffers()))
