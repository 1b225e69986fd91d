"""The trained model out of a run: the network the run evaluated, as a plain ``torch.nn`` module.

A checkpoint holds what training needs, not the evaluated model: a schedule-free optimizer trains
at one point and evaluates at an average of its iterates (the weights live in the optimizer's
state), and each evaluation first refreshes BatchNorm's statistics. :func:`evaluated_model` makes
that model once: the averaged weights, the statistics of the run's last evaluation (saved with an
epoch's checkpoint; refreshed again, as training would, from a checkpoint taken mid-epoch), eval
mode. :func:`plain_model` turns it into an ``nn.Sequential``; for the paper's models (convolution,
dense and depthwise-separable blocks) it holds ``torch.nn`` modules only, so that it pickles,
scripts, traces and exports without ``lls`` installed. The zoo's residual and transformer blocks are
``lls`` modules: their exported files (``export.py``) are what runs without ``lls``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import checked, device_of
from ..data import Dataset, load_dataset, make_loader
from ..data.base import FileSplit, Split
from ..errors import LLSError
from ..method.activation import LeakyReLU
from ..method.net import LocalNet
from .fit import EVAL_BATCH_SIZE, REFRESH_BATCHES
from .run import Session, open_trained

Batch = tuple[torch.Tensor, torch.Tensor]


def plain_model(net: LocalNet) -> nn.Sequential:
    """A copy of ``net`` as ``nn.Sequential(block_0, op_0, ..., block_{L-1}, op_{L-1}, head)``
    (identity ops left out), with ``lls``'s memory-saving LeakyReLU replaced by ``nn.LeakyReLU``
    (the same function; it differs only in what its backward keeps). Same mode, device, layout."""
    layers: dict[str, nn.Module] = {}
    for index, (block, op) in enumerate(zip(net.blocks, net.between, strict=True)):
        layers[f"block{index}"] = copy.deepcopy(block)
        if not isinstance(op, nn.Identity):
            layers[f"after{index}"] = copy.deepcopy(op)
    layers["head"] = copy.deepcopy(net.head)
    model = nn.Sequential()
    for name, layer in layers.items():
        model.add_module(name, _torch_modules(layer))
    return model.train(net.training)


def _torch_modules(module: nn.Module) -> nn.Module:
    if type(module) is LeakyReLU:
        return nn.LeakyReLU(module.negative_slope, module.inplace)
    for name, child in module.named_children():
        setattr(module, name, _torch_modules(child))
    return module


def evaluation_refresh(session: Session, state: dict[str, Any]) -> Iterable[Batch]:
    """The BatchNorm refresh that reproduces a checkpoint's last evaluation: none at an epoch's end
    (the saved statistics are the ones refreshed for that epoch's evaluation); mid-epoch (an
    interrupted run), the refresh batches the evaluation of that epoch draws (``fit.evaluate``)."""
    progress = state["progress"]
    if progress is None:
        return ()
    return islice(session.loaders.train.epoch(progress["epoch"], stream="refresh"), REFRESH_BATCHES)


def evaluated_model(session: Session, state: dict[str, Any]) -> nn.Sequential:
    """The run's evaluated network (averaged weights, refreshed BatchNorm, eval mode), plain."""
    with torch.no_grad(), session.trainer.evaluation(evaluation_refresh(session, state)) as net:
        return plain_model(net).eval()


@checked
def load_run(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    data_dir: str | None = None,
    download: bool = True,
) -> nn.Sequential:
    """The model a run evaluated, as a plain ``torch.nn`` module on ``device`` in eval mode.

    It gives the run's test accuracy (``lls eval``'s figure) on the run's test batches; for the
    paper's models it needs nothing from ``lls`` to run, pickle, script or export. Inputs are
    normalised images of the run's dataset, shape (N, C, H, W); outputs are logits (N, K). The
    run's data is read (the BatchNorm refresh of a run stopped mid-epoch needs its training
    batches)::

        model = lls.load_run("runs/my-run")
        predicted = model(x).argmax(1)
    """
    _, state, session = open_trained(path, device=device_of(device), data_dir=data_dir, download=download)
    return evaluated_model(session, state)


def describe_run(session: Session) -> dict[str, Any]:
    """What a training program exported from a run says about itself, as JSON values (an inference
    export's strings are :func:`lls.training.export.run_metadata`'s): the input shape (C, H, W) and
    its normalisation ``(x - mean) / std`` per channel, the class names, the model, its rule and
    options, the dataset and the ``lls`` version that wrote it."""
    from .. import __version__

    config, data = session.config, session.data
    names = (
        list(data.classes)
        if len(data.classes) == data.num_classes
        else [str(k) for k in range(data.num_classes)]
    )
    return {
        "input_shape": list(data.input_shape),
        "mean": [float(v) for v in data.mean],
        "std": [float(v) for v in data.std],
        "classes": names,
        "model": config.model,
        "model_options": dict(config.model_options or {}),
        "rule": config.rule,
        "rule_options": dict(config.rule_options or {}),
        "dataset": config.dataset,
        "lls_version": __version__,
    }


@dataclass
class Inputs:
    """The images a trained model is asked about: normalised batches, their names and labels."""

    name: str  # "fashion-mnist test", or "files"
    data: Dataset
    split: Split | FileSplit
    names: list[str]  # one per image: "test[17]", or the file's path


def dataset_inputs(
    session: Session, dataset: str | None, split: str, *, data_dir: str | None, download: bool
) -> Inputs:
    """A split of the run's dataset (the run's ``limit`` applied), or of another dataset of the same
    input shape and classes, as ``lls eval`` evaluates and ``lls predict`` predicts it."""
    config, data = session.config, session.data
    if dataset and dataset != config.dataset:
        data = load_dataset(dataset, data_dir, download=download, quiet=True, augment="none")
        if (data.input_shape, data.num_classes) != (session.data.input_shape, session.data.num_classes):
            raise LLSError(
                f"the model takes {session.data.input_shape} images and {session.data.num_classes} classes; "
                f"{dataset} has {data.input_shape} and {data.num_classes}"
            )
    chosen = (data.train if split == "train" else data.test).head(config.limit)
    name = dataset or config.dataset
    return Inputs(f"{name} {split}", data, chosen, [f"{split}[{i}]" for i in range(len(chosen))])


def batches(session: Session, inputs: Inputs, device: torch.device) -> Iterable[Batch]:
    """``inputs`` in evaluation batches, normalised and laid out as the run evaluated them."""
    layout = torch.channels_last if session.config.channels_last else torch.contiguous_format
    data = inputs.data
    loader = make_loader(
        inputs.split, EVAL_BATCH_SIZE, mean=data.mean, std=data.std, device=device, memory_format=layout
    )
    return loader.epoch()
