"""Layer pipelining (``--parallel pipeline``, local rules only).

The blocks are split into stages, one per rank; stage s receives (activations, labels) of a batch
from stage s-1, trains its blocks with the trainer's own block-local step
(:meth:`~lls.step.step.Step.local_pass` over its range) and sends its output on without waiting
(``isend``), so up to PIPELINE_DEPTH batches are in flight and all stages work at once. Nothing ever
travels backwards. Each stage sees the batches in order and updates after each, so block l+1 learns
from exactly the activations block l produced for that batch: the same algorithm as one process
(tested to the bit on CPU).

After each epoch the stages send their blocks' state to rank 0, which runs the one evaluation
procedure (``fit.evaluate``) on the whole network and sends the evaluated state back; rank 0 then
holds the whole trainer, so its checkpoints are those of one process.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from typing import Any

import torch
import torch.distributed as dist

from ..errors import LLSError
from ..measure.cost import count_costs
from ..step.step import StepResult
from ..step.trainer import Trainer
from .distributed import STRATEGIES, Distributed
from .fit import EpochProgress, Loaders, evaluate, train_epoch

PIPELINE_DEPTH = 2  # batches a stage may have sent that its successor has not yet received


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


@STRATEGIES.register("pipeline")
class Pipeline(Distributed):
    """One rank's stage of a pipelined local rule: its blocks, and the head on the last stage."""

    name = "pipeline"

    def __init__(self, device: torch.device, timeout: float, *, stages: str | None = None, **_) -> None:
        super().__init__(device, timeout)
        self.stages_text = stages
        self.layout: list[range] = []
        self.busy = self.waiting = 0.0

    def record(self) -> dict[str, Any]:
        return {**super().record(), "stages": self.stages_text}

    def describe(self) -> str:
        stages = ", ".join(f"{r.start}-{r.stop - 1}" for r in self.layout)
        return f"{super().describe()}; stages {stages}"

    def setup(self, trainer: Trainer, loaders: Loaders) -> None:
        if trainer.rule.timing != "block":
            raise LLSError(
                f"--parallel pipeline needs a rule whose blocks learn from their own output and the label "
                f"alone; {trainer.rule.name} needs messages travelling backwards (use --parallel ddp)"
            )
        net, count = trainer.net, len(trainer.net.blocks)
        if self.stages_text:
            self.layout = parse_stages(self.stages_text, count)
        else:
            # on a copy, and with the random state put back: counting runs the blocks in training
            # mode (which moves BatchNorm statistics) and builds signals (which may draw weights)
            with torch.random.fork_rng(devices=[]):
                report = count_costs(
                    copy.deepcopy(net), trainer.rule, trainer.input_shape, trainer.num_classes
                )
            costs = [b.forward + b.weight_grad + b.signal_mults for b in report.blocks[:-1]]
            self.layout = balance_stages(costs, self.ctx.world)
        if len(self.layout) != self.ctx.world:
            raise LLSError(
                f"{len(self.layout)} stages for {self.ctx.world} processes; start one process per stage"
            )
        self.blocks = self.layout[self.ctx.rank]
        self.first, self.last = self.ctx.rank == 0, self.ctx.rank == self.ctx.world - 1
        shapes = net.block_shapes(trainer.input_shape)
        self.in_shape = shapes[self.blocks.start][0]
        param = next(net.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.pending: deque = deque()

    # --- messages: a header (batch size; 0 ends the epoch), then activations and labels --------

    def receive(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        start = time.perf_counter()
        header = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.recv(header, self.ctx.rank - 1)
        n = int(header[0])
        message = None
        if n:
            x = torch.empty(n, *self.in_shape, dtype=self.dtype, device=self.device)
            y = torch.empty(n, dtype=torch.int64, device=self.device)
            dist.recv(x, self.ctx.rank - 1)
            dist.recv(y, self.ctx.rank - 1)
            message = x, y
        self.waiting += time.perf_counter() - start
        return message

    def send(self, h: torch.Tensor | None, y: torch.Tensor | None) -> None:
        start = time.perf_counter()
        n = 0 if h is None else len(h)
        works = [dist.isend(torch.tensor([n], dtype=torch.int64, device=self.device), self.ctx.rank + 1)]
        if h is not None:
            h, y = h.detach().contiguous(), y.contiguous()
            works += [dist.isend(h, self.ctx.rank + 1), dist.isend(y, self.ctx.rank + 1)]
        self.pending.append((works, h, y))  # keep the tensors alive until sent
        while len(self.pending) > (PIPELINE_DEPTH if h is not None else 0):
            for work in self.pending.popleft()[0]:
                work.wait()
        self.waiting += time.perf_counter() - start

    # --- an epoch --------------------------------------------------------------------------------

    def batches(self, loaders: Loaders, epoch: int):
        if self.first:
            yield from loaders.train.epoch(epoch)
        else:
            while (message := self.receive()) is not None:
                yield message

    def train_epoch(self, trainer, loaders, epoch, *, resume=None, **_) -> EpochProgress:
        """This stage's part of an epoch; rank 0 gets the sums of every stage. Stop requests take
        effect at the end of the epoch (no mid-epoch checkpoints in a pipeline)."""
        if resume is not None:
            raise LLSError(
                "this checkpoint is mid-epoch; finish that epoch without --parallel pipeline first"
            )
        self.busy = self.waiting = 0.0
        start = time.perf_counter()

        def stage_step(x: torch.Tensor, y: torch.Tensor) -> StepResult:
            began = time.perf_counter()
            trainer.batch_size_in_step = len(y)
            done = trainer.step.local_pass(x, y, trainer.step.update, self.blocks)
            trainer.steps_taken += 1  # the weights moved: BatchNorm's statistics are stale
            self.busy += time.perf_counter() - began
            if not self.last:
                self.send(done.output, y)
                return StepResult(done.output, None, done.block_losses)
            return StepResult(done.output, done.loss, done.block_losses)

        mine = train_epoch(
            trainer,
            loaders.train,
            epoch,
            progress=False,
            batches=self.batches(loaders, epoch),
            step_fn=stage_step,
            blocks=self.blocks,
        )
        if not self.last:
            self.send(None, None)
        seconds = time.perf_counter() - start
        sums = {
            "loss": mine.loss_sum,
            "correct": mine.correct,
            "seen": mine.seen,
            "steps": mine.step,
            "blocks": torch.tensor(mine.block_sums, dtype=torch.float64),
        }
        part = (self.blocks, sums, seconds, self.busy / max(self.busy + self.waiting, 1e-9))
        parts: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(parts, part)
        blocks = torch.cat([p[1]["blocks"] for p in parts]).tolist()
        last = parts[-1][1]
        return EpochProgress(
            epoch,
            last["steps"],
            last["loss"],
            last["correct"],
            last["seen"],
            blocks,
            max(p[2] for p in parts),
            [p[3] for p in parts],
        )

    def evaluate(self, trainer: Trainer, loaders: Loaders, epoch: int, blocks: bool):
        """Rank 0 gathers every stage's blocks, runs the paper's evaluation on the whole network
        and sends the evaluated network back (averaged-weight round trip and refreshed BatchNorm
        statistics), so every stage continues from what one process would hold."""
        state = self.gather_state(trainer)
        if self.main:
            trainer.load_state_dict(state)
        outcome = [evaluate(trainer, loaders, epoch, blocks) if self.main else None]
        dist.broadcast_object_list(outcome, 0)
        net_state = [trainer.net.state_dict() if self.main else None]
        dist.broadcast_object_list(net_state, 0)
        trainer.net.load_state_dict(net_state[0])
        return outcome[0]

    def gather_state(self, trainer: Trainer) -> dict[str, Any] | None:
        """The full trainer state on rank 0, assembled from every stage's own blocks."""
        state = trainer.state_dict()
        own = tuple(f"blocks.{i}." for i in self.blocks) + (("head.",) if self.last else ())
        part = {
            "net": {k: v for k, v in state["net"].items() if k.startswith(own)},
            "signals": {i: state["signals"][i] for i in self.blocks},
            "optimizers": {i: state["optimizers"][i] for i in self.blocks},
        }
        if self.last:
            part["optimizers"][len(trainer.net.blocks)] = state["optimizers"][-1]
        parts: list[Any] | None = [None] * self.ctx.world if self.main else None
        dist.gather_object(part, parts, dst=0)
        if not self.main:
            return None
        for p in parts:
            state["net"].update(p["net"])
            for key in ("signals", "optimizers"):
                for i, value in p[key].items():
                    state[key][i] = value
        return state
