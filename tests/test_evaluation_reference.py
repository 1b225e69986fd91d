"""The evaluation procedure against a reimplementation of the authors' (main.py:129-144), to the last
digit on the CPU, for schedule-free and plain optimizers; then `lls eval` and `lls.load_run` on a
saved run.

The authors' evaluation after each epoch (main.py): the network in train mode (line 130); every
schedule-free optimizer switched to its averaged weights (lines 131-134); 50 batches of a fresh pass
over the shuffled, augmented training loader forwarded without gradients, which refreshes
BatchNorm's running statistics (lines 135-139); eval mode (line 140); the test set (line 142). The
next epoch switches back to train mode and the training weights (lines 80-84); BatchNorm's running
statistics are left as refreshed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import islice

import pytest
import torch
import torch.nn.functional as F

import lls
from lls.cli import main
from lls.step.optim import is_schedule_free
from lls.step.sfadamw import AdamWScheduleFree
from lls.training import fit
from lls.training.config import TrainConfig
from lls.training.run import build_session

from .conftest import TINY_SPECS, tiny_batch

OPTIMIZERS = ["adamw-sf", "adamw-sf-authors", "sgd-sf", "adamw"]  # schedule-free and plain


def schedule_free_lerp(optimizer: torch.optim.Optimizer, weight: Callable[[float], float]) -> None:
    """Every parameter with a ``z`` moved to ``lerp(p, z, weight(beta1))``, tensor by tensor (lls'
    capturable copy lerps with the multi-tensor kernel, which rounds alike)."""
    for group in optimizer.param_groups:
        beta1 = group["betas"][0] if "betas" in group else group["momentum"]
        for p in group["params"]:
            z = optimizer.state[p].get("z")
            if z is not None:
                if isinstance(optimizer, AdamWScheduleFree):
                    torch._foreach_lerp_([p.data], [z], weight(beta1))
                else:
                    p.data.lerp_(z, weight(beta1))  # in place: the parameter keeps its layout


# Schedule-free (Defazio et al. 2024): gradients at y = (1 - beta1) z + beta1 x, evaluation at x
TO_AVERAGE = lambda beta1: 1 - 1 / beta1  # noqa: E731  x = y + (1 - 1/beta1) (z - y)
TO_TRAINING_POINT = lambda beta1: 1 - beta1  # noqa: E731  y = x + (1 - beta1) (z - x)


def reference_evaluation(trainer: lls.Trainer, refresh, test) -> tuple[float, float]:
    """(mean test loss, accuracy) of the authors' procedure (main.py:130-144), done in place:
    ``trainer`` is left as the authors' loop leaves it for testing."""
    net = trainer.net
    net.train()  # main.py:130
    for optimizer in trainer.optimizers:  # main.py:131-134
        if is_schedule_free(optimizer):
            schedule_free_lerp(optimizer, TO_AVERAGE)
    with torch.no_grad():  # main.py:135-139
        for x, _ in refresh:
            net(x)
        net.eval()  # main.py:140
        loss, correct, count = torch.zeros((), dtype=torch.float64), 0, 0
        for x, y in test:  # main.py:18-41
            logits = net(x)
            loss += F.cross_entropy(logits, y, reduction="sum").double()
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    return float(loss) / count, correct / count


def reference_back_to_training(trainer: lls.Trainer) -> None:
    """main.py:80-84: train mode and the training point; BatchNorm's statistics stay as refreshed."""
    trainer.net.train()
    for optimizer in trainer.optimizers:
        if is_schedule_free(optimizer):
            schedule_free_lerp(optimizer, TO_TRAINING_POINT)


def trained(optimizer: str, steps: int = 4) -> lls.Trainer:
    """A tiny trainer a few steps in; in the layout of the batches (a layout changes the last bits
    of BatchNorm's sums, not the procedure)."""
    trainer = lls.build_trainer(
        TINY_SPECS, "lls", (1, 8, 8), 5, seed=3, optimizer=optimizer, channels_last=False
    )
    for step in range(steps):
        trainer.train_step(*tiny_batch(seed=step))
    return trainer


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_evaluate_is_the_authors_procedure_to_the_last_digit(optimizer):
    """Three twins trained alike: one evaluated by the reference, one by ``evaluate``, one inside
    ``evaluation()``: the same numbers, weights and statistics to the last bit, and after the
    evaluation the same training point."""
    refresh = [tiny_batch(n=12, seed=100 + i) for i in range(3)]
    test = [tiny_batch(n=20, seed=200 + i) for i in range(2)]
    reference = trained(optimizer)
    loss, accuracy = reference_evaluation(reference, refresh, test)
    ours = trained(optimizer)
    result = ours.evaluate(test, refresh=refresh)
    assert (result.loss, result.accuracy) == (loss, accuracy)
    evaluated = reference.net.state_dict()
    with trained(optimizer).evaluation(refresh=refresh) as net, torch.no_grad():
        assert not net.training and not any(m.training for m in net.modules())
        inside = net.state_dict()
        assert inside.keys() == evaluated.keys()
        for name, value in evaluated.items():
            assert torch.equal(inside[name], value), name
        for x, _ in test:
            assert torch.equal(net(x), reference.net(x))
    reference_back_to_training(reference)
    for (name, p), q in zip(ours.net.named_parameters(), reference.net.parameters(), strict=True):
        assert torch.equal(p, q), name  # the same training point, rounding of the round trip included


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_evaluation_gives_back_the_training_weights_and_modes(optimizer):
    trainer = trained(optimizer)
    weights = {k: v.clone() for k, v in trainer.net.named_parameters()}
    with trainer.evaluation(refresh=[tiny_batch(n=12, seed=100)]):
        pass
    assert trainer.net.training and all(m.training for m in trainer.net.modules())
    for optimizer_ in trainer.optimizers:
        if is_schedule_free(optimizer_):
            assert optimizer_.param_groups[0]["train_mode"]
    for name, value in trainer.net.named_parameters():
        # the lerp back from x to y rounds: within a few float32 ulps
        torch.testing.assert_close(value, weights[name], rtol=1e-6, atol=1e-7, msg=name)


def test_evaluation_restores_parameters_and_batchnorm_statistics():
    """The context manager promises to undo itself: statistics and weights, bit for bit."""
    trainer = trained("adamw-sf")
    buffers = {k: v.clone() for k, v in trainer.net.named_buffers()}
    weights = {k: v.clone() for k, v in trainer.net.named_parameters()}
    with trainer.evaluation(refresh=[tiny_batch(n=12, seed=100)]):
        pass
    for name, value in trainer.net.named_buffers():
        assert torch.equal(value, buffers[name]), name
    for name, value in trainer.net.named_parameters():
        assert torch.equal(value, weights[name]), name


def test_the_test_batch_size_does_not_change_the_evaluation():
    """The authors test in batches of 128 (script.sh: --test-batch-size 128), lls in batches of
    EVAL_BATCH_SIZE: in eval mode each image's logits depend on that image alone."""
    x, y = tiny_batch(n=500, seed=9)
    refresh = [tiny_batch(n=12, seed=100)]

    def split(size):
        return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]

    ours = trained("adamw-sf").evaluate(split(fit.EVAL_BATCH_SIZE), refresh=refresh)
    authors = trained("adamw-sf").evaluate(split(128), refresh=refresh)
    assert ours.accuracy == authors.accuracy
    assert ours.loss == pytest.approx(authors.loss, rel=1e-6)


# --- fit: which batches refresh, in which order -------------------------------------------------


def digits_loaders(digits, seed=0) -> lls.Loaders:
    return lls.Loaders.for_dataset(digits, batch_size=4, limit=208, seed=seed)  # 52 training batches


def digits_trainer(digits, seed=0) -> lls.Trainer:
    return lls.build_trainer(TINY_SPECS, "lls", digits.input_shape, digits.num_classes, seed=seed)


def by_hand(trainer: lls.Trainer, loaders: lls.Loaders, epochs: int) -> list[tuple[float, float]]:
    """The authors' loop (main.py:56-144): each epoch's training steps, then the reference
    evaluation refreshed on the first 50 batches of a new pass over the shuffled training set
    (islice(train_loader, 50), line 136: not the epoch's own first batches). The trainer is left as
    the last evaluation leaves it."""
    results = []
    for epoch in range(epochs):
        if epoch:
            reference_back_to_training(trainer)
        for x, y in loaders.train.epoch(epoch):
            trainer.train_step(x, y)
        refresh = islice(loaders.train.epoch(epoch, stream="refresh"), fit.REFRESH_BATCHES)
        results.append(reference_evaluation(trainer, refresh, loaders.test.epoch()))
    return results


def test_fit_evaluates_each_epoch_as_the_authors(digits):
    """Two epochs of fit against the authors' loop by hand; between them the running statistics
    stay as refreshed (main.py:80 only switches modes)."""
    loaders = digits_loaders(digits)
    history = lls.fit(digits_trainer(digits), loaders, 2, progress=False, block_accuracy=False)
    expected = by_hand(digits_trainer(digits), loaders, 2)
    assert [(r.test_loss, r.test_accuracy) for r in history.records] == expected


def test_the_refresh_is_a_new_pass_over_the_training_set(digits):
    """The refresh batches are training batches (augmented as training batches are) from a shuffle
    of their own, which changes with the epoch and the seed."""
    loaders = digits_loaders(digits)
    seen = []
    trainer = digits_trainer(digits)
    trainer.net.blocks[0].register_forward_pre_hook(
        lambda module, inputs: seen.append(inputs[0].clone()) if not torch.is_grad_enabled() else None
    )
    lls.fit(trainer, loaders, 1, progress=False, block_accuracy=False)
    refresh = [x for x, _ in islice(loaders.train.epoch(0, stream="refresh"), fit.REFRESH_BATCHES)]
    test = [x for x, _ in loaders.test.epoch()]
    assert len(seen) == fit.REFRESH_BATCHES + len(test)
    assert all(torch.equal(a, b) for a, b in zip(seen, refresh + test, strict=True))
    first = [x for x, _ in islice(loaders.train.epoch(0), fit.REFRESH_BATCHES)]
    assert not torch.equal(torch.cat(first), torch.cat(refresh))  # not the epoch's own order
    later = [x for x, _ in islice(loaders.train.epoch(1, stream="refresh"), fit.REFRESH_BATCHES)]
    assert not torch.equal(torch.cat(later), torch.cat(refresh))  # a new pass each epoch


# --- a saved run: `lls eval` and lls.load_run ----------------------------------------------------


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, digits) -> tuple:
    """A run of `lls train`, and the same run by hand (the authors' loop), left in eval mode."""
    out = tmp_path_factory.mktemp("runs") / "run"
    flags = ["--dataset", "digits", "--limit", "128", "--batch-size", "16", "--epochs", "1", "--seed", "4"]
    assert main(["train", *flags, "--quiet", "--out", str(out)]) == 0
    config = TrainConfig(dataset="digits", limit=128, batch_size=16, epochs=1, seed=4)
    session = build_session(config, device=torch.device("cpu"), quiet=True)
    (result,) = by_hand(session.trainer, session.loaders, 1)
    return out, result, session


def test_a_runs_record_lls_eval_and_load_run_are_the_authors_evaluation(saved_run, capsys):
    out, (loss, accuracy), session = saved_run
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["test_loss"], last["test_accuracy"]) == (loss, accuracy)  # what training reported
    # The checkpoint holds the training point y (back from x, rounded) and z: `lls eval` and
    # load_run evaluate at x again, from y, with the statistics as refreshed (no second refresh)
    trainer, test = session.trainer, [x for x, _ in session.loaders.test.epoch()]
    reference_back_to_training(trainer)
    again = reference_evaluation(trainer, (), session.loaders.test.epoch())
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (printed["loss"], printed["accuracy"]) == again
    assert printed["accuracy"] == accuracy and printed["loss"] == pytest.approx(loss, rel=1e-6)
    model = lls.load_run(out)
    assert not model.training
    with torch.no_grad():
        for x in test:
            assert torch.equal(model(x), trainer.net(x))
