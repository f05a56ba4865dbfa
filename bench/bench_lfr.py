"""Cost of one training step of SmallCNN (softplus, width 32, batch 128, 28x28x1) per regulariser
(SPEC 10), relative to a plain cross-entropy step.

    python -m pytest bench/bench_lfr.py --benchmark-only

Network passes per step (F: forward, B: backward, each over the whole batch; k inner steps):
- none: 1F + 1B.
- gradpen: 2F (penalty, CE), a B with create_graph for the input gradient, then the
  training backward through it: a double backward.
- lfr: k times (1F, 1B with create_graph, a double backward to x'), then gradpen's passes at x'.
- pgd-at: k times (1F + 1B to x), then 1F + 1B.
Measured at k = 10 (CPU, 1 thread, a shared 2-core machine; plain step 0.4-0.8 s): gradpen
3.6x, lfr 17-24x, pgd-at 8x a plain step; an lfr inner step costs about twice a PGD one.

Each regulariser's step is timed with a plain step of a second copy of the model run before
every round (untimed, in the same process, so both see the same machine load); extra_info holds
cost_vs_plain = t_step / t_plain and images/s.
"""

import statistics
import time

import pytest
import torch
from conftest import TINY, synced

from pursamere_fast.nets import SmallCNN
from pursamere_fast.train import RegulariserConfig

BATCH, WIDTH, SIDE = (8, 4, 8) if TINY else (128, 32, 28)
STEPS = 2 if TINY else 10  # SPEC 10's CIFAR-10 setting; the trainer's default
ROUNDS = 1 if TINY else 5
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
REGULARISERS = ("none", "gradpen", "lfr", "pgd-at")


def make_step(name, device):
    """A zero-argument function doing one SGD step with regulariser `name` on a fixed batch."""
    torch.manual_seed(0)
    model = SmallCNN(1, 10, WIDTH, SIDE, activation="softplus").to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, SIDE, SIDE, generator=gen).to(device)
    y = (torch.arange(BATCH) % 10).to(device)
    reg = RegulariserConfig(name, eps=0.1, alpha=0.01, steps=STEPS, lam=0.02)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        loss = reg.loss(model, x, y, torch.Generator().manual_seed(0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return synced(step, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", REGULARISERS)
def test_regulariser_step(benchmark, name, device):
    """One step with `name`, timed in alternation with a plain step of an identical model."""
    device = torch.device(device)
    step, plain = make_step(name, device), make_step("none", device)
    step()  # allocate the optimiser state and warm up outside the timing
    plain()
    plain_times = []

    def setup():
        t0 = time.perf_counter()
        plain()
        plain_times.append(time.perf_counter() - t0)

    benchmark.pedantic(step, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    benchmark.extra_info.update(regulariser=name, device=str(device), batch=BATCH, width=WIDTH,
                                inner_steps=STEPS if name in ("lfr", "pgd-at") else 0,
                                threads=torch.get_num_threads(), t_plain_s=statistics.median(plain_times))
    if benchmark.stats is not None:  # None under --benchmark-disable
        t = benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=BATCH / t, cost_vs_plain=t / statistics.median(plain_times))
