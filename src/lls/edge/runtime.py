"""The loop an app runs on a device, in ExecuTorch's Python runtime (the C++ API is the same).

:class:`ProgramRunner` loads a training program (``programs.py``), keeps the BatchNorm running
statistics the methods take and give, gives every method its own SGD optimizer over that method's
parameters (the runtime's ``get_sgd_optimizer``: a block trains on its own signal alone) and runs
one training step per batch with :meth:`ProgramRunner.step`, block after block as
``programs.py``'s module docstring describes (a block exported in slices of the batch with its
passes over the slices, :func:`lls.edge.sliced.sliced_step`). :meth:`ProgramRunner.state` reads
the trained parameters and statistics back, under the run's names, so that they load into an
``lls`` trainer.

Outputs are copied out of the runtime's arena (the next call reuses it), except the parameters:
those tensors are the runtime's own memory, which the optimizer updates in place.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LLSError
from . import require_executorch
from .programs import METADATA_METHOD, MethodLayout, ProgramLayout
from .sliced import sliced_step

GRADIENTS_INDEX = "__et_training_gradients_index_"  # ExecuTorch's joint-export getters
PARAMETERS_INDEX = "__et_training_parameters_index_"
PARAMETER_NAMES = "__et_training_fqn_"
PROGRAM_MAGIC = b"ET"  # bytes 4-5 of every ExecuTorch program (its flatbuffer identifier, ET12...)
# What the runtime's thread pool logs on stderr the first time a program computes, probing the CPU
# ("[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version", "... dont match")
CPU_PROBE_LOG = "[cpuinfo_utils.cpp:"
_cpu_probed = False


@contextmanager
def without_cpu_probe_log() -> Iterator[None]:
    """Run the block with the process's stderr (file descriptor 2, where the C++ runtime writes)
    held in a file, and give back every line but the CPU probe's, until the probe has been seen
    once: a user of ``lls edge`` sees lls's output, not the runtime's start-up diagnostics."""
    global _cpu_probed
    if _cpu_probed:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines()
            _cpu_probed = _cpu_probed or any(line.startswith(CPU_PROBE_LOG) for line in lines)
            kept = [line for line in lines if not line.startswith(CPU_PROBE_LOG)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


@dataclass
class StepOutcome:
    """One training step in the runtime."""

    loss: float  # the head's cross-entropy
    logits: torch.Tensor  # (N, K), before the head's update
    block_losses: list[float]  # each block's local loss (empty for BP)


class ProgramRunner:
    """A training program loaded in ExecuTorch's runtime: ``ProgramRunner(buffer).step(x, y)``."""

    def __init__(self, program: bytes | str | Path, *, lr: float | None = None) -> None:
        require_executorch()
        from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

        self.buffer = Path(program).read_bytes() if isinstance(program, (str, Path)) else bytes(program)
        where = f"{program}" if isinstance(program, (str, Path)) else "the buffer"
        if self.buffer[4:6] != PROGRAM_MAGIC:  # the runtime would log its complaint to stderr first
            raise LLSError(
                f"{where} is not an ExecuTorch program (no ET header); "
                "export one with `lls export RUN --format executorch --training`"
            )
        try:
            self.module = _load_for_executorch_from_buffer(self.buffer)
            methods = self.module.method_names()
        except Exception as error:  # not a program: said in one line
            raise LLSError(
                f"{where} is not an ExecuTorch program ({str(error).strip()[:160] or type(error).__name__}); "
                "export one with `lls export RUN --format executorch --training`"
            ) from None
        if METADATA_METHOD not in methods:
            raise LLSError(
                f"{where} is an ExecuTorch program but not an lls training program (no lls_metadata); "
                "export one with `lls export RUN --format executorch --training`"
            )
        self.layout = ProgramLayout.from_dict(json.loads(self.module.run_method(METADATA_METHOD, ())[0]))
        self.optimizer = dict(self.layout.optimizer)
        if lr is not None:
            self.optimizer["lr"] = lr
        self.statistics: dict[str, torch.Tensor] = {}
        for method in self.layout.methods:
            if method.statistics:
                values = self.module.run_method(f"{method.name}_statistics", ())
                self.statistics.update(zip(method.statistics, (v.clone() for v in values), strict=True))
        self._params: dict[str, dict[str, torch.Tensor]] = {}
        self._optimizers: dict[str, object] = {}
        self._where: dict[str, tuple[int, int, list[str]]] = {}  # a training method's outputs

    @property
    def batch_size(self) -> int:
        return self.layout.batch_size

    def _outputs(self, name: str) -> tuple[int, int, list[str]]:
        """Where a training method's gradients and parameters start among its outputs, and their names."""
        if name not in self._where:
            self._where[name] = (
                self.module.run_method(GRADIENTS_INDEX + name, ())[0],
                self.module.run_method(PARAMETERS_INDEX + name, ())[0],
                list(self.module.run_method(PARAMETER_NAMES + name, ())),
            )
        return self._where[name]

    def run(self, name: str, inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Run the training method ``name``: its user outputs (copied) and its gradients by parameter
        name (copied)."""
        with without_cpu_probe_log():
            outputs = self.module.run_method(name, tuple(inputs), clone_outputs=False)
        grad_start, param_start, names = self._outputs(name)
        if name not in self._params:  # the runtime's own parameter tensors
            self._params[name] = dict(zip(names, outputs[param_start:], strict=True))
        grads = {n: g.clone() for n, g in zip(names, outputs[grad_start:param_start], strict=True)}
        return [o.clone() for o in outputs[:grad_start]], grads

    def forward(self, name: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the forward-only method ``name`` (a sliced block's statistics pass): its outputs, copied."""
        with without_cpu_probe_log():
            return [o.clone() for o in self.module.run_method(name, tuple(inputs), clone_outputs=False)]

    def call(self, method: MethodLayout, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
        """Run ``method`` with the running statistics it takes (:meth:`run`)."""
        return self.run(method.name, [*inputs, *(self.statistics[name] for name in method.statistics)])

    def update(self, method: MethodLayout, grads: dict, outputs: list[torch.Tensor]) -> None:
        """Step ``method``'s optimizer and keep the statistics it gave."""
        self.optimize(method, grads)
        n = len(method.statistics)
        if n:
            self.statistics.update(zip(method.statistics, outputs[2 : 2 + n], strict=True))

    def optimize(self, method: MethodLayout, grads: dict) -> None:
        """Step ``method``'s own SGD optimizer (made on first use) with ``grads``."""
        from executorch.extension.training import get_sgd_optimizer

        optimizer = self._optimizers.get(method.name)
        if optimizer is None:
            o = self.optimizer
            optimizer = get_sgd_optimizer(
                self._params[method.name],
                o["lr"],
                o["momentum"],
                o["dampening"],
                o["weight_decay"],
                o["nesterov"],
            )
            self._optimizers[method.name] = optimizer
        optimizer.step(grads)

    def parameters(self, method: MethodLayout) -> dict[str, torch.Tensor]:
        """``method``'s parameters, the runtime's own tensors. They are outputs of a call, so a
        method not called yet is called once on zeros first (its gradients dropped, nothing
        stepped, its statistics not kept)."""
        if method.name not in self._params:
            meta = self.module.method_meta(method.name)
            shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(len(method.inputs))]
            inputs = [
                torch.zeros(shape, dtype=torch.long if name == "y" else torch.float32)
                for shape, name in zip(shapes, method.inputs, strict=True)
            ]
            self.run(method.name, inputs)
        return self._params[method.name]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutcome:
        """One training step on a batch (``batch_size`` samples, float32 inputs, int64 labels)."""
        if len(y) != self.batch_size or len(x) != self.batch_size:
            raise LLSError(f"the program trains batches of {self.batch_size}; got {len(y)} samples")
        x = x.float().contiguous()
        y = y.long().contiguous()
        methods = self.layout.methods
        if self.layout.timing == "end-to-end":
            (network,) = methods
            outputs, grads = self.call(network, [x, y])
            self.update(network, grads, outputs)
            return StepOutcome(float(outputs[0]), outputs[1], [])
        blocks, head = methods[:-1], methods[-1]
        losses: list[float] = []
        h = x
        if self.layout.timing == "head":  # DFA: the blocks' outputs first, the updates after the head's
            inputs = []
            placeholder = torch.zeros(len(y), self.layout.num_classes)
            for block in blocks:
                inputs.append(h)
                h = self.call(block, [h, y, placeholder])[0][1]  # no step, statistics dropped
            outputs, grads = self.call(head, [h, y])
            self.update(head, grads, outputs)
            logits = outputs[1]
            for block, h_in in zip(blocks, inputs, strict=True):
                block_out, grads = self.call(block, [h_in, y, logits])
                self.update(block, grads, block_out)
                losses.append(float(block_out[0]))
            return StepOutcome(float(outputs[0]), logits, losses)
        for block in blocks:
            if block.sliced:
                loss, h = sliced_step(self, block, h, y)
                losses.append(loss)
                continue
            outputs, grads = self.call(block, [h, y])
            self.update(block, grads, outputs)
            losses.append(float(outputs[0]))
            h = outputs[1]
        outputs, grads = self.call(head, [h, y])
        self.update(head, grads, outputs)
        return StepOutcome(float(outputs[0]), outputs[1], losses)

    def state(self) -> dict[str, torch.Tensor]:
        """Every trained parameter and running statistic, by the run's name (``net.blocks.0.0.weight``,
        ``signals.2.modulation``, ``net.blocks.0.1.running_mean``). Parameters of a method never
        called are not known to the runtime yet and are left out."""
        out = {}
        for method in self.layout.methods:
            for name, tensor in self._params.get(method.name, {}).items():
                out[method.parameters[name]] = tensor.clone()
        out.update({name: value.clone() for name, value in self.statistics.items()})
        return out
