"""The exact-gradient purification: gradcheck, equality with the reference, checkpointing."""

import pytest
import torch
from pursamere_fast.reference import purify_reference

from pursamere_fast import NonFiniteScoreError, Purifier, PurifyConfig, make_noise, purify
from pursamere_fast.exact import purify_unrolled
from pursamere_fast.nets import ConvScoreNet

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


def _score(dtype=torch.float64, requires_grad=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ConvScoreNet(1, 4, 2)
    return net.to(dtype).requires_grad_(requires_grad)


def _x(b=1, side=4, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand((b, 1, side, side), generator=gen, dtype=dtype)


def _cfg(**kw):
    base = dict(sigmas=(0.5, 0.3), steps_per_sigma=1, n_samples=2, rho=10.0, norm="l2", sam_radius=0.0,
                lr_max=0.05, lr_min=0.02)
    return PurifyConfig(**(base | kw))


@pytest.mark.parametrize("sam_radius", [0.0, 0.05], ids=["no-sam", "sam-l2"])
def test_gradcheck_float64(sam_radius):
    # rho large and norm l2: no projection or clamp binds, so the map is smooth.
    cfg = _cfg(sam_radius=sam_radius)
    score = _score()
    noise = make_noise(cfg, (1, 4, 4), dtype=torch.float64)
    x = _x().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: purify_unrolled(t, score, cfg, noise), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(), dict(sam_radius=0.05), dict(norm="linf", sam_radius=0.05, rho=0.02),
                                dict(norm="l2", sam_radius=0.05, rho=0.05), dict(steps_per_sigma=2, n_samples=3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_equals_reference(kw, dtype):
    cfg = _cfg(**kw)
    score = _score(dtype)
    x = _x(b=3, side=5, dtype=dtype)
    noise = make_noise(cfg, (1, 5, 5), dtype=dtype)
    ref, _ = purify_reference(x.clone(), score, cfg, noise)
    # The reference's layout (the CPU default would run the network channels_last): then the
    # same building blocks do the same arithmetic, bit for bit.
    plain = dict(channels_last=False)
    out = purify_unrolled(x.clone().requires_grad_(True), score, cfg, noise, **plain)
    assert out.dtype == dtype and out.requires_grad
    assert torch.equal(out.detach(), ref)
    with torch.no_grad():
        assert torch.equal(purify_unrolled(x, score, cfg, noise, **plain), ref)
    with torch.inference_mode():
        assert torch.equal(purify_unrolled(x, score, cfg, noise, **plain), ref)


def test_purifier_full_mode_matches_purify_and_backpropagates():
    cfg = _cfg(norm="linf", rho=0.05, sam_radius=0.02, max_batch=2)
    score = _score(torch.float32)
    x = _x(b=3, side=6, dtype=torch.float32).requires_grad_(True)
    out = Purifier(score, cfg, grad_mode="full")(x)
    # The reference's own building blocks: measured bitwise equal on every CPU kernel set tried;
    # 1e-6 allows the safe-sqrt branch another rounding.
    assert torch.allclose(out.detach(), purify(x.detach(), score, cfg, backend="reference"), atol=1e-6)
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert bool(torch.isfinite(g).all())
    (g_bpda,) = torch.autograd.grad((Purifier(score, cfg, grad_mode="bpda")(x) * w).sum(), x)
    assert torch.equal(g_bpda, w)
    assert not torch.allclose(g, w)


def test_rho_zero_gives_identity_value_and_gradient():
    cfg = _cfg(norm="linf", rho=0.0, sam_radius=0.05)
    score = _score()
    x = _x(b=2).requires_grad_(True)
    out = purify_unrolled(x, score, cfg)
    assert torch.equal(out.detach(), x.detach())
    w = torch.randn_like(x)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    assert torch.allclose(g, w, atol=1e-12)


def test_checkpointing_recomputes_each_step_and_matches_plain_autograd():
    from pursamere_fast.exact import _loop

    cfg = _cfg(sam_radius=0.05, steps_per_sigma=2)
    base = _score()
    calls = {"n": 0}

    def score(y, sigma):
        calls["n"] += 1
        return base(y, sigma)

    x = _x(b=2).requires_grad_(True)
    noise = make_noise(cfg, (1, 4, 4), dtype=torch.float64)
    out = purify_unrolled(x, score, cfg, noise)
    per_pass = cfg.num_steps * 2  # ERE gradient + SAM gradient per step
    assert calls["n"] == per_pass
    w = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * w).sum(), x)
    # The backward reran every step's forward: activations were not kept between steps.
    assert calls["n"] == 2 * per_pass
    # ... and kept no graph of its own (one would chain the steps' graphs: memory O(K)).
    assert g.grad_fn is None and not g.requires_grad
    # Second-order gradients are refused, not silently wrong.
    out2 = purify_unrolled(x, score, cfg, noise)
    (g2,) = torch.autograd.grad((out2 * out2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g2.sum(), x)
    plain, _ = _loop(x, score, cfg, noise, create_graph=True, checkpointed=False)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), x)
    assert torch.equal(g, g_plain)


def test_score_parameters_get_no_grad():
    cfg = _cfg()
    score = _score(requires_grad=True)
    x = _x().requires_grad_(True)
    purify_unrolled(x, score, cfg).sum().backward()
    assert x.grad is not None
    assert all(p.grad is None and p.requires_grad for p in score.parameters())


def test_bad_inputs_and_nonfinite_score():
    cfg = _cfg()
    score = _score()
    with pytest.raises(ValueError, match="noise"):
        purify_unrolled(_x(), score, cfg, torch.zeros(1, 2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="x_adv"):
        purify_unrolled(_x() + 1, score, cfg)
    with pytest.raises(ValueError, match="x_adv"):
        purify_unrolled(_x()[0], score, cfg)
    with pytest.raises(ValueError, match="score returned shape"):
        purify_unrolled(_x(), lambda y, s: y[:, :, :2], cfg)

    def bad(y, sigma):
        s = score(y, sigma)
        return s * float("nan") if float(sigma[0]) < 0.4 else s

    with pytest.raises(NonFiniteScoreError, match="step 1 .*sigma=0.3"):
        purify_unrolled(_x().requires_grad_(True), bad, cfg)


class _Doubled(torch.autograd.Function):
    """y -> 2y whose backward is itself differentiable and counts its own backward: one count
    per double backward walked through the score."""

    count = 0

    @staticmethod
    def forward(ctx, y):
        return 2 * y

    @staticmethod
    def backward(ctx, grad):
        return _DoubledBackward.apply(grad)


class _DoubledBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad):
        return 2 * grad

    @staticmethod
    def backward(ctx, grad2):
        _Doubled.count += 1
        return 2 * grad2


@pytest.mark.parametrize("norm, walks_per_step", [("linf", 1), ("l2", 2)])
def test_linf_sam_backward_walks_one_double_backward_per_step(norm, walks_per_step):
    # linf: the first ERE gradient only feeds sign(g), whose derivative is zero; the backward
    # differentiates the score twice per step only for l2, where d = r*g/||g|| depends on g.
    cfg = _cfg(norm=norm, sam_radius=0.05, rho=0.05, steps_per_sigma=2)
    base = _score()

    def score(y, sigma):
        return base(_Doubled.apply(y) / 2, sigma)

    x = _x(b=2).requires_grad_(True)
    out = purify_unrolled(x, score, cfg)
    _Doubled.count = 0
    torch.autograd.grad(out.sum(), x)
    assert _Doubled.count == walks_per_step * cfg.num_steps


def test_gradcheck_float64_linf_sam():
    # sign(g) is locally constant (no component of g is 0), rho = 1 and steps of at most 0.05
    # from [0.2, 0.8] bind neither the ball nor [0, 1], so the map is smooth around x: the
    # gradient without the first gradient's graph is the true one.
    cfg = _cfg(norm="linf", sam_radius=0.02, rho=1.0)
    score = _score()
    noise = make_noise(cfg, (1, 4, 4), dtype=torch.float64)
    x = _x().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: purify_unrolled(t, score, cfg, noise), (x,), eps=1e-6, atol=1e-7)


def test_auto_chunk_rows_bounds_cuda_chunks_by_pixels():
    from pursamere_fast.exact import CUDA_CHUNK_PIXELS, auto_chunk_rows

    # purify plans no bound on CUDA; the exact path's double backward needs one.
    assert auto_chunk_rows(None, "cuda", (3, 32, 32)) == CUDA_CHUNK_PIXELS // (32 * 32) == 64
    assert auto_chunk_rows(None, "cuda", (3, 256, 256)) == 1
    assert auto_chunk_rows(16, "cuda:0", (3, 32, 32)) == 16
    assert auto_chunk_rows(64, "cpu", (1, 28, 28)) == 64 and auto_chunk_rows(None, "cpu", (3, 32, 32)) is None
