"""Where LLS's gap to BP on Fashion-MNIST sits: LLS with a two-layer classifier head.

    python benchmarks/fmnist_gap.py --epochs 10 --seeds 0,1 --holdout 10000

SmallConv trained with LLS as everywhere else, except that its dense block (Linear 512 -> BN ->
LeakyReLU) becomes part of the head: the head (dense block + linear classifier) learns from its own
cross-entropy, the three convolutional blocks from LLS; still no gradient crosses into a
convolutional block. Same data, budget, optimizer and evaluation as `lls reproduce compare`, on a
held-out part of the training set. If this matches BP, the last block's basis-aligned representation
is what costs the accuracy; if it matches plain LLS, the convolutional blocks trained by LLS are.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import lls


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument(
        "--holdout",
        type=int,
        default=10_000,
        help="evaluate on this many held-out training images, as `lls train --holdout` (0: test set)",
    )
    args = parser.parse_args()
    lls.tune_malloc()
    data = lls.load_dataset("fashion-mnist")
    if args.holdout:
        data = data.hold_out(args.holdout)
    split = "holdout" if args.holdout else "test"
    finals = []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        zoo = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=10)
        net = lls.LocalNet(
            blocks=list(zoo.blocks[:3]),
            head=nn.Sequential(zoo.blocks[3], zoo.head),
            between=list(zoo.between[:3]),
            latent_pool=zoo.latent_pool[:3],
        ).to(memory_format=torch.channels_last)
        trainer = lls.Trainer(
            net, lls.create_rule("lls", basis="square", seed=seed), input_shape=data.input_shape
        )
        loaders = lls.Loaders.for_dataset(data, 128, seed=seed, channels_last=True)

        def report(record, seed=seed):
            blocks = " ".join(f"{100 * b:.1f}" for b in record.block_accuracy)
            accuracy = 100 * record.test_accuracy
            print(f"seed {seed} epoch {record.epoch}: {split} {accuracy:.2f}% | blocks {blocks}")

        history = lls.fit(trainer, loaders, args.epochs, progress=False, on_epoch=report)
        finals.append(history.final_test_accuracy)
    mean = 100 * statistics.fmean(finals)
    spread = 100 * statistics.stdev(finals) if len(finals) > 1 else 0.0
    print(
        f"LLS conv blocks + 2-layer head, {args.epochs} epochs: {mean:.2f} ± {spread:.2f}% final "
        f"{split} accuracy"
    )


if __name__ == "__main__":
    main()
