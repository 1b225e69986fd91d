"""lls: train deep networks with LLS, a layer-local learning rule, and the rules it is measured against.

The public API::

    import lls
    data = lls.load_dataset("fashion-mnist")
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=10)
    trainer = lls.Trainer(net, lls.create_rule("lls", basis="square"), input_shape=data.input_shape)
    history = lls.fit(trainer, lls.Loaders.for_dataset(data, batch_size=128), epochs=1)

or, from names: ``trainer = lls.build_trainer("smallconv", "lls", data, rule_options={"basis": "square"})``.
"""

__version__ = "0.1.0"  # the one definition (pyproject.toml reads it)

from .data import Dataset, Split, TensorLoader, list_datasets, load_dataset
from .errors import LLSError
from .malloc import tune_malloc
from .method.basis import BASIS_KINDS, basis, register_basis
from .method.localize import localize
from .method.models import create_model, list_models
from .method.net import LocalNet
from .method.rules import Rule, create_rule, list_rules, register_rule
from .method.signals import BlockSignal
from .step.factory import build_trainer
from .step.schedules import lr_schedule
from .step.trainer import Evaluation, StepResult, Trainer
from .training.fit import EpochRecord, History, Loaders, evaluate, fit, train_epoch

__all__ = [
    "BASIS_KINDS",
    "BlockSignal",
    "Dataset",
    "EpochRecord",
    "Evaluation",
    "History",
    "LLSError",
    "Loaders",
    "LocalNet",
    "Rule",
    "Split",
    "StepResult",
    "TensorLoader",
    "Trainer",
    "__version__",
    "basis",
    "build_trainer",
    "create_model",
    "create_rule",
    "evaluate",
    "fit",
    "list_datasets",
    "list_models",
    "list_rules",
    "load_dataset",
    "localize",
    "lr_schedule",
    "register_basis",
    "register_rule",
    "train_epoch",
    "tune_malloc",
]
