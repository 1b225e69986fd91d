"""The trainer's own decisions: set up from the first batch, the engine it picks, the state it
checkpoints, the checks it runs before a step. Small and fast: the trainer's mutants are judged here."""

import copy
import re

import pytest
import torch
from torch import nn

import lls
from lls.step import trainer as trainer_module
from lls.step.engine import is_capturable, optimizer_engine
from lls.step.precision import cpu_supports
from lls.step.step import SerialSchedule

from .conftest import NUM_CLASSES, TINY_INPUT, tiny_batch, tiny_net, tiny_trainer

NOT_SET_UP = "the trainer has not seen a batch yet: give input_shape=... or train one step first"


def shapeless_net(seed: int = 0) -> lls.LocalNet:
    """A LocalNet built by hand: it does not know its input shape (TINY_INPUT fits it)."""
    torch.manual_seed(seed)
    blocks = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Linear(4 * 4 * 4, 16), nn.ReLU()),
    ]
    between = [nn.Sequential(nn.MaxPool2d(2), nn.Flatten()), None]
    return lls.LocalNet(blocks, head=nn.Linear(16, NUM_CLASSES), between=between, latent_pool=[2, None])


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def same_weights(a: lls.Trainer, b: lls.Trainer) -> bool:
    pairs = zip(a.net.parameters(), b.net.parameters(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


# --- set up from the first batch ------------------------------------------------------------------


def test_a_network_that_knows_its_shape_is_set_up_at_once():
    trainer = lls.Trainer(tiny_net(), "lls")  # the builder's LocalNet carries its input shape
    assert trainer.input_shape == TINY_INPUT and len(trainer.optimizers) == 4


def test_the_first_training_batch_sets_up_the_same_trainer_as_a_given_shape():
    lazy = lls.Trainer(shapeless_net(), "lls")
    shaped = lls.Trainer(shapeless_net(), "lls", input_shape=TINY_INPUT)
    assert lazy.input_shape is None and lazy.batch_size_in_step == 0
    with pytest.raises(lls.LLSError, match=exactly(NOT_SET_UP)):
        lazy.state_dict()
    for seed in (1, 2):
        for t in (lazy, shaped):
            t.train_step(*tiny_batch(12, seed=seed))
    assert lazy.input_shape == TINY_INPUT and lazy.batch_size_in_step == 12
    assert same_weights(lazy, shaped)


def test_a_sequential_model_is_localized_from_its_first_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
    trainer = lls.Trainer(model, "lls")
    assert trainer.input_shape is None
    trainer.train_step(*tiny_batch())
    assert trainer.input_shape == TINY_INPUT and len(trainer.net.blocks) == 1


def test_a_first_batch_without_samples_is_one_line():
    y = tiny_batch(4)[1]
    expected = "a batch must hold an input tensor of samples, got {}"
    with pytest.raises(lls.LLSError, match=exactly(expected.format("list"))):
        lls.Trainer(shapeless_net(), "lls").train_step([[0.0]], y)
    with pytest.raises(lls.LLSError, match=exactly(expected.format("Tensor"))):
        lls.Trainer(shapeless_net(), "lls").train_step(torch.tensor(0.0), y)
    # a 1-D batch holds scalar samples: the network itself says it does not take them
    with pytest.raises(lls.LLSError, match=r"does not accept inputs of shape \(\)"):
        lls.Trainer(shapeless_net(), "lls").train_step(torch.zeros(4), y)


def test_the_first_evaluated_batch_sets_up_the_trainer_and_every_batch_counts():
    batches = [tiny_batch(8, seed=seed) for seed in (1, 2, 3)]
    lazy = lls.Trainer(shapeless_net(), "lls").evaluate(batches)
    shaped = lls.Trainer(shapeless_net(), "lls", input_shape=TINY_INPUT).evaluate(batches)
    assert (lazy.loss, lazy.accuracy) == (shaped.loss, shaped.accuracy)
    unset = lls.Trainer(shapeless_net(), "lls")
    with pytest.raises(lls.LLSError, match=exactly("evaluation got no batches")):
        unset.evaluate([])
    assert unset.input_shape is None  # nothing read, nothing set up
    with pytest.raises(lls.LLSError, match=exactly(NOT_SET_UP)):
        unset.evaluation()
    with pytest.raises(lls.LLSError, match=exactly("a batch must be a pair (inputs, labels), got Tensor")):
        unset.evaluate([batches[0][0]])


def test_the_options_are_checked_before_the_first_batch():
    for options, message in [
        ({"optimizer": "nope"}, "unknown optimizer 'nope'; known optimizers: "),
        ({"lr": -1.0}, "--lr must be > 0, got -1.0"),
        ({"precision": "fp8"}, "unknown precision 'fp8'; known precisions: fp32, bf16, fp16"),
    ]:
        with pytest.raises(lls.LLSError, match="^" + re.escape(message)):
            lls.Trainer(shapeless_net(), "lls", **options)


# --- evaluation ---------------------------------------------------------------------------------


def test_blocks_are_read_out_only_when_asked():
    trainer = tiny_trainer("bp")  # no signals: each block is read out by a ridge probe
    batches = [tiny_batch(8, seed=seed) for seed in (1, 2)]
    plain = trainer.evaluate(batches)
    assert plain.block_accuracy == [] and plain.readout is None
    probed = trainer.evaluate(batches, blocks=True, probe_batches=batches)
    assert probed.readout == "ridge probe" and len(probed.block_accuracy) == len(trainer.net.blocks)
    assert all(0 <= a <= 1 for a in probed.block_accuracy)
    assert (probed.loss, probed.accuracy) == (plain.loss, plain.accuracy)


# --- the step -----------------------------------------------------------------------------------


def test_a_local_pass_with_the_trainers_update_is_its_step():
    """The pieces the engines compose: local_pass over every block with update == train_step."""
    x, y = tiny_batch()
    stepped, composed = tiny_trainer("lls-m"), tiny_trainer("lls-m")
    stepped.train_step(x, y)
    called, issued = [], []

    class Recording(SerialSchedule):
        def issue(self, index):
            issued.append(index)
            return super().issue(index)

    def recorded(i, signal):
        def loss(a, y, logits=None):
            called.append(i)
            return signal(a, y, logits)

        return loss

    signals = [recorded(i, s) for i, s in enumerate(composed.signals)]
    done = composed.step.local_pass(x, y, composed.step.update, signals=signals, schedule=Recording())
    blocks = len(composed.net.blocks)
    assert called == list(range(blocks)) and issued == list(range(blocks + 1))
    assert done.block_losses.shape == (blocks,) and same_weights(stepped, composed)


def test_no_training_step_while_evaluating():
    message = (
        "a training step inside evaluation() (the network in eval mode, schedule-free optimizers "
        "on their averaged weights); step after the evaluation has ended"
    )
    trainer = tiny_trainer("lls")
    x, y = tiny_batch()
    trainer.net.eval()  # the network alone
    with pytest.raises(lls.LLSError, match=exactly(message)):
        trainer.train_step(x, y)
    trainer.net.train()
    trainer.optimizers[1].eval()  # one schedule-free optimizer alone
    with pytest.raises(lls.LLSError, match=exactly(message)):
        trainer.train_step(x, y)
    trainer.optimizers[1].train()
    trainer.train_step(x, y)


def test_signals_take_the_networks_dtype():
    trainer = lls.Trainer(tiny_net().double(), "lls-m", input_shape=TINY_INPUT)
    assert all(t.dtype == torch.float64 for s in trainer.signals for t in [*s.parameters(), *s.buffers()])
    x, y = tiny_batch()
    assert torch.isfinite(trainer.train_step(x.double(), y).loss)


def test_a_rule_giving_signals_to_some_blocks_only_is_refused():
    rule = lls.create_rule("lls")

    class Partial(type(rule)):
        def signal(self, index, *args):
            return None if index == 1 else super().signal(index, *args)

    with pytest.raises(ValueError, match=exactly("rule lls gave signals to some blocks only")):
        lls.Trainer(tiny_net(), Partial(), input_shape=TINY_INPUT)


def test_the_class_count_is_the_last_linear_layers():
    head = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4))
    block = nn.Sequential(nn.Flatten(), nn.Linear(64, 8))
    assert lls.Trainer(lls.LocalNet([block], head, [None]), "lls", input_shape=TINY_INPUT).num_classes == 4
    headless = lls.LocalNet([block], nn.ReLU(), [None])
    with pytest.raises(
        lls.LLSError, match=exactly("cannot tell the number of classes: the head has no nn.Linear")
    ):
        lls.Trainer(headless, "lls", input_shape=TINY_INPUT)


def test_low_memory_steps_through_its_plan():
    trainer = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, memory=1)  # a 1-byte budget
    with pytest.raises(lls.LLSError, match=r"^a memory budget of .* is below the smallest step at batch 16"):
        trainer.train_step(*tiny_batch(16))


def test_dfa_keeps_every_blocks_input_until_the_head():
    """DFA's blocks wait for the head's logits: its last block's step holds the earlier blocks'
    inputs too, which LLS's (stepped as soon as its output exists) has let go of."""
    dfa, local = (
        lls.Trainer(tiny_net(), rule, input_shape=TINY_INPUT, memory="low") for rule in ("dfa", "lls")
    )
    assert dfa.low_memory.kept(16)[-1] > local.low_memory.kept(16)[-1]


@pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="this CPU build has no bf16 autocast kernels")
def test_bf16_steps_run_the_blocks_in_bf16():
    trainer = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, precision="bf16")
    seen = []
    trainer.net.blocks[0].register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    trainer.train_step(*tiny_batch())
    assert seen == [torch.bfloat16]


# --- the engine (the graph engine's choice, as on a CUDA device) ----------------------------------


def test_the_graph_engine_needs_cuda():
    with pytest.raises(
        lls.LLSError, match=r"^engine 'graph' captures CUDA graphs and needs a CUDA device, not cpu"
    ):
        lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="graph")


@pytest.fixture
def as_if_on_cuda(monkeypatch):
    """The trainer's engine choice as on a CUDA device: the graph engine is recorded, not built."""
    built = []

    class Recorder:
        def __init__(self, step, input_shape, *, strict):
            self.args, self.batches = (step, input_shape, strict), []
            built.append(self)

        def step(self, x, y):
            self.batches.append((x, y))
            return "replayed"

    monkeypatch.setattr(
        trainer_module, "optimizer_engine", lambda name, device, opt: optimizer_engine(name, "cuda", opt)
    )
    monkeypatch.setattr(trainer_module, "GraphEngine", Recorder)
    return built


@pytest.mark.parametrize("engine", ["graph", "auto"])
def test_the_graph_engine_steps_with_capturable_optimizers(as_if_on_cuda, engine):
    trainer = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine=engine)
    (graph,) = as_if_on_cuda
    assert trainer.engine is graph and graph.args == (trainer.step, TINY_INPUT, engine == "graph")
    assert all(is_capturable(o) for o in trainer.optimizers)
    x, y = tiny_batch()
    assert trainer.train_step(x, y) == "replayed"
    ((stepped_x, stepped_y),) = graph.batches
    assert torch.equal(stepped_x, x) and torch.equal(stepped_y, y)


def not_capturable(params, lr, weight_decay):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def halving(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)


GRAPH_BLOCKERS = [
    ({"precision": "fp16"}, "fp16's gradient scaling cannot be captured: use --engine eager, or bf16"),
    (
        {"memory": "low"},
        "the graph engine captures whole-batch steps and low memory slices them: "
        "use --engine eager with --memory",
    ),
    (
        {"lr_schedule": halving},
        "the graph engine replays captured steps: use --engine eager with an lr schedule",
    ),
    (
        {"optimizer": not_capturable},
        "engine 'graph' needs capturable optimizers (every per-step scalar on the device); SGD is not; "
        "choose a capturable optimizer or --engine eager",
    ),
]


@pytest.mark.parametrize("options,message", GRAPH_BLOCKERS, ids=["fp16", "memory", "schedule", "factory"])
def test_what_cannot_be_captured_is_refused_by_graph_and_stepped_eagerly_by_auto(
    as_if_on_cuda, options, message
):
    if options.get("precision") == "fp16" and not cpu_supports(torch.float16):
        pytest.skip("this CPU build has no fp16 autocast kernels")
    with pytest.raises(lls.LLSError, match=exactly(message)):
        lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="graph", **options)
    auto = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="auto", **options)
    assert auto.engine is None and not as_if_on_cuda
    assert not any(is_capturable(o) for o in auto.optimizers)  # the eager step's implementations
    auto.train_step(*tiny_batch())


def test_the_graph_engine_names_a_registered_optimizer_it_cannot_capture(as_if_on_cuda):
    with pytest.raises(
        lls.LLSError, match=r"^engine 'graph' needs a capturable optimizer and 'sgd-sf' has none"
    ):
        lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="graph", optimizer="sgd-sf")
    auto = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, engine="auto", optimizer="sgd-sf")
    assert auto.engine is None and not as_if_on_cuda


# --- the checkpointed state ---------------------------------------------------------------------


def lrs(trainer: lls.Trainer) -> list[float]:
    return [o.param_groups[0]["lr"] for o in trainer.optimizers]


def test_lr_schedules_are_checkpointed_with_the_trainer():
    options = dict(optimizer="adam", lr=0.01, lr_schedule=halving)
    trainer = lls.Trainer(shapeless_net(), "lls", **options)  # set up by its first batch, schedules too
    trainer.train_step(*tiny_batch())
    trainer.end_epoch()
    assert lrs(trainer) == [0.005] * 3
    state = copy.deepcopy(trainer.state_dict())
    resumed = lls.Trainer(shapeless_net(seed=1), "lls", input_shape=TINY_INPUT, **options)
    resumed.load_state_dict(state)
    for t in (trainer, resumed):
        t.end_epoch()
    assert lrs(trainer) == lrs(resumed) == [0.0025] * 3
    unscheduled = lls.Trainer(shapeless_net(), "lls", input_shape=TINY_INPUT, optimizer="adam")
    with pytest.raises(ValueError):  # a checkpoint's schedules need a trainer with schedules
        unscheduled.load_state_dict(state)
    with pytest.raises(ValueError):  # and every optimizer's state
        resumed.load_state_dict(dict(state, optimizers=state["optimizers"][:-1]))
    del state["schedulers"]  # a checkpoint written without schedules
    unscheduled.load_state_dict(state)
    assert lrs(unscheduled) == [0.005] * 3


@pytest.mark.skipif(not cpu_supports(torch.float16), reason="this CPU build has no fp16 autocast kernels")
def test_fp16_checkpoints_one_gradient_scaler_per_optimizer():
    assert "scalers" not in tiny_trainer("lls").state_dict()  # fp32 has none
    trainer = lls.Trainer(tiny_net(), "lls", input_shape=TINY_INPUT, precision="fp16")
    trainer.train_step(*tiny_batch())
    trainer.precision.scalers[2].update(7.0)  # one block's scale, as after its overflows
    state = copy.deepcopy(trainer.state_dict())
    assert len(state["scalers"]) == len(trainer.optimizers) == 4
    resumed = lls.Trainer(tiny_net(seed=1), "lls", input_shape=TINY_INPUT, precision="fp16")
    resumed.load_state_dict(state)
    assert [s.get_scale() for s in resumed.precision.scalers] == [
        s.get_scale() for s in trainer.precision.scalers
    ]
    assert resumed.precision.scalers[2].get_scale() == 7.0
    with pytest.raises(ValueError, match=exactly("no fp16 gradient scalers for the 4 optimizers")):
        resumed.load_state_dict({k: v for k, v in state.items() if k != "scalers"})
