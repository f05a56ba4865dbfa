"""adam_project: it moves x, it matches the reference, a no-op leaves the state bit-identical."""

import math

import pytest
import torch
from kernel_checks import assert_2x, assert_equal
from pursamere_fast.kernels import adam_project, adam_project_torch, use_triton
from pursamere_fast.reference.adam_project import adam_project as adam_project_ref

pytestmark = pytest.mark.numerics

BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8




def _rho(norm, d):
    # 8/255 per pixel (linf); its l2 counterpart at half the linf ball's corner distance.
    return 8 / 255 if norm == "linf" else 0.5 * 8 / 255 * math.sqrt(d)


def _schedules(dtype, k_total=4, lr_max=0.4):
    """lr_k, 1-beta1^(k+1), 1-beta2^(k+1) as device-style schedules; ops get 0-dim views [k]."""
    ks = torch.arange(k_total, dtype=torch.float64)
    lr_t = lr_max * (1 - ks / k_total)
    bc1_t = 1 - BETA1 ** (ks + 1)
    bc2_t = 1 - BETA2 ** (ks + 1)
    return lr_t.to(dtype), bc1_t.to(dtype), bc2_t.to(dtype)


def _inputs(b, n, d, rho, dtype=torch.float32, seed=0):
    """State after a few steps: x near x_adv (some pixels at 0 or 1), moments of matching size.
    With lr_2 = 0.2 the step leaves the ball for many pixels, so projection and clamp act."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    x_adv = torch.rand(b, d, **f64).mul_(1.2).sub_(0.1).clamp_(0, 1)
    x = (x_adv + (2 * torch.rand(b, d, **f64) - 1) * rho / math.sqrt(d)).clamp_(0, 1)
    m = 0.1 * torch.randn(b, d, **f64)
    v = 0.01 * torch.rand(b, d, **f64)
    g = torch.randn(b, d, **f64)
    eps = torch.randn(n, d, **f64)
    sig_t = torch.tensor([0.9, 0.5, 0.3, 0.1], dtype=torch.float64)
    return [t.to(dtype) for t in (x, x_adv, m, v, g, eps, sig_t)]


def _impls(device):
    impls = [("torch", adam_project_torch)]
    if use_triton(device):
        impls.append(("triton", adam_project))
    return impls


def _run(fn, x, x_adv, m, v, g, sched, k, rho, norm, device, eps=None, sig_t=None):
    """Run on copies; returns (x, m, v, y_next or None)."""
    x, x_adv, m, v, g = (t.to(device).clone() for t in (x, x_adv, m, v, g))
    lr_t, bc1_t, bc2_t = (t.to(device) for t in sched)
    nxt = {}
    if eps is not None:
        nxt = dict(
            y_next=torch.full((x.shape[0], eps.shape[0], x.shape[1]), float("nan"), dtype=x.dtype, device=device),
            eps_next=eps.to(device), sigma_next=sig_t.to(device)[3],
        )  # fmt: skip
    fn(x, x_adv, m, v, g, lr_t[k], bc1_t[k], bc2_t[k],
       beta1=BETA1, beta2=BETA2, adam_eps=ADAM_EPS, rho=rho, norm=norm, **nxt)  # fmt: skip
    return x, m, v, nxt.get("y_next")


def _ref(x, x_adv, m, v, g, sched, k, rho, norm):
    lr_t, bc1_t, bc2_t = sched
    return adam_project_ref(x, x_adv, m, v, g, lr_t[k], bc1_t[k], bc2_t[k],
                            beta1=BETA1, beta2=BETA2, adam_eps=ADAM_EPS, rho=rho, norm=norm)  # fmt: skip


def _assert_feasible(name, x, x_adv, rho, norm):
    x, x_adv = x.cpu().double(), x_adv.cpu().double()
    assert ((x >= 0) & (x <= 1)).all(), f"{name}: outside [0, 1] at {((x < 0) | (x > 1)).nonzero()[:8].tolist()}"
    if norm == "linf":
        dist = (x - x_adv).abs().amax(dim=1)
    else:
        dist = torch.linalg.vector_norm(x - x_adv, dim=1)
    assert (dist <= rho * (1 + 1e-5) + 1e-7).all(), f"{name}: outside the {norm} ball: {dist.tolist()} > {rho}"


@pytest.mark.parametrize("write_y", [False, True])
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("case", range(4))
def test_float32_matches_reference(device, shapes, case, norm, write_y):
    b, n, d = shapes[case]
    rho = _rho(norm, d)
    x, x_adv, m, v, g, eps, sig_t = _inputs(b, n, d, rho)
    sched = _schedules(torch.float32)
    k = 2
    x64, m64, v64 = _ref(*(t.double() for t in (x, x_adv, m, v, g)), [t.double() for t in sched], k, rho, norm)
    x32, m32, v32 = _ref(x, x_adv, m, v, g, sched, k, rho, norm)
    free, _, _ = _ref(*(t.double() for t in (x, x_adv, m, v, g)), [t.double() for t in sched], k, math.inf, norm)
    assert not torch.equal(free, x64), "test setup: the projection onto the ball should act"
    outs = {}
    for name, fn in _impls(device):
        xo, mo, vo, y = _run(fn, x, x_adv, m, v, g, sched, k, rho, norm, device, *((eps, sig_t) if write_y else ()))
        assert_2x(f"{name} x", xo, x32, x64)
        assert_2x(f"{name} m", mo, m32, m64)
        assert_2x(f"{name} v", vo, v32, v64)
        _assert_feasible(name, xo, x_adv, rho, norm)
        if write_y:
            sigma_next = sig_t.to(device)[3]
            assert_equal(f"{name} y_next", y, xo[:, None] + sigma_next * eps.to(device)[None])
        outs[name] = (mo, vo)
    if "triton" in outs:
        # m and v: the same multiplies and adds in the same order. (x also takes a sqrt, which
        # torch's CPU build does not round correctly everywhere: covered by the 2x rule.)
        assert_equal("triton vs torch m", outs["triton"][0], outs["torch"][0])
        assert_equal("triton vs torch v", outs["triton"][1], outs["torch"][1])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_float64(device, shapes, norm):
    b, n, d = shapes[1]
    rho = _rho(norm, d)
    x, x_adv, m, v, g, eps, sig_t = _inputs(b, n, d, rho, torch.float64, seed=1)
    sched = _schedules(torch.float64)
    x64, m64, v64 = _ref(x, x_adv, m, v, g, sched, 1, rho, norm)
    for name, fn in _impls(device):
        xo, mo, vo, _ = _run(fn, x, x_adv, m, v, g, sched, 1, rho, norm, device)
        if name == "torch" and device.type == "cpu":
            for label, out, ref in (("x", xo, x64), ("m", mo, m64), ("v", vo, v64)):
                assert_equal(f"torch {label}", out, ref)
        # float64 elementwise arithmetic: a few ulp at most (measured 7e-17 under the interpreter).
        for label, out, ref in (("x", xo, x64), ("m", mo, m64), ("v", vo, v64)):
            torch.testing.assert_close(out.cpu(), ref, rtol=1e-15, atol=1e-15,
                                       msg=lambda s, name=name, label=label: f"{name} {label}: {s}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_first_step_moves_x_against_the_gradient(device, norm):
    """Step 0 from m = v = 0 moves each pixel by lr * g/(|g| + adam_eps*...) ~ -lr*sign(g)."""
    b, d, lr = 2, 37, 0.01
    x_adv = torch.full((b, d), 0.5)
    g = torch.randn(b, d, generator=torch.Generator().manual_seed(3))
    sched = _schedules(torch.float32, lr_max=lr)
    for name, fn in _impls(device):
        xo, mo, vo, _ = _run(fn, x_adv, x_adv, torch.zeros(b, d), torch.zeros(b, d), g, sched, 0, 1.0, norm, device)
        step = (xo.cpu() - x_adv).double()
        # Adam's first step is -lr * g / (|g| + eps): off sign(g) by adam_eps / |g|, measured 1e-6.
        torch.testing.assert_close(step, -lr * torch.sign(g).double(), rtol=1e-4, atol=0.0,
                                   msg=lambda s, name=name: f"{name}: {s}")  # fmt: skip
        torch.testing.assert_close(mo.cpu(), (1 - BETA1) * g)
        torch.testing.assert_close(vo.cpu(), (1 - BETA2) * g * g)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_noop_leaves_state_bit_identical(device, shapes, norm):
    """g = 0 with m = v = 0 and x strictly inside the ball and (0, 1): nothing may change."""
    b, n, d = shapes[1]
    rho = _rho(norm, d)
    gen = torch.Generator().manual_seed(4)
    x_adv = 0.1 + 0.8 * torch.rand(b, d, generator=gen)
    x = x_adv + (2 * torch.rand(b, d, generator=gen) - 1) * 0.5 * rho / math.sqrt(d)
    zeros = torch.zeros(b, d)
    for name, fn in _impls(device):
        xo, mo, vo, _ = _run(fn, x, x_adv, zeros, zeros, zeros, _schedules(torch.float32), 2, rho, norm, device)
        assert_equal(f"{name} x", xo, x)
        assert_equal(f"{name} m", mo, zeros)
        assert_equal(f"{name} v", vo, zeros)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_rho_zero_returns_x_adv(device, shapes, norm):
    b, n, d = shapes[2]
    x, x_adv, m, v, g, eps, sig_t = _inputs(b, n, d, 0.1)
    for name, fn in _impls(device):
        xo, _, _, y = _run(fn, x, x_adv, m, v, g, _schedules(torch.float32), 2, 0.0, norm, device, eps, sig_t)
        assert_equal(f"{name} x", xo, x_adv)
        assert_equal(f"{name} y_next", y, x_adv.to(device)[:, None] + sig_t.to(device)[3] * eps.to(device)[None])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nan_gradient_propagates(device, norm):
    """The clamps must not turn a NaN into a bound: the loop's finiteness check has to see it."""
    b, n, d = 2, 1, 37
    x, x_adv, m, v, g, _, _ = _inputs(b, n, d, 0.1)
    g[0, 5] = float("nan")
    for name, fn in _impls(device):
        xo, mo, vo, _ = _run(fn, x, x_adv, m, v, g, _schedules(torch.float32), 2, 0.1, norm, device)
        nan = torch.isnan(xo.cpu())
        assert nan[0, 5] and torch.isnan(mo.cpu()[0, 5]) and torch.isnan(vo.cpu()[0, 5]), name
        assert not nan[1].any(), f"{name}: NaN leaked into another image"


@pytest.mark.parametrize("fn", [adam_project, adam_project_torch], ids=["triton", "torch"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(lr=0.1), "lr must be a 0-dim tensor"),
        (dict(bc2=torch.tensor(0.1, dtype=torch.float64)), "bc2 must have dtype"),
        (dict(beta1=1.0), r"beta1 must be in \[0, 1\)"),
        (dict(rho=-1.0), "rho must be a finite number >= 0"),
        (dict(rho=float("nan")), "rho must be a finite number >= 0"),
        (dict(norm="linfinity"), "norm must be one of"),
        (dict(g=torch.zeros(2, 6)), r"g must have shape \(2, 5\)"),
        (dict(y_next=torch.zeros(2, 3, 5)), "y_next, eps_next and sigma_next go together"),
        (dict(y_next=torch.zeros(2, 3, 5), eps_next=torch.zeros(2, 5), sigma_next=torch.tensor(0.1)),
         r"eps_next must have shape \(3, 5\)"),
    ],
)  # fmt: skip
def test_bad_arguments_raise(fn, bad, match):
    args = dict(
        x=torch.zeros(2, 5), x_adv=torch.zeros(2, 5), m=torch.zeros(2, 5), v=torch.zeros(2, 5), g=torch.zeros(2, 5),
        lr=torch.tensor(0.1), bc1=torch.tensor(0.1), bc2=torch.tensor(0.001),
        beta1=0.9, beta2=0.999, adam_eps=1e-8, rho=0.03, norm="linf",
    )  # fmt: skip
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fn(**args)
