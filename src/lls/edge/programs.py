"""The training program of a trainer's current state: one ExecuTorch method per block, one for the head.

:func:`training_program` is the builder (``lls export --format executorch --training``, and what
``lls cost --runtime executorch`` reads memory plans from). For a local rule the program holds:

``block{i}``  inputs ``x`` (the block's input, N x ...), ``y`` (labels, int64, N), for rules that
              wait for the head (DFA) ``logits`` (N x K, the head's output), then the running mean
              and variance of each of the block's BatchNorm layers; outputs ``loss`` (its local
              loss, a scalar), ``h`` (the next block's input: the fixed ops after the block applied
              to its output, detached), then the updated running statistics in the same order,
              then (ExecuTorch's joint export) the gradients of the block's own parameters and the
              parameters themselves. The rule's fixed tensors (basis, feedback matrix) are
              constants of the method; its learned ones (LLS-M's m, LLS-MxM's M, a local
              classifier's matrix) are parameters of the method.
``head``      inputs ``h`` (the last block's ``h``), ``y``; outputs ``loss`` (cross-entropy) and
              ``logits`` (computed before the update), then gradients and parameters.
``network``   BP only, instead of all of the above: inputs ``x``, ``y``, every BatchNorm's running
              statistics; outputs ``loss``, ``logits``, the updated statistics.

A block exported in slices of the batch (``slices``; ``max_memory`` chooses them) is ``block{i}``
with other inputs and outputs and beside it ``block{i}_stats{k}`` and ``block{i}_sums{k}``
(:mod:`lls.edge.sliced`); its layout's ``sliced`` says how to call them.

Constant methods: ``lls_metadata`` (one JSON string: what the program is and the layout of every
method, :class:`ProgramLayout`), ``{method}_statistics`` (the initial running statistics that
method takes, a list of tensors), ``batch_size``, ``num_classes``, ``learning_rate``, ``momentum``,
``weight_decay`` and ``rule``. Shapes are fixed: every batch has ``batch_size`` samples.

The loop (``runtime.py``; the same in C++): for each batch, ``h = x``; for each block, call
``block{i}`` with ``(h, y, stats_i)``, step its SGD optimizer with the gradients, keep the new
statistics and take the next ``h``; then call ``head`` and step it. DFA first runs every block
for its ``h`` only (no step, statistics dropped), then the head, then each block again with the
head's logits, stepping it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLSError
from ..method.net import evaluating
from ..method.signals import ProjectionSignal
from . import require_executorch
from .layers import BatchStatsNorm, FixedPool, exportable, norms
from .sliced import (
    STATS,
    SUMS,
    SlicedLayout,
    StatsPass,
    SumsPass,
    WeightsPass,
    check_slices,
    held_bytes,
    norm_order,
    slice_norms,
)

PROGRAM_FORMAT = "lls-training-program"
PROGRAM_VERSION = 1
METADATA_METHOD = "lls_metadata"
RUNTIME_OPTIMIZER = "sgd"  # the one optimizer ExecuTorch's training runtime has
SGD_MOMENTUM = 0.9  # lls's "sgd" (lls.step.optim): momentum 0.9, no dampening, not Nesterov


@dataclass
class MethodLayout:
    """What one method takes and gives (also in the program's metadata)."""

    name: str
    kind: str  # "block", "head" or "network"
    index: int  # the block's index; the head's is the number of blocks; the network's 0
    inputs: list[str]  # "x" / "h", "y", ("logits"), then the names of the running statistics
    outputs: list[str]  # "loss", "h" / "logits", then the updated statistics (the same names)
    statistics: list[str]  # the running statistics, in the order of inputs and outputs
    parameters: dict[str, str] = field(default_factory=dict)  # the program's name -> the run's name
    sliced: dict[str, Any] | None = None  # a block run in slices of its batch (sliced.SlicedLayout)


@dataclass
class ProgramLayout:
    """Every method of a training program, in the order a step calls them, and what it is."""

    methods: list[MethodLayout]
    timing: str  # the rule's: "block", "head" or "end-to-end"
    batch_size: int
    input_shape: list[int]
    num_classes: int
    optimizer: dict[str, Any]  # the runtime's SGD: lr, momentum, dampening, weight_decay, nesterov
    info: dict[str, Any]  # what the program was made from (rule, model, dataset, normalisation, ...)

    def method(self, name: str) -> MethodLayout:
        return next(m for m in self.methods if m.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {"format": PROGRAM_FORMAT, "version": PROGRAM_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ProgramLayout:
        if record.get("format") != PROGRAM_FORMAT:
            raise LLSError("the program holds no lls training layout: export it with `lls export --training`")
        if record.get("version") != PROGRAM_VERSION:
            raise LLSError(
                f"the program is an lls training program of version {record.get('version')}, "
                f"this lls reads version {PROGRAM_VERSION}; export it again with this lls"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in record.items() if k in fields}
        values["methods"] = [MethodLayout(**m) for m in values["methods"]]
        return cls(**values)


@dataclass
class BuiltProgram:
    """:func:`build_program`'s result: the ExecuTorch program and its layout."""

    manager: Any  # executorch.exir.ExecutorchProgramManager
    layout: ProgramLayout
    statistics_bytes: int = 0  # the running statistics the app keeps (float32)

    @property
    def buffer(self) -> bytes:
        return self.manager.buffer


# --- the steps as modules -------------------------------------------------------------------------


class _WithStatistics(nn.Module):
    """A module whose BatchNorm layers take their running statistics as inputs and give the
    updated ones as outputs (:class:`~lls.edge.layers.BatchStatsNorm`)."""

    def _set_norms(self, module: nn.Module) -> None:
        self._norms: list[BatchStatsNorm] = [m for _, m in norms(module)]

    def _take(self, stats: tuple[torch.Tensor, ...]) -> None:
        if len(stats) != 2 * len(self._norms):
            raise ValueError(f"expected {2 * len(self._norms)} running statistics, got {len(stats)}")
        for i, norm in enumerate(self._norms):
            norm.running, norm.updated = (stats[2 * i], stats[2 * i + 1]), None

    def _give(self) -> list[torch.Tensor]:
        out = []
        for norm in self._norms:
            out += list(norm.updated)
            norm.running = norm.updated = None
        return out


class BlockStep(_WithStatistics):
    """Block ``i``'s training step: ``(x, y, [logits], *stats) -> (loss, h, *new stats)``."""

    def __init__(
        self, block: nn.Module, between: nn.Module, signal: nn.Module, pool: nn.Module | None, logits: bool
    ) -> None:
        super().__init__()
        self.block, self.between, self.signal, self.pool = block, between, signal, pool
        self.takes_logits = logits
        self._set_norms(block)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *rest: torch.Tensor):
        logits, stats = (rest[0], rest[1:]) if self.takes_logits else (None, rest)
        self._take(stats)
        a = self.block(x)
        z = self.pool(a) if self.pool is not None else self.signal.latent(a)
        loss = self.signal.latent_loss(z, y, logits)  # the signal's own definition of the loss
        h = self.between(a.detach())
        return (loss, h, *self._give())


class HeadStep(nn.Module):
    """The head's step: ``(h, y) -> (loss, logits)``, the cross-entropy of lls's step."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, h: torch.Tensor, y: torch.Tensor):
        logits = self.head(h)
        return F.cross_entropy(logits, y), logits.detach()


class NetworkStep(_WithStatistics):
    """BP's step: ``(x, y, *stats) -> (loss, logits, *new stats)``, one backward through it all."""

    def __init__(self, blocks: list[nn.Module], between: list[nn.Module], head: nn.Module) -> None:
        super().__init__()
        self.blocks, self.between, self.head = nn.ModuleList(blocks), nn.ModuleList(between), head
        self._set_norms(self.blocks)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *stats: torch.Tensor):
        self._take(stats)
        h = x
        for block, between in zip(self.blocks, self.between, strict=True):
            h = between(block(h))
        logits = self.head(h)
        return (F.cross_entropy(logits, y), logits.detach(), *self._give())


# --- the builder ----------------------------------------------------------------------------------


def _statistics(
    prefix: str, module: nn.Module, original: nn.Module, order: list[str] | None = None
) -> tuple[list[str], list[torch.Tensor]]:
    """The run's names of the running statistics of ``module``'s BatchNorm layers and their values,
    read from ``original`` (the trainer's module, whose names ``module`` keeps); in module order, or
    in ``order`` (the layers' names)."""
    names, values = [], []
    buffers = dict(original.named_buffers())
    for name in order if order is not None else [name for name, _ in norms(module)]:
        for stat in ("running_mean", "running_var"):
            names.append(f"{prefix}{name}.{stat}")
            values.append(buffers[f"{name}.{stat}"].detach().float().contiguous().clone())
    return names, values


def _parameters(step: nn.Module, names: dict[str, str]) -> dict[str, str]:
    """The program's parameter names (the step module's) -> the run's, by the step's prefixes."""
    out = {}
    for name, _ in step.named_parameters():
        prefix, _, rest = name.partition(".")
        out[name] = names[prefix] + rest
    return out


@dataclass
class BlockParts:
    """Block ``index`` of a trainer: what its methods are made of."""

    index: int
    block: nn.Module  # the trainer's own modules (names and running statistics are read from them)
    between: nn.Module
    signal: nn.Module
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def what(self) -> str:
        return f"block {self.index} ({type(self.block).__name__})"

    @property
    def names(self) -> dict[str, str]:
        """A block method's parameter prefixes -> the run's."""
        i = self.index
        return {"block": f"net.blocks.{i}.", "between": f"net.between.{i}.", "signal": f"signals.{i}."}

    @property
    def after_shape(self) -> tuple[int, ...]:
        """The next block's input shape (the fixed ops between applied)."""
        return _after_shape(self.between, self.out_shape)

    def held(self, batch_size: int) -> int:
        """What the app holds while the block runs in slices (:func:`lls.edge.sliced.held_bytes`)."""
        modules = (self.block, self.between, self.signal)
        parameters = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
        return held_bytes(batch_size, self.in_shape, self.after_shape, parameters)

    def copies(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module | None]:
        """Exportable copies of the block, the ops between and the signal, and the latent pool that
        stands for a projection signal's (:class:`~lls.edge.layers.FixedPool`)."""
        signal, pool = exportable(self.signal), None
        if isinstance(self.signal, ProjectionSignal):
            pool = FixedPool(self.signal.pooling)
            signal.pooling = None  # the program pools with ``pool``
        return exportable(self.block, self.in_shape), exportable(self.between, self.out_shape), signal, pool


def block_parts(trainer) -> list[BlockParts]:
    """Every block of ``trainer`` (a local rule's), in order."""
    net = trainer.net
    shapes = net.block_shapes(tuple(trainer.input_shape))
    return [
        BlockParts(i, block, between, signal, tuple(shapes[i][0]), tuple(shapes[i][1]))
        for i, (block, between, signal) in enumerate(
            zip(net.blocks, net.between, trainer.signals, strict=True)
        )
    ]


@dataclass
class _Method:
    """One method of the program being built."""

    name: str
    module: nn.Module
    example: tuple  # example inputs, for the export
    what: str  # what it is, for a refusal ("block 2 (Sequential)")
    layout: MethodLayout | None = None  # a step's method; None: one of a sliced block's passes
    statistics: list[torch.Tensor] = field(default_factory=list)  # the running statistics it starts from
    training: bool = True  # False: forward only (a sliced block's statistics passes)


def _network_method(trainer, x: torch.Tensor, y: torch.Tensor) -> _Method:
    """BP's one method (:class:`NetworkStep`)."""
    net = trainer.net
    shapes = net.block_shapes(tuple(trainer.input_shape))
    blocks = [exportable(b, tuple(s)) for b, (s, _) in zip(net.blocks, shapes, strict=True)]
    between = [exportable(o, tuple(s)) for o, (_, s) in zip(net.between, shapes, strict=True)]
    step = NetworkStep(blocks, between, exportable(net.head))
    names, values = _statistics("blocks.", step.blocks, net.blocks)
    names = [f"net.{n}" for n in names]
    layout = MethodLayout("network", "network", 0, ["x", "y", *names], ["loss", "logits", *names], names)
    layout.parameters = _parameters(
        step, {"blocks": "net.blocks.", "between": "net.between.", "head": "net.head."}
    )
    return _Method("network", step, (x, y, *values), "the network", layout, values)


def _block_method(parts: BlockParts, batch_size: int, takes_logits: bool, classes: int) -> _Method:
    """A block's method (:class:`BlockStep`)."""
    block, between, signal, pool = parts.copies()
    step = BlockStep(block, between, signal, pool, takes_logits)
    names, values = _statistics(f"net.blocks.{parts.index}.", step.block, parts.block)
    extra = ["logits"] if takes_logits else []
    name = f"block{parts.index}"
    layout = MethodLayout(
        name, "block", parts.index, ["x", "y", *extra, *names], ["loss", "h", *names], names
    )
    layout.parameters = _parameters(step, parts.names)
    x, y = torch.zeros(batch_size, *parts.in_shape), torch.zeros(batch_size, dtype=torch.long)
    logits = [torch.zeros(batch_size, classes)] if takes_logits else []
    return _Method(name, step, (x, y, *logits, *values), parts.what, layout, values)


def _head_method(trainer, batch_size: int) -> _Method:
    net = trainer.net
    h = torch.zeros(batch_size, *block_parts(trainer)[-1].after_shape)
    head = HeadStep(exportable(net.head))
    layout = MethodLayout("head", "head", len(net.blocks), ["h", "y"], ["loss", "logits"], [])
    layout.parameters = _parameters(head, {"head": "net.head."})
    return _Method("head", head, (h, torch.zeros(batch_size, dtype=torch.long)), "the head", layout)


def build_program(
    trainer,
    batch_size: int,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = SGD_MOMENTUM,
    info: dict[str, Any] | None = None,
    max_memory: int | None = None,
    slices: dict[int, int] | None = None,
) -> BuiltProgram:
    """The training program of ``trainer``'s current state (weights, BatchNorm statistics, the
    rule's tensors) for batches of ``batch_size``, with the runtime's SGD settings and ``info``
    (what the program was made from) in its metadata. ``slices`` (block index -> S) runs those
    blocks in S slices of the batch (:mod:`lls.edge.sliced`: the same step, a slice's activations
    in the arena). Refuses, in one line naming the block and the fix, a layer that cannot be
    exported, an operator the runtime lacks, or (``max_memory``, bytes) a program that does not
    fit (after slicing the blocks that do not, where the rule allows it)."""
    require_executorch()
    from executorch.exir import to_edge

    trainer._built()
    if batch_size < 1:
        raise LLSError(f"a training program needs batches of 1 or more, got {batch_size}")
    net, rule = trainer.net, trainer.rule
    input_shape, classes = tuple(trainer.input_shape), trainer.num_classes
    _check_statistics(net, batch_size, input_shape)
    ref = next(net.parameters())
    if ref.dtype != torch.float32:
        raise LLSError(f"training programs are float32; the trainer's network is {ref.dtype}")
    unknown = sorted(set(slices or {}) - set(range(len(net.blocks))))
    if unknown:
        raise LLSError(
            f"slices name block {unknown[0]!r}, which the network does not have (blocks 0 to "
            f"{len(net.blocks) - 1}); name one of those"
        )
    slices = {i: s for i, s in (slices or {}).items() if s > 1}
    if slices and rule.timing != "block":
        raise LLSError(
            f"only a rule whose blocks learn before the head can run a block in slices, not "
            f"{rule.name}; export without slices"
        )
    if rule.timing == "end-to-end":
        x = torch.zeros(batch_size, *input_shape)
        methods = [_network_method(trainer, x, torch.zeros(batch_size, dtype=torch.long))]
    else:
        methods = []
        for parts in block_parts(trainer):
            if parts.index in slices:
                methods += sliced_block(parts, batch_size, slices[parts.index])
            else:
                methods.append(_block_method(parts, batch_size, rule.timing == "head", classes))
        methods.append(_head_method(trainer, batch_size))
    programs = {m.name: _export(m.module, m.example, m.what, m.training) for m in methods}
    optimizer = {
        "name": RUNTIME_OPTIMIZER,
        "lr": lr,
        "momentum": momentum,
        "dampening": 0.0,
        "weight_decay": weight_decay,
        "nesterov": False,
    }
    program_layout = ProgramLayout(
        [m.layout for m in methods if m.layout is not None],
        rule.timing,
        batch_size,
        list(input_shape),
        classes,
        optimizer,
        {"rule": rule.config(), **(info or {})},
    )
    constants: dict[str, Any] = {
        METADATA_METHOD: json.dumps(program_layout.as_dict()),
        "batch_size": batch_size,
        "num_classes": classes,
        "learning_rate": float(lr),
        "momentum": float(momentum),
        "weight_decay": float(weight_decay),
        "rule": rule.name,
    }
    for m in methods:
        if m.statistics:
            constants[f"{m.name}_statistics"] = m.statistics
    whats = {m.name: m.what for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            manager = to_edge(programs, constant_methods=constants).to_executorch()
        except Exception as error:  # any lowering failure is the model's, said in one line
            raise _lowering_error(programs, whats, error) from None
    held = sum(v.numel() * v.element_size() for m in methods for v in m.statistics)
    built = BuiltProgram(manager, program_layout, held)
    check_operators(built, whats)
    if max_memory is not None:
        if not slices and rule.timing == "block":
            options = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "info": info}
            built = fit_slices(trainer, built, max_memory, **options) or built
        check_memory(built, max_memory)
    return built


FIT_ROUNDS = 3  # rebuilds fit_slices tries: a slice's arena is estimated, then read from the plan


def fit_slices(trainer, built: BuiltProgram, max_memory: int, **options: Any) -> BuiltProgram | None:
    """``built`` rebuilt with the blocks whose method does not fit ``max_memory`` run in slices of
    the batch (the fewest slices, dividing the batch, that fit them), or None where slicing cannot
    help (a rule whose blocks wait for the head, or none of the blocks is what does not fit). The
    number of slices is estimated from the block's arena, then checked in the new memory plan."""
    from .memory import footprint_of

    if built.layout.timing != "block":
        return None
    batch, slices = built.layout.batch_size, {}
    divisors = [s for s in range(2, batch + 1) if batch % s == 0]
    parts = block_parts(trainer)
    for _ in range(FIT_ROUNDS):
        layout = built.layout
        footprint = footprint_of(built.manager, "", batch, layout.optimizer["momentum"], layout)
        budget = max_memory - footprint.weights - footprint.optimizer - built.statistics_bytes
        if budget <= 0:  # the weights and their momentum alone do not fit: no slice helps
            return None
        needs = {  # block index -> the largest need of its methods (a sliced block's passes too)
            method.index: max(
                m.need
                for m in footprint.methods
                if m.name == method.name or m.name.startswith(method.name + "_")
            )
            for method in layout.methods
            if method.kind == "block"
        }
        changed = False
        for i, need in needs.items():
            now = slices.get(i, 1)
            larger = [s for s in divisors if s > now]
            if need <= budget or not larger:
                continue
            held = parts[i].held(batch)
            work = (need - (held if now > 1 else 0)) * now  # the whole batch's, as the unsliced method's
            slices[i] = next((s for s in larger if work / s + held <= budget), larger[0])
            changed = True
        if not changed:
            return built if slices else None
        built = build_program(trainer, batch, slices=slices, **options)
    return built


def sliced_block(parts: BlockParts, batch_size: int, slices: int) -> list[_Method]:
    """A block's methods run in ``slices`` slices of the batch (:mod:`lls.edge.sliced`): the
    block's own (with its layout and initial running statistics), then its statistics and sums passes."""
    i, in_shape, what = parts.index, parts.in_shape, parts.what
    check_slices(slices, batch_size, what)
    n = batch_size // slices
    block, between, signal, pool = parts.copies()
    order = norm_order(block, in_shape)
    share = n / batch_size if parts.signal.batch_reduction == "mean" else 1.0
    weights = WeightsPass(slice_norms(block), between, signal, pool, share, [o for o, _ in order])
    name = f"block{i}"
    running, values = _statistics(f"net.blocks.{i}.", block, parts.block, [o for o, _ in order])
    batch_names = [f"{norm}.batch_{s}" for norm, _ in order for s in ("mean", "var")]
    means_names = [f"{norm}.mean_{s}" for norm, _ in order for s in ("dy", "dy_xhat")]
    x, y = torch.zeros(n, *in_shape), torch.zeros(n, dtype=torch.long)
    batch = [
        t for norm in weights.norms for t in (torch.zeros(norm.num_features), torch.ones(norm.num_features))
    ]
    means = [torch.zeros_like(t) for t in batch]
    parameters = dict(weights.named_parameters())
    block_parameters = [p for p in parameters if p.startswith("block.")]
    sizes = {p: t.numel() * t.element_size() for p, t in parameters.items()}
    layout = MethodLayout(
        name, "block", i, ["x", "y", *batch_names, *means_names], ["objective", "loss", "h"], running
    )
    layout.parameters = _parameters(weights, parts.names)
    layout.sliced = dataclasses.asdict(
        SlicedLayout(
            slices,
            list(parameters),
            block_parameters,
            [
                {
                    "name": norm,
                    "channels": weights.norms[k].num_features,
                    "count": batch_size * values_,
                    "momentum": weights.norms[k].momentum,
                }
                for k, (norm, values_) in enumerate(order)
            ],
            parts.held(batch_size),
            sum(sizes[p] for p in block_parameters),
            sum(sizes.values()),
        )
    )
    methods = [_Method(name, weights, (x, y, *batch, *means), what, layout, values)]
    detached = [t.detach().clone() for t in parameters.values()]
    block_values = [parameters[p].detach().clone() for p in block_parameters]
    for k in range(len(order)):
        stats = StatsPass(copy.deepcopy(weights), k)
        example = (x, *block_values, *batch[: 2 * k])
        methods.append(_Method(f"{name}{STATS}{k}", stats, example, what, training=False))
    for k in reversed(range(len(order))):
        sums = SumsPass(copy.deepcopy(weights), k)
        methods.append(
            _Method(f"{name}{SUMS}{k}", sums, (x, y, *detached, *batch, *means[2 * (k + 1) :]), what)
        )
    return methods


def _check_statistics(net: nn.Module, batch_size: int, input_shape: tuple[int, ...]) -> None:
    """Refuse a batch that leaves a BatchNorm one value per channel (a dense block's at batch 1):
    its batch statistics would be that value and its unbiased variance 0/0. A convolution's
    BatchNorm at batch 1 still has H x W values per channel (MLPerf Tiny's batch-1 models)."""
    alone: list[str] = []
    names = {m: n for n, m in net.named_modules()}

    def hook(module, args, out):
        if args[0].numel() // args[0].shape[1] < 2:
            alone.append(names[module])

    norms_ = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [m.register_forward_hook(hook) for m in norms_]
    try:
        with evaluating(net):
            net(torch.zeros(batch_size, *input_shape, device=next(net.parameters()).device))
    finally:
        for handle in handles:
            handle.remove()
    if alone:
        raise LLSError(
            f"at batch {batch_size} BatchNorm {alone[0]} sees one value per channel (no batch "
            "statistics): export with --batch-size 2 or more"
        )


def training_program(trainer, batch_size: int, **options: Any):
    """The ``executorch.exir.ExecutorchProgramManager`` of :func:`build_program` (same options)."""
    return build_program(trainer, batch_size, **options).manager


def _after_shape(between: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.no_grad():
        return tuple(between.eval()(torch.zeros(2, *shape)).shape[1:])


def _lowering_error(programs: dict, what: dict[str, str], error: Exception) -> LLSError:
    """The one-line refusal of a program ExecuTorch could not lower, naming the first method that
    fails on its own (each is lowered apart to find it: the failure path only) and the reason,
    which names the operator (e.g. one outside the core ATen set)."""
    from executorch.exir import to_edge

    culprit = "the program"
    for name, program in programs.items():
        try:
            to_edge({name: program}).to_executorch()
        except Exception as single:  # this method is one that cannot be lowered
            culprit, error = what.get(name, name), single
            break
    return LLSError(
        f"{culprit} cannot be lowered to ExecuTorch ({_first_line(error)}); train this model with "
        "`lls train`, or write the layer with core operators (see lls/edge/layers.py)"
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def _export(step: nn.Module, example: tuple, what: str, training: bool = True):
    """``step`` exported as a training method (its first output's gradients for its parameters
    added) or, ``training=False``, as a forward-only one."""
    from torch.export.experimental import _export_forward_backward

    step.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(step, example, strict=False)
            return _export_forward_backward(program) if training else program
        except Exception as error:
            raise LLSError(
                f"{what} cannot be exported as a training method ({_first_line(error)}); train this "
                "model with `lls train`, or use one made of conv, linear and BatchNorm blocks"
            ) from None


# --- checks ---------------------------------------------------------------------------------------


def runtime_operators() -> set[str]:
    """The operators ExecuTorch's runtime in this environment has kernels for (``name.overload``)."""
    from executorch.extension.pybindings.portable_lib import _get_operator_names

    return set(_get_operator_names())


def program_operators(manager) -> dict[str, set[str]]:
    """Each method's operators (``name.overload``), from the program itself."""
    out = {}
    for plan in manager.executorch_program.execution_plan:
        out[plan.name] = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
    return out


def check_operators(built: BuiltProgram, what: dict[str, str], known: set[str] | None = None) -> None:
    """Refuse a program that calls an operator the runtime has no kernel for, naming the first."""
    known = runtime_operators() if known is None else known
    for method, ops in program_operators(built.manager).items():
        missing = sorted(op for op in ops if op not in known and not op.startswith("executorch_prim::"))
        if missing:
            raise LLSError(
                f"{what.get(method, method)} needs the operator {missing[0]}, which this ExecuTorch "
                "runtime has no kernel for; train this model with `lls train`, or build the runtime "
                "with a kernel library that has it"
            )


def check_memory(built: BuiltProgram, max_memory: int) -> None:
    """Refuse a program whose training holds more than ``max_memory`` bytes: its weights, the
    optimizer's state, the running statistics and the largest need of a method (one method runs at
    a time; :attr:`lls.edge.memory.MethodMemory.need`)."""
    from ..step.lowmem import size_text
    from .memory import footprint_of

    footprint = footprint_of(
        built.manager, "", built.layout.batch_size, built.layout.optimizer["momentum"], built.layout
    )
    largest = max(footprint.methods, key=lambda m: m.need)
    total = footprint.footprint + built.statistics_bytes
    if total > max_memory:
        sliced = " (it runs in slices already)" if largest.held else ""
        raise LLSError(
            f"training needs {size_text(total)} ({size_text(footprint.weights)} weights, "
            f"{size_text(footprint.optimizer)} SGD momentum, {size_text(largest.need)} for method "
            f"{largest.name}{sliced}), over --max-memory {size_text(max_memory)}; export with a "
            "smaller --batch-size, or use a smaller model"
        )
