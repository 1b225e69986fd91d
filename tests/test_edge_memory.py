"""Memory as an ExecuTorch device sees it: each method's planned arena read from the lowered program,
its weights and gradients, and `lls cost --runtime executorch` comparing LLS's programs with BP's."""

import json
import sys
import warnings

import pytest
import torch
from torch import nn

import lls
from lls.cli import main
from lls.edge.memory import method_memory

FLOAT = 4  # bytes
# `lls cost`'s runtime test: SmallConv at width 1/8 (4, 8, 16 channels and 64 units) on 8 x 8 images
TINY = ["--model", "smallconv", "--width", "0.125", "--input", "1,8,8", "--classes", "3"]


def lowered(module: nn.Module, example: tuple, training: bool = False):
    pytest.importorskip("executorch", reason="needs executorch (docs/edge.md)")
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(module, example, strict=False)
        if training:
            program = _export_forward_backward(program)
        return to_edge(program).to_executorch()


class ConvStep(nn.Module):
    """One block's training step, by hand: a convolution, ReLU, a linear readout, cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.readout = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x, y):
        logits = self.readout(torch.relu(self.conv(x)).flatten(1))
        return nn.functional.cross_entropy(logits, y), logits.detach()


def test_an_inference_programs_weights_are_constants_outside_its_arena():
    memory = method_memory(lowered(nn.Linear(16, 3).eval(), (torch.zeros(2, 16),)))
    forward = memory["forward"]
    assert forward.constants == (16 * 3 + 3) * FLOAT  # weight and bias, read-only
    assert forward.parameters == forward.gradients == 0
    assert forward.arena >= (2 * 16 + 2 * 3) * FLOAT  # at least the input and the logits


def test_a_training_method_plans_its_weights_and_gradients_into_its_arena():
    x, y = torch.zeros(4, 3, 6, 6), torch.zeros(4, dtype=torch.long)
    manager = lowered(ConvStep().train(), (x, y), training=True)
    (step,) = method_memory(manager).values()  # the getters of the joint export are left out
    weights = (8 * 3 * 3 * 3 + 8 + 8 * 6 * 6 * 5 + 5) * FLOAT
    assert step.parameters == step.gradients == weights
    conv_output = 4 * 8 * 6 * 6 * FLOAT  # kept for the backward of ReLU and the readout
    assert step.working >= x.numel() * FLOAT + conv_output
    # the same read from the .pte's bytes
    assert method_memory(manager.buffer)["forward"] == step
    bigger = method_memory(lowered(ConvStep().train(), (torch.zeros(16, 3, 6, 6), y.repeat(4)), True))
    assert bigger["forward"].working > step.working and bigger["forward"].parameters == weights


@pytest.mark.slow  # six training methods lowered: a minute alone on 2 cores, several under load
def test_cost_runtime_executorch_compares_lls_blocks_with_bps_network(capsys):
    pytest.importorskip("executorch", reason="needs executorch (docs/edge.md)")
    argv = ["cost", *TINY, "--runtime", "executorch", "--batch", "2", "--compare", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    record = json.loads(lines[-1])
    lls_, bp = record["rules"]["lls"], record["rules"]["bp"]
    net = lls.create_model("smallconv", in_channels=1, input_size=8, num_classes=3, width=0.125)
    weights = sum(p.numel() for p in net.parameters()) * FLOAT
    # every parameter once in either rule's programs (LLS's square basis is fixed, not a parameter)
    assert lls_["weights_bytes"] == bp["weights_bytes"] == weights
    assert lls_["gradients_bytes"] == bp["gradients_bytes"] == weights
    assert lls_["optimizer_bytes"] == weights  # SGD's momentum, one buffer per parameter
    assert [m["name"] for m in lls_["methods"]] == ["block0", "block1", "block2", "block3", "head"]
    assert [m["name"] for m in bp["methods"]] == ["network"]
    # BP's one method holds all of it; each LLS method a part, so the largest is smaller
    assert (
        bp["largest_arena_bytes"] >= weights * 2 and lls_["largest_arena_bytes"] < bp["largest_arena_bytes"]
    )
    assert lls_["footprint_bytes"] < bp["footprint_bytes"] <= bp["resident_bytes"]
    assert any(line.startswith("lls") and "block" in line for line in lines)


def test_cost_runtime_executorch_without_executorch_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch", None)
    assert main(["cost", *TINY, "--runtime", "executorch", "--batch", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'lls[edge]'" in err


def test_batch_one_is_refused_for_a_pytorch_step_as_before(capsys):
    assert main(["cost", *TINY, "--batch", "1"]) == 2
    assert "BatchNorm needs 2 images" in capsys.readouterr().err
