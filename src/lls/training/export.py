"""A trained model to a file other runtimes read: ONNX, TorchScript or ExecuTorch (``lls export``).

- ``onnx``: ``torch.onnx.export`` with the ``torch.export``-based exporter (PyTorch's default and
  maintained one; it needs the ``onnx`` and ``onnxscript`` packages, ``pip install 'lls[export]'``),
  input ``input`` (N, C, H, W) with a dynamic batch dimension, output ``logits`` (N, K).
- ``torchscript``: ``torch.jit.trace`` (the model is a fixed chain of layers: tracing records all
  of it), loaded back with ``torch.jit.load`` and no ``lls``.
- ``executorch``: an ExecuTorch inference program (``.pte``: ``torch.export`` -> ``to_edge`` ->
  ``to_executorch``, portable kernels, no delegate) for PyTorch's on-device runtime; method
  ``forward`` takes (N, C, H, W) normalised images, N from 1 to ``EXECUTORCH_MAX_BATCH`` (the
  memory planner sizes the arena for the largest), and returns the (N, K) logits. The program also
  holds its metadata as constant methods (no inputs): ``lls_metadata`` (all of it, one JSON object
  of the strings below) and, decoded, ``input_shape``, ``input_mean``, ``input_std``,
  ``class_names`` and ``num_classes`` (``METADATA_METHODS``). It needs the ``executorch`` package
  (``INSTALL_EDGE``; docs/edge.md).

Every file carries what a runtime needs to feed it and read it (:func:`run_metadata`): the input
normalisation, the class names where the dataset has them, the rule and the ``lls`` version, as
strings (JSON for lists and objects): ONNX's ``metadata_props``, TorchScript's ``_extra_files``
(``torch.jit.load(path, _extra_files={"lls_version": ""})`` reads one back), ExecuTorch's constant
methods.

The file appears complete or not at all: it is written next to its destination and renamed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..errors import LLSError
from ..files import atomic_replace, atomic_write, check_output
from ..registry import Registry

EXAMPLE_BATCH = 2  # the traced batch; ONNX's batch dimension stays free (torch.export specialises 0 and 1)
INSTALL_EXPORT = "pip install 'lls[export]'"
# executorch's own requirements pull coremltools, pandas, torchao, hydra...: its export, runtime and
# training need three small packages beside torch (pyproject's `edge` extra), the wheel without its list
INSTALL_EDGE = "pip install 'lls[edge]' && pip install --no-deps executorch==1.5.1"
EXECUTORCH_MAX_BATCH = 64  # the largest batch an exported inference program takes

Exporter = Callable[[nn.Module, torch.Tensor, Path, dict[str, str]], None]
FORMATS: Registry[Exporter] = Registry("format")
NEEDS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript"),
    "torchscript": (),
    "executorch": ("executorch",),
}
INSTALLS = {"onnx": INSTALL_EXPORT, "executorch": INSTALL_EDGE}
EXTENSIONS = {"onnx": "onnx", "torchscript": "pt", "executorch": "pte"}
# the typed constant methods of an ExecuTorch program besides lls_metadata: each returns the value of
# the metadata key of its name (run_metadata's JSON strings, decoded)
METADATA_METHODS = ("input_shape", "input_mean", "input_std", "class_names", "num_classes")


def installed(package: str) -> bool:
    """Whether ``package`` can be imported (False also where a test hides it: ``sys.modules[p] = None``)."""
    if package in sys.modules and sys.modules[package] is None:
        return False
    return importlib.util.find_spec(package) is not None


def check_format(name: str) -> None:
    """Refuses, in one line, an unknown format or one whose packages are not installed."""
    FORMATS.get(name)
    missing = [package for package in NEEDS.get(name, ()) if not installed(package)]
    if missing:
        raise LLSError(f"exporting to {name} needs {' and '.join(missing)}: {INSTALLS[name]}")


def run_metadata(
    *,
    rule: dict[str, Any],
    mean: Sequence[float],
    std: Sequence[float],
    input_shape: Sequence[int],
    classes: Sequence[str] = (),
    num_classes: int,
    model: str | None = None,
    dataset: str | None = None,
) -> dict[str, str]:
    """What an exported file records about the model it holds, every value a string: how inputs are
    normalised (``(pixels / 255 - input_mean) / input_std``, per channel), the class names (when
    the dataset names every class), the rule with its options, the model's and dataset's names and
    the ``lls`` version."""
    metadata = {
        "lls_version": __version__,
        "rule": json.dumps(rule, sort_keys=True),
        "input_shape": json.dumps(list(input_shape)),
        "input_mean": json.dumps(list(mean)),
        "input_std": json.dumps(list(std)),
        "input_normalization": "(pixels / 255 - input_mean) / input_std, per channel",
        "num_classes": str(num_classes),
    }
    if len(classes) == num_classes:
        metadata["class_names"] = json.dumps(list(classes))
    if model is not None:
        metadata["model"] = model
    if dataset is not None:
        metadata["dataset"] = dataset
    return metadata


def export_model(
    model: nn.Module,
    input_shape: Sequence[int],
    out: str | Path,
    format: str,
    metadata: dict[str, str] | None = None,
    inputs: Sequence[Path] = (),
) -> Path:
    """Write ``model`` (eval mode; inputs of ``input_shape`` without the batch) to ``out``, with
    ``metadata`` (:func:`run_metadata`; string keys and values) in the file. ``out`` must be a file a
    command may write (``files.check_output``: never a run's own file, one of ``inputs``, a link, a
    FIFO or a device)."""
    check_format(format)
    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        example_name = "model." + EXTENSIONS[format]
        raise LLSError(f"{out} is a directory; give the file to write, e.g. {out / example_name}")
    check_output(out, inputs=inputs)
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise LLSError("export metadata must map strings to strings")
    param = next(model.parameters())
    example = torch.zeros(EXAMPLE_BATCH, *input_shape, device=param.device, dtype=param.dtype)
    metadata.setdefault("input_shape", json.dumps(list(input_shape)))
    with torch.no_grad():
        FORMATS.get(format)(model.eval(), example, out, metadata)
    return out


@FORMATS.register("torchscript")
def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    traced = torch.jit.trace(model, example)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files=metadata)
    atomic_write(out, buffer.getvalue())


@FORMATS.register("onnx")
def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    quiet = logging.getLogger("torch.onnx")  # the exporter logs every optional op it skips
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                external_data=False,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    program.model.metadata_props.update(metadata)
    atomic_replace(out, lambda path: program.save(str(path), external_data=False))


@FORMATS.register("executorch")
def export_executorch(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, str]) -> None:
    from executorch.exir import to_edge  # an optional extra (check_format said so if it is missing)

    batch = torch.export.Dim("batch", min=1, max=EXECUTORCH_MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's and exir's deprecation notices
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
        constants: dict[str, Any] = {"lls_metadata": json.dumps(metadata, sort_keys=True)}
        constants.update({key: json.loads(metadata[key]) for key in METADATA_METHODS if key in metadata})
        buffer = to_edge(program, constant_methods=constants).to_executorch().buffer
    atomic_write(out, buffer)
