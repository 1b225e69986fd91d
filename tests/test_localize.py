"""lls.localize: nn.Sequential split by index, by count (balanced multiply-adds) or per layer;
models with named children split by names (a torchvision-layout ResNet-18); every refusal; the
README's "Your own model" code, run as written."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lls
from lls.method.localize import choose_pool

README = Path(__file__).resolve().parents[1] / "README.md"
RESNET_STAGES = ["layer1", "layer2", "layer3", "layer4"]


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, as torchvision writes it."""

    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layout: attribute names, 7x7 stem, max-pool, four stages of two
    basic blocks, average pool, torch.flatten, fc."""

    def __init__(self, num_classes=1000, in_channels=3):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(64)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample), BasicBlock(planes, planes)]
        self.inplanes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def trains(net: lls.LocalNet, shape, classes: int, steps: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Block losses of the first and the last of ``steps`` LLS steps on one fixed batch."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, *shape, generator=g), torch.randint(0, classes, (8,), generator=g)
    trainer = lls.Trainer(net, "lls", optimizer="adam", lr=1e-3)
    losses = [trainer.train_step(x, y).block_losses for _ in range(steps)]
    return losses[0], losses[-1]


def test_torchvision_layout_resnet18_by_stage_names_trains_with_lls():
    torch.manual_seed(0)
    model = ResNet18(num_classes=10)
    net = lls.localize(model, RESNET_STAGES, input_shape=(3, 32, 32))
    assert len(net.blocks) == 4 and net.blocks[1] is model.layer2 and net.blocks[3] is model.layer4
    stem = net.blocks[0][0]  # conv1, bn1, relu and maxpool run before layer1, inside block 0
    assert {stem.conv1, stem.bn1, stem.maxpool} <= set(stem.modules()) and net.blocks[0][1] is model.layer1
    assert net.head.fc is model.fc  # avgpool, flatten, fc
    # 32 px: 8 x 8 after the stem, then 8, 4, 2, 1: C p^2 <= 2048 -> p = 4 (64 ch), 4, 2, 1
    shapes = [tuple(s) for s in net.block_output_shapes((3, 32, 32))]
    assert shapes == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert net.latent_pool == [4, None, None, None]  # 128*16 = 2048, 1024 and 512 fit as they are
    first, last = trains(net, (3, 32, 32), 10)
    assert (last < first).all(), (first, last)
    assert next(model.parameters()) is next(net.parameters())  # training the LocalNet trains the model


def test_resnet18_one_block_per_residual_block():
    model = ResNet18(num_classes=10, in_channels=1)
    net = lls.localize(model, ["layer*.*"], input_shape=(1, 28, 28))
    assert len(net.blocks) == 8 and net.blocks[7] is model.layer4[1]
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model(x))


def test_torchvision_resnet18_itself():
    torchvision = pytest.importorskip(
        "torchvision",
        reason="torchvision does not import beside the CPU build of torch (the GPU image has it)",
    )
    model = torchvision.models.resnet18(num_classes=10)
    net = lls.localize(model, RESNET_STAGES, input_shape=(3, 32, 32))
    first, last = trains(net, (3, 32, 32), 10)
    assert len(net.blocks) == 4 and (last < first).all()


class Skip(nn.Module):
    def __init__(self, from_input=False):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.from_input = from_input

    def forward(self, x):
        h = self.a(x)
        return self.fc(self.b(h) + (x if self.from_input else h))


class WeightsBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return self.fc(self.b(self.a(x) * self.scale))


def mlp(*tail: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3), *tail)


@pytest.mark.parametrize(
    "make,match",
    [
        (
            lambda: lls.localize(Skip(), ["a", "b"], input_shape=(8,)),
            "a tensor skips from block 'a' to the head",
        ),
        (lambda: lls.localize(Skip(True), ["a", "b"], input_shape=(8,)), "skips from the input to the head"),
        (lambda: lls.localize(WeightsBetween(), ["a", "b"], input_shape=(8,)), "'scale' runs between blocks"),
        (lambda: lls.localize(ResNet18(), ["layer1", "layer3"], input_shape=(3, 32, 32)), "has weights"),
        (lambda: lls.localize(ResNet18(), ["layer2", "layer1"], input_shape=(3, 32, 32)), "in the order"),
        (
            lambda: lls.localize(ResNet18(), [*RESNET_STAGES, "fc"], input_shape=(3, 32, 32)),
            "head must run last",
        ),
        (lambda: lls.localize(ResNet18(), ["layer9"], input_shape=(3, 32, 32)), "no submodule 'layer9'"),
        (lambda: lls.localize(ResNet18(), ["layer1", "layer1.0"], input_shape=(3, 32, 32)), "lies inside"),
        (lambda: lls.localize(ResNet18(), input_shape=(3, 32, 32)), "not an nn.Sequential: name its blocks"),
        (lambda: lls.localize(mlp(nn.Softmax(1)), input_shape=(8,)), "the head .* is not last: Softmax"),
        (
            lambda: lls.localize(mlp(nn.BatchNorm1d(3)), input_shape=(8,)),
            "last layer with weights is a BatchNorm1d",
        ),
        (lambda: lls.localize(mlp(), [2, 1], input_shape=(8,)), "increasing layer indices"),
        (lambda: lls.localize(mlp(), 3, input_shape=(8,)), "ask for 1 to 2 blocks"),
        (lambda: lls.localize(mlp(), input_shape=(9,)), "does not accept inputs of shape"),
        (lambda: lls.Trainer(ResNet18(), "lls"), "not a LocalNet: split it into blocks with lls.localize"),
    ],
)
def test_what_cannot_be_localized_is_refused_in_one_line(make, match):
    with pytest.raises(lls.LLSError, match=match) as error:
        make()
    assert "\n" not in str(error.value)


def test_sequential_split_balanced_by_multiply_adds():
    """Linear layers of 8*100 = 800, 100*100 = 10,000 and 10,000 multiply-adds: two blocks balance
    as [800 + 10,000 | 10,000] (largest 10,800), not [800 | 20,000]."""
    model = nn.Sequential(
        nn.Linear(8, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
        nn.Dropout(0.1), nn.Linear(100, 3),
    )  # fmt: skip
    net = lls.localize(model, 2, input_shape=(8,))
    assert [len(b) for b in net.blocks] == [4, 2] and net.blocks[1][0] is model[4]
    assert isinstance(net.between[1], nn.Dropout) and net.head is model[7]  # the dropout ends block 1
    by_index = lls.localize(model, [2, 4], input_shape=(8,))
    assert [b[0] for b in by_index.blocks] == [model[0], model[2], model[4]]
    per_layer = lls.localize(model, input_shape=(8,))
    assert len(per_layer.blocks) == 3 and per_layer.input_shape == (8,)


def test_conv_sequential_keeps_batchnorm_with_its_conv_and_pools_between():
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 4),
    )  # fmt: skip
    net = lls.localize(model, input_shape=(1, 28, 28))
    assert list(net.blocks[0]) == list(model[:3]) and net.between[0] is model[3]
    assert list(net.blocks[1]) == list(model[4:7]) and net.between[1] is model[7]
    assert net.latent_pool == [16, None]  # 8 x 28 x 28 pooled to 8 x 16 x 16 = 2048; 8 x 14 x 14 fits


@pytest.mark.parametrize(
    "shape,pool",
    [
        ((16, 28, 28), 8),  # 16 * 64 = 1024; p = 16 would give 4096
        ((32, 14, 14), 8),  # 32 * 64 = 2048 exactly
        ((8, 28, 28), 16),  # 8 * 256 = 2048
        ((64, 7, 7), 4),
        ((4096, 2, 2), 1),  # more channels than the bound: the global average
        ((8, 7, 7), None),  # 392 entries fit as they are
        ((4096,), 2048),  # VGG11's dense blocks
        ((512,), None),
        ((49, 64), None),  # tokens: the token mean
    ],
)
def test_latent_pool_keeps_latents_within_2048(shape, pool):
    assert choose_pool(shape) == pool


def test_mlp_on_tabular_data_learns():
    """A plain MLP of Linear blocks on 20 float features whose class is the largest of the first 3."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(
        nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(),
        nn.Linear(64, 3),
    )  # fmt: skip
    torch.manual_seed(0)
    trainer = lls.Trainer(lls.localize(model, input_shape=(20,)), "lls", optimizer="adam", lr=1e-2)
    train = [(x[i : i + 50], y[i : i + 50]) for i in range(0, 500, 50)]
    history = lls.fit(trainer, train, epochs=5, test=[(x[500:], y[500:])], progress=False)
    assert history.best_test_accuracy > 0.6  # chance is 1/3


def readme_section(title: str) -> str:
    text = README.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))


def test_readme_your_own_model_runs_as_written(capsys):
    code = readme_section("Your own model")
    assert "lls.localize(model" in code and "lls.localize(resnet" in code and "DataLoader(" in code
    torch.manual_seed(0)
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    assert len(namespace["history"].records) == 2
    assert re.search(r"test accuracy \d+\.\d%", capsys.readouterr().out)
