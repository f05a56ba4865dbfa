"""CUDA graphs of the fused loop, and the fast path on a GPU.

Two parts:
- CPU (run everywhere): the properties graph replay relies on. A reloaded `_FusedLoop` is
  indistinguishable from a fresh one, and `graphs.run_graphed`'s bookkeeping (capture once,
  replay, cache, evict, recapture on moved weights, warn-and-fall-back, strict raise) checked
  with a stand-in CUDA graph that records the captured steps and re-executes them on replay.
- CUDA (skipped without one): real captures. Replay equals eager bit for bit, two replays are
  bit-identical, the float64 graph equals the reference to 1e-9, the loop at CIFAR-10 size
  with the Triton kernels matches the reference, a syncing score falls back, bf16 NCSNv2 at
  ngf 128 stays within the tolerances stated in tests/test_score_options.py, channels_last
  and torch.compile (Inductor) match eager.
"""

import contextlib
import importlib
import warnings

import pytest
import torch
from pursamere_fast.kernels import use_triton
from pursamere_fast.reference import purify_reference
from test_score_options import BF16_MEAN_DX_RHO, BF16_TRACE_RTOL, CL_ATOL, CL_TRACE_RTOL

import pursamere_fast.graphs as graphs
from pursamere_fast import PurifyConfig, make_noise, purify
from pursamere_fast.nets import ConvScoreNet
from pursamere_fast.scores.ncsnv2 import NCSNv2, NCSNv2Score

purify_module = importlib.import_module("pursamere_fast.purify")

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (CUDA graphs, cuDNN, Inductor on GPU)")

CONFIGS = {
    "linf_sam": dict(norm="linf", sam_radius=0.02),
    "l2_sam": dict(norm="l2", rho=0.3, sam_radius=0.1),
    "linf_nosam": dict(norm="linf", sam_radius=0.0),
}


def config(**kw):
    base = dict(sigmas=(0.2, 0.1, 0.05), steps_per_sigma=2, n_samples=3, rho=0.05, lr_max=0.02, lr_min=0.005,
                sam_radius=0.02)
    base.update(kw)
    return PurifyConfig(**base)


def images(shape=(3, 2, 5, 7), seed=1, device="cpu", dtype=torch.float32):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def conv_score(channels=2, device="cpu", dtype=torch.float32):
    torch.manual_seed(0)
    return ConvScoreNet(channels, width=8, depth=3).to(device, dtype)


def gaussian_score(y, sigma):
    # Exact score of N(0.5, 0.04) data: smooth, no network, so the loop's own kernels are tested.
    return -(y - 0.5) / (0.04 + sigma.view(-1, 1, 1, 1) ** 2)


@pytest.fixture(autouse=True)
def _fresh_caches():
    graphs.clear_graph_cache()
    yield
    graphs.clear_graph_cache()


def eager_loop(score, cfg, x, noise, backend="torch"):
    loop = purify_module._FusedLoop(score, cfg, x.shape, x.dtype, x.device, backend)
    loop.load(x, noise)
    loop.run()
    return loop.result()


def assert_same(a, b, what):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None, what
            continue
        diff = (u != v).nonzero()
        assert diff.numel() == 0, f"{what}: {diff.shape[0]} elements differ, first at {diff[:8].tolist()}"


# --- CPU: what graph replay relies on -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reloaded_loop_equals_fresh_loop(name):
    # A cached graph reuses one loop's buffers for every call; load() must reset all state.
    cfg, score = config(**CONFIGS[name]), conv_score()
    xa, xb = images(seed=1), images(seed=2)
    na, nb = torch.randn(2, cfg.num_steps, 3, 2, 5, 7).unbind()
    loop = purify_module._FusedLoop(score, cfg, xa.shape, xa.dtype, xa.device, "torch")
    loop.load(xa, na)
    loop.run()
    loop.load(xb, nb)
    loop.run()
    assert_same(loop.result(), eager_loop(score, cfg, xb, nb), "reloaded vs fresh")
    assert torch.equal(loop.result()[0], purify(xb, score, cfg, noise=nb, backend="torch", cuda_graph=False,
                                                channels_last=False))


def test_single_step_loop_uses_the_padded_noise_row():
    cfg, score, x = config(sigmas=(0.1,), steps_per_sigma=1), conv_score(), images()
    noise = make_noise(cfg, x.shape[1:])
    out, _ = purify_reference(x, score, cfg, noise)
    # float32 fused vs plain loop, one step: measured 3e-8 (AVX2, SSE4.1, scalar kernels).
    torch.testing.assert_close(eager_loop(score, cfg, x, noise)[0], out, rtol=0, atol=1e-6)


class _RecordedGraph:
    """Stand-in for torch.cuda.CUDAGraph: capture records the loop steps, replay re-executes them."""

    def __init__(self):
        self.steps = []

    def replay(self):
        _FAKE["replays"] += 1
        for loop in self.steps:
            _FAKE["step"](loop)


_FAKE = {}


class _Stream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """CUDA graph API stand-ins on the CPU; `fail` makes the next captures raise like a sync would."""
    _FAKE.clear()
    _FAKE.update(captures=0, replays=0, fail=False, capturing=None, step=purify_module._FusedLoop.step)

    def step(loop):
        if _FAKE["capturing"] is not None:
            _FAKE["capturing"].append(loop)
        else:
            _FAKE["step"](loop)

    @contextlib.contextmanager
    def capture(graph):
        _FAKE["captures"] += 1
        _FAKE["capturing"] = graph.steps
        try:
            if _FAKE["fail"]:
                raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
            yield
        finally:
            _FAKE["capturing"] = None

    monkeypatch.setattr(purify_module._FusedLoop, "step", step)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: None)
    return _FAKE


def run_graphed(score, cfg, x, noise, strict=False, backend="torch"):
    def make_loop():
        return purify_module._FusedLoop(score, cfg, x.shape, x.dtype, x.device, backend)

    return graphs.run_graphed(make_loop, x, noise, score=score, key=(cfg, backend), strict=strict)


@pytest.mark.parametrize("mode", graphs.CAPTURE_MODES)
def test_run_graphed_captures_once_and_replays(fake_cuda_graphs, monkeypatch, mode):
    monkeypatch.setattr(graphs, "CAPTURE_MODE", mode)
    cfg, score = config(), conv_score()
    results = []
    for seed in (1, 2, 3):
        x, noise = images(seed=seed), torch.randn(cfg.num_steps, 3, 2, 5, 7)
        out = run_graphed(score, cfg, x, noise)
        assert_same(out, eager_loop(score, cfg, x, noise), f"{mode} replay vs eager, call {seed}")
        results.append(out)
    assert fake_cuda_graphs["captures"] == 1
    assert fake_cuda_graphs["replays"] == 3 * (cfg.num_steps if mode == "step" else 1)
    # Outputs are copies: the next call's replay must not overwrite an earlier result.
    assert not torch.equal(results[0][0], results[2][0])


def test_run_graphed_cache_evicts_and_recaptures_moved_weights(fake_cuda_graphs):
    cfg, score = config(), conv_score()
    noise = torch.randn(cfg.num_steps, 3, 2, 5, 7)
    for batch in (1, 2, 3):
        run_graphed(score, cfg, images((batch, 2, 5, 7)), noise)
    assert len(graphs._RUNNERS) == graphs.CACHE_SIZE and fake_cuda_graphs["captures"] == 3
    run_graphed(score, cfg, images((3, 2, 5, 7)), noise)
    assert fake_cuda_graphs["captures"] == 3
    score.to(torch.float64).to(torch.float32)  # same values, new storage: the old graph would read freed memory
    x = images((3, 2, 5, 7))
    assert_same(run_graphed(score, cfg, x, noise), eager_loop(score, cfg, x, noise), "after moving weights")
    assert fake_cuda_graphs["captures"] == 4


def test_run_graphed_bound_method_reuses_its_capture(fake_cuda_graphs):
    model = NCSNv2(image_size=8, channels=2, ngf=4)
    cfg, x = config(n_samples=2, steps_per_sigma=1), images((2, 2, 8, 8))
    noise = torch.randn(cfg.num_steps, 2, 2, 8, 8)
    run_graphed(model.score, cfg, x, noise)
    run_graphed(model.score, cfg, x, noise)
    assert fake_cuda_graphs["captures"] == 1


def test_failed_capture_warns_once_and_runs_eagerly(fake_cuda_graphs):
    fake_cuda_graphs["fail"] = True
    cfg, score, x = config(), conv_score(), images()
    noise = torch.randn(cfg.num_steps, 3, 2, 5, 7)
    with pytest.warns(RuntimeWarning, match="capture of the purification loop failed"):
        first = run_graphed(score, cfg, x, noise)
    assert_same(first, eager_loop(score, cfg, x, noise), "fallback vs eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(run_graphed(score, cfg, x, noise), first, "second fallback call")
    assert fake_cuda_graphs["captures"] == 1


def test_failed_capture_raises_when_strict(fake_cuda_graphs):
    fake_cuda_graphs["fail"] = True
    cfg = config()
    with pytest.raises(RuntimeError, match="capture of the purification loop failed"):
        run_graphed(conv_score(), cfg, images(), torch.randn(cfg.num_steps, 3, 2, 5, 7), strict=True)
    assert not graphs._RUNNERS


def test_score_errors_surface_during_warmup(fake_cuda_graphs):
    cfg = config()
    with pytest.raises(ValueError, match="score returned shape"):
        run_graphed(lambda y, sigma: y[:, :1], cfg, images(), torch.randn(cfg.num_steps, 3, 2, 5, 7))
    assert fake_cuda_graphs["captures"] == 0 and not graphs._RUNNERS


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.fixture
def deterministic_cudnn():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def fused_backends():
    return ["torch", "triton"] if CUDA and use_triton("cuda") else ["torch"]


@requires_cuda
@pytest.mark.parametrize("mode", graphs.CAPTURE_MODES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_graph_replay_equals_eager_bitwise(deterministic_cudnn, monkeypatch, mode, backend, name):
    if backend not in fused_backends():
        pytest.skip("triton is not importable here")
    monkeypatch.setattr(graphs, "CAPTURE_MODE", mode)
    cfg, score, x = config(**CONFIGS[name]), conv_score(device="cuda"), images(device="cuda")
    eager, eager_ere = purify(x, score, cfg, backend=backend, cuda_graph=False, return_ere=True)
    first, first_ere = purify(x, score, cfg, backend=backend, cuda_graph=True, return_ere=True)
    runner = next(iter(graphs._RUNNERS.values()))[1]
    second, second_ere = purify(x, score, cfg, backend=backend, cuda_graph=True, return_ere=True)
    assert next(iter(graphs._RUNNERS.values()))[1] is runner, "the second call captured again"
    assert_same((first, first_ere), (eager, eager_ere), "graph vs eager")
    assert_same((second, second_ere), (first, first_ere), "two replays")


@requires_cuda
def test_cached_graph_takes_new_inputs_and_weight_updates(deterministic_cudnn):
    cfg, score = config(), conv_score(device="cuda")
    purify(images(device="cuda"), score, cfg, cuda_graph=True)
    x2, noise2 = images(seed=5, device="cuda"), torch.randn(cfg.num_steps, 3, 2, 5, 7, device="cuda")
    assert_same((purify(x2, score, cfg, noise=noise2, cuda_graph=True),),
                (purify(x2, score, cfg, noise=noise2, cuda_graph=False),), "new x and noise")
    with torch.no_grad():
        score.body[0].weight.mul_(1.5)  # in place: the graph reads it at replay
    assert_same((purify(x2, score, cfg, cuda_graph=True),), (purify(x2, score, cfg, cuda_graph=False),),
                "after an in-place weight update")
    assert len(graphs._RUNNERS) == 1


def test_graph_key_leaves_out_seed_and_max_batch():
    # The noise is loaded into the captured buffers as data: EoT draws (a fresh seed per call)
    # must replay one capture, not recapture and evict.
    key = purify_module.graph_key
    cfg = config()
    assert key(cfg.with_overrides(seed=7, max_batch=2), "torch", None) == key(cfg, "torch", None)
    assert key(cfg.with_overrides(rho=0.04), "torch", None) != key(cfg, "torch", None)
    assert key(cfg, "triton", None) != key(cfg, "torch", None)


@requires_cuda
def test_fresh_seeds_replay_one_capture(deterministic_cudnn):
    cfg, score, x = config(), conv_score(device="cuda"), images(device="cuda")
    for seed in (1, 2, 3):
        assert_same((purify(x, score, cfg, seed=seed, cuda_graph=True),),
                    (purify(x, score, cfg, seed=seed, cuda_graph=False),), f"seed {seed}")
    assert len(graphs._RUNNERS) == 1


@requires_cuda
def test_auto_captures_modules_only(deterministic_cudnn):
    cfg, x = config(), images(device="cuda")
    purify(x, conv_score(device="cuda"), cfg)
    assert len(graphs._RUNNERS) == 1
    graphs.clear_graph_cache()
    purify(x, gaussian_score, cfg)
    assert not graphs._RUNNERS


@requires_cuda
@pytest.mark.parametrize("mode", graphs.CAPTURE_MODES)
def test_float64_graph_equals_reference(monkeypatch, mode):
    monkeypatch.setattr(graphs, "CAPTURE_MODE", mode)
    cfg = config()
    x = images(dtype=torch.float64)
    ref, ref_ere = purify_reference(x, conv_score(dtype=torch.float64), cfg, make_noise(cfg, x.shape[1:],
                                                                                         dtype=torch.float64))
    out, ere = purify(x.cuda(), conv_score(device="cuda", dtype=torch.float64), cfg, backend="torch",
                      cuda_graph=True, return_ere=True)
    assert (out.cpu() - ref).abs().max().item() <= 1e-9
    assert (ere.cpu() - ref_ere).abs().max().item() <= 1e-9 * ref_ere.abs().max().item()


@requires_cuda
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_triton_loop_at_cifar10_size_matches_reference(name, cuda_graph):
    if "triton" not in fused_backends():
        pytest.skip("triton is not importable here")
    # B=64, N=8, 3x32x32: the benchmark's shapes, every kernel at full size with its tails.
    cfg = config(n_samples=8, **CONFIGS[name])
    x64 = images((64, 3, 32, 32), dtype=torch.float64)
    ref64, _ = purify_reference(x64, gaussian_score, cfg, make_noise(cfg, x64.shape[1:], dtype=torch.float64))
    ref32, _ = purify_reference(x64.float(), gaussian_score, cfg, make_noise(cfg, x64.shape[1:]))
    out32 = purify(x64.float().cuda(), gaussian_score, cfg, backend="triton", cuda_graph=cuda_graph).cpu()
    out64 = purify(x64.cuda(), gaussian_score, cfg, backend="triton", cuda_graph=cuda_graph).cpu()
    ref_err = (ref32.double() - ref64).abs().max().item()
    err = (out32.double() - ref64).abs().max().item()
    assert err <= 2 * ref_err + 1e-5, f"float32: err {err:.3g} vs float32 reference err {ref_err:.3g}"
    assert (out64 - ref64).abs().max().item() <= 1e-9


class _SyncingScore(torch.nn.Module):
    """A score that reads a value back to the host every call: runs eagerly, cannot be captured."""

    def __init__(self):
        super().__init__()
        self.net = conv_score()

    def forward(self, y, sigma):
        scale = 1.0 + 0.0 * float(sigma[0])
        return self.net(y, sigma) * scale


@requires_cuda
def test_syncing_score_falls_back_with_a_warning(deterministic_cudnn):
    cfg, x = config(), images(device="cuda")
    score = _SyncingScore().cuda()
    eager = purify(x, score, cfg, cuda_graph=False)
    with pytest.warns(RuntimeWarning, match="capture of the purification loop failed"):
        auto = purify(x, score, cfg, cuda_graph="auto")
    assert torch.equal(auto, eager)
    graphs.clear_graph_cache()
    with pytest.raises(RuntimeError, match="capture of the purification loop failed"):
        purify(x, score, cfg, cuda_graph=True)
    # The device is still usable, and a capturable score still captures.
    good = conv_score(device="cuda")
    assert torch.equal(purify(x, good, cfg, cuda_graph=True), purify(x, good, cfg, cuda_graph=False))


@pytest.fixture
def full_fp32():
    # cuDNN runs fp32 convolutions in TF32 by default; the tolerance is stated against true fp32.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@requires_cuda
def test_bf16_ncsnv2_ngf128_within_stated_tolerance(full_fp32):
    torch.manual_seed(0)
    score = NCSNv2Score(NCSNv2(32, 3, 128)).cuda()
    cfg = config(n_samples=8, sigmas=(0.2, 0.05), steps_per_sigma=2)
    x = images((2, 3, 32, 32), device="cuda")
    ref, ref_ere = purify(x, score, cfg, return_ere=True)
    out, ere = purify(x, score, cfg, return_ere=True, score_dtype=torch.bfloat16)
    assert not torch.equal(ere, ref_ere)
    trace_err = ((ere - ref_ere).abs() / ref_ere.abs()).max().item()
    assert trace_err <= BF16_TRACE_RTOL, f"ERE trace off by {trace_err:.3g} relative"
    mean_dx = (out - ref).abs().mean().item()
    assert mean_dx <= BF16_MEAN_DX_RHO * cfg.rho, f"mean |dx| {mean_dx:.3g} vs rho {cfg.rho:.3g}"


@requires_cuda
def test_channels_last_cuda_matches_contiguous(full_fp32):
    cfg, x = config(), images((3, 3, 8, 8), device="cuda")

    def make():
        torch.manual_seed(0)
        return NCSNv2Score(NCSNv2(8, 3, 16)).cuda()

    ref, ref_ere = purify(x, make(), cfg, return_ere=True)
    out, ere = purify(x, make(), cfg, return_ere=True, channels_last=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=CL_ATOL)
    torch.testing.assert_close(ere, ref_ere, rtol=CL_TRACE_RTOL, atol=0)


@requires_cuda
def test_compiled_score_with_graphs_matches_eager(full_fp32):
    cfg, x = config(), images((3, 3, 8, 8), device="cuda")
    score = conv_score(channels=3, device="cuda")
    ref, ref_ere = purify(x, score, cfg, cuda_graph=False, return_ere=True)
    out, ere = purify(x, score, cfg, cuda_graph=True, compile_score=True, return_ere=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ere, ref_ere, rtol=1e-5, atol=0)
    again = purify(x, score, cfg, cuda_graph=True, compile_score=True)
    assert torch.equal(again, out)
