"""One hostile-input matrix, run against every purifier and every public entry point (issue 40).

Entry points: `purify`, `Purifier` (grad modes none, bpda, full), `ADPPurifier`, `HeteroPurifier`
(mask "all" and the saliency mask), `DiffPurePurifier`, `PurifiedClassifier` around a purifier,
and the CLI's `evaluate`. Each case is an exact error type and a message fragment, or a stated
coercion whose output is checked. The property-based tests draw shapes, dtypes, ranges, layouts
and NaN/Inf positions: each input gets a named error or an output that is finite, in [0, 1], of
the input's shape and dtype. `docs/hostile_inputs.md` is the table of these cases.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from pursamere_fast import NonFiniteScoreError, Purifier, PurifyConfig, checks, cli, purify
from pursamere_fast.attacks import PurifiedClassifier
from pursamere_fast.checks import ModelCallError, ModelInputError
from pursamere_fast.nets import ConvScoreNet, SmallCNN
from pursamere_fast.purifiers import ADPPurifier, DiffPurePurifier, HeteroPurifier

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = PurifyConfig(sigmas=(0.2, 0.1), steps_per_sigma=1, n_samples=2, rho=0.05, sam_radius=0.02, lr_max=0.02,
                   lr_min=0.01)
HETERO = dict(t_l=40, t_s=20, resample_steps=2, grid_steps=100)


def score_net(dtype=torch.float32):
    torch.manual_seed(0)
    return ConvScoreNet(1, 4, 2).eval().requires_grad_(False).to(dtype)


def classifier_net():
    torch.manual_seed(1)
    return SmallCNN(1, 10, 4, 8).eval().requires_grad_(False)


def gaussian(y, sigma):
    """The exact score of N(0.5, 0.04) data: works for any shape and dtype."""
    return -(y - 0.5) / (0.04 + sigma.view(-1, 1, 1, 1) ** 2)


# name -> (score -> callable x -> output images). Every purifier class in
# pursamere_fast.purifiers is here, in the grad modes that run a different path.
PURIFIERS = {
    "purify": lambda s: (lambda x: purify(x, s, CFG)),
    "Purifier": lambda s: Purifier(s, CFG),
    "Purifier-bpda": lambda s: Purifier(s, CFG, grad_mode="bpda"),
    "Purifier-full": lambda s: Purifier(s, CFG, grad_mode="full"),
    "ADPPurifier": lambda s: ADPPurifier(s, sigma=0.1, noise_std=0.1, steps=2),
    "ADPPurifier-full": lambda s: ADPPurifier(s, sigma=0.1, noise_std=0.1, steps=2, grad_mode="full"),
    "HeteroPurifier": lambda s: HeteroPurifier(s, None, mask="all", **HETERO),
    "HeteroPurifier-saliency": lambda s: HeteroPurifier(s, classifier_net(), **HETERO),
    "HeteroPurifier-full": lambda s: HeteroPurifier(s, None, mask="all", grad_mode="full", **HETERO),
    "DiffPurePurifier": lambda s: DiffPurePurifier(s, t_star=0.05, steps=3),
    "DiffPurePurifier-full": lambda s: DiffPurePurifier(s, t_star=0.05, steps=3, grad_mode="full"),
}
# PurifiedClassifier: the torchattacks-facing module; its errors are its purifier's.
ENTRIES = {**PURIFIERS,
           "PurifiedClassifier": lambda s: PurifiedClassifier(Purifier(s, CFG), classifier_net(), mean=[0.5],
                                                              std=[0.5])}
# The purifiers whose images pass through the classifier or the score model first (the
# channel check then names the classifier).
CLASSIFIER_FIRST = {"HeteroPurifier-saliency"}


def good(b=2, c=1, h=8, w=8, dtype=torch.float32, seed=0):
    return torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed)).to(dtype)


def with_value(x, index, value):
    x = x.clone()
    x[index] = value
    return x


# (case, images, error type, message fragment). Fragments are the words of checks.images, the
# same for every entry point; "(x|x_adv)" is the argument's name (purify calls it x_adv).
IMAGE_CASES = [
    ("(C, H, W) without a batch dimension", good()[0], ValueError,
     r"must have shape \(B, C, H, W\), got ndim=3.*x\.unsqueeze\(0\)"),
    ("(H, W)", good()[0, 0], ValueError, r"ndim=2.*x\[None, None\]"),
    ("5-D (runs, B, C, H, W)", good()[None], ValueError, r"ndim=5.*x\.flatten\(0, 1\)"),
    ("NHWC grayscale (B, H, W, 1)", good().permute(0, 2, 3, 1), ValueError,
     r"looks channels-last \(B, H, W, C\) with C=1: permute it with x\.permute\(0, 3, 1, 2\)"),
    ("NHWC colour (B, H, W, 3)", good(c=3).permute(0, 2, 3, 1), ValueError,
     r"channels-last .*x\.permute\(0, 3, 1, 2\)"),
    ("uint8 images", (good() * 255).to(torch.uint8), ValueError,
     r"must be a floating-point tensor .*got dtype torch\.uint8; .*x\.float\(\) / 255"),
    ("int64 images", (good() * 255).long(), ValueError, r"got dtype torch\.int64; .*/ 255"),
    ("bool images", good() > 0.5, ValueError, r"got dtype torch\.bool; .*x\.float\(\)"),
    ("complex images", good().to(torch.complex64), ValueError, r"must be a floating-point tensor"),
    ("float images in [0, 255]", good() * 255, ValueError, r"must lie in \[0, 1\], got values in .*divide them by 255"),
    ("mean/std-normalised images (torchattacks set_normalization_used)", (good() - 0.2860) / 0.3530, ValueError,
     r"must lie in \[0, 1\].*PurifiedClassifier\(purifier, classifier, mean=\.\.\., std=\.\.\.\).*set_normalization"),
    ("[-1, 1] images", good() * 2 - 1, ValueError, r"\(x \+ 1\) / 2"),
    ("overshoot 1 + 1e-4", with_value(good(), (0, 0, 0, 0), 1 + 1e-4), ValueError,
     r"must lie in \[0, 1\].*clamp\(0, 1\)"),
    ("NaN pixel", with_value(good(), (1, 0, 3, 4), float("nan")), ValueError,
     r"contains NaN or Inf \(1 of 128 values, the first at index \(1, 0, 3, 4\)\)"),
    ("+Inf pixel", with_value(good(), (0, 0, 0, 1), float("inf")), ValueError, r"contains NaN or Inf \(1 of 128"),
    ("empty batch", good()[:0], ValueError, r"must not be empty, got shape \(0, 1, 8, 8\)"),
    ("NumPy array", good().numpy(), ValueError, r"must be a torch\.Tensor, got ndarray; .*torch\.from_numpy"),
    ("nested list", good().tolist(), ValueError, r"must be a torch\.Tensor, got list"),
    ("meta tensor", torch.empty(2, 1, 8, 8, device="meta"), ValueError, r"must hold data, got a tensor on the meta"),
    ("3 channels for a 1-channel score", good(c=3), ModelInputError,
     r"has C=3 channels but the (score|classifier) model takes C=1"),
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("case, x, error, fragment", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_hostile_images(entry, case, x, error, fragment):
    with pytest.raises(error) as info:
        ENTRIES[entry](score_net())(x)
    message = str(info.value)
    assert re.search(fragment, message), message
    if error is ValueError:  # the argument is named first
        assert re.match(r"(x|x_adv) (must|contains)", message), message
    if "channels" in case:
        who = "classifier" if entry in CLASSIFIER_FIRST else "score"
        assert f"the {who} model" in message, message


class NaNScore(nn.Module):
    """ConvScoreNet whose output is NaN (or Inf) from `step` score calls on."""

    def __init__(self, value=float("nan"), after=0):
        super().__init__()
        self.net, self.value, self.after, self.calls = score_net(), value, after, 0

    def forward(self, y, sigma):
        self.calls += 1
        s = self.net(y, sigma)
        return s * self.value if self.calls > self.after else s


def detached_module_score(y, sigma):
    # A plain function: the boundary cannot see the float32 module inside to cast for it.
    return _NET32(y, sigma)


_NET32 = score_net()


def raising_score(y, sigma):
    raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (128x1 and 64x10)")


# (case, score factory, images, error type, fragment).
SCORE_CASES = [
    ("score returns NaN", lambda: NaNScore(), good(), NonFiniteScoreError, r"NaN/Inf at step 0\b"),
    ("score returns NaN from its second call", lambda: NaNScore(after=1), good(), NonFiniteScoreError,
     r"NaN/Inf at step [01]\b"),
    ("score returns Inf", lambda: NaNScore(float("inf")), good(), NonFiniteScoreError, r"NaN/Inf at step 0\b"),
    ("score returns the wrong shape", lambda: (lambda y, s: y[:, :, :2]), good(), ValueError,
     r"score returned shape"),
    ("score returns an int tensor", lambda: (lambda y, s: (y * 10).long()), good(), ValueError,
     r"score must return a floating"),
    ("score returns None", lambda: (lambda y, s: None), good(), ValueError, r"score must return a floating"),
    ("score function around a float32 module, float64 images", lambda: detached_module_score,
     good(dtype=torch.float64), ModelInputError, r"score model cannot take (x|x_adv)'s dtype torch\.float64"),
    ("score raises a layer's RuntimeError", lambda: raising_score, good(), ModelInputError,
     r"score model failed on (x|x_adv) \(its input of shape .*\): mat1 and mat2"),
    ("score takes one argument", lambda: (lambda y: y), good(), ModelCallError,
     r"score model could not be called on (x|x_adv) \(a score is called as score\(y, sigma\)"),
]


@pytest.mark.parametrize("entry", PURIFIERS)
@pytest.mark.parametrize("case, make_score, x, error, fragment", SCORE_CASES, ids=[c[0] for c in SCORE_CASES])
def test_hostile_scores(entry, case, make_score, x, error, fragment):
    purifier = PURIFIERS[entry](make_score())
    with pytest.raises(error) as info:
        purifier(x)
    assert re.search(fragment, str(info.value)), str(info.value)


# Stated coercions: (case, score factory, images). Each output is finite, in [0, 1], of the
# input's shape, dtype and device.
COERCIONS = [
    ("float64 images, float32 score module: the score runs in float32", lambda: score_net(),
     good(dtype=torch.float64)),
    ("float32 images, float64 score module: the score runs in float64", lambda: score_net(torch.float64), good()),
    ("float16 images: purified in float32, returned in float16", lambda: score_net(), good(dtype=torch.float16)),
    ("bfloat16 images: purified in float32, returned in bfloat16", lambda: score_net(), good(dtype=torch.bfloat16)),
    ("bfloat16 score module", lambda: score_net(torch.bfloat16), good()),
    ("one image", lambda: score_net(), good(b=1)),
    ("odd sizes 5 x 7", lambda: score_net(), good(h=5, w=7)),
    ("1 x 1 images", lambda: score_net(), good(h=1, w=1)),
    ("non-contiguous images", lambda: score_net(), good().transpose(2, 3)),
    ("channels_last memory format", lambda: score_net(), good(c=3).to(memory_format=torch.channels_last)),
    ("images exactly 0 and 1", lambda: score_net(), (good() > 0.5).float()),
    ("within the 1e-6 slack of [0, 1]", lambda: score_net(), with_value(good(), (0, 0, 0, 0), 1 + 5e-7)),
    ("an nn.Parameter", lambda: score_net(), nn.Parameter(good())),
    ("score returns a tuple (its first element is the score)", lambda: (lambda y, s: (gaussian(y, s), None)), good()),
]


# The saliency classifier takes one-channel 8 x 8 images: other images are a ModelInputError for
# the purifiers that run it first (tested below), not a coercion.
COERCION_CASES = [(entry, *case) for entry in PURIFIERS for case in COERCIONS
                  if entry not in CLASSIFIER_FIRST or tuple(case[2].shape[1:]) == (1, 8, 8)]


@pytest.mark.parametrize("entry, case, make_score, x", COERCION_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in COERCION_CASES])
def test_stated_coercions(entry, case, make_score, x):
    if x.shape[1] != 1 and "channels_last" in case:
        make_score = lambda: gaussian  # noqa: E731 - any channel count
    out = PURIFIERS[entry](make_score())(x)
    assert_purified(out, x)


def assert_purified(out, x):
    assert isinstance(out, torch.Tensor)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    o = out.detach().double()
    assert bool(torch.isfinite(o).all()) and float(o.min()) >= 0 and float(o.max()) <= 1


def test_classifier_for_another_image_size_is_named():
    with pytest.raises(ModelInputError, match=r"the classifier model failed on x \(its input of shape \(2, 1, 5, 7\)"):
        HeteroPurifier(score_net(), classifier_net(), **HETERO)(good(h=5, w=7))


# --- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["Purifier", "ADPPurifier", "HeteroPurifier", "PurifiedClassifier"])
def test_grad_mode_none_inside_an_attack_names_the_grad_modes(entry):
    x = good().requires_grad_(True)
    out = ENTRIES[entry](score_net())(x)
    with pytest.raises(RuntimeError, match=r"grad_mode='none' has no gradient.*grad_mode='bpda'.*grad_mode='full'"):
        torch.autograd.grad(out.sum(), x)
    # Its value is the purification, and without a backward nothing changes.
    with torch.no_grad():
        assert torch.equal(out.detach(), ENTRIES[entry](score_net())(x))


@pytest.mark.parametrize("entry", [e for e in PURIFIERS if "full" in e or "bpda" in e])
def test_gradient_modes_differentiate_float16_images(entry):
    x = good(dtype=torch.float16).requires_grad_(True)
    out = PURIFIERS[entry](score_net())(x)
    (g,) = torch.autograd.grad(out.float().sum(), x)
    assert g.dtype == torch.float16 and bool(torch.isfinite(g).all())


# --- options ------------------------------------------------------------------------------------

OPTION_CASES = [
    ("PurifyConfig rho=16 (linf)", lambda: PurifyConfig(rho=16), r"^rho must be <= 1 for norm='linf'.*/255"),
    ("purify rho=8 override", lambda: purify(good(), gaussian, CFG, rho=8.0), r"^rho must be <= 1.*rho=8/255"),
    ("Purifier rho=255", lambda: Purifier(gaussian, CFG, rho=255), r"^rho must be <= 1"),
    ("ADPPurifier steps=0", lambda: ADPPurifier(gaussian, steps=0), r"^steps must be an integer >= 1"),
    ("ADPPurifier sigma=0", lambda: ADPPurifier(gaussian, sigma=0), r"^sigma must be a finite number > 0"),
    ("HeteroPurifier T disagreeing with a VPScore", lambda: _vp_hetero(T=500),
     r"^T must be the score model's schedule length 1000"),
    ("HeteroPurifier t_l off the grid", lambda: HeteroPurifier(gaussian, None, mask="all", t_l=45, t_s=20,
                                                                grid_steps=100), r"^t_l must be on the grid"),
    ("DiffPurePurifier t_star=2", lambda: DiffPurePurifier(gaussian, t_star=2.0), r"^t_star must be"),
    ("PurifiedClassifier std=0", lambda: PurifiedClassifier(Purifier(gaussian, CFG), classifier_net(), std=[0.0]),
     r"std"),
    ("PurifiedClassifier mean of 3 for 1-channel images",
     lambda: PurifiedClassifier(Purifier(gaussian, CFG), classifier_net(), mean=[0.5, 0.5, 0.5])(good()),
     r"^mean must have 1 or 1 entries \(the images' channels\), got 3"),
    ("PurifiedClassifier whose classifier takes 3 channels",
     lambda: PurifiedClassifier(Purifier(gaussian, CFG), SmallCNN(3, 10, 4, 8))(good()),
     r"the purified x has C=1 channels but the classifier model takes C=3"),
    ("PurifyConfig sam_radius=4 (linf)", lambda: PurifyConfig(sam_radius=4), r"^sam_radius must be <= 1.*4/255"),
    ("HeteroPurifier.make_noise of an (H, W) shape",
     lambda: HeteroPurifier(gaussian, None, mask="all", **HETERO).make_noise((8, 8)),
     r"^image_shape must be \(C, H, W\)"),
    ("HeteroPurifier.mask of uint8 images",
     lambda: HeteroPurifier(score_net(), classifier_net(), **HETERO).mask((good() * 255).byte()),
     r"^x must be a floating-point tensor .*/ 255"),
]


@pytest.mark.parametrize("entry", ["purify", "Purifier", "Purifier-full"])
def test_score_through_parameters_only_is_named(entry):
    """An output that needs a gradient through a parameter but not through y: the loops that
    differentiate the score with respect to y name it (instead of torch's "appears to not have
    been used in the graph")."""
    w = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match=r"^score returned a tensor that does not depend on its input y"):
        PURIFIERS[entry](lambda y, s: w.expand_as(y) * 1.0)(good().requires_grad_(True))


class DropoutScore(nn.Module):
    """A score left in training mode with Dropout: random on every call."""

    def __init__(self):
        super().__init__()
        self.drop, self.net = nn.Dropout(0.1), score_net()

    def forward(self, y, sigma):
        return self.net(self.drop(y), sigma)


@pytest.mark.parametrize("entry", ["purify", "Purifier", "ADPPurifier", "HeteroPurifier"])
def test_score_in_training_mode_warns(entry):
    with pytest.warns(RuntimeWarning, match=r"score is in training mode with Dropout.*call score\.eval\(\)"):
        PURIFIERS[entry](DropoutScore())(good())


def _vp_hetero(**kw):
    from pursamere_fast.scores import VPScore

    ac = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    return HeteroPurifier(VPScore(lambda x, t: torch.zeros_like(x), ac), None, mask="all", **HETERO, **kw)


@pytest.mark.parametrize("case, call, fragment", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_hostile_options(case, call, fragment):
    with pytest.raises(ValueError) as info:
        call()
    assert re.search(fragment, str(info.value)), str(info.value)


def test_linf_rho_one_stays_legal_for_an_unconstrained_search():
    assert PurifyConfig(rho=1).rho == 1.0 and PurifyConfig(rho=16, norm="l2").rho == 16.0
    assert_purified(purify(good(), gaussian, CFG, rho=1.0), good())


def uint8_data():
    """A --data factory that hands the harness uint8 images."""
    return torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.long)


CLI_CASES = [
    (["evaluate", "--data", "test_hostile_matrix:uint8_data"], "--data", r"uint8.*x\.float\(\) / 255"),
    (["evaluate", "--pursamere", "rho=16"], "--pursamere", r"rho must be <= 1 for norm='linf'.*/255"),
    (["evaluate", "--pursamere", "rho=nan"], "--pursamere", r"rho must be a finite number"),
    (["evaluate", "--defences", "adp", "--adp", "steps=0"], "--adp", r"steps must be an integer >= 1"),
    (["evaluate", "--defences", "hetero", "--hetero", "tau=2"], "--hetero", r"tau must be"),
    (["evaluate", "--mean", "0.5", "--std", "0"], "--std", r""),
]


@pytest.mark.parametrize("argv, option, fragment", CLI_CASES, ids=[" ".join(a) for a, _, _ in CLI_CASES])
def test_cli_evaluate_hostile_options(argv, option, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--out", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pursamere-fast evaluate: error: argument {option}: "), err
    assert re.search(fragment, lines[0]), lines[0]
    assert not (tmp_path / "o").exists()


def test_score_error_names_a_device_mismatch():
    # No second device here: the message torch gives for one, as the boundary would see it.
    error = RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 "
                         "and cpu!")
    named = checks.score_error(error, "score", good())
    assert isinstance(named, ModelInputError)
    assert re.search(r"^x is on cpu but the score model is elsewhere .*model\.to\(x\.device\)", str(named))
    assert checks.score_error(torch.OutOfMemoryError("CUDA out of memory"), "score", good()) is None
    assert checks.score_error(KeyError("k"), "score", good()) is None


# --- property-based ---------------------------------------------------------------------------

# Cheap entry points for many draws (the "full" paths are covered by the cases above).
PROPERTY_ENTRIES = ["purify", "Purifier", "ADPPurifier", "HeteroPurifier", "DiffPurePurifier"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int64]
RANGES = ["unit", "x255", "normalised", "nan", "inf", "edges"]


@st.composite
def hostile_images(draw):
    b = draw(st.integers(0, 3))
    c = draw(st.sampled_from([1, 3]))
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    layout = draw(st.sampled_from(["nchw", "nhwc", "chw"]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(RANGES))
    seed = draw(st.integers(0, 2**16))
    x = torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "x255":
        x = x * 255
    elif kind == "normalised":
        x = (x - 0.5) / 0.25
    elif kind == "edges":
        x = (x > 0.5).double()
    elif kind in ("nan", "inf") and x.numel():
        flat = x.view(-1)
        flat[draw(st.integers(0, flat.numel() - 1))] = float("nan") if kind == "nan" else float("-inf")
    if layout == "nhwc":
        x = x.permute(0, 2, 3, 1)
    elif layout == "chw" and b:
        x = x[0]
    if not dtype.is_floating_point and kind in ("nan", "inf"):
        kind = "unit"  # an integer tensor cannot hold NaN
        x = torch.nan_to_num(x, nan=0.0, neginf=0.0)
    x = x.to(dtype)
    return x, dict(b=b, c=c, layout=layout, kind=kind, dtype=dtype)


def acceptable(x, info) -> bool:
    """Whether the input is one a purifier must purify (every other input is refused): by its
    shape and values, not by how it was drawn (a permuted 1 x 1 image is a valid (B, C, H, W)
    one, a "normalised" pixel may land in [0, 1])."""
    if x.dim() != 4 or not x.is_floating_point() or x.numel() == 0:
        return False
    if x.shape[1] > 4 and x.shape[2] > 4 and x.shape[3] in (1, 3, 4):  # channels-last
        return False
    v = x.double()
    return bool(torch.isfinite(v).all()) and float(v.min()) >= -1e-6 and float(v.max()) <= 1 + 1e-6


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entry=st.sampled_from(PROPERTY_ENTRIES), drawn=hostile_images(), conv=st.booleans())
def test_property_named_error_or_purified_images(entry, drawn, conv):
    """Random shapes, dtypes, ranges, layouts, NaN/Inf positions (CPU; see below for devices):
    a ValueError naming the images (or the model that cannot take them), or images that are
    finite, in [0, 1], of the input's shape and dtype."""
    x, info = drawn
    score = score_net() if conv else gaussian
    purifier = PURIFIERS[entry](score)
    try:
        out = purifier(x)
    except ValueError as e:
        message = str(e)
        assert re.match(r"(x|x_adv) (must|contains|has C=)", message) or "model" in message, message
        # A valid input is refused only when the score model cannot take its channels.
        assert not acceptable(x, info) or (conv and x.shape[1] != 1), message
        return
    assert acceptable(x, info), f"accepted {info}"
    assert_purified(out, x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("entry", PROPERTY_ENTRIES)
def test_devices(entry, device):
    """Images and score on the device: purified on it; images on the CPU with a score elsewhere
    (when there is a second device): a ModelInputError naming both."""
    score = score_net().to(device)
    x = good().to(device)
    assert_purified(PURIFIERS[entry](score)(x), x)
    if device != "cpu":
        with pytest.raises(ModelInputError, match="is on cpu but the score model is elsewhere"):
            PURIFIERS[entry](score)(good())


def test_nan_position_does_not_matter_and_is_named():
    for index in [(0, 0, 0, 0), (1, 0, 7, 7), (0, 0, 4, 2)]:
        with pytest.raises(ValueError, match=re.escape(f"the first at index {index}")):
            ADPPurifier(gaussian)(with_value(good(), index, math.nan))
    assert np.isnan(with_value(good(), (1, 0, 7, 7), math.nan).numpy()).sum() == 1


def test_torchattacks_set_normalization_used_names_purified_classifier():
    """torchattacks normalises before calling the model: the purifier then sees normalised images,
    and the message says to normalise inside the PurifiedClassifier instead."""
    torchattacks = pytest.importorskip("torchattacks", reason="install with `pip install --no-deps torchattacks`")
    model = PurifiedClassifier(Purifier(score_net(), CFG, grad_mode="bpda"), classifier_net())
    attack = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=1)
    attack.set_normalization_used(mean=[0.2860], std=[0.3530])
    with pytest.raises(ValueError, match=r"PurifiedClassifier\(purifier, classifier, mean=.*set_normalization_used"):
        attack(good(), torch.tensor([0, 1]))
    fixed = torchattacks.PGD(PurifiedClassifier(Purifier(score_net(), CFG, grad_mode="bpda"), classifier_net(),
                                                mean=[0.2860], std=[0.3530]), eps=8 / 255, alpha=2 / 255, steps=1)
    assert_purified(fixed(good(), torch.tensor([0, 1])), good())
