"""Step engines: how a :class:`~lls.step.step.Step` is issued on the device.

- ``eager``: the step itself, op by op from Python. The reference; on a CPU the only one.
- ``graph`` (CUDA only): the whole step (every block's forward, signal, backward and optimizer
  step, and the head's) captured once in a CUDA graph and replayed per batch, so that the host
  issues one launch per step instead of hundreds. The LLS family's signals use their closed-form
  backward (fused.py), other rules their own signal.
- ``auto``: ``graph`` on CUDA when the optimizer has a capturable implementation (the registry's
  CAPTURABLE_OPTIMIZERS: "adamw-sf" is lls.sfadamw's there), else ``eager``.

Why: on a GPU an eager LLS step is limited by the host issuing ~430 small kernels (VGG8, batch
128), not by the GPU; see docs/cost.md. Graphs remove the issue cost; block independence, which
BP does not have, then lets blocks overlap.

The schedule of a local rule (``timing == "block"``): block l's forward, signal, backward and
optimizer step are issued on CUDA stream S_l; the head's on S_L. Block l + 1 needs only block l's
*output*, so S_{l+1} waits for an event recorded on S_l right after block l's forward, and block
l's signal, backward and step overlap block l + 1's forward::

    main  fork ─────────────────────────────────────────────────────── join (all S_l) ─ stack
    S_0     └ F_0 ●E_0  signal_0  backward_0  step_0 ───────────────────────┤
    S_1            └─wait E_0─ pool F_1 ●E_1  signal_1  backward_1  step_1 ──┤
    ...                                 └─wait E_1─ ...                       │
    S_L                                        └─wait E_{L-1}─ pool head CE backward step

(``pool`` is the fixed op between blocks, run on the consumer's stream.) No stream ever waits for
another's backward: that is the part BP cannot overlap, because its block l - 1 backward needs
block l's. Cross-stream lifetimes follow the caching allocator's rule: a tensor made on one stream
and read on another is ``record_stream``-ed to the reader (block l's output to S_{l+1}; the
batch and labels to every S_l), so its memory is not handed to a later allocation on its own
stream before the reader is done; during capture, the allocator keeps such blocks out of reuse
until the capture ends (graph-pool discipline). Tensors made on side streams and read on ``main``
are read only after the join, and every step starts with each S_l waiting for ``main`` (the fork),
so memory freed after the join is reused only by work ordered after it.

The graph's life: the first ``warmup`` steps of a batch shape run eagerly through this same code
(the first one on a single stream, then a full device synchronisation, so that lazily made
constants exist before several streams read them); they are real training steps. The next step of
that shape is captured (capture executes nothing) and replayed at once, and every later step of
that shape copies the batch into the graph's static input and replays. Other shapes (the last,
smaller batch of an epoch) get their own graph the same way, up to ``max_graphs``; beyond that they
run eagerly. BatchNorm statistics and optimizer states are updated by the replayed kernels
exactly once per step, as in an eager step. Loading a state dict replaces optimizer state tensors,
so it drops the graphs (``reset``); they are captured again.

Requirements for ``graph``: a CUDA device; optimizers whose step keeps every per-step scalar on
the device (the trainer asks the registry for capturable implementations); no data-parallel
gradient hook. A graph holds the hyper-parameters (learning rate, weight decay, betas) it was
captured with; when an optimizer's are changed (a schedule, a hand-set learning rate), the engine
drops its graphs and captures them again with the new values, so a change takes effect at the next
step as on the eager engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import LLSError
from ..method.fused import block_losses
from .optim import CAPTURABLE_OPTIMIZERS
from .sfadamw import AdamWScheduleFree
from .step import SERIAL, Step, StepResult

ENGINES = ("eager", "graph", "auto")
WARMUP_STEPS = 3  # eager steps of a batch shape before it is captured (lazy init, optimizer state)
MAX_GRAPHS = 2  # captured batch shapes (a full batch and an epoch's last); others run eagerly


def resolve_engine(name: str, device: torch.device | str) -> str:
    """``eager`` or ``graph`` for the engine asked for on ``device`` (``auto``: graph on CUDA);
    refuses ``graph`` off CUDA. Whether the optimizer allows it is :func:`optimizer_engine`'s."""
    if name not in ENGINES:
        raise LLSError(f"unknown engine {name!r}; known engines: {', '.join(ENGINES)}")
    device = torch.device(device)
    if name == "auto":
        return "graph" if device.type == "cuda" else "eager"
    if name == "graph" and device.type != "cuda":
        raise LLSError(
            f"engine 'graph' captures CUDA graphs and needs a CUDA device, not {device.type}; "
            "use --engine eager (or auto)"
        )
    return name


def optimizer_engine(name: str, device: torch.device | str, optimizer: str | Callable) -> str:
    """The engine a trainer runs for ``--engine name`` with ``optimizer`` (a registered name; a
    factory's optimizers are checked once built, :func:`check_capturable`): ``graph`` needs a
    capturable implementation; ``auto`` falls back to ``eager`` where there is none."""
    resolved = resolve_engine(name, device)
    if resolved == "graph" and isinstance(optimizer, str) and optimizer not in CAPTURABLE_OPTIMIZERS.names():
        if name == "auto":
            return "eager"
        known = ", ".join(CAPTURABLE_OPTIMIZERS.names())
        raise LLSError(
            f"engine 'graph' needs a capturable optimizer and {optimizer!r} has none; "
            f"capturable: {known}; or use --engine eager"
        )
    return resolved


def hyperparameters(optimizers: Sequence[torch.optim.Optimizer]) -> list[dict[str, Any]]:
    """Every optimizer's hyper-parameters as the host holds them (the numbers a graph bakes in);
    the per-step values an optimizer keeps as tensors on the device are left out."""
    return [
        {k: v for k, v in group.items() if k != "params" and not isinstance(v, torch.Tensor)}
        for optimizer in optimizers
        for group in optimizer.param_groups
    ]


def is_capturable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an optimizer's step can be captured in a CUDA graph: PyTorch's convention (every
    param group says ``capturable=True``) or lls's schedule-free AdamW (its scalars on the device)."""
    if isinstance(optimizer, AdamWScheduleFree):
        return True
    return bool(optimizer.param_groups) and all(g.get("capturable", False) for g in optimizer.param_groups)


def check_capturable(optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Refuses, with one line, optimizers a graph cannot replay."""
    for optimizer in optimizers:
        if not is_capturable(optimizer):
            raise LLSError(
                f"engine 'graph' needs capturable optimizers (every per-step scalar on the device); "
                f"{type(optimizer).__name__} is not; choose a capturable optimizer or --engine eager"
            )


# --- the stream schedule ---------------------------------------------------------------------------


class StreamBackend(Protocol):
    """What a :class:`StreamSchedule` needs from a device: streams, events and lifetimes. CUDA
    has one (:class:`CudaStreams`); the tests give a recording stand-in that runs on a CPU."""

    def stream(self) -> Any: ...
    def event(self) -> Any: ...
    def current_stream(self) -> Any: ...
    def record(self, event: Any, stream: Any) -> None: ...
    def wait(self, stream: Any, event: Any) -> None: ...
    def use(self, stream: Any) -> Any: ...  # context manager making ``stream`` current
    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None: ...


class CudaStreams:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def current_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def record(self, event: torch.cuda.Event, stream: torch.cuda.Stream) -> None:
        event.record(stream)

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event) -> None:
        stream.wait_event(event)

    def use(self, stream: torch.cuda.Stream):
        return torch.cuda.stream(stream)

    def keep_alive(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)


class StreamSchedule:
    """Block ``l``'s work on stream ``l``; block ``l + 1`` waits only for block ``l``'s output.

    Streams and events are made once and reused every step. ``begin`` forks from the calling
    stream (and keeps ``inputs`` alive for every stream that reads them); ``join`` makes the
    calling stream wait for all of them.
    """

    def __init__(self, count: int, backend: StreamBackend) -> None:
        self.backend = backend
        self.streams = [backend.stream() for _ in range(count)]
        self.outputs = [backend.event() for _ in range(count)]  # block l's output is ready
        self.ends = [backend.event() for _ in range(count)]  # everything issued on S_l is done
        self.fork = backend.event()
        self.main: Any = None
        self.issued: set[int] = set()

    def begin(self, inputs: Sequence[torch.Tensor] = ()) -> None:
        backend = self.backend
        self.main = backend.current_stream()
        self.issued = set()
        backend.record(self.fork, self.main)
        for stream in self.streams:
            backend.wait(stream, self.fork)
            for tensor in inputs:
                backend.keep_alive(tensor, stream)

    @contextmanager
    def issue(self, index: int) -> Iterator[None]:
        if self.main is None:
            raise RuntimeError("StreamSchedule.begin() was not called")
        stream = self.streams[index]
        if index - 1 in self.issued:  # the previous block's output is this block's input
            self.backend.wait(stream, self.outputs[index - 1])
        self.issued.add(index)
        with self.backend.use(stream):
            yield

    def ready(self, index: int, output: torch.Tensor) -> None:
        self.backend.record(self.outputs[index], self.streams[index])
        if index + 1 < len(self.streams):
            self.backend.keep_alive(output, self.streams[index + 1])

    def join(self) -> None:
        for index in sorted(self.issued):
            self.backend.record(self.ends[index], self.streams[index])
            self.backend.wait(self.main, self.ends[index])
        self.main = None


# --- the graph engine ------------------------------------------------------------------------------


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # static inputs: each step's batch is copied in
    y: torch.Tensor
    result: StepResult  # static outputs, overwritten by every replay


class GraphEngine:
    """Captures a whole training step in CUDA graphs and replays them (module docstring).

    ``streams``: issue each block on its own stream (local rules with ``timing == "block"``);
    ``fused``: the closed-form LLS-family signal. ``strict``: raise instead of stepping eagerly
    when a step cannot be captured (a data-parallel gradient hook is set).
    """

    def __init__(
        self,
        step: Step,
        input_shape: Sequence[int],
        *,
        warmup: int = WARMUP_STEPS,
        max_graphs: int = MAX_GRAPHS,
        streams: bool = True,
        fused: bool = True,
        strict: bool = True,
    ) -> None:
        param = next(step.net.parameters())
        resolve_engine("graph", param.device)
        if warmup < 1:
            raise ValueError("a graph needs at least one eager warm-up step of its shape")
        self.stepper, self.warmup, self.max_graphs, self.strict = step, warmup, max_graphs, strict
        self.device = param.device
        self.backend = CudaStreams(self.device)
        self.stream = torch.cuda.Stream(self.device)  # where eager steps and captures run
        local = step.rule.timing == "block"
        count = len(step.net.blocks) + 1  # one per block and one for the head
        self.schedule = StreamSchedule(count, self.backend) if streams and local else None
        self.losses = None
        if fused and step.signals:
            shapes = step.net.block_output_shapes(input_shape)
            self.losses = block_losses(step.signals, shapes, device=self.device, dtype=param.dtype)
        torch.cuda.synchronize(self.device)  # constants made above exist before any stream reads them
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: dict[tuple, int] = {}
        self.replays = 0
        self.captured_with: list[dict[str, Any]] = []  # the hyper-parameters of the graphs held

    # --- stepping ------------------------------------------------------------------------------

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        if self.stepper.sync_gradients is not None:
            if self.strict:
                raise LLSError("engine 'graph' does not run with data parallelism yet; use --engine eager")
            return self.stepper.eager(x, y)
        if self.graphs and hyperparameters(self.stepper.optimizers) != self.captured_with:
            self.reset()  # a graph replays the values it was captured with: capture anew
        key = (tuple(x.shape), x.stride(), x.dtype, tuple(y.shape), y.dtype)
        captured = self.graphs.get(key)
        if captured is not None:
            return self._replay(captured, x, y)
        seen = self.seen.get(key, 0)
        self.seen[key] = seen + 1
        if seen >= self.warmup and len(self.graphs) < self.max_graphs:
            return self._replay(self._capture(key, x, y), x, y)
        return self._eager(x, y, first=seen == 0)

    def reset(self) -> None:
        """Drop every graph (after optimizer states were replaced); later steps capture anew."""
        torch.cuda.synchronize(self.device)
        self.graphs.clear()
        self.seen.clear()

    # --- internals -----------------------------------------------------------------------------

    def _body(self, x: torch.Tensor, y: torch.Tensor, schedule) -> StepResult:
        return self.stepper.eager(x, y, signals=self.losses, schedule=schedule)

    def _eager(self, x: torch.Tensor, y: torch.Tensor, *, first: bool) -> StepResult:
        """One step issued op by op through the engine's own code (its streams, its signal)."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)
        x.record_stream(self.stream)
        y.record_stream(self.stream)
        schedule = None if first else self.schedule  # first of a shape: lazy constants, one stream
        with torch.cuda.stream(self.stream):
            if schedule is not None:
                schedule.begin((x, y))
            result = self._body(x, y, schedule or SERIAL)
        caller.wait_stream(self.stream)
        for tensor in (result.logits, result.loss, result.block_losses):
            if tensor.numel():  # (BP's empty block losses own no memory)
                tensor.record_stream(caller)
        if first:
            torch.cuda.synchronize(self.device)
        return result

    def _capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor) -> _Captured:
        static_x, static_y = torch.empty_like(x), torch.empty_like(y)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            if self.schedule is not None:
                self.schedule.begin()  # static inputs live as long as the graph: nothing to keep alive
            result = self._body(static_x, static_y, self.schedule or SERIAL)
        captured = _Captured(graph, static_x, static_y, result)
        self.graphs[key] = captured
        self.captured_with = hyperparameters(self.stepper.optimizers)
        return captured

    def _replay(self, captured: _Captured, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        captured.x.copy_(x)
        captured.y.copy_(y)
        captured.graph.replay()
        self.replays += 1
        out = captured.result
        # copies, so that a caller holding a step's result is not overwritten by the next replay
        return StepResult(out.logits.clone(), out.loss.clone(), out.block_losses.clone())
