"""Shared fixtures: tiny networks and the digits dataset, so most tests run in milliseconds."""

from __future__ import annotations

import os

import pytest
import torch

import lls
from lls.method.net import AvgPool, Conv, Dense, MaxPool, build

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share two cores: one thread each
    torch.set_num_threads(1)

TINY_SPECS = (Conv(4, pool=2), MaxPool(), Conv(6, pool=1), AvgPool(2), Dense(8))
TINY_INPUT = (1, 8, 8)
NUM_CLASSES = 5


def tiny_net(seed: int = 0, activation: str = "leaky_relu") -> lls.LocalNet:
    torch.manual_seed(seed)
    return build(TINY_SPECS, TINY_INPUT, NUM_CLASSES, activation)


def tiny_batch(n: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *TINY_INPUT, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def tiny_trainer(rule: str, seed: int = 0, **options) -> lls.Trainer:
    return lls.build_trainer(TINY_SPECS, rule, TINY_INPUT, NUM_CLASSES, rule_options=options, seed=seed)


@pytest.fixture(scope="session")
def digits() -> lls.Dataset:
    pytest.importorskip("sklearn")
    return lls.load_dataset("digits")
