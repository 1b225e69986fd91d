"""A trainer's state carries every piece a resumed run needs: loaded into a trainer built from
another seed (so that nothing can match by chance), it trains on exactly as the original."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lls

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS, tiny_batch


def built(rule: str, init_seed: int, **options) -> lls.Trainer:
    return lls.build_trainer(
        TINY_SPECS,
        rule,
        TINY_INPUT,
        NUM_CLASSES,
        seed=init_seed,
        rule_options=options,
        lr_schedule="cosine",
        epochs=4,
    )


def everything(trainer: lls.Trainer) -> list[torch.Tensor]:
    """Weights, statistics, the rules' tensors (fixed ones included) and the optimizers' state."""
    out = [t for t in trainer.net.state_dict().values()]
    for signal in trainer.signals:
        out += [*signal.parameters(), *signal.buffers()]
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            out += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize(
    "rule,options",
    [("lls-m", {}), ("lls-mxm", {}), ("local-classifier", {}), ("lls", {"basis": "random"}), ("dfa", {})],
)
def test_a_loaded_state_trains_on_as_the_original(rule, options):
    original = built(rule, 0, **options)
    for step in range(3):
        original.train_step(*tiny_batch(seed=step))
    original.end_epoch()
    # other initial weights; the rule's seed is the run's config (its fixed draws are rebuilt from it)
    rule_seed = {"seed": 0} if "seed" in lls.create_rule(rule).config() else {}
    resumed = built(rule, 1, **rule_seed, **options)
    resumed.load_state_dict(copy.deepcopy(original.state_dict()))  # as a checkpoint: nothing shared
    for step in range(3, 5):
        original.train_step(*tiny_batch(seed=step))
        resumed.train_step(*tiny_batch(seed=step))
    assert [o.param_groups[0]["lr"] for o in resumed.optimizers] == [
        o.param_groups[0]["lr"] for o in original.optimizers
    ]
    a, b = everything(original), everything(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_a_resumed_run_keeps_its_lr_schedule(tmp_path, digits):
    """Two epochs in one go, and one epoch then a resume to two: the same learning rate each epoch
    (the schedule steps before the epoch's checkpoint) and the same figures."""
    from lls.cli import main

    flags = ["train", "--dataset", "digits", "--limit", "64", "--batch-size", "16", "--quiet"]
    flags += ["--lr-schedule", "step"]
    assert main([*flags, "--epochs", "3", "--out", str(tmp_path / "whole")]) == 0
    assert main([*flags, "--epochs", "1", "--out", str(tmp_path / "parts")]) == 0
    assert main(["train", "--resume", str(tmp_path / "parts"), "--epochs", "3", "--quiet"]) == 0

    def rows(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.endswith("seconds")} for line in lines]

    assert rows("parts") == rows("whole")
    assert len({row["lr"] for row in rows("whole")}) > 1  # the schedule did change the lr
