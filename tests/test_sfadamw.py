"""lls.sfadamw: the schedulefree package's results, the paper's update, no host sync, shared checkpoints."""

from __future__ import annotations

import io
import math
from typing import ClassVar

import pytest
import schedulefree
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lls import LLSError
from lls.step.optim import OPTIMIZERS, create_optimizer, is_schedule_free
from lls.step.sfadamw import STEP_SCALARS, AdamWScheduleFree

SHAPES = [(7,), (3, 5), (2, 3, 4, 4), ()]
LATE_PARAM, LATE_STEPS = 1, 10  # this parameter has no gradient for its group's first steps
STEPS = 300
LOWER_LR_AT = 200
FLOAT32_ULP = torch.finfo(torch.float32).eps


def make_pair(ours_class=AdamWScheduleFree, ours_kwargs=None, dtype=torch.float32, seed=0, **kwargs):
    """The package's optimizer and ours on equal copies of the same parameters, two groups."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    pairs = []
    for cls, extra in ((schedulefree.AdamWScheduleFree, {}), (ours_class, ours_kwargs or {})):
        params = [t.clone().requires_grad_() for t in init]
        groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}]
        opt = cls(groups, lr=1e-2, **kwargs, **extra)
        opt.train()
        pairs.append((params, opt))
    return pairs


def feed(params_and_opts, grads, step):
    """Give every optimizer its own copy of the same gradients (steps overwrite .grad) and step."""
    for params, opt in params_and_opts:
        for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
            p.grad = None if (i == LATE_PARAM and step < LATE_STEPS) else grad.clone()
        opt.step()


def max_abs(tensors):
    return max(t.abs().max().item() for t in tensors)


def float32_bound(steps, params):
    """How far two float32 implementations of the same update may drift apart.

    Per step ours and the package differ in at most a few roundings of y and z (lerp vs sub-mul-add,
    alpha*grad fused vs scaled first): at most 2 ulp of the largest weight. With gradients fixed in
    advance the update is non-expansive in y and z (a convex combination plus the same increment;
    weight decay scales by 1 - lr*wd), so the differences at most add up: 2 ulp per step.
    """
    return 2 * steps * FLOAT32_ULP * max(1.0, max_abs(params))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"weight_decay": 0.1},
        {"weight_decay": 1.0},
        {"warmup_steps": 50},
        {"warmup_steps": 50, "weight_decay": 0.1},
        {"r": 0.5, "weight_lr_power": 1.0, "warmup_steps": 20},
    ],
    ids=["plain", "decay", "decay-1", "warmup", "warmup-decay", "r-power"],
)
def test_matches_schedulefree_package(options):
    (ref, ref_opt), (ours, opt) = pairs = make_pair(**options)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        feed(pairs, [torch.randn(s, generator=g) for s in SHAPES], step)
        if step == LOWER_LR_AT:  # lr_max must keep the larger lr; eager steps read the new one
            for _, o in pairs:
                o.param_groups[0]["lr"] *= 0.3
        if step == STEPS // 2:  # evaluate in the middle, then train on
            ref_opt.eval(), opt.eval()
            torch.testing.assert_close(ours, ref, rtol=0, atol=float32_bound(step + 1, ref))
            ref_opt.train(), opt.train()
    tol = float32_bound(STEPS, ref)
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)
    for p, q in zip(ref, ours, strict=True):
        # The second moment sees only the gradients: the same operations on the same inputs.
        assert torch.equal(opt.state[q]["exp_avg_sq"], ref_opt.state[p]["exp_avg_sq"])
        torch.testing.assert_close(opt.state[q]["z"], ref_opt.state[p]["z"], rtol=0, atol=tol)
    for ref_group, group in zip(
        ref_opt.state_dict()["param_groups"], opt.state_dict()["param_groups"], strict=True
    ):
        assert group["k"] == ref_group["k"] == STEPS
        for name in ("lr_max", "weight_sum", "scheduled_lr"):
            assert group[name] == pytest.approx(ref_group[name], rel=1e-12)  # float64 either way
    ref_opt.eval(), opt.eval()
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol)


def paper_reference(y0, target, curvature, steps, lr, betas, eps, decay, warmup, r, power, correction):
    """Schedule-free AdamW as the paper writes it (x, y, z kept apart), in Python floats.

    Minimises sum_i curvature_i (y_i - target_i)^2 / 2 elementwise. ``correction`` "moment":
    v / (1 - beta2^t) under the root; "lr": step size lr * sqrt(1 - beta2^t) and sqrt(v) + eps (the
    paper's Algorithm 1, and the LLS authors' copy). Returns y after each step and the final x, z.
    """
    beta1, beta2 = betas
    x, z, v = list(y0), list(y0), [0.0] * len(y0)
    lr_max, weight_sum, ys = 0.0, 0.0, []
    for t in range(1, steps + 1):
        y = [(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x, strict=True)]
        grad = [a * (yi - b) for a, yi, b in zip(curvature, y, target, strict=True)]
        v = [beta2 * vi + (1 - beta2) * gi * gi for vi, gi in zip(v, grad, strict=True)]
        gamma = lr * min(1.0, t / warmup if warmup else 1.0)
        if correction == "moment":
            u = [gi / (math.sqrt(vi / (1 - beta2**t)) + eps) for gi, vi in zip(grad, v, strict=True)]
        else:
            gamma *= math.sqrt(1 - beta2**t)
            u = [gi / (math.sqrt(vi) + eps) for gi, vi in zip(grad, v, strict=True)]
        z = [zi - gamma * (ui + decay * yi) for zi, ui, yi in zip(z, u, y, strict=True)]
        lr_max = max(lr_max, gamma)
        weight = t**r * lr_max**power
        weight_sum += weight
        c = weight / weight_sum
        x = [(1 - c) * xi + c * zi for xi, zi in zip(x, z, strict=True)]
        ys.append([(1 - beta1) * zi + beta1 * xi for zi, xi in zip(z, x, strict=True)])
    return ys, x, z


@pytest.mark.parametrize("correction", ["moment", "lr"])
def test_matches_paper_update_in_float64(correction):
    """A tiny quadratic, gradients taken at the optimizer's own y, against the paper's equations."""
    hyper = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3, decay=0.2, warmup=5, r=0.5, power=2.0)
    y0, target, curvature = [0.5, -1.0, 2.0, 0.25, -0.75], [1.0, 0.0, -1.0, 0.5, 2.0], [1, 3, 0.5, 2, 1]
    steps = 12
    ys, x, z = paper_reference(y0, target, curvature, steps, correction=correction, **hyper)
    params = [torch.tensor(y0[:3], dtype=torch.float64), torch.tensor(y0[3:], dtype=torch.float64)]
    params = [p.requires_grad_() for p in params]
    opt = AdamWScheduleFree(
        params, lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], weight_decay=hyper["decay"],
        warmup_steps=hyper["warmup"], r=hyper["r"], weight_lr_power=hyper["power"],
        bias_correction=correction,
    )  # fmt: skip
    opt.train()
    a, b = torch.tensor(curvature, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    for expected in ys:
        y = torch.cat([p.detach() for p in params])
        grads = (a * (y - b)).split([3, 2])
        for p, grad in zip(params, grads, strict=True):
            p.grad = grad.clone()
        opt.step()
        torch.testing.assert_close(
            torch.cat([p.detach() for p in params]).tolist(), expected, rtol=1e-12, atol=0
        )
    torch.testing.assert_close(torch.cat([opt.state[p]["z"] for p in params]).tolist(), z, rtol=1e-12, atol=0)
    opt.eval()
    torch.testing.assert_close(torch.cat([p.detach() for p in params]).tolist(), x, rtol=1e-12, atol=0)


def test_authors_variant_weights_the_average_by_bias_correction():
    """Issue 12 item 3: same z steps, but lr_max carries sqrt(1 - beta2^t), so the average tilts late.

    With eps = 0 both variants move z by lr * g / sqrt(v / (1 - beta2^t)). The package's average of
    z_1..z_t is uniform (w_t = lr^2); the authors' weighs z_i by lr_max_i^2 = lr^2 (1 - beta2^i).
    """
    beta2, steps, lr = 0.999, 40, 0.01
    params = {c: torch.linspace(-1, 1, 6, dtype=torch.float64).requires_grad_() for c in ("moment", "lr")}
    opts = {
        c: AdamWScheduleFree([p], lr=lr, eps=0.0, betas=(0.9, beta2), bias_correction=c)
        for c, p in params.items()
    }
    g = torch.Generator().manual_seed(2)
    zs = []
    for t in range(1, steps + 1):
        grad = torch.randn(6, generator=g, dtype=torch.float64)
        for c, opt in opts.items():
            opt.train()
            params[c].grad = grad.clone()
            opt.step()
        lr_moment, lr_authors = (opts[c].param_groups[0]["scheduled_lr"].item() for c in ("moment", "lr"))
        assert lr_authors / lr_moment == pytest.approx(math.sqrt(1 - beta2**t), rel=1e-12)
        z_moment, z_authors = (opts[c].state[params[c]]["z"] for c in ("moment", "lr"))
        torch.testing.assert_close(z_authors, z_moment, rtol=1e-12, atol=1e-14)
        zs.append(z_moment.clone())
    weights = torch.tensor([1 - beta2**i for i in range(1, steps + 1)], dtype=torch.float64)
    for opt in opts.values():
        opt.eval()
    zs = torch.stack(zs)
    torch.testing.assert_close(params["moment"].detach(), zs.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(params["lr"].detach(), weights @ zs / weights.sum(), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(params["lr"], params["moment"], rtol=1e-3, atol=0)


class HostReadGuard(TorchDispatchMode):
    """Fails on every operation that brings a tensor's value to the host or host data to a tensor."""

    FORBIDDEN: ClassVar = {
        torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), bool(t), if t: ...
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.equal.default,
        torch.ops.aten.lift_fresh.default,  # torch.tensor(python data): a host-to-device copy
        torch.ops.aten.lift_fresh_copy.default,
    }

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"step() called {func}: a host-device synchronisation")
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("correction", ["moment", "lr"])
def test_step_reads_no_tensor_value_on_the_host(correction):
    """After the first (state-creating) step, as a CUDA graph would be captured."""
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    opt = AdamWScheduleFree(params, weight_decay=0.1, warmup_steps=3, r=1.0, bias_correction=correction)
    opt.train()
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        if step == 0:
            opt.step()
            continue
        with HostReadGuard() as guard:
            opt.step()
        assert {"_foreach_mul_", "_foreach_sub_", "pow", "maximum"} <= guard.ops  # the guard saw the step


def test_step_runs_on_meta_tensors():
    """Meta tensors have no values: any branch on a value, or .item(), would raise."""
    params = [torch.empty(s, device="meta").requires_grad_() for s in SHAPES]
    opt = AdamWScheduleFree(params, weight_decay=0.1, warmup_steps=3, bias_correction="lr")
    opt.train()
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    opt.eval()
    assert opt.param_groups[0]["k"].device.type == "meta"
    assert opt.state[params[2]]["z"].shape == SHAPES[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to capture a CUDA graph")
def test_step_replays_in_a_cuda_graph():
    """Eager steps that never sync, then one step captured and replayed: the package's results."""
    steps, eager_steps = 60, 3
    init = [torch.randn(s, device="cuda") for s in SHAPES]
    ref = [t.clone().requires_grad_() for t in init]
    ours = [t.clone().requires_grad_() for t in init]
    ref_opt = schedulefree.AdamWScheduleFree(ref, lr=1e-2, weight_decay=0.1, warmup_steps=20)
    opt = AdamWScheduleFree(ours, lr=1e-2, weight_decay=0.1, warmup_steps=20)
    ref_opt.train(), opt.train()
    for p in ours:
        p.grad = torch.zeros_like(p)  # static gradient buffers, refilled before every step
    grads = [[torch.randn(s, device="cuda") for s in SHAPES] for _ in range(steps)]

    def load(step):
        for p, q, grad in zip(ref, ours, grads[step], strict=True):
            p.grad = grad.clone()
            q.grad.copy_(grad)

    side = torch.cuda.Stream()  # warm-up before capture runs on a side stream, as torch asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(eager_steps):
            load(step)
            ref_opt.step()
            if step > 0:  # the first step creates the state (host-to-device copies of the scalars)
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()  # recorded, not run
    for step in range(eager_steps, steps):
        load(step)
        ref_opt.step()
        graph.replay()
    torch.cuda.synchronize()
    assert opt.state_dict()["param_groups"][0]["k"] == steps  # the count advanced on the device
    torch.testing.assert_close(ours, ref, rtol=0, atol=float32_bound(steps, ref))
    ref_opt.eval(), opt.eval()
    torch.testing.assert_close(ours, ref, rtol=0, atol=float32_bound(steps, ref))


@pytest.mark.parametrize("direction", ["package-to-ours", "ours-to-package"])
def test_state_dict_loads_across_implementations(direction):
    """Save in eval mode (as the package asks), load into the other implementation, train on alike."""
    pairs = make_pair(weight_decay=0.1, warmup_steps=10)
    if direction == "ours-to-package":
        pairs = pairs[::-1]
    (src, src_opt), (dst, dst_opt) = pairs
    g = torch.Generator().manual_seed(3)
    for step in range(40):
        feed(pairs[:1], [torch.randn(s, generator=g) for s in SHAPES], step)
    src_opt.eval()
    buffer = io.BytesIO()
    torch.save(src_opt.state_dict(), buffer)
    buffer.seek(0)
    with torch.no_grad():
        for p, q in zip(src, dst, strict=True):
            q.copy_(p)
    dst_opt.load_state_dict(torch.load(buffer, weights_only=True))  # plain numbers and tensors only
    src_opt.train(), dst_opt.train()
    torch.testing.assert_close(dst, src, rtol=0, atol=0)
    for step in range(40, 80):
        feed(pairs, [torch.randn(s, generator=g) for s in SHAPES], step)
    torch.testing.assert_close(dst, src, rtol=0, atol=float32_bound(80, src))
    assert dst_opt.state_dict()["param_groups"][1]["k"] == 80
    fresh = [
        cls([torch.zeros(1, requires_grad=True)])
        for cls in (schedulefree.AdamWScheduleFree, AdamWScheduleFree)
    ]
    ref_keys, our_keys = (set(o.state_dict()["param_groups"][0]) for o in fresh)
    assert our_keys - ref_keys == {"bias_correction"} and ref_keys <= our_keys  # the package's format


def test_registry_names_and_engines():
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert type(create_optimizer("adamw-sf", params, 1e-3)) is schedulefree.AdamWScheduleFree  # bit-for-bit
    authors = create_optimizer("adamw-sf-authors", params, 1e-3, 0.1)
    capturable = create_optimizer("adamw-sf", params, 1e-3, capturable=True)
    for opt, correction in ((authors, "lr"), (capturable, "moment")):
        assert isinstance(opt, AdamWScheduleFree) and opt.defaults["bias_correction"] == correction
        assert is_schedule_free(opt)
    assert "adamw-sf-authors" in OPTIMIZERS
    with pytest.raises(LLSError, match=r"unknown capturable optimizer 'sgd-sf'.*adamw-sf"):
        create_optimizer("sgd-sf", params, 1e-3, capturable=True)
    with pytest.raises(LLSError, match=r"unknown optimizer 'nope'.*sgd-sf"):
        create_optimizer("nope", params, 1e-3, capturable=True)


def test_bad_use_fails_naming_the_fix():
    with pytest.raises(LLSError, match=r"bias_correction 'x'.*moment, lr"):
        AdamWScheduleFree([torch.nn.Parameter(torch.zeros(2))], bias_correction="x")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = AdamWScheduleFree([p])  # starts in eval mode, like the package
    p.grad = torch.ones(2)
    with pytest.raises(LLSError, match=r"call optimizer.train\(\)"):
        opt.step()


def test_iterate_weighting_power_r_1_matches_the_package():
    """r = 1: iterate t enters the average with weight t * lr_max^2 (the package's c_t)."""
    pairs = make_pair(r=1.0, warmup_steps=5)
    g = torch.Generator().manual_seed(4)
    steps = 30
    for step in range(steps):
        feed(pairs, [torch.randn(s, generator=g) for s in SHAPES], step)
    (ref, ref_opt), (ours, opt) = pairs
    ref_opt.eval(), opt.eval()
    torch.testing.assert_close(ours, ref, rtol=0, atol=float32_bound(steps, ref))


def test_a_group_mixing_dtypes_is_refused_naming_the_fix():
    params = [torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.float64, requires_grad=True)]
    opt = AdamWScheduleFree(params)
    opt.train()
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(
        LLSError, match=r"^schedule-free AdamW needs one device and dtype per parameter group; split"
    ):
        opt.step()


def test_a_fresh_optimizer_has_the_packages_defaults_and_state_dict():
    """Built with no arguments, both give the same group entries (ours adds only its variant)."""
    params = [torch.zeros(2, requires_grad=True)]
    ref, ours = (cls(params) for cls in (schedulefree.AdamWScheduleFree, AdamWScheduleFree))
    assert {k: v for k, v in ours.defaults.items() if k != "bias_correction"} == ref.defaults
    (ref_group,), (group,) = (o.state_dict()["param_groups"] for o in (ref, ours))
    assert group.pop("bias_correction") == "moment" and group == ref_group


def test_a_group_added_after_train_switches_with_the_others():
    """train() and eval() switch every group not yet switched, also one added in between."""
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(3, generator=g), torch.randn(4, generator=g)
    grads = [torch.randn(4, generator=g) for _ in range(5)]
    results = []
    for cls in (schedulefree.AdamWScheduleFree, AdamWScheduleFree):
        a, b = first.clone().requires_grad_(), second.clone().requires_grad_()
        opt = cls([a], lr=0.1)
        opt.train()
        opt.add_param_group({"params": [b]})  # in eval mode, as every new group
        opt.train()
        for grad in grads:
            b.grad = grad.clone()
            opt.step()
        opt.eval()
        results.append(b.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=float32_bound(len(grads), results[0]))
    assert not torch.allclose(results[0], second, atol=1e-3)  # the steps moved it


def test_the_step_scalars_are_updated_in_place():
    """A captured step replays on the tensors it saw: the step count and the average's weights are
    created once, on the first step, and every later step updates those same tensors."""
    params = [torch.randn(s).requires_grad_() for s in SHAPES]
    opt = AdamWScheduleFree(params, warmup_steps=3)
    opt.train()
    for step in range(1, 4):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        if step == 1:
            first = {name: opt.param_groups[0][name] for name in STEP_SCALARS}
    group = opt.param_groups[0]
    assert all(group[name] is tensor for name, tensor in first.items())
    assert group["k"].item() == 3 and group["k"].dtype == torch.float64
