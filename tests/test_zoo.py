"""Residual networks and the ViT: layouts and parameter counts by hand, locality for every model of
the registry, multiply-adds by hand, the block granularity option."""

import pytest
import torch
from torch import nn

import lls
from lls.method.net import build
from lls.method.signals import latent_dim

from .test_lowmem import CLASSES, ZOO_INPUT, narrow
from .test_trainer import record_gradient_flow

# Block by block at (1, 28, 28) (Fashion-MNIST), block granularity: (output shape, latent pool,
# d_l). Pools: the largest power-of-two side p with C p^2 <= 2048 (16 ch -> 8, 32 ch -> 8, 64 ch -> 4).
CIFAR_STAGES = [((16, 28, 28), 8, 1024), ((32, 14, 14), 8, 2048), ((64, 7, 7), 4, 1024)]
ZOO_LAYOUTS = {
    name: (n, [stage for stage in CIFAR_STAGES for _ in range(n)])
    for name, n in (("resnet20", 3), ("resnet32", 5), ("resnet56", 9), ("resnet110", 18))
}
RESNET18_STAGES = [
    ((64, 28, 28), 4, 1024),
    ((128, 14, 14), 4, 2048),
    ((256, 7, 7), 2, 1024),
    ((512, 4, 4), 2, 2048),
]
ZOO_LAYOUTS["resnet18"] = (
    2,
    [s for s, d in zip(RESNET18_STAGES, (2, 2, 2, 2), strict=True) for _ in range(d)],
)
ZOO_LAYOUTS["resnet34"] = (
    None,
    [s for s, d in zip(RESNET18_STAGES, (3, 4, 6, 3), strict=True) for _ in range(d)],
)
for _name, (_n, _blocks) in ZOO_LAYOUTS.items():  # the last block's latent: the head's global average
    (_c, _h, _w), _, _ = _blocks[-1]
    _blocks[-1] = ((_c, _h, _w), 1, _c)
ZOO_LAYOUTS["vit"] = (None, [((49, 64), None, 64)] * 6)  # 7 x 7 patches of 4 x 4, dim 64; latent: token mean


def cifar_resnet_params(n: int, in_channels: int = 3, classes: int = 10) -> int:
    """ResNet-6n+2 with 1x1-convolution shortcuts where the shape changes, counted by hand."""

    def conv(cin, cout, k=3):
        return cin * cout * k * k

    def bn(c):
        return 2 * c

    total = conv(in_channels, 16) + bn(16)
    cin = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, c) + bn(c) + conv(c, c) + bn(c)
            if cin != c:
                total += conv(cin, c, 1) + bn(c)
            cin = c
    return total + 64 * classes + classes


@pytest.mark.parametrize("name", sorted(ZOO_LAYOUTS))
def test_layout_block_by_block(name):
    from .test_models import uninitialised

    _, blocks = ZOO_LAYOUTS[name]
    net = uninitialised(name, in_channels=1, input_size=28, num_classes=10)
    shapes = net.block_output_shapes((1, 28, 28))
    assert [(tuple(s), p, latent_dim(s, p)) for s, p in zip(shapes, net.latent_pool, strict=True)] == blocks


@pytest.mark.parametrize("granularity", ["block", "stage"])
def test_last_latent_is_what_the_head_reads_or_pooled_as_before(granularity):
    """By default the last block's LLS latent is the global average of its output, the head's input
    (computed here with mean over H, W); 'pooled' keeps the stage's own pool (4 x 4 of 64 channels at
    7 x 7, as in CIFAR_STAGES), what runs made before the option trained with."""
    from lls.method.signals import latent

    torch.manual_seed(0)
    net = lls.create_model("resnet20", in_channels=1, input_size=28, block_granularity=granularity)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        for block, between in zip(net.blocks, net.between, strict=True):
            a = block(x)
            x = between(a)
    assert net.latent_pool[-1] == 1
    torch.testing.assert_close(latent(a, net.latent_pool[-1]), a.mean((2, 3)))
    torch.testing.assert_close(latent(a, net.latent_pool[-1]), x.flatten(1))  # what the head is given
    pooled = lls.create_model(
        "resnet20", in_channels=1, input_size=28, block_granularity=granularity, last_latent="pooled"
    )
    assert pooled.latent_pool[:-1] == net.latent_pool[:-1]
    assert (pooled.latent_pool[-1], latent_dim((64, 7, 7), pooled.latent_pool[-1])) == (4, 1024)


def test_a_resnet_run_recorded_before_last_latent_reads_back_pooled():
    """A config.json written before the option existed trained with the pooled last latent: it
    reads back (and so resumes and evaluates) with it; a new config records today's default; a
    model the option does not concern gets nothing set away from the default."""
    from lls.training.config import TrainConfig

    old = {"dense_latent": "pooled", "depthwise_padding": "1", "block_granularity": "stage", "width": 1.0}
    config = TrainConfig.from_dict({"model": "resnet20", "model_options": dict(old)})
    assert config.model_options["last_latent"] == "pooled"
    assert TrainConfig(model="resnet20").model_options["last_latent"] == "head"
    assert (
        TrainConfig.from_dict({"model": "smallconv", "model_options": {}}).model_options["last_latent"]
        == "head"
    )
    recorded = TrainConfig.from_dict({"model": "resnet20", "model_options": {**old, "last_latent": "head"}})
    assert recorded.model_options["last_latent"] == "head"


@pytest.mark.parametrize("n", [3, 5, 9, 18])
def test_cifar_resnet_parameter_count_by_hand(n):
    net = lls.create_model(f"resnet{6 * n + 2}", in_channels=3, input_size=32)
    assert sum(p.numel() for p in net.parameters()) == cifar_resnet_params(n)


def test_resnet20_is_the_published_size():
    """He et al.'s ResNet-20 has 0.27M parameters (269,722 with parameter-free shortcuts); the two
    1x1 projection shortcuts add 16*32 + 32*64 weights and 2 BatchNorms (2*32 + 2*64)."""
    assert cifar_resnet_params(3) == 269_722 + 16 * 32 + 32 * 64 + 2 * 32 + 2 * 64


@pytest.mark.parametrize("name,params", [("resnet18", 11_173_962), ("resnet34", 21_282_122)])
def test_resnet18_34_have_the_cifar_variants_size(name, params):
    """The widely used CIFAR ResNet-18/34 (3x3 stem, no max-pool, 10 classes) sizes."""
    from .test_models import uninitialised

    net = uninitialised(name, in_channels=3, input_size=32)
    assert sum(p.numel() for p in net.parameters()) == params


def test_vit_parameters_by_hand_and_no_convolution():
    net = lls.create_model("vit", in_channels=1, input_size=28)
    dim, tokens, hidden = 64, 49, 128
    block = (
        2 * 2 * dim
        + (3 * dim * dim + 3 * dim)
        + (dim * dim + dim)
        + (dim * hidden + hidden)
        + (hidden * dim + dim)
    )
    expected = (16 * dim + dim) + tokens * dim + 6 * block + 2 * dim + dim * 10 + 10
    assert sum(p.numel() for p in net.parameters()) == expected
    assert not any(isinstance(m, nn.Conv2d) for m in net.modules())


@pytest.mark.parametrize(
    "name,stage_blocks", [("resnet20", 3), ("resnet110", 3), ("resnet18", 4), ("resnet34", 4)]
)
def test_stage_granularity_one_block_per_stage(name, stage_blocks):
    from .test_models import uninitialised

    by_block = uninitialised(name, in_channels=1, input_size=28)
    by_stage = uninitialised(name, in_channels=1, input_size=28, block_granularity="stage")
    assert len(by_stage.blocks) == stage_blocks
    assert sum(p.numel() for p in by_stage.parameters()) == sum(p.numel() for p in by_block.parameters())
    last_of_stage = [tuple(s) for s in by_block.block_output_shapes((1, 28, 28))]
    stages = [tuple(s) for s in by_stage.block_output_shapes((1, 28, 28))]
    assert stages == list(dict.fromkeys(last_of_stage))  # each stage ends where its last block does


def test_unknown_granularity_names_the_known_ones():
    with pytest.raises(lls.LLSError, match="known granularities: block, stage"):
        lls.create_model("resnet20", block_granularity="layer")


@pytest.mark.parametrize("name", lls.list_models())
def test_no_gradient_crosses_a_block_in_any_model(name):
    shape = ZOO_INPUT[name]
    torch.manual_seed(0)
    net = build(narrow(name), shape, CLASSES, name=name)
    trainer = lls.Trainer(net, "lls", input_shape=shape)
    flow = record_gradient_flow(trainer)
    g = torch.Generator().manual_seed(0)
    trainer.train_step(torch.randn(4, *shape, generator=g), torch.randint(0, CLASSES, (4,), generator=g))
    assert [(u, o) for u, o in flow if u != o] == []
    assert {owner for _, owner in flow} == set(range(len(net.blocks) + 1))


def test_resnet20_forward_multiply_adds_by_hand():
    """Block 1 (the second residual block of stage 1, 16 channels at 28 x 28): two 3x3 convolutions,
    16 * 16 * 9 multiply-adds per output position each; BatchNorm, the sum and the activation are not
    multiply-adds of the FLOP counter."""
    from lls.measure.cost import count_costs

    report = count_costs("resnet20", "lls", (1, 28, 28), 10)
    assert report.blocks[1].forward == 2 * 16 * 16 * 9 * 28 * 28
    first = 1 * 16 * 9 * 28 * 28 + 2 * 16 * 16 * 9 * 28 * 28  # the stem joins block 0
    assert report.blocks[0].forward == first
    assert report.blocks[-1].forward == 64 * 10  # the head


def test_vit_block_multiply_adds_by_hand():
    """A pre-norm block on T = 49 tokens of d = 64, 4 heads of 16: Q, K, V projections T d 3d, scores
    and their weighting 2 * T^2 d, the output projection T d^2, the MLP 2 * T d (2d)."""
    from lls.measure.cost import count_costs

    t, d = 49, 64
    report = count_costs("vit", "lls", (1, 28, 28), 10)
    expected = t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * 2 * d
    assert report.blocks[1].forward == expected
    assert report.blocks[0].forward == expected + t * 16 * d  # the patch embedding joins block 0


def test_compare_says_more_when_a_signal_costs_more_than_bps():
    """A pre-norm ViT: BP's input gradients at block borders are nearly free, LLS's signal is not."""
    from lls.measure.cost import compare_text

    def totals(mults):
        return {"totals": {"step_macs": 10, "signal_mults": mults, "signal_adds": 1, "extra_params": 0}}

    text = compare_text({"bp": totals(640), "lls": totals(2690), "dfa": totals(64)}, "vit", 128)
    assert "4.2x more" in text and " 10x fewer" in text and " 0x fewer" not in text
