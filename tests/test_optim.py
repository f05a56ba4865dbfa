"""SAM, ImbSAM and SSE-SAM (SPEC 9) against a plain two-pass float64 reference on a tiny MLP.

The reference below is written out: explicit weights, autograd.grad for each gradient, the
ascent w + rho g / ||g|| with one norm over all weights, and SGD / Adam updates by hand with
torch's semantics. Where the arithmetic is the same (rho = 0, lr = 0, reruns, resumption) the
comparison is bitwise.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pursamere_fast.optim import SAM, SSESAM, ImbSAM, stage_rho_head

pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_thread")]

DT = torch.float64
TAIL = 2  # classes 0 and 1 are head, 2 is tail
# Each batch holds head and tail samples.
LABELS = [[0, 1, 2, 0, 1, 2], [1, 1, 0, 2, 0, 1], [2, 0, 1, 1, 0, 0]]
SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-3)
ADAM = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3)
# Radii large enough that the perturbed updates differ clearly from the plain ones.
RADII = {"sam": dict(rho=0.2), "imbsam": dict(rho=0.3), "ssesam": dict(rho_head=0.15, rho_tail=0.3)}
WRAPPERS = {"sam": SAM, "imbsam": ImbSAM, "ssesam": SSESAM}


def make_model(device="cpu"):
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT))
    return model.to(device)


def batches(device="cpu", labels=LABELS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(len(y), 4, generator=g, dtype=DT).to(device), torch.tensor(y, device=device))
            for y in labels]


def make_opt(kind, model, base="sgd", **radii):
    b = (torch.optim.SGD(model.parameters(), **SGD) if base == "sgd"
         else torch.optim.Adam(model.parameters(), **ADAM))
    return WRAPPERS[kind](b, **(radii or RADII[kind]))


def head_tail(per_sample, y):
    tail = y == TAIL
    return per_sample[~tail].sum() / len(y), per_sample[tail].sum() / len(y)


def make_closure(kind, model, x, y, outs=None, snaps=None):
    def closure():
        if snaps is not None:
            snaps.append([p.detach().clone() for p in model.parameters()])
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        out = per_sample.sum() / len(y) if kind == "sam" else head_tail(per_sample, y)
        if outs is not None:
            outs.append(out)
        return out
    return closure


def train(kind, base="sgd", steps=3, model=None, opt=None, device="cpu", **radii):
    model = make_model(device) if model is None else model
    opt = make_opt(kind, model, base, **radii) if opt is None else opt
    for x, y in batches(device)[:steps]:
        opt.step(make_closure(kind, model, x, y))
    return model, opt


def assert_bitwise(a, b):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"tensor {i}: max |diff| {(p - q).abs().max().item():.3g}"


# ------------------------------------------------------------------------------------------
# The reference: explicit weights [W1, b1, W2, b2], float64, two passes per perturbed group.

def ref_losses(w, x, y):
    """(L, L_H, L_T) with L_H = sum_head l_i / B and L_T = sum_tail l_i / B."""
    logits = torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]
    per_sample = -torch.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    tail = y == TAIL
    return per_sample.sum() / len(y), per_sample[~tail].sum() / len(y), per_sample[tail].sum() / len(y)


def ref_grad(which, w, x, y):
    w = [t.detach().requires_grad_() for t in w]
    return list(torch.autograd.grad(ref_losses(w, x, y)[which], w))


def ref_ascend(w, g, rho):
    norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
    return w if rho == 0 or norm == 0 else [wi + rho * gi / norm for wi, gi in zip(w, g)]


def ref_update_gradient(kind, w, x, y, rho=0.0, rho_head=0.0, rho_tail=0.0):
    L, H, T = 0, 1, 2
    if kind == "sam":
        return ref_grad(L, ref_ascend(w, ref_grad(L, w, x, y), rho), x, y)
    if kind == "imbsam":
        rho_head, rho_tail = 0.0, rho
    gh = ref_grad(H, ref_ascend(w, ref_grad(H, w, x, y), rho_head), x, y)
    gt = ref_grad(T, ref_ascend(w, ref_grad(T, w, x, y), rho_tail), x, y)
    return [a + b for a, b in zip(gh, gt)]


def ref_base_step(base, w, g, state):
    """torch.optim.SGD / Adam (L2 weight decay, no nesterov/amsgrad), one step, by hand."""
    if base == "sgd":
        d = [gi + SGD["weight_decay"] * wi for wi, gi in zip(w, g)]
        buf = d if "buf" not in state else [SGD["momentum"] * b + di for b, di in zip(state["buf"], d)]
        state["buf"] = buf
        return [wi - SGD["lr"] * b for wi, b in zip(w, buf)]
    b1, b2 = ADAM["betas"]
    t = state["t"] = state.get("t", 0) + 1
    d = [gi + ADAM["weight_decay"] * wi for wi, gi in zip(w, g)]
    m = state["m"] = [b1 * mi + (1 - b1) * di for mi, di in zip(state.get("m", [0] * 4), d)]
    v = state["v"] = [b2 * vi + (1 - b2) * di * di for vi, di in zip(state.get("v", [0] * 4), d)]
    step_size = ADAM["lr"] / (1 - b1 ** t)
    denom = [torch.sqrt(vi) / (1 - b2 ** t) ** 0.5 + ADAM["eps"] for vi in v]
    return [wi - step_size * mi / di for wi, mi, di in zip(w, m, denom)]


def ref_train(kind, base, device, steps=3, **radii):
    w = [p.detach().clone() for p in make_model(device).parameters()]
    state, losses = {}, []
    for x, y in batches(device)[:steps]:
        losses.append(ref_losses(w, x, y))
        w = ref_base_step(base, w, ref_update_gradient(kind, w, x, y, **radii), state)
    return w, losses


# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam"])
def test_step_matches_two_pass_reference(kind, base, device):
    model = make_model(device)
    opt = make_opt(kind, model, base)
    forwards, returned = [], []
    for x, y in batches(device):
        outs = []
        returned.append(opt.step(make_closure(kind, model, x, y, outs)))
        assert returned[-1] is outs[0]  # what the closure returned at w, not at a perturbed point
        forwards.append(len(outs))
    # One forward at w, then one per perturbed group.
    assert forwards == [{"sam": 2, "imbsam": 2, "ssesam": 3}[kind]] * 3

    w_ref, losses_ref = ref_train(kind, base, device, **RADII[kind])
    torch.testing.assert_close(list(model.parameters()), w_ref, atol=1e-12, rtol=0)
    expected = [L if kind == "sam" else (H, T) for L, H, T in losses_ref]
    torch.testing.assert_close(returned, expected, atol=1e-12, rtol=0)
    # The perturbation matters: the plain (rho = 0) update is far from it.
    w_plain, _ = ref_train(kind, base, device)
    assert max((a - b).abs().max().item() for a, b in zip(w_ref, w_plain)) > 1e-4


@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam"])
def test_weights_restored_bitwise(kind, device):
    # lr = 0: the base step does not move w, so anything left of the perturbation shows.
    model = make_model(device)
    w0 = [p.detach().clone() for p in model.parameters()]
    base = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-3)
    # Large radii: w + e - e then differs from w in 11-18 of the 67 weights (1-5 at RADII).
    radii = {k: 20 * v for k, v in RADII[kind].items()}
    opt = WRAPPERS[kind](base, **radii)
    for x, y in batches(device)[:2]:
        snaps = []
        opt.step(make_closure(kind, model, x, y, snaps=snaps))
        assert_bitwise(snaps[0], w0)  # the first forward is at w
        assert all(not torch.equal(a, b) for a, b in zip(snaps[1], w0))  # the second is perturbed
        assert_bitwise(list(model.parameters()), w0)
    # Subtracting e back would not give w bitwise here, so this test can tell.
    which, rho = {"sam": (0, "rho"), "imbsam": (2, "rho"), "ssesam": (1, "rho_head")}[kind]
    g = ref_grad(which, w0, x, y)
    norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
    e = [radii[rho] * gi / norm for gi in g]
    assert any(not torch.equal((w + ei) - ei, w) for w, ei in zip(w0, e))


@pytest.mark.parametrize("empty_as", ["constant", "masked"])
@pytest.mark.parametrize("empty", ["tail", "head"])
@pytest.mark.parametrize("kind", ["imbsam", "ssesam"])
def test_group_without_samples(kind, empty, empty_as):
    """No perturbation, no NaN: the update is the other group's alone (SAM on it, or the plain
    step on L_H for ImbSAM)."""
    labels = [[0, 1, 1, 0], [1, 0, 0, 0]] if empty == "tail" else [[2, 2, 2], [2, 2, 2]]
    data = batches(labels=labels)

    def closure_for(model, x, y):
        def closure():
            per_sample = F.cross_entropy(model(x), y, reduction="none")
            head, tail = head_tail(per_sample, y)  # the empty one is a 0 with a zero gradient
            zero = torch.zeros((), dtype=DT)
            if empty_as == "constant":  # a 0 that does not require grad
                return (head, zero) if empty == "tail" else (zero, tail)
            return head, tail
        return closure

    model = make_model()
    opt = make_opt(kind, model, "adam")
    for x, y in data:
        ret = opt.step(closure_for(model, x, y))
        assert torch.isfinite(torch.stack(list(ret))).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())

    rho = {("imbsam", "tail"): 0.0, ("imbsam", "head"): RADII["imbsam"]["rho"],
           ("ssesam", "tail"): RADII["ssesam"]["rho_head"], ("ssesam", "head"): RADII["ssesam"]["rho_tail"]}
    expected = make_model()
    sam = make_opt("sam", expected, "adam", rho=rho[kind, empty])
    for x, y in data:
        group = 0 if empty == "tail" else 1
        sam.step(lambda x=x, y=y, group=group: head_tail(F.cross_entropy(expected(x), y, reduction="none"),
                                                            y)[group])
    assert_bitwise(list(model.parameters()), list(expected.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_ssesam_with_rho_head_zero_is_imbsam(base):
    rho_tail = RADII["imbsam"]["rho"]
    imb, _ = train("imbsam", base)
    sse_model = make_model()
    sse = make_opt("ssesam", sse_model, base, rho_head=0.05, rho_tail=rho_tail)
    sse.rho_head = stage_rho_head(epoch=7, epochs=10, rho_head=0.05, gamma=0.7)  # phase 2
    assert sse.rho_head == 0.0
    train("ssesam", base, model=sse_model, opt=sse)
    assert_bitwise(list(sse_model.parameters()), list(imb.parameters()))


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_sam_with_rho_zero_is_the_base_step(base):
    sam, _ = train("sam", base, rho=0.0)
    model = make_model()
    opt = make_opt("sam", model, base).base
    for x, y in batches():
        opt.zero_grad()
        (F.cross_entropy(model(x), y, reduction="none").sum() / len(y)).backward()
        opt.step()
    assert_bitwise(list(sam.parameters()), list(model.parameters()))


@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam"])
def test_deterministic(kind):
    (m1, o1), (m2, o2) = train(kind, "adam"), train(kind, "adam")
    assert_bitwise(list(m1.parameters()), list(m2.parameters()))
    s1, s2 = o1.state_dict()["state"], o2.state_dict()["state"]
    for i in s1:
        assert_bitwise([s1[i]["exp_avg"], s1[i]["exp_avg_sq"]], [s2[i]["exp_avg"], s2[i]["exp_avg_sq"]])


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["sam", "imbsam", "ssesam"])
def test_state_dict_round_trip(kind, base):
    data = batches()
    model = make_model()
    opt = make_opt(kind, model, base)
    for i, (x, y) in enumerate(data + data[:1]):
        if i == 2:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
        opt.step(make_closure(kind, model, x, y))

    resumed = make_model()
    resumed.load_state_dict(saved[0])
    opt2 = make_opt(kind, resumed, base, **{k: 0.0 for k in RADII[kind]})  # radii come from the state
    opt2.load_state_dict(saved[1])
    assert {k: getattr(opt2, k) for k in RADII[kind]} == RADII[kind]
    for x, y in (data + data[:1])[2:]:
        opt2.step(make_closure(kind, resumed, x, y))
    assert_bitwise(list(resumed.parameters()), list(model.parameters()))


def test_torch_optim_conventions():
    model = make_model()
    opt = make_opt("ssesam", model)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base.param_groups and opt.state is opt.base.state
    x, y = batches()[0]
    opt.step(make_closure("ssesam", model, x, y))
    assert all(p.grad is not None for p in model.parameters())  # the update gradient, as torch leaves it
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(make_closure("ssesam", model, x, y))
    sched.step()
    assert opt.base.param_groups[0]["lr"] == SGD["lr"] / 2
    opt.rho_tail = 0.0  # radii are attributes, changed between steps
    assert opt.state_dict()["sam"] == {"rho_head": RADII["ssesam"]["rho_head"], "rho_tail": 0.0}


def test_stage_rho_head():
    assert [stage_rho_head(e, 10, 0.05, 0.7) for e in range(10)] == [0.05] * 7 + [0.0] * 3
    assert [stage_rho_head(e, 3, 0.05, 0.5) for e in range(3)] == [0.05, 0.05, 0.0]  # from epoch 1.5 on
    assert stage_rho_head(0, 10, 0.05, 0.0) == 0.0 and stage_rho_head(9, 10, 0.05, 1.0) == 0.05


def _sgd():
    return torch.optim.SGD(make_model().parameters(), lr=0.1)


def _set(obj, name, value):
    setattr(obj, name, value)


@pytest.mark.parametrize("call, name", [
    (lambda: SAM(_sgd(), rho=-0.1), "rho"),
    (lambda: SAM(_sgd(), rho=float("nan")), "rho"),
    (lambda: ImbSAM(_sgd(), rho=float("inf")), "rho"),
    (lambda: SAM(_sgd(), rho="0.05"), "rho"),
    (lambda: SSESAM(_sgd(), rho_head=-1.0), "rho_head"),
    (lambda: SSESAM(_sgd(), rho_tail=float("inf")), "rho_tail"),
    (lambda: _set(SAM(_sgd()), "rho", -1.0), "rho"),
    (lambda: _set(SSESAM(_sgd()), "rho_tail", float("nan")), "rho_tail"),
    (lambda: SAM(make_model()), "base"),
    (lambda: SAM(list(make_model().parameters())), "base"),
    (lambda: ImbSAM(SAM(_sgd())), "base"),
    (lambda: SAM(_sgd()).step(None), "closure"),
    (lambda: SSESAM(_sgd()).step(None), "closure"),
    (lambda: ImbSAM(_sgd()).step(lambda: torch.zeros((), dtype=DT)), "closure"),
    (lambda: SAM(_sgd()).load_state_dict(_sgd().state_dict()), "state_dict"),
    (lambda: SAM(_sgd()).load_state_dict(SSESAM(_sgd()).state_dict()), "state_dict"),
    (lambda: stage_rho_head(-1, 10), "epoch"),
    (lambda: stage_rho_head(0, 0), "epochs"),
    (lambda: stage_rho_head(0, 10, gamma=1.5), "gamma"),
])
def test_bad_arguments_raise_value_error(call, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        call()
