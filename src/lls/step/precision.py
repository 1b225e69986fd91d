"""Training precision: ``fp32`` (the reference), ``bf16`` or ``fp16`` mixed precision.

The weights, the optimizers' states and every update stay in float32; what changes is the dtype
the forward pass computes in. Under ``bf16`` / ``fp16`` a training step runs

- every block and the head under ``torch.autocast`` (convolutions and linear layers in the low
  precision; autocast computes the cross-entropy in float32);
- each block's learning signal on the block's output: the part that reads the whole output (the
  LLS latent's pooling, :meth:`~lls.method.signals.BlockSignal.latent`) under autocast, the rest
  (the latent's L2 normalisation, the scores against the basis, the loss and its reduction) in
  float32 on the up-cast latent; a signal that is not split that way (the graph engine's fused one)
  gets the up-cast output. So the basis is made and used in float32 and every loss is a float32
  reduction;
- every backward pass and optimizer step outside autocast (PyTorch's advice).

``fp16``'s narrow range needs loss scaling. Each block has its own loss and its own optimizer, so
each optimizer gets its own ``GradScaler``: a block whose gradients overflow skips its step and
lowers its own scale without touching the others (BP, one loss, steps all of them with the first
scaler). The scalers' state is part of the trainer's checkpoint.

Evaluation always runs in float32, so that the evaluated model is exactly the float32 network a
user exports (``lls.load_run``). Inside a CUDA graph capture autocast runs with its weight cache
off (a cached cast would be a tensor of the capture), which is why the cache is off everywhere: one
code path for both engines. ``fp16`` steps read the scaler's overflow flag on the host, which a
graph cannot: the graph engine refuses ``fp16`` (``auto`` steps eagerly).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import LLSError
from ..method.signals import BlockSignal

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@functools.cache
def cpu_supports(dtype: torch.dtype) -> bool:
    """Whether this CPU build runs a training step under CPU autocast in ``dtype`` (a tiny conv and
    linear layer, forward and backward); some builds and CPUs lack the half-precision kernels."""
    try:
        conv = torch.nn.Conv2d(2, 2, 3, padding=1)
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            out = F.linear(conv(torch.randn(2, 2, 4, 4)).flatten(1), torch.randn(3, 32))
            loss = F.cross_entropy(out, torch.tensor([0, 1]))
        loss.backward()
        return out.dtype == dtype and bool(torch.isfinite(conv.weight.grad).all())
    except (RuntimeError, NotImplementedError):
        return False


def check_precision(name: str, device: torch.device | str) -> torch.dtype:
    """The autocast dtype of precision ``name`` on ``device``; refuses, in one line, an unknown
    name or a precision the device cannot train in."""
    if name not in PRECISIONS:
        raise LLSError(f"unknown precision {name!r}; known precisions: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[name]
    device = torch.device(device)
    if dtype is torch.float32:
        return dtype
    if device.type == "cpu" and not cpu_supports(dtype):
        raise LLSError(
            f"this CPU build of torch {torch.__version__} cannot train in {name}; "
            "use --precision bf16 or fp32 (or a GPU)"
        )
    if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise LLSError(f"{torch.cuda.get_device_name(device)} has no bf16; use --precision fp16 or fp32")
    if device.type not in ("cpu", "cuda"):
        raise LLSError(f"--precision {name} runs on cpu and cuda, not {device.type}; use fp32")
    return dtype


def is_mixed(name: str) -> bool:
    """Whether precision ``name`` computes anything below float32."""
    return PRECISIONS.get(name, torch.float32) is not torch.float32


class Precision:
    """A trainer's precision: where autocast is on, and one gradient scaler per optimizer (fp16)."""

    def __init__(self, name: str, device: torch.device, optimizers: int) -> None:
        self.name = name
        self.dtype = check_precision(name, device)
        self.device_type = torch.device(device).type
        self.mixed = self.dtype is not torch.float32
        scaled = self.dtype is torch.float16
        self.scalers = [torch.amp.GradScaler(self.device_type) for _ in range(optimizers)] if scaled else []

    def autocast(self):
        """The forward pass of blocks and head: autocast in the low precision (fp32: nothing)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False)

    def exact(self):
        """Float32 inside an :meth:`autocast` region (backward passes, steps, the loss's reductions)."""
        if not self.mixed:
            return nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def restore(self, t: torch.Tensor) -> torch.Tensor:
        """An output of an autocast region back in float32 (fp32: ``t`` itself, whatever its dtype)."""
        return t.float() if self.mixed else t

    def signal_loss(
        self, signal: Callable[..., torch.Tensor], a: torch.Tensor, y: torch.Tensor, logits=None
    ) -> torch.Tensor:
        """``signal(a, y, logits)``: the latent under autocast, the rest in float32 (module docstring)."""
        if not self.mixed:
            return signal(a, y, logits)
        logits = None if logits is None else logits.float()
        if isinstance(signal, BlockSignal):
            with self.autocast():
                z = signal.latent(a)
            with self.exact():
                return signal.latent_loss(z.float(), y, logits)
        with self.exact():
            return signal(a.float(), y, logits)

    def update(
        self,
        optimizers: list[torch.optim.Optimizer],
        loss: torch.Tensor,
        sync: Callable[[torch.optim.Optimizer], None] | None,
        scaler: int = 0,
    ) -> None:
        """Backward of ``loss`` and a step of each of ``optimizers`` (one for a block; all for BP),
        with scaler number ``scaler`` under fp16; ``sync`` averages gradients across processes."""
        with self.exact():
            if not self.scalers:
                loss.backward()
                for optimizer in optimizers:
                    if sync is not None:
                        sync(optimizer)
                    optimizer.step()
                return
            chosen = self.scalers[scaler]
            chosen.scale(loss).backward()
            for optimizer in optimizers:
                if sync is not None:  # averaging scaled gradients scales the average alike
                    sync(optimizer)
                chosen.step(optimizer)  # unscales; skips the step if a gradient is inf or nan
            chosen.update()

    def state_dict(self) -> list[dict[str, Any]]:
        return [scaler.state_dict() for scaler in self.scalers]

    def load_state_dict(self, state: list[dict[str, Any]] | None) -> None:
        if not self.scalers:
            return
        if state is None or len(state) != len(self.scalers):
            raise ValueError(f"no fp16 gradient scalers for the {len(self.scalers)} optimizers")
        for scaler, scaler_state in zip(self.scalers, state, strict=True):
            scaler.load_state_dict(scaler_state)


FP32 = Precision("fp32", torch.device("cpu"), 0)  # no autocast, no scaler: the reference step
