"""purify(): validation, backend dispatch, and the fused PurSAMERE loop.

The fused loop ("torch" and "triton" backends, `_FusedLoop`) runs SPEC section 2 with every
buffer allocated before the first step and every per-step value (sigma, lr, Adam bias
corrections, the noise slice, the step index itself) read from device tensors, so the loop
issues no host sync and one step can be captured in a CUDA graph (`graphs.py`). The three
fused ops come from `pursamere_fast.kernels`: Triton launchers for "triton", their torch
fallbacks (same signatures, same semantics) for "torch". How the score network runs inside
(bf16 autocast, channels_last, torch.compile) is `graphs.prepare_score`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from . import checks, graphs, kernels
from .config import PurifyConfig
from .reference.purify import purify_reference
from .scores.boundary import NonFiniteScoreError, call_score

BACKENDS = ("auto", "reference", "torch", "triton")
# Score pixels (rows x H x W) per chunk on a CPU. The shipped Fashion-MNIST score network
# (forward + input-backward, 2 threads, AMD EPYC with AVX2) costs 2.5 ms per 28x28 row from 16
# to 64 rows and 3.4 ms from 128 rows on: past ~50k pixels a layer's activations no longer fit
# the cache. Purifying 64 shipped images (N = 2) in chunks of 64 rows instead of 128 took
# 41 ms/img instead of 54 (bench/bench_score_options.py).
CPU_CHUNK_PIXELS = 64 * 28 * 28


def make_noise(config: PurifyConfig, image_shape, device=None, dtype=None) -> torch.Tensor:
    """The fixed Monte Carlo noise of `config`: (K, N, C, H, W), drawn on the CPU from `config.seed`.

    Drawing on the CPU makes the noise, and so the purifier, identical on every device.

    Args:
        config: the purification config (K, N and seed come from it).
        image_shape: (C, H, W).
        device, dtype: where to move the noise afterwards (default: CPU, float32).

    Raises:
        ValueError: if image_shape is not three positive integers.
    """
    if not isinstance(config, PurifyConfig):
        raise ValueError(f"config must be a PurifyConfig, got {type(config).__name__}")
    image_shape = checks.image_shape("image_shape", image_shape)
    gen = torch.Generator("cpu").manual_seed(config.seed)
    noise = torch.randn((config.num_steps, config.n_samples, *image_shape), generator=gen, dtype=torch.float32)
    return noise.to(device=device if device is not None else "cpu", dtype=dtype or torch.float32)


def purify(x_adv, score, config=None, *, noise=None, backend="auto", return_ere=False, cuda_graph="auto",
           score_dtype=None, channels_last="auto", compile_score=False, chunk_rows="auto", **overrides):
    """Purify a batch with PurSAMERE (SPEC section 2).

    Args:
        x_adv: (B, C, H, W) floating images in [0, 1]. Never modified.
        score: callable score(y, sigma) -> (M, C, H, W), y (M, C, H, W), sigma (M,).
        config: PurifyConfig (default PurifyConfig()); `**overrides` replace its fields.
        noise: optional explicit (K, N, C, H, W) noise; default `make_noise(config, ...)`.
        backend: "auto" (triton on CUDA when available, else torch), "reference", "torch",
            "triton" (CUDA, or the CPU under TRITON_INTERPRET=1).
        return_ere: also return the (B, K) ERE trace, e_sigma_k at x before step k.
        cuda_graph: run the fused loop ("torch", "triton") as a CUDA graph, captured on the
            first call and replayed by later calls with the same score, config, batch shape,
            dtype and options (`pursamere_fast.graphs`). "auto": on CUDA, for nn.Module scores
            (or their bound methods), falling back to eager with a warning when capture fails
            (a score that syncs with the host). True: always capture, raise when it fails.
            False: eager.
        score_dtype: None (the score runs in the input's precision) or torch.bfloat16: the
            score network runs under bf16 autocast; the ERE, the gradients the loop reduces,
            Adam's state and the iterate stay float32. Needs a float32/16 input, not float64.
        channels_last: feed the score channels_last inputs and, for an nn.Module score,
            convert its 4-D parameters and buffers to channels_last in place (values
            unchanged; the usual recipe for tensor-core convolutions). "auto" (default): on a
            CPU for a score module with convolutions, else off (`score_plan`).
        compile_score: run the score through torch.compile (compiled once per score and
            options; the first call pays the compilation). An nn.Module score is called with
            detached parameters so the compiled backward computes the input gradient only.
            Off by default: on a 2-core AVX2 CPU it saved 4% on the shipped model after a
            14-44 s first call.
        chunk_rows: at most this many score rows (images x n_samples) per chunk, besides
            `config.max_batch`; "auto" (default): on a CPU, CPU_CHUNK_PIXELS / (H x W) rows
            (64 at 28x28), on CUDA no bound; None: no bound. Results do not depend on it
            beyond the score network's rounding.

    Returns:
        x_pur with the shape, dtype and device of x_adv (and the ERE trace if asked; float32,
        or float64 for float64 inputs).

    Raises:
        ValueError: bad input, config, noise, backend or option; a score that is not callable,
            returns the wrong shape, dtype or device, or returns a tensor that does not depend
            on its input through autograd.
        NonFiniteScoreError: the score's output or its input-gradient was NaN/Inf; the message
            names the first such step and its sigma.
        RuntimeError: cuda_graph=True and the loop could not be captured.

    Warns:
        RuntimeWarning: the score module is in training mode with BatchNorm or Dropout.
    """
    config = resolve_config(config, overrides)
    checks.images("x_adv", x_adv)
    check_score(score)
    checks.flag("return_ere", return_ere)
    backend = _resolve_backend(backend, x_adv.device)
    use_graph = _resolve_cuda_graph(cuda_graph, backend, x_adv.device, score)
    check_score_options(score_dtype, compile_score, x_adv.dtype)
    plan = score_plan(score, x_adv.shape[1:], x_adv.device, channels_last=channels_last, chunk_rows=chunk_rows)
    compute = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    shape = (config.num_steps, config.n_samples, *x_adv.shape[1:])
    if noise is None:
        noise = make_noise(config, x_adv.shape[1:], device=x_adv.device, dtype=x_adv.dtype)
    else:
        checks.tensor("noise", noise, shape)
        noise = noise.to(device=x_adv.device, dtype=x_adv.dtype)
    options = graphs.ScoreOptions(score_dtype, plan["channels_last"], compile_score)
    score_fn = graphs.prepare_score(score, options)
    # Autograd is needed inside even when the caller runs under no_grad or inference_mode.
    with torch.inference_mode(False), torch.enable_grad():
        noise = noise.to(compute).clone()
        outs, traces = [], []
        for chunk in x_adv.split(chunk_images(config, plan["chunk_rows"])):
            chunk = chunk.detach().to(compute).clone()
            if backend == "reference":
                x, trace = purify_reference(chunk, CheckedScore(score_fn, config), config, noise)
                trace_sam, grad_sum = None, None
            elif use_graph:
                def make_loop(chunk=chunk):
                    return _FusedLoop(score_fn, config, chunk.shape, chunk.dtype, chunk.device, backend)

                x, trace, trace_sam, grad_sum = graphs.run_graphed(
                    make_loop, chunk, noise, score=score, key=graph_key(config, backend, options),
                    strict=cuda_graph is True)
            else:
                loop = _FusedLoop(score_fn, config, chunk.shape, chunk.dtype, chunk.device, backend)
                loop.load(chunk, noise)
                loop.run()
                x, trace, trace_sam, grad_sum = loop.result()
            check_finite(config, x, trace, trace_sam, grad_sum)
            outs.append(x)
            traces.append(trace)
        x_pur = torch.cat(outs).to(x_adv.dtype)
    if return_ere:
        return x_pur, torch.cat(traces)
    return x_pur


class _FusedLoop:
    """The fused loop's buffers and one step of it, with the step index on the device.

    Every buffer is allocated in the constructor. Each step reads its index k from a device
    tensor (`idx` = [k, k+1]), gathers sigma_k, lr_k, the Adam bias corrections, sigma_k+1
    and the noise slices k, k+1 from device tables into fixed buffers, and advances the
    index, so one code path serves three executions: `run()` K times eagerly, one step
    captured in a CUDA graph and replayed K times, or K steps captured in one graph
    (`pursamere_fast.graphs`). The noise table has a zero slice K so that the last step's
    write of the "next" perturbed batch needs no branch (it is never read).
    """

    def __init__(self, score, config, shape, dtype, device, backend):
        if backend == "triton":
            self._ops = kernels.ere_residual, kernels.mc_reduce_sam, kernels.adam_project
        else:
            self._ops = kernels.ere_residual_torch, kernels.mc_reduce_sam_torch, kernels.adam_project_torch
        self.score, self.config = score, config
        b, img = shape[0], tuple(shape[1:])
        n, d, k_total = config.n_samples, math.prod(img), config.num_steps
        self.b, self.n, self.d, self.img, self.num_steps = b, n, d, img, k_total
        self.device, self.dtype = torch.device(device), dtype
        b1, b2 = config.betas
        sam = config.sam_radius > 0
        sigmas, lrs = config.step_sigmas(), config.step_lrs()
        # Columns: sigma_k, lr_k, 1 - b1^(k+1), 1 - b2^(k+1), sigma_(k+1) (0 after the last step).
        rows = [(sigmas[k], lrs[k], 1 - b1 ** (k + 1), 1 - b2 ** (k + 1), nxt)
                for k, nxt in zip(range(k_total), sigmas[1:] + [0.0])]
        empty = dict(dtype=dtype, device=self.device)
        self.sched = torch.tensor(rows, **empty)
        self.eps_all = torch.zeros(k_total + 1, n, d, **empty)
        self.idx = torch.zeros(2, dtype=torch.int64, device=self.device)
        self._idx0 = torch.arange(2, device=self.device)
        self.cur = torch.empty(1, 5, **empty)
        self.eps_pair = torch.empty(2, n, d, **empty)
        self.sigma, self.lr, self.bc1, self.bc2, self.sigma_next = self.cur[0].unbind()
        self.sigma_rows = self.sigma.expand(b * n)
        self.eps, self.eps_next = self.eps_pair.unbind()
        self.xa = torch.empty(b, d, **empty)
        self.x, self.m, self.v, self.g = (torch.empty_like(self.xa) for _ in range(4))
        self.y = torch.empty(b, n, d, **empty)
        self.y_sam = torch.empty_like(self.y) if sam else None
        self.dlds = torch.empty(b * n, d, **empty)
        self.sqnorm = torch.empty(b * n, **empty)
        self.ere_row = torch.empty(1, b, **empty)
        self.trace = torch.empty(k_total, b, **empty)
        self.trace_sam = torch.empty(k_total, b, **empty) if sam else None
        # Per-step sum of each image's update gradient: NaN/Inf there means the score's
        # input-gradient was not finite although its output was (the trace cannot see that).
        self.grad_row = torch.empty(1, b, **empty)
        self.grad_sum = torch.empty(k_total, b, **empty)

    def load(self, x_adv, noise):
        """Copy a (b, C, H, W) batch and (K, N, C, H, W) noise in and reset the state to step 0."""
        self.xa.copy_(x_adv.reshape(self.b, self.d))
        self.eps_all[: self.num_steps].copy_(noise.reshape(self.num_steps, self.n, self.d))
        self.reset()

    def reset(self):
        """x = x_adv, m = v = 0, k = 0, and the first perturbed batch; no host sync."""
        self.x.copy_(self.xa)
        self.m.zero_()
        self.v.zero_()
        self.idx.copy_(self._idx0)
        torch.addcmul(self.x.unsqueeze(1), self.sched[0, 0], self.eps_all[0].unsqueeze(0), out=self.y)

    def step(self):
        """One step of SPEC section 2 at the device-side index k, then k += 1."""
        ere_residual, mc_reduce_sam, adam_project = self._ops
        cfg = self.config
        torch.index_select(self.sched, 0, self.idx[:1], out=self.cur)
        torch.index_select(self.eps_all, 0, self.idx, out=self.eps_pair)
        gy = self._score_vjp(self.y, self.trace)
        if self.y_sam is not None:
            mc_reduce_sam(gy, self.x, self.eps, self.sigma, cfg.sam_radius, cfg.norm, self.g, self.y_sam)
            gy = self._score_vjp(self.y_sam, self.trace_sam)
        mc_reduce_sam(gy, self.x, self.eps, self.sigma, 0.0, cfg.norm, self.g)
        torch.sum(self.g, 1, out=self.grad_row[0])
        self.grad_sum.index_copy_(0, self.idx[:1], self.grad_row)
        adam_project(self.x, self.xa, self.m, self.v, self.g, self.lr, self.bc1, self.bc2,
                     beta1=cfg.betas[0], beta2=cfg.betas[1], adam_eps=cfg.adam_eps, rho=cfg.rho, norm=cfg.norm,
                     y_next=self.y, eps_next=self.eps_next, sigma_next=self.sigma_next)
        self.idx.add_(1)

    def run(self):
        """All K steps, eagerly."""
        for _ in range(self.num_steps):
            self.step()

    def result(self):
        """(x, trace, trace_sam, grad_sum): views of the buffers, (b, C, H, W), (b, K), (b, K) or
        None, (b, K)."""
        trace_sam = None if self.trace_sam is None else self.trace_sam.t()
        return self.x.view(self.b, *self.img), self.trace.t(), trace_sam, self.grad_sum.t()

    def _score_vjp(self, y, trace):
        # dL/dy for L = sum_b e_b; the ERE itself goes to row k of `trace` as a by-product.
        b, n, d = self.b, self.n, self.d
        yl = y.view(b * n, *self.img).detach().requires_grad_(True)
        with checks.model_errors("score", yl, images="x_adv"):  # channels, device, dtype: a named ValueError
            s = call_score(self.score, yl, self.sigma_rows)
        ere_residual, _, _ = self._ops
        ere_residual(s.detach().reshape(b * n, d), self.eps, self.sigma, n, self.dlds, self.sqnorm)
        torch.mean(self.sqnorm.view(b, n), dim=1, out=self.ere_row[0])
        trace.index_copy_(0, self.idx[:1], self.ere_row)
        (gy,) = torch.autograd.grad(s, yl, grad_outputs=self.dlds.view_as(s), allow_unused=True)
        if gy is None:  # known when the graph is built: no sync
            raise _unused_input_error()
        # reshape, not view: a channels_last score hands back a channels_last gradient.
        return gy.reshape(b, n, d)


def resolve_config(config, overrides) -> PurifyConfig:
    """`config` (default PurifyConfig()) with `overrides` applied; ValueError for anything else."""
    if config is None:
        config = PurifyConfig()
    if not isinstance(config, PurifyConfig):
        raise ValueError(f"config must be a PurifyConfig or None, got {type(config).__name__}")
    return config.with_overrides(**overrides)


def check_score(score) -> None:
    """A callable score; warn when its module would make the purifier batch-dependent or random.

    BatchNorm in training mode normalises with the statistics of the whole B*N batch (and
    updates its running statistics), so an image's result depends on its batch-mates;
    Dropout in training mode draws a fresh mask on every call.
    """
    checks.function("score", score)
    module = graphs.module_of(score)
    if module is None:
        return
    culprits = sorted({type(m).__name__ for m in module.modules() if m.training and (
        isinstance(m, nn.modules.batchnorm._BatchNorm) or (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0))})
    if culprits:
        warnings.warn(f"score is in training mode with {', '.join(culprits)}: results then depend on the batch "
                      "and on randomness, and running statistics change; call score.eval() before purifying",
                      RuntimeWarning, stacklevel=3)


class CheckedScore:
    """The score as the reference and exact loops call it, checked at every call.

    Those loops keep no per-step record of the gradient, so a NaN/Inf is caught where it first
    enters: in the score's output, or in its input (x_adv and the noise are checked finite, so
    only a NaN/Inf update gets there). They call the score once per ERE evaluation, one per
    step, two with SAM, so the call count gives the step. One host sync per call, on paths
    that are slow anyway. Make one per chunk: the count starts at step 0.
    """

    def __init__(self, score, config: PurifyConfig):
        self.score, self.config, self.calls = score, config, 0
        self.per_step = config.ere_evaluations_per_step

    def __call__(self, y, sigma):
        k, first = divmod(self.calls, self.per_step)
        self.calls += 1
        if not bool(torch.isfinite(y.detach()).all()):
            raise _grad_error(self.config, k - 1 if first == 0 else k)
        # The exact loop differentiates this call twice (attention then runs on the math kernel).
        with checks.model_errors("score", y, images="x_adv"):  # channels, device, dtype: a named ValueError
            s = call_score(self.score, y, sigma, double_backward=y.requires_grad and torch.is_grad_enabled())
        if not bool(torch.isfinite(s.detach()).all()):
            raise _output_error(self.config, k)
        if self.calls == 1 and y.requires_grad and torch.is_grad_enabled():
            # An output that needs a gradient through parameters only would surface later as
            # torch's "appears to not have been used in the graph"; one extra backward, once.
            (g,) = torch.autograd.grad(s, y, torch.ones_like(s), retain_graph=True, allow_unused=True)
            if g is None:
                raise _unused_input_error()
        return s


def _unused_input_error():
    return ValueError("score returned a tensor that does not depend on its input y through autograd (it depends on "
                      "parameters only, or is constant): purification needs the score's gradient with respect to y")


def _output_error(config, k):
    return NonFiniteScoreError(f"score produced NaN/Inf at step {k} (sigma={config.step_sigmas()[k]:.6g}); "
                               "check the score model at this noise level")


def _grad_error(config, k):
    return NonFiniteScoreError(f"the gradient through the score (its input-gradient) was NaN/Inf at step {k} "
                               f"(sigma={config.step_sigmas()[k]:.6g}) although its output was finite; "
                               "check the score model's backward at this noise level")


def graph_key(config: PurifyConfig, backend: str, options) -> tuple:
    """What a captured loop depends on besides the score and the batch shape. Not the seed: the
    noise is loaded into the graph as data, so EoT draws with fresh seeds replay one capture;
    not max_batch: the chunk's shape is keyed on its own."""
    return dataclasses.replace(config, seed=0, max_batch=1), backend, options


def check_finite(config: PurifyConfig, x, trace, trace_sam=None, grad_sum=None) -> None:
    """Raise NonFiniteScoreError naming the first step whose score output or input-gradient was
    NaN/Inf, or saying that the purified images are not finite. One host sync per chunk."""
    def first_bad(*traces):
        bad = torch.zeros(trace.shape[1], dtype=torch.bool, device=trace.device)
        for t in traces:
            if t is not None:
                bad |= ~torch.isfinite(t).all(0)
        return int(bad.nonzero()[0]) if bool(bad.any()) else None

    k_out, k_grad = first_bad(trace, trace_sam), first_bad(grad_sum)
    if k_out is not None and (k_grad is None or k_out <= k_grad):
        raise _output_error(config, k_out)
    if k_grad is not None:
        raise _grad_error(config, k_grad)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteScoreError("purified images contain NaN/Inf although every score output was finite: the "
                                  "gradient through the score (its input-gradient) was not finite")


def _resolve_cuda_graph(cuda_graph, backend, device, score):
    """Whether this call runs the fused loop as a CUDA graph (see `purify`)."""
    if not (cuda_graph is True or cuda_graph is False or (isinstance(cuda_graph, str) and cuda_graph == "auto")):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    if cuda_graph is True:
        if backend == "reference":
            raise ValueError("cuda_graph=True needs a fused backend ('torch' or 'triton'), got backend='reference'")
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got x_adv on {device}")
        return True
    if cuda_graph is False:
        return False
    # A plain function may close over tensors or Python state that the graph would freeze
    # unseen; a module's parameters and buffers are fingerprinted (graphs.run_graphed).
    return backend != "reference" and device.type == "cuda" and graphs.module_of(score) is not None


def score_plan(score, image_shape, device, *, channels_last="auto", chunk_rows="auto") -> dict:
    """How `purify` runs `score` on `device` for images of `image_shape` (C, H, W): a rule on
    facts of the machine and the score, never a timing race, so two runs compute the same
    function. The evaluation manifest records it.

    Returns:
        {"channels_last": bool, "chunk_rows": int or None, "cpu_capability": str or None}.

    Raises:
        ValueError: channels_last not True, False or "auto"; chunk_rows not "auto", None or
            an integer >= 1.
    """
    if channels_last != "auto":
        checks.flag("channels_last", channels_last)
    if chunk_rows is not None and chunk_rows != "auto":
        checks.integer("chunk_rows", chunk_rows, 1)
    device = torch.device(device)
    cpu = device.type == "cpu"
    capability = torch.backends.cpu.get_cpu_capability() if cpu else None
    if channels_last == "auto":
        # On a CPU, channels_last convolutions beat contiguous ones on the shipped model: 54 vs
        # 69 ms/img on a 2-core AVX2 EPYC (64-row chunks, timed in alternation, separate copies
        # of the model); issue 11 reported 26 vs 37 ms/img on an AVX-512 one.
        module = graphs.module_of(score)
        channels_last = cpu and module is not None and any(isinstance(m, nn.Conv2d) for m in module.modules())
    if chunk_rows == "auto":
        chunk_rows = max(1, CPU_CHUNK_PIXELS // math.prod(image_shape[1:])) if cpu else None
    return {"channels_last": channels_last, "chunk_rows": chunk_rows, "cpu_capability": capability}


def chunk_images(config: PurifyConfig, chunk_rows) -> int:
    """Images per chunk: config.max_batch, and at most chunk_rows // n_samples (at least one)."""
    if chunk_rows is None:
        return config.max_batch
    return max(1, min(config.max_batch, chunk_rows // config.n_samples))


def check_score_options(score_dtype, compile_score, input_dtype):
    """ValueError for a score option this input cannot take (shared with `exact.purify_unrolled`)."""
    if score_dtype is not None and score_dtype != torch.bfloat16:
        raise ValueError(f"score_dtype must be None or torch.bfloat16, got {score_dtype!r}")
    if score_dtype is not None and input_dtype == torch.float64:
        raise ValueError("score_dtype=torch.bfloat16 needs a float32 (or lower precision) x_adv: the float64 path "
                         "exists to match the reference exactly; got x_adv of dtype torch.float64")
    checks.flag("compile_score", compile_score)


def _resolve_backend(backend, device):
    checks.choice("backend", backend, BACKENDS)
    if backend == "auto":
        return "triton" if device.type == "cuda" and kernels.use_triton(device) else "torch"
    if backend == "triton" and not kernels.use_triton(device):
        raise ValueError(
            f"backend='triton' needs triton and a CUDA device (or TRITON_INTERPRET=1 on the CPU); "
            f"got device {device}, triton available: {kernels.triton_available()}"
        )
    return backend
