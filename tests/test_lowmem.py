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

import copy
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
from lls.step.lowmem import (
    GRADIENTS_IN_FLIGHT,
    MIB,
    BlockProfile,
    Budget,
    LowMemory,
    SliceSamples,
    memory_plan,
    parse_memory,
    size_text,
)
from lls.step.sliced import SlicedBlock
from lls.step.sliced_norm import BatchNormSums

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
    whole = rule_gradients(trainer.step, x, y)
    slices = ((0, 2), (2, BATCH))
    parts = [rule_gradients(trainer.step, x[a:b], y[a:b]) for a, b in slices]
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
        trainer.step.sync_gradients = lambda opt, synced=synced: synced.append(
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
    first = low.step.local_pass(x, y, low.step.update, range(0, split))
    second = low.step.local_pass(first.output, y, low.step.update, range(split, len(low.net.blocks)))
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
    normal = rule_gradients(make_trainer(net_fn, "lls-mxm", shape).step, x, y)
    low = rule_gradients(make_trainer(net_fn, "lls-mxm", shape, SliceSamples(SLICE)).step, x, y)
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
    assert trainer.low_memory is not None and trainer.config.memory == "low"


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


@pytest.mark.parametrize(
    "size,text", [(3 * 2**29, "1.5 GiB"), (300 * 2**20, "300 MiB"), (12 * 2**10, "12 KiB"), (512, "512 B")]
)
def test_size_text_is_read_back_by_parse_memory(size, text):
    assert size_text(size) == text
    assert parse_memory(text) == size


def test_memory_plan_takes_one_byte_and_refuses_what_is_not_a_positive_count_of_bytes():
    assert memory_plan(1) == Budget(1)
    for bad in (True, 2.5, 0, -3):
        with pytest.raises(lls.LLSError) as refused:
            memory_plan(bad)
        assert str(refused.value) == f"memory {bad!r} is neither 'low' nor a positive number of bytes"


def three_blocks(activation=None) -> LocalNet:
    """A net whose per-sample bytes are counted by hand in ``HAND_PROFILES`` (float64, input 1 x 4 x 4)."""
    blocks = [
        nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), LeakyReLU()),  # 2 x 4 x 4
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), LeakyReLU()),  # 3 x 2 x 2
        nn.Sequential(nn.Linear(12, 5), LeakyReLU()),  # 5
    ]
    between = [nn.MaxPool2d(2), nn.Flatten(), None]
    return LocalNet(blocks, nn.Linear(5, CLASSES), between, [1, None, None]).double()


HAND_SHAPE = (1, 4, 4)
F64 = 8
HAND_PROFILES = [
    # input 16, next input 2 x 2 x 2; conv, BatchNorm, LeakyReLU outputs of 32, two more of the
    # largest in flight, and two latents of 2 x 1 x 1; parameters 2 x 9 + 2 and 2 + 2
    BlockProfile(16 * F64, 8 * F64, (3 * 32 + 2 * 32 + 2 * 2) * F64, 24 * F64, 2 * F64),
    BlockProfile(8 * F64, 12 * F64, (2 * 12 + 2 * 12) * F64, 57 * F64, 0),  # latent: the whole output
    BlockProfile(12 * F64, 5 * F64, (2 * 5 + 2 * 5) * F64, 65 * F64, 0),  # the head's input is 5
]


def test_kept_bytes_counted_by_hand():
    """What each block keeps whole at batch n: its input and the next block's (DFA: every block's
    input and the head's), its latent's gradient, twice its parameters."""
    n = 4
    ordinary = LowMemory(Budget(1), three_blocks(), HAND_SHAPE, recompute_all=False)
    assert ordinary.profiles == HAND_PROFILES
    assert ordinary.kept(n) == [
        n * (16 + 8 + 2) * F64 + 2 * 24 * F64,
        n * 20 * F64 + 2 * 57 * F64,
        n * 17 * F64 + 2 * 65 * F64,
    ]
    dfa = LowMemory(Budget(1), three_blocks(), HAND_SHAPE, recompute_all=True)
    held = (16 + 8 + 12 + 5) * F64
    assert dfa.kept(n) == [
        n * (held + 2 * F64) + 2 * 24 * F64,
        n * held + 2 * 57 * F64,
        n * held + 2 * 65 * F64,
    ]


def test_the_smallest_budget_slices_one_sample_at_a_time_and_a_byte_less_is_refused():
    n = 4
    kept = [n * 26 * F64 + 48 * F64, n * 20 * F64 + 114 * F64, n * 17 * F64 + 130 * F64]  # as counted above
    least = kept[0] + HAND_PROFILES[0].work  # block 0, one sample a slice: the largest of the three
    assert least == 2528 and least > max(k + p.work for k, p in zip(kept[1:], HAND_PROFILES[1:], strict=True))
    low = LowMemory(Budget(least), three_blocks(), HAND_SHAPE, recompute_all=False)
    # (least - kept) // work: 1312 // 1312, 976 // 384, 944 // 160 (whole: 4)
    assert low.slice_samples(n) == [1, 2, 4] and low.slices(n) == [4, 2, 1]
    assert low.estimated_peak(n) == least
    with pytest.raises(lls.LLSError) as refused:
        LowMemory(Budget(least - 1), three_blocks(), HAND_SHAPE, recompute_all=False).slice_samples(n)
    assert str(refused.value) == (
        "a memory budget of 2.47 KiB is below the smallest step at batch 4: block 0 one sample at a time "
        "needs about 2.47 KiB (the inputs it keeps whole); give --memory 1MiB or more, or a smaller batch"
    )


def test_blocks_that_fit_take_the_ordinary_step_except_dfas():
    """A block whose whole batch fits its slice takes the ordinary step (no SlicedBlock); DFA's
    blocks always recompute, after the head."""
    n = 4
    net = three_blocks()
    h = [torch.zeros(n, *shape, dtype=torch.float64) for shape in (HAND_SHAPE, (2, 2, 2), (12,))]
    cases = [(False, 2528, [True, True, False]), (False, MIB, [False] * 3), (True, MIB, [True] * 3)]
    for recompute_all, budget, expected in cases:
        slicer = LowMemory(Budget(budget), net, HAND_SHAPE, recompute_all=recompute_all).slicer(net, n)
        assert [isinstance(slicer(i, h[i]), SlicedBlock) for i in range(3)] == expected, budget


def conv_block(channels_last: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), LeakyReLU()).double()
    return block.to(memory_format=torch.channels_last) if channels_last else block


@pytest.mark.parametrize("channels_last", [False, True])
def test_next_input_is_the_whole_batch_output_in_its_layout(channels_last):
    """The next block's input of a sliced block: the block's output on the whole batch in training
    mode (batch statistics, running statistics updated once), laid out as the ordinary step's."""
    block, between = conv_block(channels_last), nn.MaxPool2d(2)
    reference = copy.deepcopy(block)
    h = torch.randn(5, 2, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if channels_last:
        h = h.contiguous(memory_format=torch.channels_last)
    expected = between(reference(h))
    out = SlicedBlock(block, between, h, 2).next_input()
    torch.testing.assert_close(out, expected, rtol=TOLERANCE, atol=TOLERANCE)
    assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert out.is_contiguous() == (not channels_last)
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(block.state_dict()[name], value, rtol=TOLERANCE, atol=TOLERANCE, msg=name)


class SpareBlock(nn.Module):
    """A block holding a BatchNorm its forward never calls (a layer kept for later, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.spare = conv_block(), nn.BatchNorm2d(4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PooledSignal(lls.BlockSignal):
    """A user signal with a latent smaller than the output, a loss that reads the head's logits,
    and a parameter its loss does not use."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(4, CLASSES).double()
        self.spare = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        return a.mean((2, 3))

    def latent_loss(self, z, y, logits=None):
        return F.cross_entropy(self.classifier(z) + logits, y)


def test_sliced_gradients_leave_unused_parameters_without_gradient():
    """A sliced block's loss and gradients equal the ordinary ones, and what the loss does not use
    (a BatchNorm the block never calls, a parameter of the signal) gets no gradient in either."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 2, 6, 6, generator=g, dtype=torch.float64)
    y, logits = (
        torch.randint(0, CLASSES, (5,), generator=g),
        torch.randn(5, CLASSES, generator=g, dtype=torch.float64),
    )
    torch.manual_seed(0)
    block, signal = SpareBlock(), PooledSignal()
    ref_block, ref_signal = copy.deepcopy(block), copy.deepcopy(signal)
    expected = ref_signal(ref_block(h), y, logits)
    expected.backward()
    sliced = SlicedBlock(block, nn.Identity(), h, 2)
    loss = sliced.loss(signal, y, logits)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=TOLERANCE, atol=TOLERANCE)
    for ours, theirs in ((block, ref_block), (signal, ref_signal)):
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            if "spare" in name:
                assert p.grad is None and q.grad is None, name
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=TOLERANCE, atol=TOLERANCE, msg=name)
    with pytest.raises(RuntimeError, match=r"^a sliced block gives one loss per step$"):
        sliced.loss(signal, y, logits)


@pytest.mark.parametrize("norm", [nn.SyncBatchNorm(4), nn.InstanceNorm2d(4, track_running_stats=True)])
def test_norms_that_cannot_be_sliced_are_refused(norm):
    block = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm)
    with pytest.raises(lls.LLSError) as refused:
        SlicedBlock(block, nn.Identity(), torch.zeros(4, 2, 6, 6), 2)
    assert str(refused.value) == (
        f"the low-memory step cannot slice a block with {type(norm).__name__}; "
        "use plain BatchNorm or train without low memory"
    )


@pytest.mark.parametrize("momentum,counted", [(0.1, True), (None, True), (0.3, False), (None, False)])
def test_batchnorm_statistics_from_slices_of_one_and_three_samples(momentum, counted):
    """Statistics merged from a slice of one sample and one of three: the batch's mean and biased
    variance, and the running statistics as nn.BatchNorm updates them (momentum or cumulative
    average; without num_batches_tracked, as PyTorch: the momentum, or no update)."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 5
    layers = [nn.BatchNorm1d(3, momentum=momentum).double() for _ in range(2)]
    for layer in layers:
        layer.running_mean.fill_(1.0)
        if not counted:
            layer.num_batches_tracked = None
    reference, norm = layers[0], BatchNormSums(layers[1])
    reference(x)
    norm.add_statistics(x[:1])
    norm.add_statistics(x[1:])
    norm.finish_statistics()
    torch.testing.assert_close(norm.batch_mean, x.mean(0))
    torch.testing.assert_close(norm.batch_var, x.var(0, correction=0))
    torch.testing.assert_close(layers[1].running_mean, reference.running_mean)
    torch.testing.assert_close(layers[1].running_var, reference.running_var)
    assert (layers[1].num_batches_tracked is None) == (not counted)
    if counted:
        assert int(layers[1].num_batches_tracked) == int(reference.num_batches_tracked) == 1


def test_batchnorm_refuses_one_value_per_channel_and_takes_two():
    """Like nn.BatchNorm in training: one value per channel has no variance."""
    one = BatchNormSums(nn.BatchNorm1d(3))
    one.add_statistics(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"^Expected more than 1 value per channel when training, got 1$"):
        one.finish_statistics()
    two = BatchNormSums(nn.BatchNorm1d(3))
    two.add_statistics(torch.tensor([[1.0, 2.0, 3.0]]))
    two.add_statistics(torch.tensor([[3.0, 2.0, 0.0]]))
    two.finish_statistics()
    torch.testing.assert_close(two.batch_mean, torch.tensor([2.0, 2.0, 1.5]))
    torch.testing.assert_close(two.batch_var, torch.tensor([1.0, 0.0, 2.25]))
