"""purify's score options on the CPU: bf16 autocast, channels_last, the torch.compile plumbing,
and the validation of every new argument. The same options on CUDA: tests/test_gpu.py.

Stated tolerances (tests/test_gpu.py holds CUDA to the same ones, at ngf 128), each with the
measurement behind it, taken under torch's AVX2 and scalar kernels and oneDNN at AVX2 and
SSE4.1 (tests/cpu_kernels.sh runs this file under each):
- bf16 autocast vs fp32: ERE trace within 3% relative; purified images within 25% of rho in
  mean absolute difference. Measured 0.36-0.62% and 6.5-6.9% of rho (NCSNv2 ngf 8 at 8x8,
  K = 6, N = 3, this file); 0.07% and 5% of rho at ngf 128, 32x32, K = 2, N = 4. bf16 rounds
  at 2^-9 relative and CPUs with AVX512-BF16 or AMX accumulate its products in another order,
  so the bounds keep 4-5x headroom; the first bound was 1% / 10%, 1.5x above an AVX2 run.
  Pixel maxima are not bounded: where a gradient component is below bf16's resolution Adam's
  normalised step can flip its sign, and that pixel may end on the other side of the ball
  (measured 1.0-1.4 rho).
- channels_last vs contiguous: the same arithmetic in another summation order, whose rounding
  differences the K Adam steps amplify: measured 1.2e-7..4.5e-7 on the images (each layout
  1e-7..4.4e-7 from a float64 run) and 1.3e-7 relative on the trace. Bounds 1e-5 absolute and
  1e-5 relative, 20x above that and far below a layout bug (which moves pixels by O(rho)).
- compile (aot_eager backend here; Inductor runs on CUDA in tests/test_gpu.py): 1e-6; the
  same kernels run, measured bitwise equal.
"""

import functools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pursamere_fast.graphs as graphs
from pursamere_fast import PurifyConfig, purify
from pursamere_fast.nets import ConvScoreNet
from pursamere_fast.scores.ncsnv2 import NCSNv2, NCSNv2Score

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

CONFIG = PurifyConfig(sigmas=(0.2, 0.1, 0.05), steps_per_sigma=2, n_samples=3, rho=0.05, lr_max=0.02,
                      lr_min=0.005, sam_radius=0.02)
BF16_TRACE_RTOL, BF16_MEAN_DX_RHO = 3e-2, 0.25
CL_ATOL, CL_TRACE_RTOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def _fresh_caches():
    graphs.clear_graph_cache()
    yield
    graphs.clear_graph_cache()


def images(shape=(3, 3, 8, 8), seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def ncsnv2():
    torch.manual_seed(0)
    return NCSNv2Score(NCSNv2(image_size=8, channels=3, ngf=8))


def conv_score():
    torch.manual_seed(0)
    return ConvScoreNet(3, width=8, depth=3)


def test_bf16_within_stated_tolerance_of_fp32():
    x = images()
    ref, ref_ere = purify(x, ncsnv2(), CONFIG, backend="torch", return_ere=True)
    out, ere = purify(x, ncsnv2(), CONFIG, backend="torch", return_ere=True, score_dtype=torch.bfloat16)
    assert out.dtype == x.dtype and ere.dtype == torch.float32
    assert not torch.equal(ere, ref_ere), "bf16 gave fp32's bits: autocast did not reach the network"
    trace_err = ((ere - ref_ere).abs() / ref_ere.abs()).max().item()
    assert trace_err <= BF16_TRACE_RTOL, f"ERE trace off by {trace_err:.3g} relative"
    mean_dx = (out - ref).abs().mean().item()
    assert mean_dx <= BF16_MEAN_DX_RHO * CONFIG.rho, f"mean |dx| {mean_dx:.3g} vs rho {CONFIG.rho:.3g}"
    assert (out - x).abs().max() <= CONFIG.rho + 1e-6 and out.min() >= 0 and out.max() <= 1


def test_bf16_runs_only_the_score_under_autocast():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = conv_score()

        def forward(self, y, sigma):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), y.dtype))
            return self.net(y, sigma)

    purify(images(), Probe(), CONFIG, backend="torch", score_dtype=torch.bfloat16)
    assert seen and all(s == (True, torch.bfloat16, torch.float32) for s in seen), seen
    seen.clear()
    purify(images(), Probe(), CONFIG, backend="torch")
    assert seen and not any(enabled for enabled, _, _ in seen)


@pytest.mark.parametrize("make", [conv_score, ncsnv2], ids=["ConvScoreNet", "NCSNv2"])
def test_channels_last_matches_contiguous(make):
    x = images()
    ref, ref_ere = purify(x, make(), CONFIG, backend="torch", return_ere=True)
    score = make()
    before = {k: v.clone() for k, v in score.state_dict().items()}
    out, ere = purify(x, score, CONFIG, backend="torch", return_ere=True, channels_last=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=CL_ATOL)
    torch.testing.assert_close(ere, ref_ere, rtol=CL_TRACE_RTOL, atol=0)
    weights = [p for p in score.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert all(torch.equal(v, before[k]) for k, v in score.state_dict().items()), "values changed"
    assert all(p.grad is None for p in score.parameters())


def _plain(y, sigma):
    return -(y - 0.5) / (0.04 + sigma.view(-1, 1, 1, 1) ** 2)


def test_channels_last_with_plain_function_score():
    layouts = []

    def score(y, sigma):
        layouts.append(y.is_contiguous(memory_format=torch.channels_last))
        return _plain(y, sigma)

    x = images()
    out = purify(x, score, CONFIG, backend="torch", channels_last=True)
    assert layouts and all(layouts)
    torch.testing.assert_close(out, purify(x, _plain, CONFIG, backend="torch"), rtol=0, atol=CL_ATOL)


@pytest.fixture
def aot_eager(monkeypatch):
    # Dynamo + AOTAutograd without Inductor: the compile path's plumbing in seconds, not minutes.
    monkeypatch.setattr(graphs, "COMPILE_OPTIONS", {"backend": "aot_eager", "dynamic": False})


def test_compile_score_matches_eager_and_is_reused(aot_eager):
    from torch._dynamo.utils import counters

    x, score = images(), conv_score()
    flags = [p.requires_grad for p in score.parameters()]
    ref, ref_ere = purify(x, score, CONFIG, backend="torch", return_ere=True)
    out, ere = purify(x, score, CONFIG, backend="torch", return_ere=True, compile_score=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ere, ref_ere, rtol=1e-6, atol=0)
    graphs_after_first = counters["stats"]["unique_graphs"]
    again = purify(x, score, CONFIG, backend="torch", compile_score=True)
    assert torch.equal(again, out)
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "the second call recompiled"
    assert [p.requires_grad for p in score.parameters()] == flags
    assert all(p.grad is None for p in score.parameters())


def test_compiled_backward_computes_the_input_gradient_only(aot_eager):
    # A compiled nn.Module's backward also computes every weight gradient (twice the work);
    # the prepared score calls the module with detached weights.
    score = conv_score()
    y, sigma = images((4, 3, 8, 8)), torch.full((4,), 0.1)

    def backward_flops(fn):
        yl = y.clone().requires_grad_(True)
        out = fn(yl, sigma)
        with FlopCounterMode(display=False) as counter:
            torch.autograd.grad(out, yl, torch.ones_like(out))
        return counter.get_total_flops()

    eager = backward_flops(score)
    assert backward_flops(torch.compile(score, **graphs.COMPILE_OPTIONS)) > eager
    assert backward_flops(graphs.prepare_score(score, graphs.ScoreOptions(compile=True))) == eager


def test_prepared_score_cached_until_parameters_move():
    score = conv_score()
    opts = graphs.ScoreOptions(dtype=torch.bfloat16)
    first = graphs.prepare_score(score, opts)
    assert graphs.prepare_score(score, opts) is first
    assert graphs.prepare_score(score, graphs.ScoreOptions()) is score
    score.to(torch.float64).to(torch.float32)  # same values, new storage
    assert graphs.prepare_score(score, opts) is not first


def test_cuda_graph_auto_on_cpu_is_eager_and_silent(recwarn):
    x, score = images(), conv_score()
    auto = purify(x, score, CONFIG, backend="torch")
    assert torch.equal(auto, purify(x, score, CONFIG, backend="torch", cuda_graph=False))
    assert not [w for w in recwarn if "graph" in str(w.message)]
    assert not graphs._RUNNERS


BAD_OPTIONS = [
    (dict(cuda_graph="yes"), "cuda_graph"),
    (dict(cuda_graph=1), "cuda_graph"),
    (dict(cuda_graph=None), "cuda_graph"),
    (dict(cuda_graph=True), "cuda_graph=True needs a CUDA device"),
    (dict(cuda_graph=True, backend="reference"), "cuda_graph=True needs a fused backend"),
    (dict(score_dtype=torch.float16), "score_dtype"),
    (dict(score_dtype="bf16"), "score_dtype"),
    (dict(channels_last=1), "channels_last"),
    (dict(compile_score="yes"), "compile_score"),
]


@pytest.mark.parametrize("kwargs,match", BAD_OPTIONS, ids=[str(k) for k, _ in BAD_OPTIONS])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        purify(images(), conv_score(), CONFIG, **kwargs)


def test_bf16_with_float64_input_raises():
    with pytest.raises(ValueError, match="score_dtype"):
        purify(images().double(), conv_score().double(), CONFIG, score_dtype=torch.bfloat16)


def test_module_of_finds_modules_behind_bound_methods():
    model = NCSNv2(image_size=8, channels=3, ngf=4)
    assert graphs.module_of(model) is model
    assert graphs.module_of(model.score) is model
    assert graphs.module_of(_plain) is None
    assert graphs.module_of(functools.partial(_plain)) is None



# --- the CPU default (issue 11): a rule on facts of the machine and the score ------------------


def test_score_plan_rule():
    from pursamere_fast.purify import score_plan

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert score_plan(conv_score(), (3, 28, 28), cpu)["channels_last"] is True
    assert score_plan(_plain, (3, 28, 28), cpu)["channels_last"] is False  # no module to convert
    assert score_plan(conv_score(), (3, 28, 28), cuda) == {"channels_last": False, "chunk_rows": None,
                                                           "cpu_capability": None}
    assert score_plan(conv_score(), (1, 28, 28), cpu)["chunk_rows"] == 64
    assert score_plan(conv_score(), (3, 32, 32), cpu)["chunk_rows"] == 49
    assert score_plan(conv_score(), (3, 32, 32), cpu, channels_last=False, chunk_rows=7) == {
        "channels_last": False, "chunk_rows": 7, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def test_default_chunks_by_score_rows():
    rows = []

    def score(y, sigma):
        rows.append(y.shape[0])
        return _plain(y, sigma)

    x = images((70, 1, 28, 28))
    cfg = CONFIG.with_overrides(n_samples=2, sam_radius=0.0)
    purify(x, score, cfg, backend="torch")
    assert max(rows) == 64 and sum(rows) == 70 * 2 * cfg.num_steps
    rows.clear()
    purify(x, score, cfg, backend="torch", chunk_rows=None)  # max_batch = 64 images alone
    assert max(rows) == 128


def test_default_is_within_1e4_of_plain_eager():
    # The bar: the fast default moves no pixel by more than 1e-4 (measured 4.7e-6 on
    # the shipped model, bench/bench_score_options.py; the same arithmetic in another order).
    x = images((40, 3, 8, 8))
    plain = purify(x, conv_score(), CONFIG, backend="torch", channels_last=False, chunk_rows=None)
    fast = purify(x, conv_score(), CONFIG, backend="torch")
    assert (fast - plain).abs().max().item() <= 1e-5


def test_exact_gradient_takes_channels_last_and_bf16():
    from pursamere_fast import Purifier

    x = images((2, 3, 8, 8)).requires_grad_(True)
    w = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    grads = {}
    for name, opts in {"plain": dict(channels_last=False), "cl": dict(channels_last=True),
                       "bf16": dict(channels_last=False, score_dtype=torch.bfloat16)}.items():
        score = conv_score()
        (grads[name],) = torch.autograd.grad((Purifier(score, CONFIG, grad_mode="full", purify_options=opts)(x) * w)
                                             .sum(), x)
        if name == "cl":
            assert all(p.is_contiguous(memory_format=torch.channels_last) for p in score.parameters() if p.dim() == 4)
    rel = lambda g: ((g - grads["plain"]).norm() / grads["plain"].norm()).item()  # noqa: E731
    # channels_last: another summation order under double backward; bf16: a different function.
    assert rel(grads["cl"]) <= 1e-4, rel(grads["cl"])
    assert 0 < rel(grads["bf16"]) <= 0.5, rel(grads["bf16"])
