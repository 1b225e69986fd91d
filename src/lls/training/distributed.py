"""Training beyond one process, on PyTorch's own runtime (``torch.distributed`` under ``torchrun``).

This module joins and leaves the process group and holds data parallelism (``--parallel ddp``):
every rank takes its share of each global batch; after a block's backward its gradients (times the
rank's share of the batch) are summed across ranks in one ``all_reduce`` and divided by the batch
size, before that block's own optimizer steps. Every rule works this way, BP included. With
BatchNorm, each rank normalises with its own share's statistics (as PyTorch's
DistributedDataParallel does) unless ``--sync-bn`` (CUDA) synchronises them. The layer pipeline is
in ``pipeline.py``. Both are :class:`~lls.training.fit.Strategy` subclasses: ``fit`` drives them as it
drives one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LLSError
from ..registry import Registry
from ..step.trainer import Trainer
from .fit import EpochProgress, Loaders, Strategy, evaluate, train_epoch


@dataclass
class DistContext:
    rank: int
    world: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def join(device: torch.device, timeout_seconds: float) -> DistContext:
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
    return DistContext(dist.get_rank(), dist.get_world_size(), backend)


def leave() -> None:
    """Leave the process group if this process is in one (best effort: a peer may be gone)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError, dist.DistError):
            dist.destroy_process_group()


def lost_peer(error: Exception, rank: int) -> LLSError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LLSError(f"rank {rank} lost contact with the other ranks ({first[:160]}); stopping")


def broadcast_state(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank, bit for bit."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, 0)


class Distributed(Strategy):
    """What every multi-process strategy shares: the process group, rank 0 as the main process,
    agreed stop requests and the checkpoint broadcast."""

    def __init__(self, device: torch.device, timeout: float) -> None:
        self.ctx = join(self.place(device), timeout)
        self.main = self.ctx.main

    def place(self, device: torch.device) -> torch.device:
        if device.type == "cuda":  # one GPU per process on a node
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return device

    def describe(self) -> str:
        return f"{self.name} over {self.ctx.world} processes, {self.ctx.backend}"

    def record(self) -> dict[str, Any]:
        return {"parallel": self.name, "world_size": self.ctx.world}

    def broadcast(self, value: Any) -> Any:
        shared = [value]
        dist.broadcast_object_list(shared, 0)
        return shared[0]

    def agree(self, local):
        def stop() -> bool:
            flag = torch.tensor([1.0 if local() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            return bool(flag.item())

        return stop

    def barrier(self) -> None:
        dist.barrier()

    def lost(self, error: RuntimeError) -> LLSError | None:
        return lost_peer(error, self.ctx.rank)

    def close(self) -> None:
        leave()


STRATEGIES: Registry[type[Distributed]] = Registry("parallel mode")


@STRATEGIES.register("ddp")
class DataParallel(Distributed):
    """Every rank trains its share of each batch; gradients are averaged before each block's step."""

    name = "ddp"

    def __init__(self, device: torch.device, timeout: float, *, sync_bn: bool = False, **_) -> None:
        if sync_bn and device.type != "cuda":
            raise LLSError(
                "--sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU kernel); drop --sync-bn on CPU"
            )
        super().__init__(device, timeout)
        self.sync_bn = sync_bn
        self.trainer: Trainer | None = None

    def record(self) -> dict[str, Any]:
        return {**super().record(), "sync_bn": self.sync_bn}

    def setup(self, trainer: Trainer, loaders: Loaders) -> None:
        if self.sync_bn:  # the converted modules keep the same Parameter objects: optimizers stay valid
            trainer.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trainer.net)
        self.trainer = trainer
        loaders.train.shard = (self.ctx.rank, self.ctx.world)
        trainer.step.sync_gradients = self.sync
        broadcast_state(trainer.net)  # the same start everywhere, whatever each rank drew

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
        """The sums of every rank's share (the seconds of the slowest)."""
        values = torch.tensor(
            [done.loss_sum, float(done.correct), float(done.seen), *done.block_sums], dtype=torch.float64
        )
        dist.all_reduce(values)
        seconds = torch.tensor([done.seconds], dtype=torch.float64)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        sums = (float(values[0]), int(values[1]), int(values[2]), values[3:].tolist())
        return EpochProgress(done.epoch, done.step, *sums, float(seconds))

    def train_epoch(self, trainer, loaders, epoch, **options) -> EpochProgress:
        return self.reduce(train_epoch(trainer, loaders.train, epoch, **options))

    def evaluate(self, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool):
        """Rank 0 runs the paper's evaluation on whole batches; every rank then takes rank 0's
        parameters and buffers (the schedule-free switch to averaged weights and back rounds them,
        and the BatchNorm refresh sets the statistics), so all ranks hold the same state, bit for
        bit, and a checkpoint written by rank 0 resumes every rank exactly."""
        shard, loaders.train.shard = loaders.train.shard, None
        try:
            outcome = [evaluate(trainer, loaders, epoch, blocks)] if self.main else [None]
        finally:
            loaders.train.shard = shard
        dist.broadcast_object_list(outcome, 0)
        broadcast_state(trainer.net)
        return outcome[0]

    def progress_record(self, progress: EpochProgress) -> dict[str, Any]:
        """The epoch's global sums, and each rank's own: resumed with the same number of ranks,
        every rank continues its own sums, so the epoch's totals are added in the same order as in
        an uninterrupted run (exact, not merely close)."""
        ranks: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(ranks, progress.as_dict())
        return {**self.reduce(progress).as_dict(), "ranks": ranks}

    def resume_progress(self, record: dict[str, Any]) -> EpochProgress:
        ranks = record.get("ranks")
        if isinstance(ranks, list) and len(ranks) == self.ctx.world:
            return EpochProgress.from_dict(ranks[self.ctx.rank])
        # saved by another number of processes: rank 0 carries the global sums (close, not exact)
        saved = EpochProgress.from_dict(record)
        if self.main:
            return saved
        return EpochProgress(saved.epoch, saved.step, seconds=saved.seconds)
