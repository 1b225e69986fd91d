"""LLS against BP where `lls train` cannot go: your own model, or a zoo model with per-block options.

    python benchmarks/lls_vs_bp.py --rule lls --epochs 10 --limit 12000 --holdout 2000
    python benchmarks/lls_vs_bp.py --rule bp  --epochs 10 --limit 12000 --holdout 2000
    python benchmarks/lls_vs_bp.py --zoo resnet20 --granularity stage --latent-pool 8,8,1

A model nobody in this project wrote, brought as a user brings one: torchvision's ResNet-18 layout
(a 7x7 stride-2 stem and a 3x3 stride-2 max pool, four stages `layer1`-`layer4` of two basic blocks,
each with a 1x1 `downsample` where the shape changes, average pool, `fc`), written out here as a
plain `nn.Module` because torchvision is not installed on this machine. `lls.localize` splits it at
`layer1`-`layer4` (the stem joins the first block), and `lls.fit` trains it with the same data,
optimizer, augmentation and evaluation as `lls train` (`--limit`, `--holdout` mean what they mean
there). `--lr` takes one number or one per block and the head (`0.005,0.005,0.005,0.005,0.005`),
which `lls train` cannot. `--zoo NAME` trains a zoo model instead, built as `lls train` builds it
(the same seed, initial weights and batches), and `--latent-pool` sets each block's LLS latent pool
(the side of the adaptive average pool; 1: the global average the head reads), which `lls train`
chooses itself. The last line is a JSON summary, as `lls train --json` prints.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

import lls
from lls.method.rules import seeded_options

STAGES = ("layer1", "layer2", "layer3", "layer4")
WIDTHS = (64, 128, 256, 512)  # torchvision's resnet18: two basic blocks per stage
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-bn-relu-conv-bn, plus the shortcut, then relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layout and names (ImageNet stem), for ``in_channels`` inputs."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, (name, width) in enumerate(zip(STAGES, WIDTHS, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(cin, width, stride),
                *(BasicBlock(width, width, 1) for _ in range(1, BLOCKS_PER_STAGE)),
            ]
            setattr(self, name, nn.Sequential(*blocks))
            cin = width
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def pools(text: str) -> list[int | None]:
    return [None if v == "none" else int(v) for v in text.split(",")]


def learning_rate(text: str) -> float | list[float]:
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rule", default="lls", help="bp or lls (square basis), or any rule `lls list` names"
    )
    parser.add_argument("--zoo", default=None, help="a zoo model instead (resnet20, ...; `lls list`)")
    parser.add_argument("--granularity", default="block", help="--zoo residual networks: block or stage")
    parser.add_argument("--latent-pool", type=pools, default=None, help="each block's latent pool: 8,8,1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--limit", type=int, default=12_000, help="first N training (and test) images")
    parser.add_argument(
        "--holdout", type=int, default=2_000, help="held-out training images to evaluate on (0: test set)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--lr", type=learning_rate, default=5e-3, help="one number, or one per block and the head"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="LLS temperature (default: the rule's)"
    )
    parser.add_argument(
        "--augment", default=None, help="the dataset's augmentation preset (default: its default)"
    )
    parser.add_argument(
        "--block-accuracy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each block's own accuracy every epoch (for bp: ridge probes, slow on a CPU)",
    )
    args = parser.parse_args()
    lls.tune_malloc()
    data = lls.load_dataset("fashion-mnist", augment=args.augment)
    if args.holdout:
        data = data.hold_out(args.holdout)
    options = {"basis": "square"} if args.rule.startswith("lls") else {}
    if args.temperature is not None:
        options["temperature"] = args.temperature
    rule = lls.create_rule(args.rule, **seeded_options(args.rule, options, args.seed))
    torch.manual_seed(args.seed)  # as lls.build_trainer: the rule first, then the initial weights
    if args.zoo:
        net = lls.create_model(
            args.zoo,
            in_channels=data.input_shape[0],
            input_size=data.input_shape[1:],
            num_classes=data.num_classes,
            activation=rule.activation,
            block_granularity=args.granularity,
        )
    else:
        model = ResNet18(in_channels=data.input_shape[0], num_classes=data.num_classes)
        net = lls.localize(model, list(STAGES), input_shape=data.input_shape)
    net = net.to(memory_format=torch.channels_last)
    if args.latent_pool is not None:
        if len(args.latent_pool) != len(net.latent_pool):
            parser.error(f"--latent-pool needs {len(net.latent_pool)} values, one per block")
        net.latent_pool = args.latent_pool
    trainer = lls.Trainer(net, rule, input_shape=data.input_shape, lr=args.lr)
    loaders = lls.Loaders.for_dataset(data, 128, seed=args.seed, limit=args.limit, channels_last=True)
    split = "holdout" if args.holdout else "test"

    def report(record) -> None:
        blocks = " ".join(f"{100 * b:.1f}" for b in record.block_accuracy)
        print(
            f"epoch {record.epoch}: {split} {100 * record.test_accuracy:.2f}% | blocks {blocks}", flush=True
        )

    start = time.perf_counter()
    history = lls.fit(
        trainer, loaders, args.epochs, progress=False, on_epoch=report, block_accuracy=args.block_accuracy
    )
    summary = {
        "model": f"{args.zoo} (by {args.granularity})"
        if args.zoo
        else "torchvision-layout resnet18 (by stage)",
        "rule": args.rule,
        "options": options,
        "lr": args.lr,
        "seed": args.seed,
        "split": split,
        "final_test_accuracy": history.final_test_accuracy,
        "best_test_accuracy": history.best_test_accuracy,
        "latent_pool": net.latent_pool,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
