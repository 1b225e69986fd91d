"""Every public callable of ``lls.__all__`` checks its arguments at the call: a wrong type is one
LLSError naming the callable, the argument, what it got and what it takes, never a TypeError or an
AttributeError from deep inside. Generated: each argument of each callable in turn gets a value of
a type no annotation takes, the others type-correct."""

import inspect

import pytest
import torch
from torch import nn

import lls

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS, tiny_batch, tiny_net


def Wrong() -> complex:
    """A value of a type no annotation of the API takes: a plain value, not callable, not iterable
    (lls' own classes are duck-typed: any object of another kind may stand in for one)."""
    return 1j


def split() -> lls.Split:
    return lls.Split(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))


# Type-correct arguments of each callable (the checks run before the body, so they need not make
# sense together); each argument is replaced by Wrong() in turn.
VALID = {
    "basis": ((10, 16), {"kind": "square", "seed": 0, "width": None, "device": "cpu"}),
    "build_trainer": (
        (TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES),
        {"seed": 0, "device": "cpu", "lr": 0.01, "weight_decay": 0.0, "epochs": 1, "precision": "fp32"},
    ),
    "create_model": (("smallconv",), {"in_channels": 1, "input_size": 28, "num_classes": 10}),
    "create_rule": (("lls",), {}),
    "Dataset": (("d", split(), split(), 2, (0.5,), (0.5,)), {}),
    "EpochRecord": ((1, 0.1, 0.5, [0.1], 0.2, 0.5, 1.0, 1.0, 0.01), {}),
    "evaluate": ((lls.Trainer(tiny_net()), lls.Loaders([], [])), {"epoch": 0, "blocks": True}),
    "Evaluation": ((0.1, 0.5, [0.5]), {"readout": None}),
    "fit": ((lls.Trainer(tiny_net()), [tiny_batch()], 1), {"start_epoch": 0, "progress": False}),
    "History": (([],), {}),
    "load_dataset": (("digits", None), {"download": False, "quiet": True, "augment": None}),
    "load_run": (("nowhere",), {"device": "cpu", "data_dir": None, "download": False}),
    "Loaders": (([], []), {"probe": None}),
    "localize": ((nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 2)), 1), {"input_shape": (4,)}),
    "LocalNet": (([nn.Linear(4, 3)], nn.Linear(3, 2)), {"between": None, "latent_pool": None}),
    "lr_schedule": (("cosine", 3), {}),
    "register_basis": (("new-kind", "a help"), {}),
    "register_rule": (("new-rule",), {}),
    "save_run": (
        (lls.Trainer(tiny_net()), "nowhere", lls.History([])),
        {"model": "smallconv", "dataset": "digits", "seed": 0, "batch_size": 2},
    ),
    "Split": ((torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long)), {}),
    "TensorLoader": ((split(), 2), {"mean": (0.5,), "std": (0.5,), "shuffle": False, "seed": 0}),
    "train_epoch": (
        (lls.Trainer(tiny_net()), lls.TensorLoader(split(), 2, mean=(0.5,), std=(0.5,)), 0),
        {"progress": False},
    ),
    "Trainer": ((tiny_net(), "lls"), {"input_shape": TINY_INPUT, "lr": 0.01, "engine": "eager"}),
}
# Not called with user values: results lls makes, base classes to subclass, the error, no arguments
NOT_INPUTS = {
    "StepResult": "made by every training step (not checked there: it is the hot path)",
    "Rule": "the base class of rules (their options are checked by create_rule)",
    "BlockSignal": "the base class of signals",
    "LLSError": "the error itself",
    "list_datasets": "no arguments",
    "list_models": "no arguments",
    "list_rules": "no arguments",
    "tune_malloc": "no arguments",
}


def public_callables() -> list[str]:
    return [n for n in lls.__all__ if callable(getattr(lls, n)) and not n.startswith("_")]


def test_every_public_callable_is_covered():
    assert set(public_callables()) == set(VALID) | set(NOT_INPUTS)


def cases():
    for name, (args, kwargs) in VALID.items():
        target = getattr(lls, name)
        signature = inspect.signature(target)
        for i in range(len(args)):
            yield pytest.param(name, i, id=f"{name}-{list(signature.parameters)[i]}")
        for key in kwargs:
            yield pytest.param(name, key, id=f"{name}-{key}")


@pytest.mark.parametrize("name,which", list(cases()))
def test_a_wrong_type_is_one_line_naming_the_argument(name, which):
    args, kwargs = VALID[name]
    args, kwargs = list(args), dict(kwargs)
    if isinstance(which, int):
        args[which] = Wrong()
        argument = list(inspect.signature(getattr(lls, name)).parameters)[which]
    else:
        kwargs[which] = Wrong()
        argument = which
    with pytest.raises(lls.LLSError) as caught:
        getattr(lls, name)(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and f"{argument} must be" in message and "1j (complex)" in message, message


@pytest.mark.parametrize(
    "call,expected",
    [
        (lambda: lls.fit(lls.Trainer(tiny_net()), [tiny_batch()], -1), "epochs must be at least 1"),
        (lambda: lls.fit(lls.Trainer(tiny_net()), [tiny_batch()], 2, start_epoch=3), "start_epoch must be"),
        (lambda: lls.load_run("nowhere", device="tpu"), "not a device|lls runs on cpu or cuda"),
        (lambda: lls.load_run("nowhere", device="meta"), "lls runs on cpu or cuda"),
        (lambda: lls.localize(nn.Sequential(nn.Linear(4, 2)), 0, input_shape=(4,)), "at least 1 block"),
        (lambda: lls.localize(nn.Sequential(nn.Linear(4, 2)), input_shape=(0,)), "positive whole numbers"),
        (lambda: lls.lr_schedule("cosine", 0), "epochs must be a whole number >= 1"),
        (lambda: lls.Trainer(tiny_net(), optimizer=lambda p, lr, wd: None), "returned NoneType"),
        (lambda: lls.Trainer(tiny_net(), optimizer=nn.Linear), "failed on a parameter"),
        (lambda: lls.Trainer(tiny_net(), lr_schedule=lambda optimizer: 3), "returned int, not a scheduler"),
        (lambda: lls.Trainer(tiny_net(), lr_schedule="cosine"), r"lr_schedule must be a function \| None"),
        (lambda: lls.build_trainer(TINY_SPECS, "lls", "digits"), "data must be a dataset"),
    ],
)
def test_wrong_values_are_refused_at_the_call(call, expected):
    with pytest.raises(lls.LLSError, match=expected):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU build's refusal")
def test_load_run_on_cuda_without_cuda_says_so():
    with pytest.raises(lls.LLSError, match="no CUDA device is available"):
        lls.load_run("nowhere", device="cuda")


def test_localize_refuses_a_module_used_twice():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Flatten(), shared, nn.ReLU(), shared, nn.Linear(4, 2))
    with pytest.raises(lls.LLSError, match=r"one parameter in two places \(1.weight and 3.weight\)"):
        lls.localize(model, input_shape=(4,))
