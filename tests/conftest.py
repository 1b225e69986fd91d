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


# Mutation testing (docs/testing.md): mutmut runs, for each mutant, the tests that executed the
# mutated function; of those, only the files below that exercise the mutant's module, so that a
# change to the basis is judged by the method's tests and not by every test that trains a network.
MUTATION_TESTS = {
    "lls.method.basis": ("test_basis.py", "test_rules.py"),
    "lls.method.latent": ("test_latent.py", "test_rules.py", "test_fused.py", "test_engine.py"),
    "lls.method.signals": ("test_rules.py", "test_fused.py", "test_cost.py"),
    "lls.method.fused": ("test_fused.py", "test_engine.py"),
    "lls.method.rules": ("test_rules.py", "test_presets.py"),
    "lls.step.sfadamw": ("test_sfadamw.py",),
    "lls.step.step": (
        "test_trainer.py",
        "test_rules.py",
        "test_lowmem.py",
        "test_step.py",
        "test_precision.py",
    ),
    "lls.step.trainer": ("test_trainer.py", "test_rules.py", "test_trainer_state.py"),
    "lls.step.evaluation": ("test_trainer.py", "test_fit.py"),
    "lls.step.factory": ("test_trainer.py", "test_step.py"),
    "lls.step.lowmem": ("test_lowmem.py",),
    "lls.step.sliced": ("test_lowmem.py",),
    "lls.step.sliced_norm": ("test_lowmem.py",),
    "lls.training.fit": ("test_fit.py", "test_trainer.py"),
    "lls.training.presets": ("test_presets.py", "test_reproduce.py"),
}


def pytest_collection_modifyitems(config, items):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    files = next((f for module, f in MUTATION_TESTS.items() if mutant.startswith(module + ".")), None)
    if files is None:  # an ordinary run, or mutmut's runs without a mutant
        return
    config.hook.pytest_deselected(items=[item for item in items if item.path.name not in files])
    items[:] = [item for item in items if item.path.name in files]
