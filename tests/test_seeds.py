"""Every place the run's seed reaches, against the authors' code (github mapolinario94/LLS-DNN).

The authors seed nothing (main.py has no manual_seed): whatever they draw at random changes from
run to run, and here it changes with the seed; whatever is a function of the setup alone stays the
same for every seed. What is this project's own (the hold-out split) follows the README.
"""

from __future__ import annotations

import pytest
import torch

import lls
from lls.data import make_loader
from lls.data.base import Augment
from lls.training.config import TrainConfig, config_from_options
from lls.training.presets import PRESETS
from lls.training.run import build_session

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS


def trainer(rule: str, seed: int, **options) -> lls.Trainer:
    return lls.build_trainer(TINY_SPECS, rule, TINY_INPUT, NUM_CLASSES, seed=seed, rule_options=options)


def tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for t in [*module.parameters(), *module.buffers()]]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("rule", ["bp", "lls", "lls-m", "lls-mxm", "local-classifier", "dfa"])
def test_initial_weights_change_with_the_seed(rule):
    """Weights (lls_layers.py:77-78 nn.Conv2d's init from the global generator) and the rule's own
    learned tensors (LLS-M / MxM modulation lls_layers.py:168,171; local classifiers :153)."""
    net = [tensors(trainer(rule, seed).net) for seed in (0, 0, 1)]
    assert same(net[0], net[1]) and not same(net[0], net[2])
    signals = [[tensors(s) for s in trainer(rule, seed).signals] for seed in (0, 0, 1)]
    learned = any(True for s in trainer(rule, 0).signals for _ in s.parameters())
    assert all(same(a, b) for a, b in zip(signals[0], signals[1], strict=True))
    if learned:  # a rule with learned tensors of its own draws them from the seed too
        assert not all(same(a, b) for a, b in zip(signals[0], signals[2], strict=True))


@pytest.mark.parametrize("basis", ["periodic", "square"])
def test_the_periodic_and_square_bases_are_the_same_for_every_seed(basis):
    """lls_layers.py:11-19,47-50: a function of (K, d) alone."""
    bases = [[s.basis.clone() for s in trainer("lls", seed, basis=basis).signals] for seed in (0, 1, 7)]
    assert all(same(bases[0], other) for other in bases[1:])


@pytest.mark.parametrize(
    "rule,options,fixed", [("lls", {"basis": "random"}, "basis"), ("dfa", {}, "feedback")]
)
def test_random_bases_and_feedback_matrices_change_with_the_seed_and_the_block(rule, options, fixed):
    """lls_layers.py:157 (0.1 * randn) and feedback_alignment.py:137 (1e-4 * rand): drawn anew for
    every block, from an unseeded generator."""
    draws = {
        seed: [getattr(s, fixed).clone() for s in trainer(rule, seed, **options).signals] for seed in (0, 1)
    }
    again = [getattr(s, fixed) for s in trainer(rule, 0, **options).signals]
    assert same(draws[0], again)
    assert all(not torch.equal(a, b) for a, b in zip(draws[0], draws[1], strict=True))
    # blocks do not share draws: the first entries of the blocks' first rows differ
    firsts = [d.flatten()[:8] for d in draws[0]]
    assert len({tuple(f.tolist()) for f in firsts}) == len(firsts)


def loader(seed: int, augment: Augment | None = None, shuffle: bool = True):
    data = lls.load_dataset("digits")
    return make_loader(
        data.train.head(64),
        8,
        mean=data.mean,
        std=data.std,
        augment=augment or Augment(crop_padding=1, hflip=True, erasing=0.5),
        shuffle=shuffle,
        seed=seed,
    )


def epoch(loader_, number=0, stream="train"):
    batches = list(loader_.epoch(number, stream=stream))
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def test_shuffling_and_augmentation_change_with_the_seed_and_the_epoch(digits):
    """DataLoader(shuffle=True) (dataloader.py:297) draws a new order, crops, flips and erasures
    every epoch and every run."""
    x0, y0 = epoch(loader(0))
    assert all(torch.equal(a, b) for a, b in zip((x0, y0), epoch(loader(0)), strict=True))
    _, y1 = epoch(loader(1))
    assert not torch.equal(y0, y1)  # another order
    _, y_next = epoch(loader(0), 1)
    assert not torch.equal(y0, y_next)  # a new order each epoch
    # the same order, other augmentation draws: without shuffling only the draws change
    plain = [epoch(loader(seed, shuffle=False))[0] for seed in (0, 1)]
    assert not torch.equal(plain[0], plain[1])
    # and the refresh pass is a stream of its own, seeded alike
    refresh = [epoch(loader(seed), 0, "refresh")[1] for seed in (0, 1)]
    assert not torch.equal(refresh[0], refresh[1]) and not torch.equal(refresh[0], y0)


def test_the_test_set_and_the_holdout_split_are_the_same_for_every_seed(digits):
    """The authors test on the unshuffled test set (dataloader.py:303, shuffle=False); the hold-out
    split is a fixed choice, the same for every seed (README, --holdout)."""
    sessions = [
        build_session(TrainConfig(dataset="digits", holdout=100, seed=seed), device=torch.device("cpu"))
        for seed in (0, 3)
    ]
    held = [torch.cat([y for _, y in s.loaders.test.epoch()]) for s in sessions]
    assert torch.equal(held[0], held[1])
    assert torch.equal(sessions[0].data.test.images, sessions[1].data.test.images)
    assert torch.equal(sessions[0].data.train.images, sessions[1].data.train.images)
    train = [torch.cat([y for _, y in s.loaders.train.epoch(0)]) for s in sessions]
    assert not torch.equal(train[0], train[1])  # while the training order follows the seed


def test_a_presets_seed_reaches_the_run_and_the_rules_draws_and_nothing_else():
    for preset in PRESETS:
        a, b = preset.config(0).as_dict(), preset.config(5).as_dict()
        assert b["seed"] == 5
        if "seed" in a["rule_options"]:
            assert b["rule_options"]["seed"] == 5
            a["rule_options"] = {**a["rule_options"], "seed": 5}
        assert {**a, "seed": 5} == b, preset.name


def test_a_sessions_seed_reaches_weights_draws_and_order(digits):
    """`lls train --seed`: the config's seed decides the initial weights, the rule's random draws
    and the shuffling of one session."""
    sessions = {
        seed: build_session(
            config_from_options({"dataset": "digits", "limit": 64, "seed": seed}, {"basis": "random"}),
            device=torch.device("cpu"),
        )
        for seed in (0, 2)
    }
    weights = {s: tensors(v.trainer.net) for s, v in sessions.items()}
    bases = {s: [x.basis for x in v.trainer.signals] for s, v in sessions.items()}
    orders = {s: torch.cat([y for _, y in v.loaders.train.epoch(0)]) for s, v in sessions.items()}
    assert not same(weights[0], weights[2])
    assert not any(torch.equal(a, b) for a, b in zip(bases[0], bases[2], strict=True))
    assert not torch.equal(orders[0], orders[2])
