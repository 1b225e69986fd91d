"""A block trained in slices of its batch on the device (lls/edge/sliced.py): the app's loop over the
statistics, sums and weights passes takes the whole batch's step.

The fast tests run that loop (``sliced_step``, the code the runtime runs) on the PyTorch modules a
program is exported from, against autograd through the whole batch's BatchNorm, for every block of
every zoo layout (narrowed) and every rule that can slice; the slow ones export the programs and run
them in ExecuTorch's runtime, and read the memory they save from the plans."""

from __future__ import annotations

import json

import pytest
import torch

import lls
from lls.cli import main
from lls.edge.programs import BlockStep, MethodLayout, _statistics, block_parts, sliced_block
from lls.edge.sliced import merge_statistics, sliced_step
from lls.errors import LLSError
from lls.method.rules import create_rule

from .test_edge_training import EDGE_BATCH, close_to_lls, edge_batches, edge_trainer, needs_executorch
from .test_lowmem import ZOO_INPUT, narrow

BATCH = 6  # in 2 slices of 3 and 3 of 2
SLICED_RULES = [r for r in lls.list_rules() if create_rule(r).timing == "block"]
RELATIVE = 1e-4  # float32: the slices' statistics merge in another order than the whole batch's


class ModuleRunner:
    """What :func:`sliced_step` asks of the runtime, answered by the methods' PyTorch modules."""

    def __init__(self, methods: list) -> None:
        self.modules = {m.name: m.module for m in methods}
        own = methods[0]  # the block's method, with the running statistics it starts from
        self.statistics = dict(zip(own.layout.statistics, own.statistics, strict=True))
        self.stepped: dict[str, torch.Tensor] = {}

    def forward(self, name: str, inputs: tuple) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.modules[name](*inputs))

    def run(self, name: str, inputs: list) -> tuple[list[torch.Tensor], dict]:
        module = self.modules[name]
        module.zero_grad(set_to_none=True)
        outputs = module(*inputs)
        outputs[0].backward()
        grads = {
            n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in module.named_parameters()
        }
        return [o.detach() for o in outputs], grads

    def parameters(self, method: MethodLayout) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.modules[method.name].named_parameters()}

    def optimize(self, method: MethodLayout, grads: dict) -> None:
        self.stepped = grads


def whole_batch_step(parts, x, y):
    """The block's ordinary method (BatchNorm over the whole batch, autograd): its gradients, next
    input and updated running statistics by the run's names."""
    step = BlockStep(*parts.copies(), logits=False).train()
    names, running = _statistics(f"net.blocks.{parts.index}.", step.block, parts.block)
    loss, h, *updated = step(x, y, *running)
    loss.backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in step.named_parameters()}
    return grads, h, dict(zip(names, updated, strict=True))


def check_block(parts, x, y, slices: int) -> None:
    methods = sliced_block(parts, len(y), slices)
    runner = ModuleRunner(methods)
    _, h = sliced_step(runner, methods[0].layout, x, y)
    grads, h_ref, updated = whole_batch_step(parts, x, y)
    scale = max((float(g.abs().max()) for g in grads.values()), default=1.0)
    assert sorted(runner.stepped) == sorted(grads), parts.what
    for name, g in grads.items():
        torch.testing.assert_close(runner.stepped[name], g, rtol=RELATIVE, atol=RELATIVE * scale, msg=name)
    torch.testing.assert_close(h, h_ref, rtol=RELATIVE, atol=1e-5)
    assert sorted(runner.statistics) == sorted(updated)
    for name, value in updated.items():
        torch.testing.assert_close(runner.statistics[name], value, rtol=RELATIVE, atol=1e-6)


def trainer_for(name: str, rule: str = "lls", batch: int = BATCH):
    shape = ZOO_INPUT[name]
    trainer = edge_trainer(rule, specs=narrow(name), input_shape=shape)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, *shape, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    return trainer, x, y


def block_inputs(trainer, x):
    """Every block's input for the batch ``x``."""
    inputs, h = [], x
    net = trainer.net
    with torch.no_grad():
        for block, between in zip(net.blocks, net.between, strict=True):
            inputs.append(h)
            h = between(block(h))
    return inputs


@pytest.mark.parametrize("name", sorted(ZOO_INPUT))
def test_every_block_of_the_zoo_steps_in_slices_as_on_the_whole_batch(name):
    """Conv, dense, depthwise-separable (two BatchNorms), residual (three, one on the shortcut) and
    transformer blocks (none): the slices' gradients, next input and running statistics are the
    whole batch's."""
    trainer, x, y = trainer_for(name)
    parts = block_parts(trainer)
    inputs = block_inputs(trainer, x)
    for p, h in zip(parts, inputs, strict=True):
        check_block(p, h, y, 2 if p.index % 2 else 3)


@pytest.mark.parametrize("rule", SLICED_RULES)
def test_every_rule_that_learns_before_the_head_steps_in_slices_as_on_the_whole_batch(rule):
    trainer, x, y = trainer_for("smallconv", rule)
    for p, h in zip(block_parts(trainer), block_inputs(trainer, x), strict=True):
        check_block(p, h, y, 3)


def test_slices_merge_into_the_batchs_mean_and_biased_variance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g) * 3 + 7
    parts = [(c.mean(0), c.var(0, correction=0)) for c in x.chunk(4)]
    mean, var = merge_statistics(parts)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(var, x.var(0, correction=0))


def test_slices_that_do_not_divide_the_batch_are_refused_in_one_line():
    trainer, _, _ = trainer_for("smallconv")
    with pytest.raises(LLSError, match="4 slices do not divide the batch of 6") as error:
        sliced_block(block_parts(trainer)[0], BATCH, 4)
    assert len(str(error.value).splitlines()) == 1


def test_slices_of_a_block_the_network_lacks_are_refused_in_one_line():
    needs_executorch()
    from lls.edge.programs import build_program

    trainer = edge_trainer("lls")  # one block and the head
    with pytest.raises(LLSError, match="slices name block 3, which the network does not have") as error:
        build_program(trainer, EDGE_BATCH, lr=0.05, slices={3: 2})
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("rule", ["dfa", "bp"])
def test_a_rule_whose_blocks_wait_for_the_head_cannot_slice(rule):
    needs_executorch()
    from lls.edge.programs import build_program

    trainer = edge_trainer(rule)
    with pytest.raises(LLSError, match=f"not {rule}; export without slices") as error:
        build_program(trainer, EDGE_BATCH, lr=0.05, slices={0: 2})
    assert len(str(error.value).splitlines()) == 1


# --- in ExecuTorch's runtime -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "rule", "slices"),
    [("smallconv", "lls-mxm", {0: 2, 1: 4}), ("vgg8", "lls", {1: 2, 6: 4}), ("mobilenetv1", "lls", {1: 2})],
)
def test_sliced_programs_step_in_the_runtime_as_lls_steps_on_the_whole_batch(name, rule, slices):
    """The runtime's sliced step against lls's own trainer, which never slices: the same as the
    unsliced program's figure (tests/test_edge_training.py)."""
    needs_executorch()
    from lls.edge.programs import build_program
    from lls.edge.runtime import ProgramRunner
    from lls.edge.session import check_program

    shape = ZOO_INPUT[name]
    trainer = edge_trainer(rule, specs=narrow(name), input_shape=shape)
    built = build_program(trainer, EDGE_BATCH, lr=0.05, slices=slices)
    assert {m.name: m.sliced["slices"] for m in built.layout.methods if m.sliced} == {
        f"block{i}": s for i, s in slices.items()
    }
    result = check_program(ProgramRunner(built.buffer), trainer, edge_batches(3, shape), 3)
    assert close_to_lls(result.as_dict()), result


@pytest.mark.slow
def test_a_memory_budget_slices_the_block_that_does_not_fit_and_the_plan_shows_the_saving(capsys):
    """``lls cost --runtime executorch --memory``: the unsliced largest block over the budget runs
    in slices, and the planned footprint (what the app holds beside the arena included) fits."""
    needs_executorch()
    base = ["cost", "--model", "smallconv", "--input", "1,16,16", "--classes", "3", "--width", "0.5"]
    base += ["--runtime", "executorch", "--batch", "8", "--json"]
    assert main(base) == 0
    whole = json.loads(capsys.readouterr().out.splitlines()[-1])
    # one byte under: the largest block (the first conv's, at full resolution) must slice to fit
    budget = whole["footprint_bytes"] - 1
    assert (
        whole["largest_method"] != "block0"
        and max(whole["methods"], key=lambda m: m["need"])["name"] == "block0"
    )
    assert main([*base, "--memory", f"{budget}B"]) == 0
    out = capsys.readouterr().out
    sliced = json.loads(out.splitlines()[-1])
    assert sliced["slices"] == {"block0": 2} and "block0 in 2 slices of 4" in out
    assert sliced["footprint_bytes"] <= budget < whole["footprint_bytes"]
    arena = {m["name"]: m["arena"] for m in whole["methods"]}["block0"]
    block0 = [m for m in sliced["methods"] if m["name"].startswith("block0")]
    assert len(block0) == 3 and all(m["arena"] < arena for m in block0)  # statistics, sums, weights
    assert sliced["weights_bytes"] == whole["weights_bytes"]  # the probes are no weights
