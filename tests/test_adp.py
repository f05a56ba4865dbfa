"""ADPPurifier (pursamere_fast.purifiers.adp): determinism, batch invariance, grad modes."""

import pytest
import torch

from pursamere_fast.attacks import toy
from pursamere_fast.purifiers import ADPPurifier

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]


def test_adp_deterministic_batch_invariant_and_grad_modes():
    score = toy.make_score().double()
    x = toy.synthetic_data(6)[0].double()
    adp = ADPPurifier(score, steps=2, seed=1)
    with torch.no_grad():
        full = adp(x)
        assert torch.equal(full, adp(x))
        # float64, per-image arithmetic: measured bitwise equal.
        assert torch.allclose(torch.cat([adp(x[:2]), adp(x[2:])]), full, rtol=0, atol=1e-12)
        assert not torch.equal(full, ADPPurifier(score, steps=2, seed=2)(x))
    xi = x[:1].clone().requires_grad_(True)
    w = torch.randn_like(xi)
    (g_bpda,) = torch.autograd.grad((ADPPurifier(score, steps=2, grad_mode="bpda")(xi) * w).sum(), xi)
    assert torch.equal(g_bpda, w)
    # Noise 0 keeps the input away from the clamp's kinks: the full gradient is smooth.
    smooth = ADPPurifier(score, steps=2, noise_std=0.0, sigma=0.05, grad_mode="full")
    assert torch.autograd.gradcheck(smooth, (x[:1].clamp(0.3, 0.7).requires_grad_(True),), eps=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="grad_mode"):
        ADPPurifier(score, grad_mode="exact")
    with pytest.raises(ValueError, match="steps"):
        ADPPurifier(score, steps=0)
