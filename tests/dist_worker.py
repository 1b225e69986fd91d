"""The data-parallel worker of test_distributed.py: trains a BatchNorm-free net on fixed data.

``train(rules, out)`` runs in the processes tests/processes.py starts: under torch.distributed's
environment (RANK, WORLD_SIZE, ...) as one rank of a data-parallel run, or without it as the
single-process reference on the combined batch. Rank 0 saves every rule's final weights to ``out``.
"""

import os

import torch
from torch import nn

import lls
from lls.data import Split, TensorLoader
from lls.training.distributed import DataParallel
from lls.training.fit import Loaders


def net() -> lls.LocalNet:
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Linear(8 * 4 * 4, 16), nn.Tanh()),
    ]
    between = [nn.MaxPool2d(2), nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), None]
    return lls.LocalNet(blocks, nn.Linear(16, 5), between, latent_pool=[2, 2, None])


def train(rules: list[str], out: str) -> int:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (100, 1, 16, 16), generator=g, dtype=torch.uint8)
    split = Split(images, torch.arange(100) % 5)
    strategy = DataParallel(torch.device("cpu"), 60) if "WORLD_SIZE" in os.environ else None
    weights = {}
    for rule in rules:
        trainer = lls.Trainer(net(), rule, input_shape=(1, 16, 16))
        loader = TensorLoader(split, 32, mean=(0.5,), std=(0.25,), shuffle=True, seed=3)  # last batch: 4
        if strategy is not None:
            strategy.setup(trainer, Loaders(loader, loader))
        for epoch in range(2):
            for x, y in loader.epoch(epoch):
                trainer.train_step(x, y)
        weights[rule] = trainer.net.state_dict()
    if strategy is None or strategy.main:
        torch.save(weights, out)
    if strategy is not None:
        strategy.barrier()
        strategy.close()
    return 0
