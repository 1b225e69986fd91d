"""lls: train deep networks with LLS, a layer-local learning rule, and the rules it is measured against.

The public API::

    import lls
    data = lls.load_dataset("fashion-mnist")
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=10)
    trainer = lls.Trainer(net, lls.create_rule("lls", basis="square"), input_shape=data.input_shape)
    history = lls.fit(trainer, lls.Loaders.for_dataset(data, batch_size=128), epochs=1)

or, from names: ``trainer = lls.build_trainer("smallconv", "lls", data, rule_options={"basis": "square"})``.
A run directory's trained model, as a plain ``torch.nn`` module: ``model = lls.load_run("runs/my-run")``.
"""

__version__ = "0.1.0"  # the one definition (pyproject.toml reads it)

# The API is imported on first use (PEP 562): importing torch takes seconds, and the `lls` command
# (lls.__main__) must be able to answer a Ctrl-C pressed in those seconds.
import importlib
from typing import Any

_API = {  # name -> module, imported on first use
    "basis": ".method.basis",
    "BASIS_KINDS": ".method.basis",
    "BlockSignal": ".method.signals",
    "build_trainer": ".step.factory",
    "create_model": ".method.models",
    "create_rule": ".method.rules",
    "Dataset": ".data",
    "EpochRecord": ".training.fit",
    "evaluate": ".training.fit",
    "Evaluation": ".step.trainer",
    "fit": ".training.fit",
    "History": ".training.fit",
    "list_datasets": ".data",
    "list_models": ".method.models",
    "list_rules": ".method.rules",
    "localize": ".method.localize",
    "lr_schedule": ".step.schedules",
    "LLSError": ".errors",
    "load_dataset": ".data",
    "load_run": ".training.trained",
    "Loaders": ".training.fit",
    "LocalNet": ".method.net",
    "register_basis": ".method.basis",
    "register_rule": ".method.rules",
    "Rule": ".method.rules",
    "save_run": ".training.save",
    "Split": ".data",
    "StepResult": ".step.trainer",
    "TensorLoader": ".data",
    "train_epoch": ".training.fit",
    "Trainer": ".step.trainer",
    "tune_malloc": ".malloc",
}


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'lls' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = ["__version__", *sorted(_API)]
