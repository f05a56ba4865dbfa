"""Cost of one training step of SmallCNN (width 32, batch 128, 28x28x1) per optimiser (SPEC 9).

    python -m pytest bench/bench_optim.py --benchmark-only

Network passes per step (F: forward, B: backward, each over the whole batch):
- SGD: 1F + 1B.
- SAM: 2F + 2B (gradient at w; gradient at w + e).
- ImbSAM: 2F + 3B (one forward at w, a backward each for L_H and L_T through it; forward and
  backward of L_T at w + e_T).
- SSE-SAM phase 1 (rho_H > 0): 3F + 4B (ImbSAM's, plus forward and backward of L_H at
  w + e_H); phase 2 (rho_H = 0, from epoch gamma * T) is ImbSAM: 2F + 3B.
With B ~ 2F a step costs about 1, 2, 2.7 and 3.7 SGD steps.

Each optimiser's step is timed with an SGD step of a second copy of the model run before every
round (untimed, in the same process, so both see the same machine load); extra_info holds
cost_vs_sgd = t_step / t_sgd, images/s and the pass counts.
"""

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, synced

from pursamere_fast.nets import SmallCNN
from pursamere_fast.optim import SAM, SSESAM, ImbSAM

BATCH, WIDTH, SIDE = (8, 4, 8) if TINY else (128, 32, 28)
ROUNDS = 1 if TINY else 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (forwards, backwards) per step.
PASSES = {"sgd": (1, 1), "sam": (2, 2), "imbsam": (2, 3), "ssesam": (3, 4), "ssesam_phase2": (2, 3)}
TAIL = 4  # classes 4..9 are tail, as in the Fashion-MNIST-LT benchmark (eta = 1000)


def make_step(name, device):
    """A zero-argument function doing one optimiser step on a fixed batch."""
    torch.manual_seed(0)
    model = SmallCNN(1, 10, WIDTH, SIDE).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, SIDE, SIDE, generator=gen).to(device)
    y = (torch.arange(BATCH) % 10).to(device)
    tail = y >= TAIL
    base = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    if name == "sgd":
        def step():
            base.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            base.step()
        return synced(step, device)
    if name == "sam":
        opt = SAM(base, rho=0.05)
        return synced(lambda: opt.step(lambda: F.cross_entropy(model(x), y)), device)
    opt = {"imbsam": lambda: ImbSAM(base, rho=0.1), "ssesam": lambda: SSESAM(base, 0.05, 0.1),
           "ssesam_phase2": lambda: SSESAM(base, 0.0, 0.1)}[name]()

    def closure():
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        return per_sample[~tail].sum() / BATCH, per_sample[tail].sum() / BATCH

    return synced(lambda: opt.step(closure), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PASSES))
def test_optimizer_step(benchmark, name, device):
    """One step of `name`, timed in alternation with an SGD step of an identical model."""
    device = torch.device(device)
    step, sgd = make_step(name, device), make_step("sgd", device)
    step()  # allocate the optimiser state and warm up outside the timing
    sgd()
    sgd_times = []

    def setup():
        t0 = time.perf_counter()
        sgd()
        sgd_times.append(time.perf_counter() - t0)

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    forwards, backwards = PASSES[name]
    benchmark.extra_info.update(optimizer=name, device=str(device), batch=BATCH, width=WIDTH,
                                threads=torch.get_num_threads(), forwards=forwards, backwards=backwards,
                                t_sgd_s=statistics.median(sgd_times))
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=BATCH / t, cost_vs_sgd=t / statistics.median(sgd_times))
