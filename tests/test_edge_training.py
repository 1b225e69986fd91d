"""On-device learning (lls/edge): training programs for ExecuTorch, run in its runtime and compared
step for step with lls's own SGD trainer; their export-friendly layers against PyTorch's; bad input.

Runtime tests are few and small (one conv block and the head, batches of 4): exporting a method
takes seconds, so the fast suite builds one program (the projection family); the feedback and BP
families, every rule and basis, and the zoo's layouts are in the slow suite."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

import lls
from lls.cli import main
from lls.errors import LLSError
from lls.method.latent import LatentPool
from lls.method.models import model_specs
from lls.method.net import AvgPool, Conv, Dense, LocalNet, MaxPool
from lls.method.rules import comparison_rules

EXACT = 1e-5  # the equality goal: the largest relative difference of any parameter after the steps
# Past a few steps on a real model, lls's own float32 run moves from its float64 run by more than
# EXACT (relative differences of near-zero weights); the runtime must then be as close to lls as
# that rounding alone, within this factor (a wrong gradient is off by orders of magnitude)
ROUNDING_FACTOR = 4


def close_to_lls(result) -> bool:
    """The runtime's steps equal lls's to EXACT, or to float32's own rounding (ROUNDING_FACTOR)."""
    return result["largest"] <= max(EXACT, ROUNDING_FACTOR * result["float64"])


EDGE_SPECS = (Conv(4, pool=2), AvgPool(1))  # one conv block (BatchNorm, LeakyReLU) and the head
EDGE_INPUT, EDGE_CLASSES, EDGE_BATCH = (1, 4, 4), 3, 4


def needs_executorch():
    pytest.importorskip("executorch", reason="needs executorch (pip install 'lls[edge]')")


# --- the export-friendly layers, against PyTorch's (no executorch needed) ---------------------------


@pytest.mark.parametrize("shape", [(6, 3, 5, 4), (6, 7)])
def test_batch_stats_norm_is_batchnorm_in_training_mode(shape):
    from lls.edge.layers import BatchStatsNorm

    torch.manual_seed(0)
    features = shape[1]
    reference = (nn.BatchNorm2d if len(shape) == 4 else nn.BatchNorm1d)(features, momentum=0.3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
    ours = BatchStatsNorm(reference)
    ours.weight = nn.Parameter(reference.weight.detach().clone())
    ours.bias = nn.Parameter(reference.bias.detach().clone())
    x = torch.randn(*shape) * 3 + 1
    ours.running = (reference.running_mean.clone(), reference.running_var.clone())
    out, expected = ours(x), reference.train()(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    mean, var = ours.updated  # the momentum update with the unbiased variance, as PyTorch's
    torch.testing.assert_close(mean, reference.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(var, reference.running_var, rtol=0, atol=1e-6)
    g = torch.randn_like(out)
    mine = torch.autograd.grad((out * g).sum(), [ours.weight, ours.bias])
    theirs = torch.autograd.grad((expected * g).sum(), [reference.weight, reference.bias])
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "pool"),
    [((3, 8, 8), 2), ((3, 7, 5), 2), ((3, 4, 4), 4), ((3, 2, 2), 4), ((6,), 4), ((6,), 12), ((5,), None)],
)
def test_fixed_pool_is_the_latent_pool_in_values_and_gradients(shape, pool):
    from lls.edge.layers import FixedPool

    torch.manual_seed(0)
    reference = LatentPool(shape, pool)
    a = torch.randn(3, *shape, requires_grad=True)
    ours, expected = FixedPool(reference)(a), reference(a)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    g = torch.randn_like(expected)
    (mine,) = torch.autograd.grad((ours * g).sum(), a)
    (theirs,) = torch.autograd.grad((expected * g).sum(), a)
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6)


def test_the_runtimes_cpu_probe_log_is_held_back_and_every_other_line_given_back(capfd, monkeypatch):
    """The C++ runtime writes to file descriptor 2 directly: its CPU probe lines are dropped the
    first time, anything else it writes reaches stderr, and once the probe was seen nothing is held."""
    import os

    from lls.edge import runtime

    monkeypatch.setattr(runtime, "_cpu_probed", False)
    probe = "[cpuinfo_utils.cpp:125] CPU info and manual query on # of cpus dont match.\n"
    with runtime.without_cpu_probe_log():
        os.write(2, probe.encode() + b"E 00:00:00 method.cpp:1] a real runtime error\n")
    assert capfd.readouterr().err == "E 00:00:00 method.cpp:1] a real runtime error\n"
    with runtime.without_cpu_probe_log():
        os.write(2, probe.encode())
    assert capfd.readouterr().err == probe


# --- programs in the runtime: one per rule family in the fast suite --------------------------------


def edge_trainer(rule: str, seed: int = 0, specs=EDGE_SPECS, input_shape=EDGE_INPUT, **options):
    trainer = lls.build_trainer(
        specs,
        rule,
        input_shape,
        EDGE_CLASSES,
        rule_options=options,
        seed=seed,
        optimizer="sgd",
        lr=0.05,
        channels_last=False,
        engine="eager",
    )
    with torch.no_grad():  # BatchNorm statistics that are not 0 / 1, as a trained run's
        for module in trainer.net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return trainer


def edge_batches(steps: int, input_shape=EDGE_INPUT, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(EDGE_BATCH, *input_shape, generator=g),
            torch.randint(0, EDGE_CLASSES, (EDGE_BATCH,), generator=g),
        )
        for _ in range(steps)
    ]


# Each family's program costs seconds to export: the projection family in the fast suite, the
# other two in the slow one
@pytest.fixture(
    scope="module",
    params=[
        "lls-mxm",
        pytest.param("dfa", marks=pytest.mark.slow),
        pytest.param("bp", marks=pytest.mark.slow),
    ],
)
def family(request):
    """A program of each rule family: a projection with learned parameters (LLS-MxM), feedback that
    waits for the head (DFA), one whole-network method (BP); with the trainer it was made from."""
    needs_executorch()
    from lls.edge.programs import build_program

    trainer = edge_trainer(request.param)
    return trainer, build_program(trainer, EDGE_BATCH, lr=0.05, info={"made_by": "test"})


def test_runtime_steps_equal_lls_sgd_steps(family):
    """The program in ExecuTorch's runtime takes the same SGD steps as lls's trainer: every
    parameter (the rule's learned ones too) and every BatchNorm running statistic."""
    from lls.edge.runtime import ProgramRunner
    from lls.edge.session import check_program

    trainer, built = family
    result = check_program(ProgramRunner(built.buffer), trainer_copy(trainer), edge_batches(3), 3)
    assert result.steps == 3 and result.tensors >= 6
    assert result.largest <= EXACT, result
    assert result.losses <= 1e-5


def trainer_copy(trainer):
    """A fresh trainer at ``trainer``'s state (the fixture's is shared by the tests)."""
    twin = edge_trainer(trainer.rule.name)
    twin.net.load_state_dict(trainer.net.state_dict())
    for mine, theirs in zip(twin.signals, trainer.signals, strict=True):
        mine.load_state_dict(theirs.state_dict())
    return twin


def test_each_method_trains_its_own_parameters_and_says_so_in_the_program(family):
    """No gradient crosses a block: a block's method outputs gradients of that block's parameters
    (and its signal's) only; the program holds what an app needs to call it."""
    from lls.edge.runtime import ProgramRunner

    trainer, built = family
    runner = ProgramRunner(built.buffer)
    layout = runner.layout
    names = [m.name for m in layout.methods]
    rule = trainer.rule.name
    assert names == (["network"] if rule == "bp" else ["block0", "head"])
    for method in layout.methods:
        owners = {
            name.split(".")[1] if name.startswith("signals") else ".".join(name.split(".")[:3])
            for name in method.parameters.values()
        }
        if method.kind == "block":
            assert owners <= {"net.blocks.0", "0"}
        elif method.kind == "head":
            assert owners == {"net.head.weight", "net.head.bias"}
    assert ("logits" in layout.methods[0].inputs) == (rule == "dfa")
    meta = json.loads(runner.module.run_method("lls_metadata", ())[0])
    assert meta["batch_size"] == EDGE_BATCH == runner.module.run_method("batch_size", ())[0]
    assert meta["input_shape"] == list(EDGE_INPUT) and meta["num_classes"] == EDGE_CLASSES
    assert meta["optimizer"] == {
        "name": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
    }
    assert meta["info"]["rule"]["name"] == rule and meta["info"]["made_by"] == "test"
    first = layout.methods[0]  # the running statistics the app starts from are the trainer's
    norm = trainer.net.blocks[0][1]
    start = runner.module.run_method(f"{first.name}_statistics", ())
    torch.testing.assert_close(start[0], norm.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(start[1], norm.running_var, rtol=0, atol=0)


# --- bad input ----------------------------------------------------------------------------------


def test_an_operator_the_runtime_lacks_is_named_in_one_line(family):
    from lls.edge.programs import check_operators, program_operators, runtime_operators

    _, built = family
    used = set().union(*program_operators(built.manager).values())
    lacking = sorted(op for op in used if "convolution" in op)[0]
    with pytest.raises(LLSError, match=f"needs the operator {lacking}, which this ExecuTorch") as error:
        check_operators(built, {"block0": "block 0 (Sequential)"}, known=runtime_operators() - {lacking})
    assert len(str(error.value).splitlines()) == 1


def test_a_program_over_max_memory_is_refused_naming_the_method(family):
    from lls.edge.memory import footprint_of
    from lls.edge.programs import check_memory

    _, built = family
    footprint = footprint_of(built.manager, "", EDGE_BATCH, 0.9, built.layout)
    # weights, momentum, the largest method's arena less its weights, the running statistics
    needed = footprint.footprint + built.statistics_bytes
    assert built.statistics_bytes == 2 * 4 * 4  # one BatchNorm of 4 channels: mean and variance
    check_memory(built, needed)  # fits: nothing said
    with pytest.raises(LLSError, match=r"over --max-memory .*smaller --batch-size") as error:
        check_memory(built, needed - 1)
    largest = max(footprint.methods, key=lambda m: m.need).name
    assert f"method {largest}" in str(error.value) and len(str(error.value).splitlines()) == 1


class DataDependent(nn.Module):
    """A block whose control flow depends on its input's values: torch.export cannot capture it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) if x.sum() > 0 else -self.conv(x)


def test_a_layer_that_cannot_be_exported_is_named_and_nothing_is_built():
    needs_executorch()
    from lls.edge.programs import build_program

    net = LocalNet([DataDependent()], nn.Linear(4 * 16, EDGE_CLASSES), [nn.Flatten()], [1])
    trainer = lls.Trainer(net, "lls", input_shape=EDGE_INPUT, optimizer="sgd", lr=0.1)
    with pytest.raises(LLSError, match=r"^block 0 \(DataDependent\) cannot be exported") as error:
        build_program(trainer, EDGE_BATCH, lr=0.1)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("optimizer", ["adamw-sf", "adam"])
def test_an_optimizer_the_runtime_lacks_is_refused_saying_what_to_use(optimizer, tmp_path, capsys):
    needs_executorch()
    out = tmp_path / "train.pte"
    argv = ["export", str(tmp_path), "--format", "executorch", "--training", "--optimizer", optimizer]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1
        and f"no {optimizer} optimizer, only SGD" in err
        and "--optimizer sgd" in err
    )
    assert not out.exists()


def test_without_executorch_the_edge_commands_say_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if it were not installed
    program = tmp_path / "train.pte"
    program.write_bytes(b"not read")
    out = tmp_path / "out.pte"
    for argv in (
        ["edge", "train", str(program), "--steps", "1"],
        ["edge", "check", str(program)],
        ["export", str(tmp_path), "--format", "executorch", "--training", "--out", str(out)],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "pip install 'lls[edge]'" in err, argv
    assert not out.exists() and not (tmp_path / "run").exists()


def test_a_file_that_is_not_a_training_program_is_refused_in_one_line(tmp_path, capsys):
    needs_executorch()
    program = tmp_path / "train.pte"
    program.write_bytes(b"\0" * 64)
    assert main(["edge", "check", str(program)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ExecuTorch program" in err


# --- the slow suite: every rule on the paper's models; the commands end to end -----------------------


RULE_CASES = [*comparison_rules(), ("lls-mxm", {"reduced": 2})]  # every rule, LLS with every basis


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "options"), RULE_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))
)
def test_every_rule_steps_in_the_runtime_as_in_lls(rule, options):
    needs_executorch()
    from lls.edge.programs import build_program
    from lls.edge.runtime import ProgramRunner
    from lls.edge.session import check_program

    specs = model_specs("smallconv")
    trainer = edge_trainer(rule, specs=specs, input_shape=(1, 8, 8), **options)
    built = build_program(trainer, EDGE_BATCH, lr=0.05)
    result = check_program(ProgramRunner(built.buffer), trainer, edge_batches(3, (1, 8, 8)), 3)
    assert close_to_lls(result.as_dict()), result


# The layouts the equality goal names (VGG8, MobileNetV1, ResNet-20; SmallConv above), narrowed to a
# 1/16 of their widths (the same kinds of blocks, poolings, strides and BatchNorms) so that a
# program exports in seconds; full-width figures: benchmarks/edge_equality.py and docs/edge.md
ZOO_EQUALITY = ["vgg8", "mobilenetv1", "resnet20"]


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["lls", "bp"])
@pytest.mark.parametrize("name", ZOO_EQUALITY)
def test_the_zoos_layouts_step_in_the_runtime_as_in_lls(name, rule):
    needs_executorch()
    from lls.edge.programs import build_program
    from lls.edge.runtime import ProgramRunner
    from lls.edge.session import check_program

    from .test_lowmem import ZOO_INPUT, narrow

    shape = ZOO_INPUT[name]
    trainer = edge_trainer(rule, specs=narrow(name), input_shape=shape)
    built = build_program(trainer, EDGE_BATCH, lr=0.05)
    result = check_program(ProgramRunner(built.buffer), trainer, edge_batches(3, shape), 3)
    assert close_to_lls(result.as_dict()), result


@pytest.mark.slow
def test_export_train_and_check_a_run_from_the_command_line(digits, tmp_path, capsys):
    """A run to a training program, checked against lls, trained in the runtime into a run
    directory that lls eval reads with the accuracy edge train reported; refusals write nothing."""
    needs_executorch()
    run, program = tmp_path / "run", tmp_path / "train.pte"
    common = ["--dataset", "digits", "--limit", "64"]
    argv = ["train", *common, "--model", "smallconv", "--epochs", "1", "--batch-size", "16"]
    assert main([*argv, "--optimizer", "sgd", "--lr", "0.05", "--out", str(run), "--quiet"]) == 0
    export = ["export", str(run), "--format", "executorch", "--training", "--out", str(program)]
    capsys.readouterr()
    assert main([*export, "--max-memory", "64KiB"]) == 2  # the weights alone are more
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "over --max-memory 64 KiB" in err and not program.exists()
    assert main([*export, "--batch-size", "8"]) == 0
    assert "block0, block1, block2, block3, head; batches of 8" in capsys.readouterr().out
    assert main(["edge", "check", str(program), "--steps", "3", "--json"]) == 0
    check = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert check["steps"] == 3 and close_to_lls(check) and check["rule"] == "lls"
    trained = tmp_path / "device"
    edge = ["edge", "train", str(program), "--steps", "5", "--out", str(trained), "--json", "--quiet"]
    assert main(edge) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 5 and summary["epochs"] == 1  # 64 images: 8 full batches an epoch
    assert main(["eval", str(trained), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["accuracy"] == summary["test_accuracy"]


class FunctionalBatchNorm(nn.Module):
    """A conv with BatchNorm called as a function in training mode, updating running statistics
    (no nn.BatchNorm for the builder to rewrite): it lowers to an operator outside ExecuTorch's
    core set."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.weight, self.bias = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
        self.register_buffer("mean", torch.zeros(4))
        self.register_buffer("var", torch.ones(4))

    def forward(self, x):
        a = self.conv(x)
        return nn.functional.batch_norm(a, self.mean, self.var, self.weight, self.bias, training=True)


def test_a_layer_outside_the_core_operators_is_named_with_its_operator():
    needs_executorch()
    from lls.edge.programs import build_program

    net = LocalNet([FunctionalBatchNorm()], nn.Linear(4 * 16, EDGE_CLASSES), [nn.Flatten()], [1])
    trainer = lls.Trainer(net, "lls", input_shape=EDGE_INPUT, optimizer="sgd", lr=0.1)
    with pytest.raises(
        LLSError, match=r"^block 0 \(FunctionalBatchNorm\) cannot be lowered .*batch_norm"
    ) as error:
        build_program(trainer, EDGE_BATCH, lr=0.1)
    assert len(str(error.value).splitlines()) == 1


def test_window_max_is_max_pooling_in_values_and_gradients():
    from lls.edge.layers import WindowMax

    x = torch.randn(2, 3, 7, 6, generator=torch.Generator().manual_seed(5), requires_grad=True)
    ours, expected = WindowMax(2)(x), nn.MaxPool2d(2)(x)
    assert torch.equal(ours, expected)
    g = torch.randn_like(expected)
    (mine,) = torch.autograd.grad((ours * g).sum(), x)
    (theirs,) = torch.autograd.grad((expected * g).sum(), x)
    assert torch.equal(mine, theirs)


@pytest.mark.slow  # a whole-network program through a max pool: seconds to export
def test_bp_through_a_max_pool_steps_as_lls_does():
    """BP's one method back-propagates through the fixed ops between blocks: through a 2x2 max
    pool (runtime's own max-pool backward is wrong: 500x off before WindowMax) it equals lls's step."""
    needs_executorch()
    from lls.edge.programs import build_program
    from lls.edge.runtime import ProgramRunner
    from lls.edge.session import check_program

    specs, shape = (Conv(4, pool=2), MaxPool(), Conv(6, pool=1), AvgPool(1)), (1, 8, 8)
    trainer = edge_trainer("bp", specs=specs, input_shape=shape)
    twin = edge_trainer("bp", specs=specs, input_shape=shape)
    twin.net.load_state_dict(trainer.net.state_dict())
    built = build_program(trainer, EDGE_BATCH, lr=0.05)
    result = check_program(ProgramRunner(built.buffer), twin, edge_batches(3, shape), 3)
    assert result.largest <= EXACT, result


def test_batch_one_is_refused_only_where_a_batchnorm_would_see_one_value():
    """At batch 1 a convolution's BatchNorm still has H x W values per channel (MLPerf Tiny trains
    at batch 1); a dense block's BatchNorm1d has one: refused, naming it, before anything is built."""
    needs_executorch()
    from lls.edge.programs import _check_statistics

    conv = edge_trainer("lls")
    _check_statistics(conv.net, 1, EDGE_INPUT)  # 4 x 4 values per channel: fine
    dense = edge_trainer("lls", specs=(Conv(4, pool=2), AvgPool(1), Dense(6)))
    with pytest.raises(LLSError, match=r"at batch 1 BatchNorm blocks\.1\.\S+ sees one value per channel"):
        _check_statistics(dense.net, 1, EDGE_INPUT)
    _check_statistics(dense.net, 2, EDGE_INPUT)
