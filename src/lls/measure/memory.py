"""What a training step holds in memory, measured (the memory columns of ``lls cost``).

Parameters plus optimizer state after a real step; the activations autograd saves for backward at
the peak of a step (saved-tensor hooks); and the peak memory of a whole step (CUDA: the allocator's
peak; CPU: the process's peak resident memory in a fresh subprocess whose allocator returns large
blocks to the system).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from typing import Any

import torch

from ..step.config import BATCH_SIZE, CHANNELS_LAST
from ..step.factory import build_trainer
from ..step.trainer import Trainer


class SavedTensorMeter:
    """Bytes of activations autograd holds for backward, and their peak, via saved-tensor hooks.

    Each saved tensor is counted once per storage while any graph still holds it; a weak reference
    on the packed handle tells when autograd lets go of it.
    """

    def __init__(self, exclude: list[torch.Tensor] = ()) -> None:
        self.alive: dict[int, list[int]] = {}  # storage pointer -> [bytes, holders]
        self.current = self.peak = 0
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}  # parameters are not activations

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key in self.exclude:
            return _Handle(tensor)
        entry = self.alive.setdefault(key, [size, 0])
        if entry[1] == 0:
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        handle = _Handle(tensor)
        weakref.finalize(handle, self._release, key)
        return handle

    def _release(self, key: int) -> None:
        entry = self.alive.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.alive[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda handle: handle.tensor)


class _Handle:
    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def state_bytes(trainer: Trainer) -> tuple[int, int]:
    """(parameter bytes, optimizer state bytes) of a trainer."""
    params = sum(p.numel() * p.element_size() for p in trainer.net.parameters())
    params += sum(p.numel() * p.element_size() for s in trainer.signals for p in s.parameters())
    optim = 0
    for optimizer in trainer.optimizers:
        for state in optimizer.state.values():
            optim += sum(
                v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v) and v.dim() > 0
            )
    return params, optim


def example_batch(input_shape, classes: int, batch: int, device: torch.device, channels_last: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *input_shape, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, classes, (batch,), generator=g).to(device)


def cuda_step_peak(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The peak memory of one step on a CUDA device, above what is held between steps."""
    dev = x.device
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    trainer.train_step(x, y)
    torch.cuda.synchronize(dev)
    return {
        "step_peak_bytes": torch.cuda.max_memory_allocated(dev) - base,
        "step_peak_method": "torch.cuda.max_memory_allocated above the memory held between steps",
    }


def measure_memory(
    model: str,
    rule: str,
    input_shape,
    classes: int,
    *,
    batch: int = BATCH_SIZE,
    device: str = "cpu",
    channels_last: bool = CHANNELS_LAST,
    subprocess_peak: bool = True,
    rule_options: dict[str, Any] | None = None,
    memory: str | int | None = None,
    model_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measured memory of one training step (bytes, whole batch); ``memory``: the low-memory step
    (``"low"`` or a budget in bytes, see ``lowmem.py``), ``None`` for the ordinary one."""
    dev = torch.device(device)
    trainer = build_trainer(
        model,
        rule,
        input_shape,
        classes,
        rule_options=rule_options,
        device=dev,
        channels_last=channels_last,
        memory=memory,
        model_options=model_options,
    )
    x, y = example_batch(input_shape, classes, batch, dev, channels_last)
    trainer.train_step(x, y)  # creates the optimizer state
    params, optim = state_bytes(trainer)
    params_and_signals = [*trainer.net.parameters(), *(p for s in trainer.signals for p in s.parameters())]
    meter = SavedTensorMeter(exclude=params_and_signals)
    with meter.hooks():
        trainer.train_step(x, y)
    result = {
        "batch": batch,
        "memory": memory,
        "param_bytes": params,
        "optimizer_bytes": optim,
        "activation_peak_bytes": meter.peak,
    }
    if dev.type == "cuda":
        result.update(cuda_step_peak(trainer, x, y))
    elif subprocess_peak:
        options = (rule_options or {}, memory, model_options or {})
        result.update(cpu_step_peak(model, rule, input_shape, classes, batch, channels_last, *options))
    if trainer.low_memory is not None:
        result["slices"] = trainer.low_memory.slices(batch)
        result["estimated_step_peak_bytes"] = trainer.low_memory.estimated_peak(batch)
    return result


def cpu_step_peak(
    model: str,
    rule: str,
    input_shape,
    classes: int,
    batch: int,
    channels_last: bool,
    options: dict[str, Any],
    memory: str | int | None = None,
    model_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Peak resident memory of one step above the memory held between steps, in a fresh process."""
    if not os.path.exists("/proc/self/clear_refs"):
        return {"step_peak_bytes": None, "step_peak_method": "unavailable: needs Linux /proc"}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    spec = json.dumps(
        [model, rule, list(input_shape), classes, batch, channels_last, options, memory, model_options or {}]
    )
    done = subprocess.run(
        [sys.executable, "-m", "lls.measure.memory", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    if done.returncode != 0:
        return {
            "step_peak_bytes": None,
            "step_peak_method": f"measurement failed: {done.stderr.strip()[-200:]}",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read_status(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _peak_in_this_process(
    model, rule, input_shape, classes, batch, channels_last, options, memory=None, model_options=None
) -> dict[str, Any]:
    trainer = build_trainer(
        model,
        rule,
        tuple(input_shape),
        classes,
        rule_options=options,
        channels_last=channels_last,
        memory=memory,
        model_options=model_options,
    )
    x, y = example_batch(tuple(input_shape), classes, batch, torch.device("cpu"), channels_last)
    for _ in range(2):  # the optimizer state and the backends' caches exist before the measured step
        trainer.train_step(x, y)
    gc.collect()
    base = _read_status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size to the current one
    trainer.train_step(x, y)
    peak = _read_status("VmHWM")
    return {
        "step_peak_bytes": peak - base,
        "step_peak_method": "peak resident memory of the process during one step minus before it "
        "(glibc returns blocks over 64 KiB to the system, so freed tensors leave the count)",
    }


if __name__ == "__main__":  # the fresh process of cpu_step_peak
    args = json.loads(sys.argv[1])
    print(json.dumps(_peak_in_this_process(*args)))
