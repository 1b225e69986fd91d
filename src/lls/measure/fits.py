"""Whether a training step fits in memory, checked before anything of its size is allocated.

A step that does not fit would be killed by the kernel with no message (on CPU the allocator hands
out memory it does not have, and the process dies when it touches it). So every command that
trains or measures a step first estimates the step's peak and compares it with the memory the
device has free: a trainer built on the ``meta`` device (shapes only, no storage) gives the
parameter and fixed-tensor sizes, and the low-memory probe (``lowmem.profile``) the activations
per sample. The estimate errs high: a step it lets through fits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import LLSError
from ..step.factory import build_trainer
from ..step.lowmem import profile, size_text
from ..step.trainer import Trainer

STATE_COPIES = 5  # per trainable parameter: the weight, its gradient, two optimizer moments, a temporary
SCORE_COPIES = 3  # per score (the head's logits, a block signal's scores): value, softmax, gradient
MEMINFO = Path("/proc/meminfo")
CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's own limit, below the machine's


def meta_trainer(model: str, rule: str, input_shape, classes: int, **options: Any) -> Trainer:
    """The trainer ``build_trainer`` would build, on the ``meta`` device: sizes without storage."""
    with torch.device("meta"):
        return build_trainer(model, rule, tuple(input_shape), classes, device="meta", **options)


def estimated_bytes(trainer: Trainer, batch: int) -> int:
    """Estimated peak bytes of training ``trainer`` at ``batch`` images: the weights with their
    gradients and optimizer state, the fixed tensors of the rule, and the largest step's
    activations and scores."""
    net = trainer.net
    element = next(net.parameters()).element_size()
    tensors = [*net.parameters(), *(p for s in trainer.signals for p in s.parameters())]
    trainable = sum(t.numel() * t.element_size() for t in tensors if t.requires_grad)
    fixed = sum(b.numel() * b.element_size() for s in trainer.signals for b in s.buffers())  # bases
    blocks = profile(net, trainer.input_shape)
    if trainer.low_memory is not None:
        activations = trainer.low_memory.estimated_peak(batch)
    elif trainer.rule.timing != "block":  # BP, and rules waiting for the head, hold every block's
        activations = batch * sum(p.input + p.work for p in blocks)
    else:  # a block-local step holds one block's at a time
        activations = max(batch * (p.input + p.output + p.latent + p.work) for p in blocks)
    rows = max([trainer.num_classes, *(getattr(s, "rows", 0) for s in trainer.signals)])
    scores = SCORE_COPIES * batch * rows * element
    return STATE_COPIES * trainable + fixed + activations + scores


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new allocation on ``device`` (None: unknown). On the CPU: the kernel's
    MemAvailable, or less where a cgroup limits this process."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu" or not MEMINFO.exists():
        return None
    free = None
    for line in MEMINFO.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            free = int(line.split()[1]) * 1024
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int((CGROUP / "memory.current").read_text())
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: the machine's figure stands
    return free


def check_fits(estimate: int, device: torch.device, what: str, fix: str) -> None:
    """Refuse ``what`` (e.g. "training at batch 60000") when ``estimate`` bytes exceed the memory
    free on ``device``; ``fix`` says what to lower."""
    free = available_bytes(device)
    if free is not None and estimate > free:
        raise LLSError(
            f"{what} would not fit in memory: it needs about {size_text(estimate)} (estimated) and "
            f"{'this machine' if device.type == 'cpu' else device} has {size_text(free)} available; {fix}"
        )


def check_training_fits(trainer: Trainer, batch: int) -> None:
    """:func:`check_fits` for training ``trainer`` at ``batch`` images (``lls train``'s check)."""
    rule, device = trainer.rule, next(trainer.net.parameters()).device
    what = f"training with {rule.name} at batch {batch}"
    fix = "lower --batch-size" + (" or use --memory low" if rule.timing != "end-to-end" else "")
    check_fits(estimated_bytes(trainer, batch), device, what, fix)
