"""diffusers models through `from_diffusers` / `load_diffusers` (SPEC 11), on tiny random UNets.

The expected values are diffusers' own conventions written out here: a DDPM-family UNet at
integer timestep t predicts for x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps (x_0 in [-1, 1]); an
NCSN++ (ScoreSdeVe) UNet takes sigma as its timestep and returns the score of [0, 1] data.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the test extra: pip install -e '.[test]'")

import pursamere_fast as pf  # noqa: E402
from pursamere_fast.purifiers import ADPPurifier, DiffPurePurifier, HeteroPurifier  # noqa: E402
from pursamere_fast.scores import VEScore, VPScore, from_diffusers, load_diffusers  # noqa: E402


def tiny_unet(channels=1, size=8, fourier=False, seed=0):
    torch.manual_seed(seed)
    extra = dict(time_embedding_type="fourier", flip_sin_to_cos=False) if fourier else {}
    return diffusers.UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4, **extra).eval()


SCHEDULERS = [
    dict(beta_schedule="linear", prediction_type="epsilon"),
    dict(beta_schedule="scaled_linear", prediction_type="v_prediction"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample"),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon", num_train_timesteps=500),
    dict(beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("kind", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
@pytest.mark.parametrize("config", SCHEDULERS)
def test_from_diffusers_matches_diffusers_conventions_on_the_grid(kind, config):
    unet = tiny_unet().double()
    scheduler = kind(**config)
    score = from_diffusers(unet, scheduler)
    assert isinstance(score, VPScore) and score.model is unet
    ac = scheduler.alphas_cumprod.double()
    last = scheduler.config.num_train_timesteps - (2 if scheduler.config.rescale_betas_zero_snr else 1)
    t = torch.tensor([0, 7, 123, last])
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=g)
    a = ac[t].view(-1, 1, 1, 1)
    f = unet(x_t, t).sample
    eps = {"epsilon": f, "v_prediction": a.sqrt() * f + (1 - a).sqrt() * x_t,
           "sample": (x_t - a.sqrt() * f) / (1 - a).sqrt()}[config["prediction_type"]]
    sigma = ((1 - ac[t]) / ac[t]).sqrt() / 2  # [0, 1]-space level of t
    y = (x_t / a.sqrt() + 1) / 2
    expected = -eps / sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(score(y, sigma), expected, rtol=1e-7, atol=1e-9)


def test_score_sde_ve_unet_takes_sigma_and_returns_the_score():
    unet = tiny_unet(fourier=True).double()
    score = from_diffusers(unet, diffusers.ScoreSdeVeScheduler())
    assert isinstance(score, VEScore) and score.data_range == (0.0, 1.0)
    y = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 5.0], dtype=torch.float64)
    torch.testing.assert_close(score(y, sigma), unet(y, sigma).sample, rtol=0, atol=0)


def test_from_diffusers_refuses_what_it_cannot_convert():
    unet = tiny_unet()
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, diffusers.DDPMScheduler(prediction_type="flow_prediction"))
    with pytest.raises(ValueError, match="scheduler must be"):
        from_diffusers(unet, diffusers.FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="unet"):
        from_diffusers("unet", diffusers.DDPMScheduler())


def test_load_diffusers_reads_a_saved_pipeline_and_a_model_folder(tmp_path):
    unet, scheduler = tiny_unet(), diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                            prediction_type="v_prediction")
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp_path / "pipe")
    unet.save_pretrained(tmp_path / "model")
    scheduler.save_pretrained(tmp_path / "model")
    y, sigma = torch.rand(2, 1, 8, 8), torch.tensor([0.05, 0.2])
    expected = from_diffusers(unet, scheduler)(y, sigma)
    for folder in (tmp_path / "pipe", tmp_path / "model"):
        loaded = load_diffusers(folder)
        assert loaded.prediction == "v_prediction" and not loaded.model.training
        torch.testing.assert_close(loaded(y, sigma), expected, rtol=0, atol=0)


def test_load_diffusers_never_reaches_the_network(tmp_path):
    with pytest.raises(ValueError, match="local folder"):
        load_diffusers("google/ddpm-cifar10-32")
    tiny_unet().save_pretrained(tmp_path / "lonely")
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load_diffusers(tmp_path / "lonely")


@pytest.mark.numerics
def test_full_gradient_through_attention_matches_finite_differences():
    """grad_mode="full" differentiates through the score's input-gradient (double backward
    through the UNet's attention, which the CPU flash kernel cannot do): float64 against central
    finite differences along random directions."""
    score = from_diffusers(tiny_unet().double(), diffusers.DDPMScheduler())
    cfg = pf.PurifyConfig(sigmas=(0.1, 0.05), steps_per_sigma=1, n_samples=1, rho=1.0, lr_max=0.01, lr_min=0.005,
                          sam_radius=0.0)
    purifier = pf.Purifier(score, cfg, grad_mode="full")
    g = torch.Generator().manual_seed(0)
    x = (0.3 + 0.4 * torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)

    def loss(z):
        return (purifier(z) * w).sum()

    (grad,) = torch.autograd.grad(loss(x), x)
    assert grad.abs().sum() > 0
    h = 1e-5
    for _ in range(3):
        d = torch.randn(x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
        assert torch.allclose((grad * d).sum(), fd, rtol=1e-5, atol=1e-8), ((grad * d).sum(), fd)


def test_every_purifier_runs_on_a_diffusers_model():
    score = from_diffusers(tiny_unet(), diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    x = torch.rand(2, 1, 8, 8)
    cfg = pf.PurifyConfig(sigmas=(0.1, 0.05), steps_per_sigma=1, n_samples=2, rho=8 / 255, sam_radius=2 / 255)
    outs = [pf.purify(x, score, cfg), pf.Purifier(score, cfg, grad_mode="bpda")(x),
            ADPPurifier(score, sigma=0.1, noise_std=0.1, steps=2)(x),
            DiffPurePurifier(score, t_star=0.05, steps=3)(x), DiffPurePurifier(score, steps=2, method="ode")(x)]
    from pursamere_fast.nets import SmallCNN

    classifier = SmallCNN(1, 10, 4, 8).eval()
    outs.append(HeteroPurifier(score, classifier, t_l=20, t_s=10, resample_steps=1, grid_steps=100)(x))
    for out in outs:
        assert out.shape == x.shape and out.dtype == x.dtype
        assert bool(torch.isfinite(out).all()) and float(out.min()) >= 0 and float(out.max()) <= 1
        assert not torch.equal(out, x)


def test_a_bf16_model_runs_in_its_dtype_and_comes_back_in_the_loops():
    unet = tiny_unet()
    scheduler = diffusers.DDPMScheduler()
    y, sigma = torch.rand(2, 1, 8, 8), torch.tensor([0.05, 0.2])
    low = from_diffusers(tiny_unet().to(torch.bfloat16), scheduler)
    with torch.no_grad():
        expected, out = from_diffusers(unet, scheduler)(y, sigma), low(y, sigma)
    assert out.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the output's scale.
    assert float((out - expected).abs().max()) < 0.05 * float(expected.abs().max())
    cfg = pf.PurifyConfig(sigmas=(0.1,), steps_per_sigma=2, n_samples=1)
    assert pf.purify(y, low, cfg).dtype == torch.float32
