"""Training beyond one process, on PyTorch's own runtime (``torch.distributed`` under ``torchrun``).

Data parallelism (``--parallel ddp``): every rank takes its share of each global batch; after a
block's backward its gradients (times the rank's share of the batch) are summed across ranks in one
``all_reduce`` and divided by the batch size, before that block's own optimizer steps. Every rule
works this way, BP included. With BatchNorm, each rank normalises with its own share's statistics
(as PyTorch's DistributedDataParallel does) unless ``--sync-bn`` (CUDA) synchronises them.

Layer pipelining (``--parallel pipeline``, local rules only): the blocks are split into stages, one
per rank; stage s receives (activations, labels) of a batch from stage s-1, trains its blocks with
their local rule and sends its output on without waiting (``isend``), so up to PIPELINE_DEPTH
batches are in flight and all stages work at once. Nothing ever travels backwards. Each stage sees
the batches in order and updates after each, so block l+1 learns from exactly the activations block
l produced for that batch: the same algorithm as one process (tested to the bit on CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .errors import LLSError
from .fit import EpochProgress, Loaders
from .trainer import Trainer

PIPELINE_DEPTH = 2  # batches a stage may have sent that its successor has not yet received


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(device: torch.device, timeout_seconds: float) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise LLSError(
            "--parallel needs torch.distributed's environment: launch with "
            "`torchrun --nproc-per-node N -m lls train ... --parallel ddp|pipeline`"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds))
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend)


def leave() -> None:
    """Leave the process group if this process is in one (best effort: a peer may be gone)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError, dist.DistError):
            dist.destroy_process_group()


def lost_peer(error: Exception, ctx: DistContext) -> LLSError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LLSError(f"rank {ctx.rank} lost contact with the other ranks ({first[:160]}); stopping")


# --- data parallelism -----------------------------------------------------------------------------


@dataclass
class DataParallel:
    ctx: DistContext
    trainer: Trainer
    loaders: Loaders

    def __post_init__(self) -> None:
        self.loaders.train.shard = (self.ctx.rank, self.ctx.world)
        self.trainer.sync_gradients = self.sync
        for p in self.trainer.net.parameters():  # the same start everywhere, whatever each rank drew
            dist.broadcast(p.data, 0)

    def sync(self, optimizer: torch.optim.Optimizer) -> None:
        """Average an optimizer's gradients over the global batch, in one all-reduce."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        n_local = float(self.trainer.batch_size_in_step)
        flat = torch.cat(
            [p.grad.flatten() * n_local for p in params] + [params[0].grad.new_tensor([n_local])]
        )
        dist.all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def reduce(self, done: EpochProgress) -> EpochProgress:
        values = torch.tensor(
            [done.loss_sum, float(done.correct), float(done.seen), *done.block_sums], dtype=torch.float64
        )
        dist.all_reduce(values)
        seconds = torch.tensor([done.seconds], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        return EpochProgress(
            done.epoch,
            done.step,
            float(values[0]),
            int(values[1]),
            int(values[2]),
            values[3:].tolist(),
            float(seconds),
        )

    def evaluator(self, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool = True):
        """Rank 0 runs the paper's evaluation on whole batches; the others take its BatchNorm
        statistics, so every rank holds the same state afterwards."""
        from .fit import evaluate

        shard, loaders.train.shard = loaders.train.shard, None
        try:
            outcome = [evaluate(trainer, loaders, epoch, blocks)] if self.ctx.main else [None]
        finally:
            loaders.train.shard = shard
        dist.broadcast_object_list(outcome, 0)
        for buffer in trainer.net.buffers():
            dist.broadcast(buffer, 0)
        return outcome[0]

    def should_stop(self, local) -> callable:
        def stop() -> bool:
            flag = torch.tensor([1.0 if local() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        return stop


def convert_sync_batchnorm(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if device.type != "cuda":
        raise LLSError(
            "--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop --sync-bn on CPU"
        )
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)


# --- layer pipelining -----------------------------------------------------------------------------


def parse_stages(text: str, blocks: int) -> list[range]:
    """``0-2,3-5,6-7`` -> stage ranges; every block in exactly one stage, in order."""
    stages = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            stages.append(range(int(first), int(last or first) + 1))
    except ValueError:
        raise LLSError(f"--stages takes ranges of block numbers like 0-2,3-5,6-7, got {text!r}") from None
    flat = [b for stage in stages for b in stage]
    if flat != list(range(blocks)):
        raise LLSError(f"--stages {text} must cover blocks 0..{blocks - 1} once each, in order")
    return stages


def balance_stages(costs: list[int], stages: int) -> list[range]:
    """Split blocks into contiguous stages minimising the largest stage cost (exact DP)."""
    n = len(costs)
    if stages > n:
        raise LLSError(f"{stages} pipeline stages but the model has only {n} blocks; use fewer processes")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for j in range(s, n + 1):
            for i in range(s - 1, j):
                value = max(best[s - 1][i], prefix[j] - prefix[i])
                if value < best[s][j]:
                    best[s][j], cut[s][j] = value, i
    bounds, j = [], n
    for s in range(stages, 0, -1):
        i = cut[s][j]
        bounds.append(range(i, j))
        j = i
    return bounds[::-1]


@dataclass
class StageTimer:
    busy: float = 0.0
    waiting: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def fraction(self) -> float:
        total = self.busy + self.waiting
        return self.busy / total if total else 0.0


class PipelineStage:
    """One rank's blocks of a pipelined local rule, with send/receive to its neighbours."""

    def __init__(self, ctx: DistContext, trainer: Trainer, stages: list[range], input_shape) -> None:
        if trainer.rule.timing != "block":
            raise LLSError(
                f"--parallel pipeline needs a rule whose blocks learn from their own output and the label "
                f"alone; {trainer.rule.name} needs messages travelling backwards (use --parallel ddp)"
            )
        if len(stages) != ctx.world:
            raise LLSError(f"{len(stages)} stages for {ctx.world} processes; start one process per stage")
        self.ctx, self.trainer, self.blocks = ctx, trainer, stages[ctx.rank]
        self.first, self.last = ctx.rank == 0, ctx.rank == ctx.world - 1
        shapes = trainer.net.block_output_shapes(input_shape)
        with torch.no_grad():  # shape of what crosses from this stage to the next
            probe = torch.zeros(2, *shapes[self.blocks[-1]])
            self.out_shape = tuple(trainer.net.between[self.blocks[-1]](probe).shape[1:])
            self.in_shape = tuple(input_shape) if self.first else None
            if not self.first:
                prev = stages[ctx.rank - 1][-1]
                self.in_shape = tuple(trainer.net.between[prev](torch.zeros(2, *shapes[prev])).shape[1:])
        self.pending: deque = deque()
        self.timer = StageTimer()

    # messages: a header (batch size, mode), then activations and labels
    def receive(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        start = time.perf_counter()
        header = torch.zeros(2, dtype=torch.int64)
        dist.recv(header, self.ctx.rank - 1)
        n, mode = int(header[0]), int(header[1])
        if n == 0:
            self.timer.waiting += time.perf_counter() - start
            return None
        x = torch.empty(n, *self.in_shape, dtype=dtype)
        y = torch.empty(n, dtype=torch.int64)
        dist.recv(x, self.ctx.rank - 1)
        dist.recv(y, self.ctx.rank - 1)
        self.timer.waiting += time.perf_counter() - start
        return x, y, mode

    def send(self, h: torch.Tensor | None, y: torch.Tensor | None, mode: int) -> None:
        start = time.perf_counter()
        n = 0 if h is None else len(h)
        header = torch.tensor([n, mode], dtype=torch.int64)
        works = [dist.isend(header, self.ctx.rank + 1)]
        if h is not None:
            h = h.detach().contiguous()
            works += [dist.isend(h, self.ctx.rank + 1), dist.isend(y.contiguous(), self.ctx.rank + 1)]
        self.pending.append((works, h, y))  # keep the tensors alive until sent
        while len(self.pending) > PIPELINE_DEPTH:
            for work in self.pending.popleft()[0]:
                work.wait()
        self.timer.waiting += time.perf_counter() - start

    def flush(self) -> None:
        while self.pending:
            for work in self.pending.popleft()[0]:
                work.wait()

    def train(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """This stage's part of a training step: its blocks (and the head on the last stage)."""
        start = time.perf_counter()
        trainer = self.trainer
        trainer.batch_size_in_step = len(y)
        done = trainer.local_pass(x, y, trainer.update, self.blocks)
        h, losses = done.output, list(done.block_losses)
        head = (done.loss, done.output) if self.last else None
        self.timer.busy += time.perf_counter() - start
        return h, losses, head

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        h = x
        for i in self.blocks:
            h = self.trainer.net.between[i](self.trainer.net.blocks[i](h))
        if self.last:
            h = self.trainer.net.head(h)
        self.timer.busy += time.perf_counter() - start
        return h


def gather_state(ctx: DistContext, trainer: Trainer, stages: list[range]) -> dict[str, Any] | None:
    """The full trainer state on rank 0, assembled from every stage's own blocks."""
    mine = stages[ctx.rank]
    state = trainer.state_dict()
    prefixes = tuple(f"blocks.{i}." for i in mine) + (("head.",) if ctx.rank == ctx.world - 1 else ())
    part = {
        "net": {k: v for k, v in state["net"].items() if k.startswith(prefixes)},
        "signals": {i: state["signals"][i] for i in mine},
        "optimizers": {i: state["optimizers"][i] for i in mine},
    }
    if ctx.rank == ctx.world - 1:
        part["optimizers"][len(trainer.net.blocks)] = state["optimizers"][-1]
    parts = [None] * ctx.world if ctx.main else None
    dist.gather_object(part, parts, dst=0)
    if not ctx.main:
        return None
    for p in parts:
        state["net"].update(p["net"])
        for i, s in p["signals"].items():
            state["signals"][i] = s
        for i, s in p["optimizers"].items():
            state["optimizers"][i] = s
    return state


# --- the pipelined training loop ------------------------------------------------------------------

TRAIN, REFRESH, PROBE, TEST = 1, 2, 3, 4  # message modes: what the batches travelling now are for


def _phase(stage: PipelineStage, mode: int, batches, handle) -> None:
    """Stream one phase's batches through the pipeline; ``handle(x, y)`` runs this stage's part and
    returns what to send on. The first stage reads ``batches``; the others read their predecessor."""
    if stage.first:
        for x, y in batches:
            h = handle(x, y)
            if not stage.last:
                stage.send(h, y, mode)
    else:
        while (message := stage.receive(stage.trainer.net.head.weight.dtype)) is not None:
            x, y, _ = message
            h = handle(x, y)
            if not stage.last:
                stage.send(h, y, mode)
    if not stage.last:
        stage.send(None, None, mode)
        stage.flush()


def pipeline_epoch(stage: PipelineStage, loaders: Loaders, epoch: int) -> dict[str, Any]:
    """Train one epoch across the stages; returns this stage's sums (gathered by the caller)."""
    from .fit import TrainingDiverged

    sums = {"loss": 0.0, "correct": 0, "seen": 0, "blocks": {i: 0.0 for i in stage.blocks}, "steps": 0}

    def handle(x, y):
        h, losses, head = stage.train(x, y)
        n = len(y)
        sums["steps"] += 1
        for i, loss in zip(stage.blocks, losses, strict=True):
            value = float(loss)
            if not math.isfinite(value):
                where = f"epoch {epoch + 1}, step {sums['steps']}"
                raise TrainingDiverged(
                    f"training diverged at {where}: block {i}'s local loss is {value}; lower --lr"
                )
            sums["blocks"][i] += value * n
        if head is not None:
            loss, logits = head
            sums["loss"] += float(loss) * n
            sums["correct"] += int((logits.argmax(1) == y).sum())
        sums["seen"] += n
        return h

    start = time.perf_counter()
    _phase(stage, TRAIN, loaders.train.epoch(epoch) if stage.first else None, handle)
    sums["seconds"] = time.perf_counter() - start
    return sums


@torch.no_grad()
def pipeline_evaluate(stage: PipelineStage, loaders: Loaders, epoch: int, blocks: bool) -> dict[str, Any]:
    """The paper's evaluation through the pipeline: averaged weights, BatchNorm refresh on 50
    training batches, then the test set; each stage reads out its own blocks."""
    from itertools import islice

    from .fit import REFRESH_BATCHES
    from .readout import RidgeProbe, block_predictions, readout_kind
    from .rules import latent

    trainer, net = stage.trainer, stage.trainer.net
    kind = readout_kind(trainer.signals) if blocks else None
    result: dict[str, Any] = {"loss": 0.0, "correct": 0, "count": 0, "blocks": {i: 0 for i in stage.blocks}}
    with trainer.evaluation() as _:
        net.train()
        refresh = (
            islice(loaders.train.epoch(epoch, stream="refresh"), REFRESH_BATCHES) if stage.first else None
        )
        _phase(stage, REFRESH, refresh, lambda x, y: stage.forward(x))
        net.eval()
        probes: dict[int, RidgeProbe] | None = None  # this stage's blocks' probes, by block index
        if kind == "ridge probe":
            features: dict[int, list] = {i: [] for i in stage.blocks}
            labels: list = []

            def collect(x, y):
                h = x
                for i in stage.blocks:
                    a = net.blocks[i](h)
                    features[i].append(latent(a, net.latent_pool[i]))
                    h = net.between[i](a)
                labels.append(y)
                return h

            _phase(stage, PROBE, loaders.probe.epoch() if stage.first else None, collect)
            y_all = torch.cat(labels)
            probes = {i: RidgeProbe(torch.cat(f), y_all, trainer.num_classes) for i, f in features.items()}

        def test(x, y):
            h = x
            for i in stage.blocks:
                a = net.blocks[i](h)
                if kind is not None:
                    predicted = block_predictions(trainer.signals, probes, i, a, net.latent_pool[i])
                    result["blocks"][i] += int((predicted == y).sum())
                h = net.between[i](a)
            if stage.last:
                logits = net.head(h)
                result["loss"] += float(F.cross_entropy(logits, y, reduction="sum"))
                result["correct"] += int((logits.argmax(1) == y).sum())
            result["count"] += len(y)
            return h

        _phase(stage, TEST, loaders.test.epoch() if stage.first else None, test)
    result["readout"] = kind
    return result


def pipeline_fit(
    ctx: DistContext,
    stage: PipelineStage,
    loaders: Loaders,
    stages: list[range],
    epochs: int,
    *,
    start_epoch: int,
    history,
    on_epoch,
    should_stop,
    block_accuracy: bool,
    lr: float,
) -> None:
    """Epochs of pipelined training. Rank 0 (the first stage) reads the data; the last stage holds
    the head. ``on_epoch(record, state)`` runs on rank 0 with the trainer state gathered from every
    stage. A stop request (Ctrl-C) takes effect at the end of the current epoch, after its checkpoint."""
    from .fit import EpochRecord, Interrupted

    blocks = sum(len(s) for s in stages)
    for epoch in range(start_epoch, epochs):
        sums = pipeline_epoch(stage, loaders, epoch)
        evaluation = pipeline_evaluate(stage, loaders, epoch, block_accuracy)
        parts = [None] * ctx.world if ctx.main else None
        dist.gather_object((sums, evaluation, stage.timer.fraction()), parts, dst=0)
        state = gather_state(ctx, stage.trainer, stages)
        if ctx.main:
            block_sums, block_correct = [0.0] * blocks, [0] * blocks
            for part_sums, part_eval, _ in parts:
                for i, value in part_sums["blocks"].items():
                    block_sums[i] = value
                for i, value in part_eval["blocks"].items():
                    block_correct[i] = value
            last, final = parts[-1][0], parts[-1][1]
            count = final["count"]
            record = EpochRecord(
                epoch=epoch + 1,
                train_loss=last["loss"] / last["seen"],
                train_accuracy=last["correct"] / last["seen"],
                block_losses=[b / last["seen"] for b in block_sums],
                test_loss=final["loss"] / count,
                test_accuracy=final["correct"] / count,
                train_seconds=max(p[0]["seconds"] for p in parts),
                eval_seconds=0.0,
                lr=lr,
                block_accuracy=[c / count for c in block_correct] if final["readout"] else [],
                readout=final["readout"],
            )
            if not math.isfinite(record.test_loss):
                raise LLSError(f"evaluation after epoch {epoch + 1} gave a test loss of {record.test_loss}")
            history.records.append(record)
            history.busy_fractions = [p[2] for p in parts]
            on_epoch(record, state)
        stop = [should_stop() if ctx.main else False]
        dist.broadcast_object_list(stop, 0)
        if stop[0] and epoch + 1 < epochs:
            raise Interrupted(None)
