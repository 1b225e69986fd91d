"""The low-memory block-local step (lowmem.py): the whole batch's step, in slices, in less memory.

Exactness tests compare a low-memory trainer with an ordinary one built the same way (same seed,
same batch) after one step. They run in float64 so that the tolerance follows from the arithmetic:
the two steps differ only in the order of their sums (over at most a few thousand terms each, and
through at most 30 layers), so they agree to ~1e-13 relative (measured: 1e-15 to 9e-13); the
tolerance 1e-9 leaves a wide margin, while a BatchNorm that saw one slice's statistics instead of
the batch's is off by more than 1e-3 (``test_slices_with_their_own_statistics_would_differ``).
Plain SGD is the optimizer, so that parameters after the step are as close as the gradients
(Adam-type steps divide by |g| and turn rounding noise in a zero gradient into a full step).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lls
from lls.measure.diagnose import rule_gradients
from lls.measure.memory import SavedTensorMeter
from lls.method.models import model_specs
from lls.method.net import Conv, Dense, DWSeparable, LeakyReLU, LocalNet, build
from lls.method.zoo import ResNet, ViT
from lls.step.lowmem import GRADIENTS_IN_FLIGHT, Budget, LowMemory, SliceSamples, memory_plan, parse_memory

LOCAL_RULES = [r for r in lls.list_rules() if r != "bp"]
CLASSES = 5
BATCH, SLICE = 5, 3  # slices of 2 and 3 samples: the slice does not divide the batch
TOLERANCE = 1e-9  # float64, see the module docstring
# the smallest inputs each zoo model takes (VGG11: 4 max-pools; MobileNetV1: 5 stride-2 blocks)
ZOO_INPUT = {
    "smallconv": (1, 8, 8),
    "smallconvl": (3, 8, 8),
    "vgg8": (3, 8, 8),
    "vgg11": (3, 16, 16),
    "mobilenetv1": (3, 16, 16),
    **dict.fromkeys(["resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34"], (3, 8, 8)),
    "vit": (1, 8, 8),  # four 4 x 4 patches
}
WIDTH_DIVISOR = 16  # zoo layouts at 1/16 of their widths: the same blocks, fast in float64
DEPTH_CAP = 2  # residual blocks per stage, transformer blocks: the same kinds of blocks, fewer of them


def narrow(name: str) -> list:
    """A zoo model's layout with its widths divided by WIDTH_DIVISOR: the same kinds of blocks
    (conv, dense, depthwise-separable with two BatchNorms), poolings and strides."""
    specs = []
    for spec in model_specs(name):
        if isinstance(spec, (Conv, DWSeparable)):
            spec = dataclasses.replace(spec, channels=max(4, spec.channels // WIDTH_DIVISOR))
        elif isinstance(spec, Dense):
            spec = dataclasses.replace(spec, width=max(4, spec.width // WIDTH_DIVISOR))
        elif isinstance(spec, ResNet):
            stages = [  # and at most DEPTH_CAP residual blocks per stage
                dataclasses.replace(
                    s, channels=max(4, s.channels // WIDTH_DIVISOR), depth=min(s.depth, DEPTH_CAP)
                )
                for s in spec.stages
            ]
            spec = ResNet(max(4, spec.stem // WIDTH_DIVISOR), tuple(stages))
        elif isinstance(spec, ViT):
            spec = dataclasses.replace(spec, dim=max(8, spec.dim // WIDTH_DIVISOR), heads=2, depth=DEPTH_CAP)
        specs.append(spec)
    return specs


def make_trainer(net_fn, rule: str, shape, memory=None, dtype=torch.float64, device="cpu") -> lls.Trainer:
    rule_obj = lls.create_rule(rule)
    torch.manual_seed(0)
    net = net_fn(rule_obj.activation).to(device=device, dtype=dtype)
    return lls.Trainer(net, rule_obj, input_shape=shape, optimizer="sgd", lr=0.1, memory=memory)


def batch(shape, n=BATCH, dtype=torch.float64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=dtype).to(device)
    return x, torch.randint(0, CLASSES, (n,), generator=g).to(device)


def step(trainer: lls.Trainer, x, y):
    """One training step; returns (each optimizer's gradient as one vector, the step's result)."""
    grads = {}
    for i, optimizer in enumerate(trainer.optimizers):

        def record(opt, args, kwargs, i=i):
            grads[i] = torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])

        optimizer.register_step_pre_hook(record)
    return grads, trainer.train_step(x, y)


def assert_same_step(normal: lls.Trainer, low: lls.Trainer, x, y, tol=TOLERANCE) -> None:
    g0, r0 = step(normal, x, y)
    g1, r1 = step(low, x, y)
    assert sorted(g0) == sorted(g1) == list(range(len(normal.optimizers)))  # one step per block and the head
    for i in g0:
        error = (g1[i] - g0[i]).norm() / g0[i].norm()
        assert error <= tol, f"block {i}: gradients differ by {error:.1e} of their norm"
    torch.testing.assert_close(r1.block_losses, r0.block_losses, rtol=tol, atol=tol)
    torch.testing.assert_close(r1.loss, r0.loss, rtol=tol, atol=tol)
    torch.testing.assert_close(r1.logits, r0.logits, rtol=tol, atol=tol)
    state0, state1 = normal.net.state_dict(), low.net.state_dict()
    for name, value in state0.items():  # parameters after the step, BatchNorm's running statistics
        if value.dtype == torch.int64:  # num_batches_tracked
            assert torch.equal(state1[name], value), name
        else:
            scale = float(value.abs().max()) or 1.0
            torch.testing.assert_close(state1[name], value, rtol=tol, atol=tol * scale, msg=name)


def test_the_zoo_table_covers_every_model():
    assert sorted(ZOO_INPUT) == sorted(lls.list_models())


def distinct_models() -> list[str]:
    """The zoo models whose narrowed layouts differ (ResNet-32/56/110 narrow to ResNet-20's)."""
    seen = {}
    for name in sorted(ZOO_INPUT):
        seen.setdefault((repr(narrow(name)), ZOO_INPUT[name]), name)
    return sorted(seen.values())


@pytest.mark.parametrize("rule", LOCAL_RULES)
@pytest.mark.parametrize("model", distinct_models())
def test_low_memory_step_is_the_whole_batch_step(model, rule):
    shape = ZOO_INPUT[model]

    def net_fn(activation):
        return build(narrow(model), shape, CLASSES, activation, name=model)

    normal = make_trainer(net_fn, rule, shape)
    low = make_trainer(net_fn, rule, shape, SliceSamples(SLICE))
    assert low.low_memory.slices(BATCH) == [2] * len(low.net.blocks)
    assert_same_step(normal, low, *batch(shape))


def test_float32_zoo_model_at_its_own_width():
    """SmallConv as registered, float32, a budget that slices the first blocks only: float32 sums
    in a different order agree to ~1e-6 relative (measured 1.3e-6), checked at 1e-4."""
    shape, n = (1, 28, 28), 32

    def net_fn(activation):
        return lls.create_model(
            "smallconv", in_channels=1, input_size=28, num_classes=CLASSES, activation=activation
        )

    probe = LowMemory(Budget(1), net_fn("leaky_relu"), shape, recompute_all=False)
    kept = probe.kept(n)
    budget = kept[0] + 5 * probe.profiles[0].work  # block 0 in slices of 5 samples, the smaller blocks whole
    low = make_trainer(net_fn, "lls", shape, budget, dtype=torch.float32)
    slices = low.low_memory.slices(n)
    assert slices[0] == 7 and slices[-1] == 1
    normal = make_trainer(net_fn, "lls", shape, dtype=torch.float32)
    assert_same_step(normal, low, *batch(shape, n, torch.float32), tol=1e-4)


def test_slices_with_their_own_statistics_would_differ():
    """The probe can fail: gradients accumulated over slices with each slice's own BatchNorm
    statistics (plain gradient accumulation) are far from the whole batch's."""
    shape = ZOO_INPUT["smallconv"]

    def net_fn(activation):
        return build(narrow("smallconv"), shape, CLASSES, activation)

    trainer = make_trainer(net_fn, "lls", shape)
    x, y = batch(shape)
    whole = rule_gradients(trainer, x, y)
    slices = ((0, 2), (2, BATCH))
    parts = [rule_gradients(trainer, x[a:b], y[a:b]) for a, b in slices]
    accumulated = [
        sum((b - a) / BATCH * p[i] for (a, b), p in zip(slices, parts, strict=True)) for i in range(4)
    ]
    errors = [float((acc - w).norm() / w.norm()) for acc, w in zip(accumulated, whole, strict=True)]
    assert min(errors) > 1e-3


def test_batchnorm_options_as_pytorch_updates_them():
    """Cumulative averages (momentum None), no affine parameters, no running statistics, and a
    BatchNorm frozen in eval mode: each behaves as the whole-batch layer would."""
    shape = (2, 6, 6)

    def net_fn(activation):
        frozen = nn.BatchNorm2d(4)
        blocks = [
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), LeakyReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False), LeakyReLU()),
            nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), frozen, LeakyReLU()),
            nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8, track_running_stats=False), LeakyReLU()),
        ]
        frozen.running_mean.uniform_(-0.1, 0.1)
        between = [None, nn.MaxPool2d(2), nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()), None]
        return LocalNet(blocks, nn.Linear(8, CLASSES), between, [2, 1, 1, None])

    normal = make_trainer(net_fn, "lls", shape)
    low = make_trainer(net_fn, "lls", shape, SliceSamples(SLICE))
    for trainer in (normal, low):  # frozen: normalises with its running statistics, sample by sample
        trainer.net.blocks[2][1].eval()
    x, y = batch(shape)
    for _ in range(2):  # the cumulative average needs a second step to differ from momentum 1
        assert_same_step(normal, low, x, y)
    assert int(low.net.blocks[0][1].num_batches_tracked) == 2


def test_saved_activations_peak_drops_with_the_slice():
    """What autograd holds for backward at the peak of a step: the whole batch's activations of the
    largest block normally; with slices of s samples, s / N of them, plus the block's input, which
    the slices are views of and which the ordinary step holds too."""
    shape, n, s = (1, 28, 28), 32, 8

    def net_fn(activation):
        return lls.create_model(
            "smallconv", in_channels=1, input_size=28, num_classes=CLASSES, activation=activation
        )

    x, y = batch(shape, n, torch.float32)
    peaks = []
    for memory in (None, SliceSamples(s)):
        trainer = make_trainer(net_fn, "lls", shape, memory, dtype=torch.float32)
        trainer.train_step(x, y)
        meter = SavedTensorMeter(exclude=[*trainer.net.parameters()])
        with meter.hooks():
            trainer.train_step(x, y)
        peaks.append(meter.peak)
    normal, low = peaks
    block0 = n * 32 * 28 * 28 * 4  # one full-size activation of block 0 (32 x 28 x 28, float32)
    assert normal >= 2 * block0  # BatchNorm's input and the activation's output, whole batch
    assert low <= normal * s / n + x.nbytes + block0 * 0.01
    assert low < normal / 3


def test_gradients_are_complete_when_data_parallelism_syncs_them():
    """Data parallelism averages gradients in Trainer.update between backward and step: with low
    memory they are already the whole slice-summed gradients there."""
    shape = ZOO_INPUT["smallconv"]

    def net_fn(activation):
        return build(narrow("smallconv"), shape, CLASSES, activation)

    seen = []
    for memory in (None, SliceSamples(SLICE)):
        trainer = make_trainer(net_fn, "lls", shape, memory)
        synced = []
        trainer.sync_gradients = lambda opt, synced=synced: synced.append(
            torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]])
        )
        trainer.train_step(*batch(shape))
        seen.append(synced)
    assert len(seen[0]) == len(seen[1]) == 5  # 4 blocks and the head, each synced once
    for a, b in zip(*seen, strict=True):
        assert (a - b).norm() <= TOLERANCE * a.norm()


def test_pipeline_stages_in_low_memory():
    """Two stages, each calling local_pass over its range, equal one ordinary step."""
    shape = ZOO_INPUT["vgg8"]

    def net_fn(activation):
        return build(narrow("vgg8"), shape, CLASSES, activation)

    normal = make_trainer(net_fn, "lls", shape)
    low = make_trainer(net_fn, "lls", shape, SliceSamples(SLICE))
    x, y = batch(shape)
    expected = normal.train_step(x, y)
    split = 3
    first = low.local_pass(x, y, low.update, range(0, split))
    second = low.local_pass(first.output, y, low.update, range(split, len(low.net.blocks)))
    losses = torch.cat([first.block_losses, second.block_losses])
    torch.testing.assert_close(losses, expected.block_losses, rtol=TOLERANCE, atol=TOLERANCE)
    torch.testing.assert_close(second.loss, expected.loss, rtol=TOLERANCE, atol=TOLERANCE)
    for name, value in normal.net.state_dict().items():
        torch.testing.assert_close(low.net.state_dict()[name], value, rtol=1e-9, atol=1e-12, msg=name)


def test_diagnostics_take_gradients_of_the_sliced_loss():
    shape = ZOO_INPUT["smallconvl"]

    def net_fn(activation):
        return build(narrow("smallconvl"), shape, CLASSES, activation)

    x, y = batch(shape)
    normal = rule_gradients(make_trainer(net_fn, "lls-mxm", shape), x, y)
    low = rule_gradients(make_trainer(net_fn, "lls-mxm", shape, SliceSamples(SLICE)), x, y)
    for a, b in zip(normal, low, strict=True):
        assert (a - b).norm() <= TOLERANCE * a.norm()


def test_diagnose_leaves_a_low_memory_trainer_untouched():
    """diagnose() works on a copy of the network: the sliced step must run the copy's blocks."""
    from lls.measure.diagnose import diagnose

    shape = ZOO_INPUT["smallconv"]

    def net_fn(activation):
        return build(narrow("smallconv"), shape, CLASSES, activation)

    trainer = make_trainer(net_fn, "lls", shape, SliceSamples(SLICE))
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    results = diagnose(trainer, [batch(shape)], sync=False)
    assert len(results) == len(trainer.net.blocks)
    for name, value in trainer.net.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_budget_picks_the_largest_slice_that_fits():
    shape, n = (1, 28, 28), 64
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=CLASSES)
    budget = 12 * 2**20
    plan = LowMemory(Budget(budget), net, shape, recompute_all=False)
    samples = plan.slice_samples(n)
    for held, s, p in zip(plan.kept(n), samples, plan.profiles, strict=True):
        assert held + s * p.work <= budget
        assert s == n or held + (s + 1) * p.work > budget
    assert samples[0] < n and samples[-1] == n  # block 0 sliced, the dense block whole
    assert plan.estimated_peak(n) <= budget
    # block 0's work per sample from its layer outputs: conv, BatchNorm, LeakyReLU (32 x 28 x 28 floats)
    # each, plus the gradients in flight, plus the slice's latent (32 x 4 x 4) and its gradient
    latent = 32 * 4 * 4 * 4
    assert plan.profiles[0].latent == latent
    assert plan.profiles[0].work == (3 + GRADIENTS_IN_FLIGHT) * 32 * 28 * 28 * 4 + 2 * latent
    assert plan.profiles[0].input == 28 * 28 * 4 and plan.profiles[0].output == 32 * 14 * 14 * 4


def test_low_is_twice_the_least_a_sliced_step_needs():
    from lls.step.lowmem import LOW_FACTOR

    shape, n = (1, 28, 28), 64
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=CLASSES)
    plan = LowMemory(memory_plan("low"), net, shape, recompute_all=False)
    assert plan.estimated_peak(n) <= LOW_FACTOR * max(plan.kept(n))


def test_a_budget_below_the_inputs_is_refused_at_the_step():
    shape = ZOO_INPUT["smallconv"]

    def net_fn(activation):
        return build(narrow("smallconv"), shape, CLASSES, activation)

    trainer = make_trainer(net_fn, "lls", shape, memory=1024)
    with pytest.raises(lls.LLSError, match=r"budget of 1 KiB is below the smallest step") as refused:
        trainer.train_step(*batch(shape))
    smallest = re.search(r"give --memory (\d+MiB) or more", str(refused.value)).group(1)
    make_trainer(net_fn, "lls", shape, memory=smallest).train_step(*batch(shape))  # the one named fits


def test_bp_is_refused():
    refusal = r"^--memory slices one block's step at a time and bp back-propagates through every block"
    with pytest.raises(lls.LLSError, match=refusal):
        make_trainer(lambda act: build(narrow("smallconv"), (1, 8, 8), CLASSES, act), "bp", (1, 8, 8), "low")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("low", "low"),
        ("256MiB", 256 * 2**20),
        ("1GiB", 2**30),
        ("1.5 GiB", 3 * 2**29),
        ("4096b", 4096),
        ("1B", 1),
    ],
)
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("text", ["256MB", "lots", "0MiB", "-1MiB"])
def test_parse_memory_rejects(text):
    with pytest.raises(lls.LLSError, match="memory"):
        parse_memory(text)


def test_memory_plan_accepts_the_api_forms():
    assert memory_plan(None) is None
    assert memory_plan("256MiB") == Budget(256 * 2**20) == memory_plan(256 * 2**20)
    with pytest.raises(lls.LLSError):
        memory_plan(0)


def test_build_trainer_passes_memory_on():
    trainer = lls.step.factory.build_trainer("smallconv", "lls", (1, 8, 8), CLASSES, memory="low")
    assert trainer.low_memory is not None and trainer.memory == "low"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "model,rule", [("smallconv", "lls"), ("mobilenetv1", "dfa"), ("vgg8", "local-classifier")]
)
def test_low_memory_step_on_cuda(model, rule):
    shape = ZOO_INPUT[model]

    def net_fn(activation):
        return build(narrow(model), shape, CLASSES, activation, name=model)

    normal = make_trainer(net_fn, rule, shape, device="cuda")
    low = make_trainer(net_fn, rule, shape, SliceSamples(SLICE), device="cuda")
    assert_same_step(normal, low, *batch(shape, device="cuda"))


def test_user_signal_with_only_a_forward():
    """A signal that defines forward() alone (no latent): the low-memory step recomputes it."""

    class Energy(lls.BlockSignal):
        def forward(self, a, y, logits=None):
            return F.cross_entropy(a.flatten(1)[:, :CLASSES], y)

    class EnergyRule(lls.Rule):
        name = "energy"

        def signal(self, index, out_shape, pool, num_classes):
            return Energy()

    shape = ZOO_INPUT["smallconv"]

    def make(memory):
        torch.manual_seed(0)
        net = build(narrow("smallconv"), shape, CLASSES).double()
        return lls.Trainer(net, EnergyRule(), input_shape=shape, optimizer="sgd", memory=memory)

    assert_same_step(make(None), make(SliceSamples(SLICE)), *batch(shape))


def test_bench_times_each_rule_with_and_without_low_memory():
    from lls.measure.bench import run_bench, summarize

    results = run_bench(
        "smallconv",
        (1, 8, 8),
        CLASSES,
        ["lls", "bp"],
        batch=4,
        steps=1,
        warmup=0,
        measure_peak=False,
        memory=(None, "low"),
    )
    assert [r.label for r in results] == ["lls", "lls memory=low", "bp"]  # BP: the ordinary step only
    summary = summarize(results)
    assert (
        "time_ratio_to_normal" in summary["lls memory=low"] and "time_ratio_to_normal" not in summary["lls"]
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_batchnorm_sums_taken_directly_equal_the_fused_kernels(channels_last):
    """The two ways a slice's BatchNorm sums are taken (the CPU's fused kernel; the direct sums
    CUDA uses) agree, and equal sum(dy) and sum(dy * (x - mean) / sqrt(var + eps)) by hand."""
    from lls.step.sliced_norm import BatchNormSums as _Norm

    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(2, 6, 3, 5, 5, generator=g).unbind(0)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    norm = _Norm(nn.BatchNorm2d(3))
    norm.add_statistics(x)
    norm.finish_statistics()
    fused = norm.slice_sums(x, dy, fused=True)
    direct = norm.slice_sums(x, dy, fused=False)
    mean, var = x.mean((0, 2, 3), keepdim=True), x.var((0, 2, 3), unbiased=False, keepdim=True)
    by_hand = ((dy * (x - mean) / torch.sqrt(var + 1e-5)).sum((0, 2, 3)), dy.sum((0, 2, 3)))
    for a, b, c in zip(fused, direct, by_hand, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-5)


def test_estimated_peak_is_the_largest_blocks_kept_bytes_plus_its_slices_work():
    """The peak estimate of the module docstring: per block, what it keeps whole plus one slice's work."""
    trainer = lls.build_trainer("smallconv", "lls", (1, 8, 8), 10, memory="low")
    low = trainer.low_memory
    batch = 64
    samples = low.slice_samples(batch)
    expected = max(k + s * p.work for k, s, p in zip(low.kept(batch), samples, low.profiles, strict=True))
    assert low.estimated_peak(batch) == expected
    assert all(p.work > 0 for p in low.profiles) and low.estimated_peak(batch) > max(low.kept(batch))
