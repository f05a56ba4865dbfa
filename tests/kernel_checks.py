"""The checks the three kernel tests share: the 2x rule and bitwise equality."""

import torch


def assert_2x(name, out, ref32, ref64, rtol=1e-6):
    """flash-attention's rule: the error against float64 is at most twice the float32
    reference's own error, plus a small atol (rtol times the output's scale)."""
    out, ref32 = out.detach().cpu().double(), ref32.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{name}: non-finite at {(~torch.isfinite(out)).nonzero()[:8].tolist()}"
    err = (out - ref64).abs()
    bound = 2 * (ref32 - ref64).abs().max().item() + rtol * max(1.0, ref64.abs().max().item())
    bad = (err > bound).nonzero()
    assert bad.numel() == 0, f"{name}: max error {err.max().item():.3e} > {bound:.3e} at {bad[:8].tolist()}"


def assert_equal(name, out, ref):
    diff = (out.cpu() != ref.cpu()).nonzero()
    assert diff.numel() == 0, f"{name}: {diff.shape[0]} elements differ, first at {diff[:8].tolist()}"
