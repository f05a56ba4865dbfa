"""The core (purify, Purifier in every grad mode, the other purifiers, kernels, reference, scores) imports neither the
attack harness nor a command line, and runs on Python 3.10, which has no tomllib."""

import os
import subprocess
import sys
import textwrap

CORE_ONLY = """
    import sys
    sys.modules["tomllib"] = None  # as on Python 3.10: importing it raises ImportError
    import torch
    import pursamere_fast as pf
    from pursamere_fast.nets import ConvScoreNet
    from pursamere_fast.scores import NCSNv2Score, NoisePredictionScore, LabelIndexedScore, load_ncsnv2

    score = ConvScoreNet(1, 4, 2).eval()
    cfg = pf.PurifyConfig(sigmas=(0.2, 0.1), steps_per_sigma=1, n_samples=2)
    x = torch.rand(2, 1, 6, 6, requires_grad=True)
    # Every mode but "none" has a gradient ("none" raises a RuntimeError naming the others).
    for mode in pf.purifier.GRAD_MODES:
        out = pf.Purifier(score, cfg, grad_mode=mode)(x)
        if mode != "none":
            out.sum().backward()
    pf.purify(x.detach(), score, cfg, backend="reference")
    from pursamere_fast.purifiers import ADPPurifier
    for mode in pf.purifier.GRAD_MODES:
        out = ADPPurifier(score, steps=1, grad_mode=mode)(x)
        if mode != "none":
            out.sum().backward()
    from pursamere_fast.nets import SmallCNN
    from pursamere_fast.purifiers import HeteroPurifier
    classifier = SmallCNN(1, 10, 4, 8).eval()
    x8 = torch.rand(2, 1, 8, 8, requires_grad=True)
    for mode in pf.purifier.GRAD_MODES:
        hetero = HeteroPurifier(score, classifier, t_l=20, t_s=10, resample_steps=1, grid_steps=100, grad_mode=mode)
        for out in (hetero(x8), hetero.purify_runs(x8, 2)):
            if mode != "none":
                out.sum().backward()
    print(" ".join(sorted(m for m in sys.modules if m.startswith("pursamere_fast"))))
"""
FORBIDDEN = ("pursamere_fast.attacks", "pursamere_fast.cli", "pursamere_fast.demo", "pursamere_fast.train",
             "pursamere_fast.data", "pursamere_fast.pretrained")


def test_core_imports_no_harness_or_cli_and_needs_no_tomllib():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CORE_ONLY)], capture_output=True, text=True,
                          check=False, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "pursamere_fast.exact" in loaded and "pursamere_fast.kernels" in loaded, loaded
    leaked = [m for m in loaded if m.startswith(FORBIDDEN)]
    assert not leaked, f"the core imported {leaked}"
