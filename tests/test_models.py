"""The model zoo: layouts from METHOD.md, any input size and class count, clear shape errors."""

import pytest
import torch

import lls
from lls.models import model_specs
from lls.net import Conv, Dense, DWSeparable

# (input shape, classes) small enough to build every model quickly
SMALL_INPUT = {"mobilenetv1": (3, 32, 32), "vgg11": (3, 32, 32)}


@pytest.mark.parametrize("name", lls.list_models())
@pytest.mark.parametrize("in_channels,classes", [(1, 10), (3, 7)])
def test_every_model_builds_and_runs(name, in_channels, classes):
    size = SMALL_INPUT.get(name, (in_channels, 28, 28))[1]
    net = lls.create_model(name, in_channels=in_channels, input_size=size, num_classes=classes)
    trainable = [s for s in model_specs(name) if isinstance(s, (Conv, DWSeparable, Dense))]
    assert len(net.blocks) == len(trainable) == len(net.latent_pool)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, classes)


def test_paper_latent_pool_sizes():
    assert lls.create_model("smallconv", in_channels=1, input_size=28).latent_pool == [4, 2, 2, None]
    assert lls.create_model("smallconvl", in_channels=3).latent_pool == [4, 2, 2, None]
    assert lls.create_model("vgg8").latent_pool == [4, 2, 2, 2, 2, 2, None]
    assert lls.create_model("mobilenetv1").latent_pool == [8, 4, 4, 4] + [2] * 8 + [1, 1]


def test_smallconv_parameter_count_by_hand():
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=10)
    conv = (1 * 9 + 1) * 32 + (32 * 9 + 1) * 64 + (64 * 9 + 1) * 128
    bn = 2 * (32 + 64 + 128 + 512)
    dense = (128 * 2 * 2 + 1) * 512
    head = (512 + 1) * 10
    assert sum(p.numel() for p in net.parameters()) == conv + bn + dense + head


def test_smallconv_block_outputs_on_fashion_mnist():
    net = lls.create_model("smallconv", in_channels=1, input_size=28)
    shapes = net.block_output_shapes((1, 28, 28))
    assert [tuple(s) for s in shapes] == [(32, 28, 28), (64, 14, 14), (128, 7, 7), (512,)]


def test_mobilenet_blocks_are_depthwise_separable():
    net = lls.create_model("mobilenetv1", input_size=64)
    shapes = net.block_output_shapes((3, 64, 64))
    assert tuple(shapes[0]) == (32, 32, 32) and tuple(shapes[-1]) == (1024, 2, 2)
    depthwise = net.blocks[1][0]
    assert depthwise.groups == depthwise.in_channels == 32


def test_blocks_use_leaky_relu_0_01_and_batchnorm():
    net = lls.create_model("smallconv", in_channels=1, input_size=28)
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 4 and all(a.negative_slope == 0.01 for a in acts)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 3


def test_too_small_input_is_a_clear_error():
    with pytest.raises(lls.LLSError, match="cannot take inputs of shape"):
        lls.create_model("vgg8", input_size=4)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(lls.LLSError, match="known models: mobilenetv1, smallconv"):
        lls.create_model("resnet50")


def test_memory_lean_leaky_relu_matches_pytorch_and_saves_only_its_output():
    from lls.net import LeakyReLU

    x = torch.randn(4, 3, 5, 5, dtype=torch.float64).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        x[0, 0, 0, 0] = 0.0  # the kink: PyTorch's gradient there is the slope
        x2[0, 0, 0, 0] = 0.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = LeakyReLU(0.01)(x)
    ref = torch.nn.LeakyReLU(0.01)(x2)
    assert torch.equal(out, ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, x2.grad)
    assert len(saved) == 1 and saved[0].data_ptr() == out.data_ptr()  # the output, not the input
