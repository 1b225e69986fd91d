"""The paper's evaluation procedure: schedule-free optimizers switch to their averaged weights,
BatchNorm statistics are refreshed on training batches, then the network runs in eval mode."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import check_fields
from ..errors import LLSError
from ..method.net import LocalNet
from ..method.readout import RIDGE_PROBE, block_predictions, fit_probes, readout_kind
from ..method.signals import BlockSignal
from .optim import is_schedule_free

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Evaluation:
    loss: float  # mean cross-entropy of the head
    accuracy: float  # 0..1
    block_accuracy: list[float]  # each block's own accuracy (empty unless asked for)
    readout: str | None = None  # how blocks were read out: "basis", "learned classifier", "ridge probe"

    def __post_init__(self) -> None:
        check_fields(self)


def train_mode(net: LocalNet, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Schedule-free optimizers on their training weights, the network in train mode."""
    for optimizer in optimizers:
        if is_schedule_free(optimizer):
            optimizer.train()
    net.train()


@contextmanager
def evaluation(
    net: LocalNet,
    optimizers: Sequence[torch.optim.Optimizer],
    refresh: Iterable[Batch] = (),
    *,
    keep_statistics: bool = False,
) -> Iterator[LocalNet]:
    """The paper's evaluation procedure, undone on exit.

    Switch schedule-free optimizers to their averaged weights, refresh BatchNorm statistics by
    forwarding the ``refresh`` batches in train mode without gradients, then put the network in
    eval mode. Yields the network, ready for inference. On exit everything is as it was, bit for
    bit: the parameters (the switch back from the averaged weights rounds, so they are put back
    as saved), every buffer (BatchNorm's running statistics and ``num_batches_tracked``), each
    module's mode and each optimizer's. With ``keep_statistics`` it is the authors' loop, what
    :func:`evaluate` (and so ``fit``) does: the refreshed buffers stay (they are the evaluated
    model's statistics, that checkpoints save) and the parameters come back through the
    optimizers' switch to training, with its rounding, so a run trains on as the authors' does.
    """
    modes = [(module, module.training) for module in net.modules()]
    switched = [o for o in optimizers if is_schedule_free(o) and o.param_groups[0]["train_mode"]]
    with torch.no_grad():
        saved = [] if keep_statistics else [*net.parameters(), *net.buffers()]
        saved = [(tensor, tensor.detach().clone()) for tensor in saved]
    for optimizer in switched:
        optimizer.eval()
    try:
        net.train()
        with torch.no_grad():
            for x, _ in refresh:
                net(x)
        net.eval()
        yield net
    finally:
        for optimizer in switched:
            optimizer.train()
        with torch.no_grad():
            for tensor, value in saved:
                tensor.copy_(value)
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def evaluate(
    net: LocalNet,
    optimizers: Sequence[torch.optim.Optimizer],
    signals: Sequence[BlockSignal],
    num_classes: int,
    batches: Iterable[Batch],
    refresh: Iterable[Batch] = (),
    *,
    blocks: bool = False,
    probe_batches: Iterable[Batch] = (),
) -> Evaluation:
    """Loss and accuracy of the evaluation-mode network on ``batches`` (the paper's procedure).

    With ``blocks``, also each block's own accuracy (see ``readout.py``): the rule's basis or
    learned classifier where it has one, else ridge probes fitted on ``probe_batches``.
    """
    total_loss = torch.zeros((), dtype=torch.float64)
    correct, count = 0, 0
    kind = readout_kind(signals) if blocks else None
    block_correct = [0] * len(net.blocks)
    with evaluation(net, optimizers, refresh, keep_statistics=True):
        probes = fit_probes(net, probe_batches, num_classes) if kind == RIDGE_PROBE else None
        if probes is not None and not probes:  # no probe batch: nothing to read the blocks out with
            warnings.warn(
                "no block accuracy: the blocks have no readout of their own and no probe batches "
                "were given (probe_batches=unaugmented training batches fits a ridge probe per block)",
                stacklevel=3,
            )
            kind = None
        for x, y in batches:
            if kind is None:
                logits = net(x)
            else:
                *outputs, (_, logits) = net.walk(x)
                for i, a in outputs:
                    predicted = block_predictions(signals, probes, i, a, net.latent_pool[i])
                    block_correct[i] += int((predicted == y).sum())
            total_loss += F.cross_entropy(logits, y, reduction="sum").double().cpu()
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    if count == 0:
        raise LLSError("evaluation got no batches")
    block_accuracy = [c / count for c in block_correct] if kind is not None else []
    return Evaluation(float(total_loss) / count, correct / count, block_accuracy, kind)
