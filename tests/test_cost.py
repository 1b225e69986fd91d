"""Multiply-add counts against closed-form formulas, and measured memory invariants."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import lls
from lls.cli import main
from lls.measure.cost import count_costs
from lls.measure.memory import SavedTensorMeter
from lls.method.rules import create_rule

from .conftest import TINY_INPUT, tiny_net

K = 5
# the tiny net: Conv(4) on 1x8x8, MaxPool, Conv(6) on 4x4x4, AvgPool(2), Dense(8) on 24, head 8 -> 5
CONV0 = 8 * 8 * 4 * (1 * 9)
CONV1 = 4 * 4 * 6 * (4 * 9)
DENSE = 24 * 8
HEAD = 8 * K


def test_forward_and_backward_counts_match_the_formulas():
    report = count_costs(tiny_net(), "bp", TINY_INPUT, K)
    forward = [b.forward for b in report.blocks]
    assert forward == [CONV0, CONV1, DENSE, HEAD]
    assert [b.weight_grad for b in report.blocks] == [CONV0, CONV1, DENSE, HEAD]  # dW costs what forward does
    # BP computes every input gradient except the data's; a 3x3 pad-1 conv's costs what its forward does
    assert [b.input_grad for b in report.blocks] == [0, CONV1, DENSE, HEAD]
    assert report.step_macs == 3 * (CONV0 + CONV1 + DENSE + HEAD) - CONV0


@pytest.mark.parametrize("rule", [r for r in lls.list_rules() if r != "bp"])
def test_local_rules_never_pay_input_gradients(rule):
    r = create_rule(rule)
    report = count_costs(tiny_net(activation=r.activation), r, TINY_INPUT, K)
    assert report.total("input_grad") == 0
    assert report.total("forward") == CONV0 + CONV1 + DENSE + HEAD


def test_feedback_projection_costs_k_times_the_output_size():
    report = count_costs(tiny_net(), "dfa", TINY_INPUT, K)
    sizes = [4 * 8 * 8, 6 * 4 * 4, 8]
    assert [b.signal_mults for b in report.blocks[:3]] == [K * s for s in sizes]


def test_lls_signal_by_hand():
    # block 0 of the tiny net: output 4x8x8 pooled to 2x2 -> d = 16, K = 5
    signal = create_rule("lls", basis="square").signal(0, torch.Size((4, 8, 8)), 2, K)
    mults, adds = signal.ops(torch.Size((4, 8, 8)))
    bins, d = 4 * 2 * 2, 16
    pool_adds, pool_mults = 4 * 8 * 8 - bins, 2 * bins
    norm_mults, norm_adds = 5 * d, (d - 1) + 2 * d
    score_adds = 2 * K * d  # forward z @ B^T and backward g @ B: additions only with a +-1 basis
    assert (mults, adds) == (pool_mults + norm_mults, pool_adds + norm_adds + score_adds)
    periodic = create_rule("lls", basis="periodic").signal(0, torch.Size((4, 8, 8)), 2, K)
    assert periodic.ops(torch.Size((4, 8, 8)))[0] == mults + 2 * K * d


def test_lls_scoring_multiplies_agree_with_pytorchs_flop_counter():
    """The closed form's scoring term equals what torch.utils.flop_counter sees for a periodic basis."""
    from torch.utils.flop_counter import FlopCounterMode

    signal = create_rule("lls", basis="periodic").signal(0, torch.Size((64,)), None, K)
    a = torch.randn(3, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        signal(a, torch.tensor([0, 1, 2])).backward()
    assert counter.get_total_flops() // 2 // 3 == 2 * K * 64


def test_saved_tensor_meter_sees_held_activations_and_their_release():
    meter = SavedTensorMeter()
    w = torch.randn(100, 100, requires_grad=True)
    with meter.hooks():
        x = torch.randn(50, 100)
        h = (x @ w).tanh()  # mm saves x (for dW; w is not needed, x wants no gradient), tanh its output
        loss = h.sum()
    held = meter.current
    assert held == (50 * 100 + 50 * 100) * 4
    loss.backward()
    del loss, h
    assert meter.current == 0 and meter.peak == held


def test_cost_command_json(capsys):
    assert (
        main(
            [
                "cost",
                "--model",
                "smallconv",
                "--dataset",
                "fashion-mnist",
                "--rule",
                "lls",
                "--no-memory",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # docs/method.md's SmallConv on 1x28x28: 32, M, 64, M, 128, A(2), fc 512, head 10 (3x3 convs, pad 1)
    convs = 28 * 28 * 32 * (1 * 9) + 14 * 14 * 64 * (32 * 9) + 7 * 7 * 128 * (64 * 9)
    assert result["totals"]["forward"] == convs + (128 * 2 * 2) * 512 + 512 * 10  # 7.7 M, as the issue says
    assert result["totals"]["input_grad"] == 0


@pytest.mark.slow  # each rule's step peak is measured in a fresh interpreter (torch import included)
def test_cost_compare_and_bench_json(capsys):
    assert (
        main(
            [
                "cost",
                "--model",
                "smallconv",
                "--input",
                "1,8,8",
                "--classes",
                "10",
                "--compare",
                "--rules",
                "bp,lls",
                "--batch",
                "16",
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bp, local = result["rules"]["bp"], result["rules"]["lls"]
    assert local["totals"]["step_macs"] < bp["totals"]["step_macs"]
    assert local["memory"]["activation_peak_bytes"] < bp["memory"]["activation_peak_bytes"]
    assert (
        main(
            [
                "bench",
                "--model",
                "smallconv",
                "--input",
                "1,8,8",
                "--classes",
                "10",
                "--rules",
                "lls,bp",
                "--batch",
                "16",
                "--steps",
                "3",
                "--warmup",
                "1",
                "--json",
            ]
        )
        == 0
    )
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lls_row = bench["rules"]["lls"]
    for key in (
        "step_seconds_median",
        "images_per_second",
        "gflops",
        "peak_memory_bytes",
        "time_ratio_to_bp",
        "memory_ratio_to_bp",
    ):
        assert key in lls_row
    assert "time_ratio_to_bp" not in bench["rules"]["bp"]


def test_cost_and_bench_json_without_the_memory_measurements(capsys):
    problem = ["--model", "smallconv", "--input", "1,8,8", "--classes", "10", "--batch", "16"]
    assert main(["cost", *problem, "--compare", "--rules", "bp,lls", "--no-memory", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rules"]["lls"]["totals"]["step_macs"] < result["rules"]["bp"]["totals"]["step_macs"]
    argv = ["bench", *problem, "--rules", "lls,bp", "--steps", "2", "--warmup", "0", "--no-memory", "--json"]
    assert main(argv) == 0
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lls_row = bench["rules"]["lls"]
    assert lls_row["peak_memory_bytes"] is None and lls_row["steps"] == 2 and lls_row["engine"] == "eager"
    assert lls_row["time_ratio_to_bp"] > 0 and "time_ratio_to_bp" not in bench["rules"]["bp"]


def test_cost_needs_a_shape(capsys):
    assert main(["cost", "--model", "vgg8"]) == 2
    assert "--input C,H,W" in capsys.readouterr().err


def test_grouped_and_strided_convolutions_by_formula():
    from lls.measure.cost import module_costs

    depthwise = torch.nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    assert module_costs(depthwise, torch.randn(2, 32, 16, 16))[:3] == (16 * 16 * 32 * 9,) * 3
    strided = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
    assert module_costs(strided, torch.randn(2, 3, 16, 16))[:3] == (8 * 8 * 8 * 27,) * 3


@pytest.mark.parametrize(
    "sizes,pool",
    [((8,), 16), ((8,), 4), ((6,), 4), ((7,), 3), ((8, 8), 2), ((7, 7), 2), ((28, 28), 4)],
)
def test_pooling_counts_follow_the_pooling_operator(sizes, pool):
    """Read PyTorch's adaptive average pooling as a matrix P (bins x entries): the forward sums each
    row's nonzeros (nnz - bins additions) and scales rows of more than one entry; the backward
    scales those rows again and adds up each column's nonzeros (nnz - entries additions). A copy
    (one entry in a bin, as in 1024 -> 2048) costs nothing forward."""
    from lls.method.latent import pooling_ops

    n = math.prod(sizes)
    eye = torch.eye(n, dtype=torch.float64).view(n, 1, *sizes)
    pooling = F.adaptive_avg_pool1d if len(sizes) == 1 else F.adaptive_avg_pool2d
    matrix = pooling(eye, pool).view(n, -1).T  # bins x entries
    nnz, bins = int((matrix != 0).sum()), matrix.shape[0]
    scaled = int(((matrix != 0).sum(1) > 1).sum())
    assert pooling_ops(sizes, pool) == (2 * scaled, (nnz - bins) + (nnz - n))


def test_pooled_dense_latent_signal_by_hand():
    """SmallConvL's dense block, 1024 units pooled to 2048 (each unit copied twice), square basis:
    the pooling's backward adds 1024 pairs of gradients; normalisation and scoring run at d = 2048."""
    k, d, units = 10, 2048, 1024
    signal = create_rule("lls", basis="square").signal(3, torch.Size((units,)), d, k)
    mults, adds = signal.ops(torch.Size((units,)))
    assert (mults, adds) == (5 * d, units + (d - 1) + 2 * d + 2 * k * d)
    shape = (3, 8, 8)  # the dense block's input is 512 x A(2) whatever the image size
    pooled = count_costs("smallconvl", "lls", shape, k)  # the authors' dense latent, by default
    output = count_costs("smallconvl", "lls", shape, k, model_options={"dense_latent": "output"})
    assert pooled.blocks[3].signal_mults == 5 * d and output.blocks[3].signal_mults == 5 * units
    assert output.blocks[3].signal_adds == (units - 1) + 2 * units + 2 * k * units
    assert [b.signal_adds for b in pooled.blocks[:3]] == [b.signal_adds for b in output.blocks[:3]]
    assert pooled.total("forward") == output.total("forward")  # the network is the same
