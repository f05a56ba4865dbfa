"""mc_reduce_sam: Triton launcher and torch fallback against the float64 reference."""

import pytest
import torch
from kernel_checks import assert_2x, assert_equal
from pursamere_fast.kernels import mc_reduce_sam, mc_reduce_sam_torch, use_triton
from pursamere_fast.reference.mc_reduce_sam import mc_reduce_sam as mc_reduce_sam_ref

pytestmark = pytest.mark.numerics

# (norm, radius, write out_y); without out_y the norm and radius play no part.
MODES = [("linf", 0.0, False), ("linf", 0.0, True), ("linf", 0.05, True), ("l2", 0.0, True), ("l2", 0.7, True)]




def _inputs(b, n, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    x = torch.rand(b, d, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, d, generator=gen, dtype=torch.float64)
    sig_t = torch.tensor([0.9, 0.5, 0.3, 0.1], dtype=torch.float64)
    return gy.to(dtype), x.to(dtype), eps.to(dtype), sig_t.to(dtype)


def _impls(device):
    impls = [("torch", mc_reduce_sam_torch)]
    if use_triton(device):
        impls.append(("triton", mc_reduce_sam))
    return impls


def _run(fn, gy, x, eps, sig_t, radius, norm, write_y, device):
    gy, x, eps, sig_t = gy.to(device), x.to(device), eps.to(device), sig_t.to(device)
    g = torch.full_like(x, float("nan"))
    y = torch.full_like(gy, float("nan")) if write_y else None
    fn(gy, x, eps, sig_t[2], radius, norm, g, y)  # sigma: a 0-dim view into the schedule
    return g, y


@pytest.mark.parametrize("norm, radius, write_y", MODES)
@pytest.mark.parametrize("case", range(4))
def test_float32_matches_reference(device, shapes, case, norm, radius, write_y):
    b, n, d = shapes[case]
    gy, x, eps, sig_t = _inputs(b, n, d)
    g64, y64 = mc_reduce_sam_ref(gy.double(), x.double(), eps.double(), sig_t.double()[2], radius, norm)
    g32, y32 = mc_reduce_sam_ref(gy, x, eps, sig_t[2], radius, norm)
    outs = {}
    for name, fn in _impls(device):
        g, y = _run(fn, gy, x, eps, sig_t, radius, norm, write_y, device)
        # The sum runs in index order everywhere: bitwise equal to the float32 reference.
        assert_equal(f"{name} g", g, g32)
        if write_y:
            assert_2x(f"{name} y", y, y32, y64)
        outs[name] = y
    if write_y and norm == "linf" and "triton" in outs:
        assert_equal("triton vs torch y", outs["triton"], outs["torch"])


@pytest.mark.parametrize("norm, radius, write_y", MODES)
def test_float64(device, shapes, norm, radius, write_y):
    b, n, d = shapes[1]
    gy, x, eps, sig_t = _inputs(b, n, d, torch.float64, seed=1)
    g64, y64 = mc_reduce_sam_ref(gy, x, eps, sig_t[2], radius, norm)
    for name, fn in _impls(device):
        g, y = _run(fn, gy, x, eps, sig_t, radius, norm, write_y, device)
        assert_equal(f"{name} g", g, g64)
        if not write_y:
            continue
        if name == "torch" and device.type == "cpu":
            assert_equal("torch y", y, y64)
        # float64 elementwise after one per-image norm: measured bitwise equal.
        torch.testing.assert_close(y.cpu(), y64, rtol=1e-15, atol=1e-15, msg=lambda m, name=name: f"{name} y: {m}")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_gradient_gives_no_step(device, norm):
    """sign(0) = 0 (linf) and g = 0 over a whole image (l2, norm floored at 1e-12): d = 0 there."""
    b, n, d = 2, 2, 37
    gy, x, eps, sig_t = _inputs(b, n, d)
    zero_cols = torch.arange(d) % 3 == 0
    gy[:, 1, zero_cols] = -gy[:, 0, zero_cols]
    gy[1, 1] = -gy[1, 0]  # image 1: g = 0 everywhere
    no_step = x[:, None] + sig_t[2] * eps[None]
    for name, fn in _impls(device):
        g, y = _run(fn, gy, x, eps, sig_t, 0.1, norm, True, device)
        y = y.cpu()
        assert (g.cpu()[:, zero_cols] == 0).all() and (g.cpu()[1] == 0).all()
        assert_equal(f"{name} y where g = 0", y[:, :, zero_cols], no_step[:, :, zero_cols])
        assert_equal(f"{name} y of the image with g = 0", y[1], no_step[1])
        moved = (y[0] - no_step[0]).abs()[:, ~zero_cols]
        assert (moved > 1e-6).all(), f"{name}: SAM step missing where g != 0"


def test_nan_gradient_like_torch_sign(device):
    """A NaN in gy stays in g; the linf step there is 0, as torch.sign(NaN) = 0."""
    b, n, d = 2, 3, 37
    gy, x, eps, sig_t = _inputs(b, n, d)
    gy[0, 1, 5] = float("nan")
    g_ref, y_ref = mc_reduce_sam_ref(gy, x, eps, sig_t[2], 0.1, "linf")
    for name, fn in _impls(device):
        g, y = _run(fn, gy, x, eps, sig_t, 0.1, "linf", True, device)
        assert torch.isnan(g.cpu()).nonzero().tolist() == [[0, 5]], name
        assert_equal(f"{name} y", y, y_ref)


@pytest.mark.parametrize("fn", [mc_reduce_sam, mc_reduce_sam_torch], ids=["triton", "torch"])
@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(sigma=0.3), "sigma must be a 0-dim tensor"),
        (dict(radius=-0.1), "radius must be a finite number >= 0"),
        (dict(radius=torch.tensor(0.1)), "radius must be a finite number >= 0"),
        (dict(norm="l1"), "norm must be one of"),
        (dict(gy=torch.zeros(2, 15)), r"gy must be 3-D"),
        (dict(x=torch.zeros(3, 5)), r"x must have shape \(2, 5\)"),
        (dict(eps=torch.zeros(3, 5, dtype=torch.float64)), "eps must have dtype"),
        (dict(out_y=torch.zeros(2, 3, 4)), r"out_y must have shape \(2, 3, 5\)"),
    ],
)
def test_bad_arguments_raise(fn, bad, match):
    args = dict(
        gy=torch.zeros(2, 3, 5), x=torch.zeros(2, 5), eps=torch.zeros(3, 5), sigma=torch.tensor(0.3),
        radius=0.1, norm="linf", out_g=torch.zeros(2, 5), out_y=None,
    )  # fmt: skip
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fn(**args)
