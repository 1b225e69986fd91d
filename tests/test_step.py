"""The training step (``Step``: its signals, schedule and ranges of blocks) and ``build_trainer``'s
options: each option given reaches the network or the trainer it builds."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import lls
from lls.method.net import AvgPool, Conv, Dense

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS, tiny_batch, tiny_trainer

# --- Step ------------------------------------------------------------------------------------------


def test_substitute_signals_replace_the_blocks_losses():
    """``signals=`` (the graph engine's fused losses) is what each block's loss comes from."""
    x, y = tiny_batch()
    plain, doubled = tiny_trainer("lls"), tiny_trainer("lls")  # equal weights: the same seed
    twice = [lambda a, y, logits=None, s=s: 2 * s(a, y, logits) for s in doubled.signals]
    expected = plain.step.eager(x, y).block_losses
    got = doubled.step.eager(x, y, signals=twice).block_losses
    assert len(got) == len(doubled.net.blocks)
    assert torch.equal(got, 2 * expected)  # doubling a float is exact


class Recorder:
    """A schedule that writes down what the step tells it, in order."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    @contextmanager
    def issue(self, index: int):
        self.events.append(("issue", index))
        yield
        self.events.append(("issued", index))

    def ready(self, index: int, output: torch.Tensor) -> None:
        self.events.append(("ready", index, tuple(output.shape)))

    def join(self) -> None:
        self.events.append(("join",))


def test_the_schedule_hears_of_every_block_in_order_then_joins():
    trainer = tiny_trainer("lls")
    x, y = tiny_batch(n=6)
    schedule = Recorder()
    trainer.step.eager(x, y, schedule=schedule)
    shapes = trainer.net.block_output_shapes(TINY_INPUT)
    expected = []
    for index, shape in enumerate(shapes):  # a block's work, then its output is ready
        expected += [("issue", index), ("ready", index, (6, *shape)), ("issued", index)]
    expected += [("issue", len(shapes)), ("issued", len(shapes)), ("join",)]  # the head, then join
    assert schedule.events == expected


def test_a_rule_waiting_for_the_head_refuses_overlapping_blocks():
    trainer = tiny_trainer("dfa")
    with pytest.raises(ValueError, match=r"^rule dfa waits for the head: its blocks cannot overlap$"):
        trainer.step.eager(*tiny_batch(), schedule=Recorder())


def test_a_range_of_blocks_has_a_head_loss_only_when_it_ends_with_the_last_block():
    trainer = tiny_trainer("lls")
    x, y = tiny_batch(n=4)
    blocks = len(trainer.net.blocks)
    seen = []

    def collect(index: int, loss: torch.Tensor) -> torch.Tensor:
        seen.append(index)
        return loss.detach()

    first = trainer.step.local_pass(x, y, collect, range(0, 1))  # a pipeline's first stage
    assert first.loss is None and first.block_losses.shape == (1,) and seen == [0]
    # The head alone: no block loss, an empty (0,) tensor; the head's cross-entropy on its input
    head_input = torch.randn(4, *trainer.net.block_output_shapes(TINY_INPUT)[-1])
    head_input = trainer.net.between[-1](head_input)
    seen.clear()
    head = trainer.step.local_pass(head_input, y, collect, range(blocks, blocks))
    assert seen == [blocks] and head.block_losses.shape == (0,)
    with torch.no_grad():
        expected = F.cross_entropy(trainer.net.head(head_input), y)
    torch.testing.assert_close(head.loss, expected)


# --- build_trainer ---------------------------------------------------------------------------------


def test_build_trainer_refuses_bad_arguments_in_one_line():
    with pytest.raises(
        lls.LLSError,
        match=r"^build_trainer: data must be a dataset, or an input shape \(C, H, W\) given with "
        r"num_classes; got \(1, 8, 8\) \(tuple\)$",
    ):
        lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT)
    with pytest.raises(
        lls.LLSError, match=r"^build_trainer: rule_options go with a rule name, not a Rule object$"
    ):
        lls.build_trainer(
            TINY_SPECS, lls.create_rule("lls"), TINY_INPUT, NUM_CLASSES, rule_options={"seed": 1}
        )


def test_build_trainer_builds_the_network_for_the_input_size():
    """No adaptive pool before the dense block: its input width is 4 channels x 8 x 8 pixels."""
    trainer = lls.build_trainer((Conv(4, pool=2), Dense(8)), "lls", (3, 8, 8), NUM_CLASSES)
    dense = next(m for m in trainer.net.blocks[1].modules() if isinstance(m, torch.nn.Linear))
    assert dense.in_features == 4 * 8 * 8
    x = torch.randn(4, 3, 8, 8)
    assert trainer.train_step(x, torch.arange(4)).logits.shape == (4, NUM_CLASSES)


def test_build_trainer_passes_model_options_to_the_model():
    """A dense block's LLS latent: pooled to its ``pool`` length (16) by default, its output (8) as is."""
    specs = (Conv(4, pool=2), AvgPool(2), Dense(8, pool=16))
    for options, width in ((None, 16), ({"dense_latent": "output"}, 8)):
        trainer = lls.build_trainer(specs, "lls", (3, 8, 8), NUM_CLASSES, model_options=options)
        assert trainer.signals[-1].basis.shape == (NUM_CLASSES, width)


def test_build_trainer_lays_convolutions_out_channels_last_unless_told_not_to():
    """Three input channels: a (4, 3, 3, 3) kernel is channels-last or contiguous, not both."""
    for channels_last in (True, False):
        trainer = lls.build_trainer(TINY_SPECS, "lls", (3, 8, 8), NUM_CLASSES, channels_last=channels_last)
        weight = trainer.net.blocks[0][0].weight
        assert weight.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert weight.is_contiguous() != channels_last


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_build_trainer_makes_the_named_schedule_over_the_epochs_or_takes_a_factory():
    lr, epochs = 0.01, 4
    trainer = lls.build_trainer(
        TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, lr=lr, lr_schedule="cosine", epochs=epochs
    )
    for epoch in range(1, epochs + 1):  # cosine from lr down to 0 over the run
        trainer.end_epoch()
        for optimizer in trainer.optimizers:
            expected = lr * (1 + math.cos(math.pi * epoch / epochs)) / 2
            assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12)

    def halving(optimizer):
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    trainer = lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, lr=lr, lr_schedule=halving)
    trainer.end_epoch()
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [lr / 2] * len(trainer.optimizers)


def test_build_trainer_passes_engine_and_precision_on():
    with pytest.raises(
        lls.LLSError, match=r"^engine 'graph' captures CUDA graphs and needs a CUDA device, not cpu"
    ):
        lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, engine="graph")
    trainer = lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, precision="bf16")
    assert trainer.precision.dtype is torch.bfloat16
    x, y = tiny_batch()
    seen = []
    trainer.net.blocks[0].register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    trainer.train_step(x, y)
    assert seen == [torch.bfloat16]  # the blocks' forward pass runs in bf16
