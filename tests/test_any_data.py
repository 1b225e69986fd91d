"""Any data and any optimizer: DataLoaders and lists of batches through fit, train_step and
evaluation; bad batches in one line; torch.optim classes, per-block learning rates and lr schedules
(API and --lr-schedule, checkpointed and honoured on resume)."""

import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lls
from lls.cli import main

from .conftest import NUM_CLASSES, TINY_INPUT, tiny_batch, tiny_net
from .test_runs import DIGITS_RUN, metrics

LR = 0.01


def loaders(n=64, batch=16):
    x, y = tiny_batch(n)
    train = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, drop_last=True)
    return train, DataLoader(TensorDataset(x, y), batch_size=n)


def test_fit_takes_dataloaders_and_the_input_shape_from_the_network():
    trainer = lls.Trainer(tiny_net(), "lls")  # built by lls: the network knows its input shape
    assert trainer.input_shape == TINY_INPUT
    train, test = loaders()
    history = lls.fit(trainer, lls.Loaders(train=train, test=test), epochs=2, progress=False)
    assert [r.epoch for r in history.records] == [1, 2] and len(history.records[0].block_losses) == 3
    history = lls.fit(trainer, train, epochs=3, start_epoch=2, test=test, progress=False)
    assert [r.epoch for r in history.records] == [3]


def test_batches_move_to_the_networks_dtype():
    trainer = lls.Trainer(tiny_net().double(), "lls")
    x, y = tiny_batch(8)  # float32 inputs, int64 labels
    result = trainer.train_step(x, y.int())
    assert result.logits.dtype == torch.float64
    assert trainer.evaluate([(x, y)]).accuracy >= 0


@pytest.mark.parametrize(
    "batch,match",
    [
        ((tiny_batch(4)[0].long(), tiny_batch(4)[1]), "inputs must be floats, got torch.int64"),
        (
            (tiny_batch(4)[0], tiny_batch(4)[1].float()),
            "labels must be integer class indices, got torch.float32",
        ),
        (
            (tiny_batch(4)[0], tiny_batch(4)[1] + NUM_CLASSES),
            r"out of range: the network has 5 classes \(0..4\)",
        ),
        ((tiny_batch(4)[0], -tiny_batch(4)[1] - 1), "label -"),
        (
            (torch.randn(4, 1, 9, 9), tiny_batch(4)[1]),
            r"inputs of shape \(1, 9, 9\) per sample; the network takes \(1, 8, 8\)",
        ),
        (
            (tiny_batch(4)[0], tiny_batch(2)[1]),
            r"one class index per sample: got labels of shape \(2,\) for 4",
        ),
        ((tiny_batch(4)[0],), "a batch must be a pair"),
    ],
)
def test_a_bad_batch_is_one_clear_line(batch, match):
    trainer = lls.Trainer(tiny_net(), "lls")
    for run in (lambda: trainer.train_step(*batch) if len(batch) == 2 else trainer.evaluate([batch]),
                lambda: lls.fit(trainer, [batch], 1, test=[batch], progress=False)):  # fmt: skip
        with pytest.raises(lls.LLSError, match=match) as error:
            run()
        assert "\n" not in str(error.value)


def test_a_one_pass_iterator_and_a_batch_of_one_are_refused():
    trainer = lls.Trainer(tiny_net(), "lls")
    train, test = loaders()
    with pytest.raises(lls.LLSError, match="can be read once only"):
        lls.fit(trainer, iter(train), 1, test=test, progress=False)
    with pytest.raises(lls.LLSError, match="BatchNorm needs 2"):
        lls.fit(trainer, [tiny_batch(1)], 1, test=test, progress=False)
    with pytest.raises(lls.LLSError, match="without test batches"):
        lls.fit(trainer, train, 1, progress=False)


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop])
def test_any_torch_optim_class_gets_lr_and_weight_decay_by_keyword(cls):
    trainer = lls.Trainer(tiny_net(), "lls", optimizer=cls, lr=LR, weight_decay=0.1)
    for optimizer in trainer.optimizers:
        assert type(optimizer) is cls
        group = optimizer.param_groups[0]
        assert group["lr"] == LR and group["weight_decay"] == 0.1
        if "betas" in group:
            assert group["betas"] == (0.9, 0.999)  # not the weight decay
    trainer.train_step(*tiny_batch())


def test_lr_per_block_as_a_list_or_a_function():
    trainer = lls.Trainer(tiny_net(), "lls", optimizer="adam", lr=[0.1, 0.2, 0.3, 0.4])
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [0.1, 0.2, 0.3, 0.4]
    trainer = lls.Trainer(tiny_net(), "lls", optimizer="adam", lr=lambda i: LR / 2**i)
    assert [o.param_groups[0]["lr"] for o in trainer.optimizers] == [LR, LR / 2, LR / 4, LR / 8]


@pytest.mark.parametrize(
    "lr,match",
    [
        ([0.1, 0.2], "lr has 2 values for 3 blocks and the head; give 4"),
        ("0.1", r"lr must be float \| Sequence\[float\] \| a function, got .0.1. \(str\)"),
        ([0.1, 0.1, -1.0, 0.1], "lr for block 2 is -1.0"),
        (lambda i: math.nan if i == 3 else 0.1, "the lr function's value for the head is nan"),
    ],
)
def test_a_bad_lr_is_refused_at_construction(lr, match):
    with pytest.raises(lls.LLSError, match=match):
        lls.Trainer(tiny_net(), "lls", optimizer="adam", lr=lr)


def test_cosine_schedule_steps_per_epoch_and_is_checkpointed():
    """Cosine over 4 epochs: lr * (1 + cos(pi * e / 4)) / 2 at epoch e (0-based)."""
    schedule = lls.lr_schedule("cosine", epochs=4)
    trainer = lls.Trainer(tiny_net(), "lls", optimizer="sgd", lr=LR, lr_schedule=schedule)
    train, test = loaders()
    history = lls.fit(trainer, train, 2, test=test, progress=False)
    expected = [LR * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(3)]
    assert [r.lr for r in history.records] == pytest.approx(expected[:2])
    restored = lls.Trainer(tiny_net(), "lls", optimizer="sgd", lr=LR, lr_schedule=schedule)
    restored.load_state_dict(trainer.state_dict())
    assert restored.optimizers[3].param_groups[0]["lr"] == pytest.approx(expected[2])
    assert restored.schedulers[0].last_epoch == 2


@pytest.mark.usefixtures("digits")
def test_lr_schedule_on_the_command_line_is_recorded_and_honoured_on_resume(tmp_path, monkeypatch):
    import contextlib

    common = [*DIGITS_RUN, "--optimizer", "sgd", "--lr-schedule", "step", "--epochs", "3", "--limit", "192"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    config = json.loads((tmp_path / "whole" / "config.json").read_text())["config"]
    assert config["lr_schedule"] == "step"
    lrs = [row["lr"] for row in metrics(tmp_path / "whole")]
    assert lrs == pytest.approx([5e-3, 5e-4, 5e-5])  # the lr falls 10x after each of 3 epochs

    @contextlib.contextmanager
    def stop_at_the_first_epoch_end():
        polls = {"n": 0}

        def should_stop():
            polls["n"] += 1
            return polls["n"] > 7  # 192 / 32 = 6 steps, then the poll at the epoch's end

        yield should_stop

    monkeypatch.setattr("lls.training.run.graceful_interrupt", stop_at_the_first_epoch_end)
    assert main([*common, "--out", str(tmp_path / "cut")]) == 130
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "whole")


@pytest.mark.usefixtures("digits")
def test_unknown_lr_schedule_exits_2_and_writes_nothing(tmp_path, capsys):
    assert main([*DIGITS_RUN, "--lr-schedule", "linear", "--out", str(tmp_path / "run")]) == 2
    assert "unknown lr schedule 'linear'; known lr schedules: cosine, none, step" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def hand_built(kind):
    """A network lls did not build, so it does not know its input shape (TINY_INPUT: 1x8x8)."""
    torch.manual_seed(0)
    if kind == "sequential":
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(4 * 4 * 4, 16), torch.nn.ReLU(), torch.nn.Linear(16, NUM_CLASSES),
        )  # fmt: skip
    blocks = [
        torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Linear(4 * 4 * 4, 16), torch.nn.ReLU()),
    ]
    between = [torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten()), None]
    return lls.LocalNet(blocks, head=torch.nn.Linear(16, NUM_CLASSES), between=between, latent_pool=[2, None])


@pytest.mark.parametrize("kind", ["localnet", "sequential"])
def test_a_network_without_an_input_shape_is_set_up_by_its_first_batch(kind):
    def run(**shape):
        trainer = lls.Trainer(hand_built(kind), "lls", lr=LR, **shape)
        torch.manual_seed(2)  # the shuffle order of the DataLoader
        train, test = loaders()
        history = lls.fit(trainer, train, 2, test=test, progress=False)
        records = history.records
        return trainer, [(r.train_loss, r.test_loss, r.test_accuracy, r.block_losses) for r in records]

    lazy, lazy_history = run()
    eager, eager_history = run(input_shape=TINY_INPUT)
    assert lazy.input_shape == eager.input_shape == TINY_INPUT
    assert lazy_history == eager_history  # the same job, to the last digit
    for a, b in zip(lazy.state_dict()["net"].values(), eager.state_dict()["net"].values(), strict=True):
        assert torch.equal(a, b)
    other_shape = r"inputs of shape \(1, 9, 9\) per sample; the network takes \(1, 8, 8\)"
    with pytest.raises(lls.LLSError, match=other_shape):  # check_batch's line, from the first batch's shape
        lazy.train_step(torch.randn(4, 1, 9, 9), tiny_batch(4)[1])


def test_a_trainer_before_its_first_batch_says_so_in_one_line():
    trainer = lls.Trainer(hand_built("localnet"), "lls")
    for call in (trainer.state_dict, lambda: trainer.load_state_dict({}), trainer.extra_parameters):
        with pytest.raises(
            lls.LLSError, match=r"^the trainer has not seen a batch yet: give input_shape"
        ) as error:
            call()
        assert str(error.value).endswith("or train one step first") and "\n" not in str(error.value)
    trainer.train_step(*tiny_batch(4))  # train_step sets it up
    assert trainer.input_shape == TINY_INPUT and set(trainer.state_dict()) >= {"net", "optimizers"}
    evaluated = lls.Trainer(hand_built("sequential"), "lls")
    assert evaluated.evaluate([tiny_batch(8)], refresh=[tiny_batch(8)]).accuracy >= 0  # and so does evaluate
    assert evaluated.input_shape == TINY_INPUT


def mlp_loaders(n=40, batch=16, features=20, classes=3):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch), DataLoader(TensorDataset(x, y), batch_size=n)


def mlp(features=20, classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(features, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, classes),
    )


@pytest.mark.parametrize("rule", lls.list_rules())
def test_every_rule_trains_from_plain_dataloaders_with_or_without_probes(rule):
    """bp, dfa and drtp have no readout of their own: without probe batches there is no block
    accuracy, said once per fit (one warning for two epochs), and training goes on; with them each
    block is read out by a ridge probe."""
    train, test = mlp_loaders()
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = lls.Trainer(lls.localize(model, input_shape=(20,)), rule, optimizer="adam", lr=1e-2)
    own_readout = lls.method.readout.readout_kind(trainer.signals) != "ridge probe"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = lls.fit(trainer, lls.Loaders(train=train, test=test), epochs=2, progress=False)
    said = [w for w in caught if "no block accuracy" in str(w.message)]
    assert len(said) == (0 if own_readout else 1)
    for record in history.records:
        assert math.isfinite(record.test_loss) and 0 <= record.test_accuracy <= 1
        assert len(record.block_accuracy) == (2 if own_readout else 0)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with probe batches nothing is said
        history = lls.fit(
            trainer, lls.Loaders(train=train, test=test, probe=test), epochs=3, start_epoch=2, progress=False
        )
    (record,) = history.records
    assert len(record.block_accuracy) == 2 and all(0 <= a <= 1 for a in record.block_accuracy)
    assert record.readout == ("ridge probe" if not own_readout else record.readout)


def test_a_dataloaders_last_batch_of_one_is_merged_into_the_one_before():
    """33 samples in batches of 16: 16, 16, 1 -> two steps, of 16 and 17, as `lls train` merges a
    last batch too small for BatchNorm; every sample is seen once."""
    train, test = mlp_loaders(n=33)
    trainer = lls.Trainer(lls.localize(mlp(), input_shape=(20,)), "lls")
    sizes = []
    step = trainer.train_step
    trainer.train_step = lambda x, y: sizes.append(len(y)) or step(x, y)
    history = lls.fit(trainer, train, epochs=1, test=test, progress=False)
    assert sizes == [16, 17] and math.isfinite(history.records[0].train_loss)
    assert len(lls.data.batches.IterableBatches(train, (20,), 3, torch.zeros(1), min_batch=2)) == 2
    merged = list(lls.data.batches.IterableBatches(train, (20,), 3, torch.zeros(1), min_batch=2).epoch())
    xs = torch.cat([x for x, _ in merged])
    torch.testing.assert_close(xs, train.dataset.tensors[0], rtol=0, atol=0)
