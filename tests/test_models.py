"""The model zoo: layouts from docs/method.md, any input size and class count, clear shape errors."""

import pytest
import torch

import lls
from lls.method.models import model_specs
from lls.method.net import Conv, Dense, DWSeparable, build

from .test_zoo import ZOO_LAYOUTS

# (input shape, classes) small enough to build every model quickly
SMALL_INPUT = {"mobilenetv1": (3, 32, 32), "vgg11": (3, 32, 32)}


@pytest.mark.parametrize("name", lls.list_models())
@pytest.mark.parametrize("in_channels,classes", [(1, 10), (3, 7)])
def test_every_model_builds_and_runs(name, in_channels, classes):
    size = SMALL_INPUT.get(name, (in_channels, 28, 28))[1]
    net = lls.create_model(name, in_channels=in_channels, input_size=size, num_classes=classes)
    trainable = [s for s in model_specs(name) if isinstance(s, (Conv, DWSeparable, Dense))]
    if name in ZOO_LAYOUTS:  # residual nets and the ViT: several blocks per spec
        trainable = ZOO_LAYOUTS[name][1]
    assert len(net.blocks) == len(trainable) == len(net.latent_pool)
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, classes)


# docs/method.md's model table and latent pool sizes, written out block by block for one input
# size each: (kind, output shape, stride of the block's 3x3 convolution, latent pool, d_l). "conv" is
# 3x3 pad 1 + BN + LeakyReLU, "dw" depthwise 3x3 + BN + act + pointwise 1x1 + BN + act, "fc" Linear
# + BN1d + act. The output shapes follow from the max-pools (M) between blocks; a dense block's pool
# is the length the authors' code pools its output to (SmallConvL 1024 -> 2048, VGG11 4096 -> 2048;
# the output's own length, i.e. no pooling, for SmallConv and VGG8).
LAYOUTS = {
    "smallconv": (  # 32, M, 64, M, 128, A(2), fc 512
        (1, 28, 28),
        [
            ("conv", (32, 28, 28), 1, 4, 32 * 16),
            ("conv", (64, 14, 14), 1, 2, 64 * 4),
            ("conv", (128, 7, 7), 1, 2, 128 * 4),
            ("fc", (512,), None, None, 512),
        ],
        128 * 2 * 2,
        512,
    ),
    "smallconvl": (  # 96, M, 192, M, 512, A(2), fc 1024
        (3, 32, 32),
        [
            ("conv", (96, 32, 32), 1, 4, 96 * 16),
            ("conv", (192, 16, 16), 1, 2, 192 * 4),
            ("conv", (512, 8, 8), 1, 2, 512 * 4),
            ("fc", (1024,), None, 2048, 2048),
        ],
        512 * 2 * 2,
        1024,
    ),
    "vgg8": (  # 128, 256, M, 256, 256, M, 512, M, 512, A(2), fc 1024
        (3, 32, 32),
        [
            ("conv", (128, 32, 32), 1, 4, 128 * 16),
            ("conv", (256, 32, 32), 1, 2, 256 * 4),
            ("conv", (256, 16, 16), 1, 2, 256 * 4),
            ("conv", (256, 16, 16), 1, 2, 256 * 4),
            ("conv", (512, 8, 8), 1, 2, 512 * 4),
            ("conv", (512, 4, 4), 1, 2, 512 * 4),
            ("fc", (1024,), None, None, 1024),
        ],
        512 * 2 * 2,
        1024,
    ),
    "vgg11": (  # 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, A(8), fc 4096, fc 4096
        (3, 32, 32),
        [
            ("conv", (64, 32, 32), 1, 4, 64 * 16),
            ("conv", (128, 16, 16), 1, 2, 128 * 4),
            ("conv", (256, 8, 8), 1, 2, 256 * 4),
            ("conv", (256, 8, 8), 1, 2, 256 * 4),
            ("conv", (512, 4, 4), 1, 2, 512 * 4),
            ("conv", (512, 4, 4), 1, 2, 512 * 4),
            ("conv", (512, 2, 2), 1, 2, 512 * 4),
            ("conv", (512, 2, 2), 1, 2, 512 * 4),
            ("fc", (4096,), None, 2048, 2048),
            ("fc", (4096,), None, 2048, 2048),
        ],
        512 * 8 * 8,
        4096,
    ),
    "mobilenetv1": (  # conv 32 /2, dw 64, 128/2, 128, 256/2, 256, 512/2, 5 x 512, 1024/2, 1024; A(1)
        (3, 128, 128),
        [
            ("conv", (32, 64, 64), 2, 8, 32 * 64),
            ("dw", (64, 64, 64), 1, 4, 64 * 16),
            ("dw", (128, 32, 32), 2, 4, 128 * 16),
            ("dw", (128, 32, 32), 1, 4, 128 * 16),
            ("dw", (256, 16, 16), 2, 2, 256 * 4),
            ("dw", (256, 16, 16), 1, 2, 256 * 4),
            ("dw", (512, 8, 8), 2, 2, 512 * 4),
            *[("dw", (512, 8, 8), 1, 2, 512 * 4)] * 5,
            ("dw", (1024, 4, 4), 2, 1, 1024),
            ("dw", (1024, 4, 4), 1, 1, 1024),
        ],
        None,
        1024,
    ),
}


def uninitialised(name: str, **kwargs) -> lls.LocalNet:
    """The model with its weights left uninitialised (for shapes only): VGG11's 134 M in ms."""
    from unittest import mock

    with (
        mock.patch.object(torch.nn.Linear, "reset_parameters", lambda self: None),
        mock.patch.object(torch.nn.Conv2d, "reset_parameters", lambda self: None),
    ):
        return lls.create_model(name, **kwargs)


def test_every_model_has_a_layout_written_out():
    assert sorted([*LAYOUTS, *ZOO_LAYOUTS]) == sorted(lls.list_models())


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_block_by_block(name):
    from lls.method.signals import latent_dim

    input_shape, blocks, first_dense_input, head_input = LAYOUTS[name]
    net = uninitialised(name, in_channels=input_shape[0], input_size=input_shape[1:], num_classes=10)
    shapes = net.block_output_shapes(input_shape)
    assert len(net.blocks) == len(blocks)
    channels = input_shape[0]
    for i, (kind, shape, stride, pool, dim) in enumerate(blocks):
        block, where = net.blocks[i], f"{name} block {i}"
        assert tuple(shapes[i]) == shape, where
        assert net.latent_pool[i] == pool, where
        assert latent_dim(shapes[i], net.latent_pool[i]) == dim, where
        layers = [m for m in block if not isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
        norms = [m for m in block if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d))]
        if kind == "fc":
            (linear, _) = layers
            assert isinstance(linear, torch.nn.Linear) and linear.out_features == shape[0], where
            if i == 0 or blocks[i - 1][0] != "fc":
                assert linear.in_features == first_dense_input, where
        else:
            convs = [m for m in layers if isinstance(m, torch.nn.Conv2d)]
            first = convs[0]
            assert (first.kernel_size, first.stride, first.padding) == ((3, 3), (stride, stride), (1, 1)), (
                where
            )
            if kind == "conv":
                assert len(convs) == 1 and first.bias is not None and first.out_channels == shape[0], where
            else:  # depthwise 3x3 over the input's channels, then pointwise 1x1 to the block's
                depthwise, pointwise = convs
                assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == channels, where
                assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == shape[0], where
        assert [n.num_features for n in norms] == ([channels] if kind == "dw" else []) + [shape[0]], where
        channels = shape[0]
    assert net.head.in_features == head_input and net.head.out_features == 10


def test_mobilenet_depthwise_padding_as_the_authors():
    """The authors' code pads each depthwise convolution by its stride: at 128 px the strided blocks
    give 64 -> 33 -> 18 -> 10 -> 6 instead of the layout's 64 -> 32 -> 16 -> 8 -> 4."""
    net = uninitialised("mobilenetv1", input_size=128, depthwise_padding="stride")
    shapes = net.block_output_shapes((3, 128, 128))
    _, blocks, _, _ = LAYOUTS["mobilenetv1"]
    strided = [i for i, (_, _, stride, _, _) in enumerate(blocks) if stride == 2]
    assert [shapes[i][-1] for i in strided] == [64, 33, 18, 10, 6]
    assert all(shapes[i][-1] == shapes[i - 1][-1] for i in range(1, len(shapes)) if i not in strided)
    assert [tuple(s[:1]) for s in shapes] == [shape[:1] for _, shape, _, _, _ in blocks]
    depthwise = [block[0] for block in net.blocks[1:]]
    assert [d.padding for d in depthwise] == [d.stride for d in depthwise]


# MLPerf Tiny's Visual Wake Words model (training/visual_wake_words/vww_model.py): MobileNetV1 at
# alpha 0.25 on 96 x 96 images, 2 classes: a strided 3x3 convolution of 8 filters, then 13 depthwise-
# separable blocks whose pointwise convolutions have these filters, strided where the layout doubles
VWW_POINTWISE = [16, 32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 256, 256]
VWW_SIDES = [48, 48, 24, 24, 12, 12, 6, 6, 6, 6, 6, 6, 3, 3]  # each block's output side, from 96 px


def test_width_scales_mobilenetv1_as_mlperf_tinys_visual_wake_words_model():
    net = lls.create_model("mobilenetv1", input_size=96, num_classes=2, width=0.25)
    shapes = net.block_output_shapes((3, 96, 96))
    assert [s[0] for s in shapes] == [8, *VWW_POINTWISE]
    assert [s[-1] for s in shapes] == VWW_SIDES
    depthwise = [block[0] for block in net.blocks[1:]]
    assert [d.in_channels for d in depthwise] == [d.groups for d in depthwise] == [8, *VWW_POINTWISE[:-1]]
    assert (net.head.in_features, net.head.out_features) == (256, 2)


def test_width_rounds_down_as_keras_and_scales_every_kind_of_block():
    net = uninitialised("mobilenetv1", input_size=32, width=0.3)
    assert [s[0] for s in net.block_output_shapes((3, 32, 32))][:3] == [9, 19, 38]  # int(32 * 0.3) ...
    vgg = uninitialised("vgg8", input_size=32, width=0.5)
    assert [s[0] for s in vgg.block_output_shapes((3, 32, 32))] == [64, 128, 128, 128, 256, 256, 512]
    assert vgg.latent_pool[-1] is None  # the dense block's latent (its own 512 units) scales with it
    resnet = uninitialised("resnet20", input_size=32, width=0.5)
    assert [s[0] for s in resnet.block_output_shapes((3, 32, 32))] == [8] * 3 + [16] * 3 + [32] * 3
    vit = uninitialised("vit", input_size=32, width=0.3)  # 64 * 0.3 = 19.2: 16, four heads of 4
    assert vit.blocks[-1][-1].normalized_shape == (16,)
    with pytest.raises(lls.LLSError, match="width"):
        lls.create_model("smallconv", width=0)


def test_dense_latent_output_scores_dense_outputs_as_they_are():
    """The layouts above are the default ('pooled', the authors' lengths); 'output' keeps the units."""
    from lls.method.signals import latent_dim

    for name, width in (("smallconvl", 1024), ("vgg11", 4096)):
        net = uninitialised(name, input_size=32, dense_latent="output")
        shapes = net.block_output_shapes((3, 32, 32))
        assert latent_dim(shapes[-1], net.latent_pool[-1]) == width and net.latent_pool[-1] is None


def test_unknown_model_option_names_the_known_ones():
    with pytest.raises(lls.LLSError, match="known dense latents: pooled, output"):
        lls.create_model("smallconv", dense_latent="flat")
    with pytest.raises(lls.LLSError, match="models have no option 'latent'; their options: dense_latent"):
        lls.create_model("smallconv", latent="output")


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
    with pytest.raises(lls.LLSError, match="known models: mobilenetv1, resnet110, resnet18"):
        lls.create_model("resnet50")


def test_memory_lean_leaky_relu_matches_pytorch_and_saves_only_its_output():
    from lls.method.net import LeakyReLU

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


def test_a_new_layer_kind_is_one_class():
    """A spec that adds itself (``add_to``) is all ``build`` needs: a trainable block and a fixed op
    defined here, outside the library, build into a LocalNet with the shapes they say."""

    class Pointwise:  # a trainable 1x1 convolution block, its latent pooled to 2 x 2
        def __init__(self, channels: int) -> None:
            self.channels = channels

        def add_to(self, net) -> None:
            c, h, w = net.spatial()
            net.add_block(torch.nn.Conv2d(c, self.channels, 1), 2, (self.channels, h, w))

    class Clamp:  # a fixed op after the block before it
        def add_to(self, net) -> None:
            net.add_ops(self, torch.nn.Hardtanh())

    net = build([Pointwise(3), Clamp(), Dense(4)], (1, 6, 6), num_classes=2)
    assert [type(b[0] if isinstance(b, torch.nn.Sequential) else b) for b in net.blocks] == [
        torch.nn.Conv2d,
        torch.nn.Linear,
    ]
    assert net.latent_pool == [2, None]
    assert isinstance(net.between[0][0], torch.nn.Hardtanh)  # then the Dense block's flatten
    assert net.block_output_shapes((1, 6, 6)) == [torch.Size([3, 6, 6]), torch.Size([4])]
    assert net(torch.zeros(2, 1, 6, 6)).shape == (2, 2)
    with pytest.raises(TypeError, match="unknown block spec"):
        build([object()], (1, 6, 6), num_classes=2)
