"""Any PyTorch model as a :class:`~lls.method.net.LocalNet`: ``localize`` finds its blocks.

- An ``nn.Sequential`` is cut into *units*, each starting at a layer with weights (a Conv, a
  Linear; a normalisation layer stays with the layer before it), and the units are grouped into
  blocks: one per unit by default, ``blocks=N`` for N blocks of balanced forward multiply-adds
  (counted by PyTorch's FLOP counter on a probe batch), or ``blocks=[i, j, ...]`` to start blocks at
  those layer indices. The last layer with weights must be a Linear: it is the head. Parameter-free
  pooling, flatten and dropout layers that end a block become the fixed ops after it.
- Any other model is split by the names of its submodules (``blocks=["layer1", "layer2",
  "layer3", "layer4"]`` for a torchvision ResNet, or patterns, ``["layer*.*"]`` for one block per
  residual block): its forward is traced with ``torch.fx``, what runs before the first named block
  (the stem) joins it, what runs between two blocks becomes the fixed op between them, and what runs
  after the last (average pool, flatten, fc) is the head.

What cannot be trained block by block is refused with the reason: a tensor that skips from one
block to a later one, parameters between blocks, a head that is not last, a model whose forward the
blocks do not reproduce on a probe batch. The LocalNet shares its parameters with ``model``:
training it trains the model.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import re
from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.flop_counter import FlopCounterMode

from ..checks import checked
from ..errors import LLSError
from . import replay
from .net import LocalNet, evaluating
from .replay import Picker, logits_of

MAX_LATENT = 2048  # the largest LLS latent d_l of the paper's presets (VGG8's first block, VGG11's fc)
PROBE_BATCH = 2  # samples of the probe batch (BatchNorm1d in train mode needs 2)
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-5  # the chained blocks must give the model's output to float rounding
NORMS = (_NormBase, nn.LayerNorm, nn.GroupNorm)
BETWEEN = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
)  # fmt: skip


def choose_pool(shape: Sequence[int], max_latent: int = MAX_LATENT) -> int | None:
    """The latent pool of a block output of ``shape`` (without batch) so that its LLS latent has at
    most ``max_latent`` entries where it can: ``None`` (the output as it is) when it fits; for a
    (C, H, W) output the largest power-of-two side p <= min(H, W) with C * p^2 <= max_latent (1
    when even C > max_latent); for a flat output, ``max_latent`` (adaptive average pooling, as the
    paper's VGG11 pools 4096 units to 2048); a (tokens, dim) output's latent is its token mean."""
    if len(shape) == 2 or math.prod(shape) <= max_latent:
        return None
    if len(shape) == 1:
        return max_latent
    if len(shape) != 3:
        raise LLSError(
            f"a block output of shape {tuple(shape)} has no LLS latent: blocks must output "
            "(features), (tokens, dim) or (channels, height, width)"
        )
    c, h, w = shape
    p = 1
    while 2 * p <= min(h, w) and c * (2 * p) ** 2 <= max_latent:
        p *= 2
    return p


@checked
def localize(
    model: nn.Module,
    blocks: int | Sequence[int] | Sequence[str] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
    example: torch.Tensor | None = None,
    output: Picker | None = None,
    max_latent: int = MAX_LATENT,
) -> LocalNet:
    """``model`` as blocks LLS trains one at a time, for inputs of ``input_shape`` (one sample).

    ``blocks``: for an ``nn.Sequential``, None (one block per layer with weights), a number of
    blocks balanced by multiply-adds, or the layer indices where blocks start; for any model, the
    names (or ``fnmatch`` patterns, matched part by part between dots) of the submodules that are
    the blocks, in the order the forward runs them. A forward ``torch.fx`` cannot follow (Python
    checks, loops, a ``ModelOutput``) is followed at run time instead (replay.py); a model
    returning a ``ModelOutput`` or a dict is read by its ``logits``. ``example``: a batch of real
    inputs (needed for integer inputs, e.g. token ids; ``input_shape`` is then its samples' shape).
    ``output(name, returned)``: the tensor a block that returns several hands on (default: its
    first). ``max_latent`` bounds each block's LLS latent (:func:`choose_pool`).
    """
    if isinstance(model, LocalNet):
        return model
    _check_not_shared(model)
    if isinstance(blocks, int) and blocks < 1:
        raise LLSError(f"localize: blocks must be at least 1 block, got {blocks}")
    if example is not None:
        if not isinstance(example, torch.Tensor) or example.dim() < 1:
            raise LLSError("example= must be a batch of inputs (a tensor whose first dimension is the batch)")
        if input_shape is not None and tuple(input_shape) != tuple(example.shape[1:]):
            given, samples = tuple(input_shape), tuple(example.shape[1:])
            raise LLSError(f"input_shape={given} but example= has samples of shape {samples}")
        input_shape = example.shape[1:]
    if input_shape is None:
        raise LLSError("localize needs input_shape=(one sample's shape), or example=a batch of inputs")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in input_shape):
        raise LLSError(f"localize: input_shape must be positive whole numbers, got {tuple(input_shape)}")
    input_shape = tuple(int(s) for s in input_shape)
    if example is not None and not example.is_floating_point() and not _names(blocks):
        raise LLSError("a model with integer inputs is split by names: blocks=['name', ...] with example=")
    probe = _probe(model, input_shape, example)
    if isinstance(model, nn.Sequential) and not _names(blocks):
        parts = _split_sequential(model, blocks, input_shape)
    else:
        if not _names(blocks):
            raise LLSError(
                f"{type(model).__name__} is not an nn.Sequential: name its blocks, "
                "e.g. localize(model, blocks=['layer1', 'layer2'], input_shape=...)"
            )
        names = _resolve(model, list(blocks))
        try:
            if output is not None or not _blocks_return_tensors(model, names, probe):
                raise _NotTraceable("blocks hand on one of several tensors: followed at run time")
            parts = _split_traced(model, names, input_shape)
        except _NotTraceable:
            *parts, _ = replay.split(model, names, probe, output)
    body, between, head = parts
    net = LocalNet(body, head, between)
    net.input_dtype = probe.dtype if not probe.is_floating_point() else None
    shapes = net.block_output_shapes(input_shape)
    net.latent_pool = [choose_pool(shape, max_latent) for shape in shapes]
    _check_same(model, net, probe)
    net.input_shape = input_shape
    net._localized_from = (model,)
    return net


def _check_not_shared(model: nn.Module) -> None:
    """Refuse a model that uses one module (or parameter) in two places: its parameters would sit
    in two blocks' optimizers, and the traced path refuses such a model too."""
    seen: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, param in module.named_parameters(recurse=False):
            where = f"{name}.{pname}" if name else pname
            if id(param) in seen and seen[id(param)] != where:
                raise LLSError(
                    f"the model uses one parameter in two places ({seen[id(param)]} and {where}): each "
                    "block needs its own layers; use a copy (copy.deepcopy) for the second use"
                )
            seen.setdefault(id(param), where)


class _NotTraceable(LLSError):
    """torch.fx cannot follow the forward: it is followed at run time instead."""


def _blocks_return_tensors(model: nn.Module, names: list[str], x: torch.Tensor) -> bool:
    """Whether every block returns one tensor on the probe batch (a GRU returns a tuple)."""
    returned = []
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, out: returned.append(out))
        for name in names
    ]
    try:
        with evaluating(model):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return all(isinstance(out, torch.Tensor) for out in returned)


def _probe(model: nn.Module, input_shape: tuple[int, ...], example: torch.Tensor | None) -> torch.Tensor:
    """The batch the split is checked on: ``example`` (its first PROBE_BATCH samples, repeated if
    fewer), else random normal inputs; on the model's device, floats in its dtype."""
    param = next(model.parameters(), None)
    if param is None:
        raise LLSError("the model has no parameters: nothing to train")
    if example is None:
        x = torch.randn(PROBE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0))
    else:
        x = example[:PROBE_BATCH]
        if len(x) < PROBE_BATCH:
            x = x.repeat(PROBE_BATCH, *([1] * (x.dim() - 1)))[:PROBE_BATCH]
    x = x.to(param.device)
    x = x.to(param.dtype) if x.is_floating_point() else x
    try:
        with evaluating(model):
            model(x)
    except Exception as error:  # the model's own error, whatever its kind
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        hint = (
            ""
            if example is not None
            else "; give one sample's shape, or example=a batch of real inputs (token ids)"
        )
        what = "example=" if example is not None else "random normal inputs"
        raise LLSError(
            f"the model does not accept inputs of shape {input_shape} ({what}: {first[:160]}){hint}"
        ) from None
    return x


def _names(blocks) -> bool:
    return (
        blocks is not None
        and not isinstance(blocks, (int, str))
        and all(isinstance(b, str) for b in blocks)
        and len(blocks) > 0
    )


def _has_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _describe(module: nn.Module) -> str:
    return type(module).__name__


# --- nn.Sequential ------------------------------------------------------------------------------


def _layer_macs(layers: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[int]:
    """Forward multiply-adds per sample of each layer (PyTorch's FLOP counter: 2 FLOPs each)."""
    param = next(iter(nn.Sequential(*layers).parameters()))
    h = torch.zeros(PROBE_BATCH, *input_shape, device=param.device, dtype=param.dtype)
    macs = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            with FlopCounterMode(display=False) as counter:
                try:
                    h = layer(h)
                except RuntimeError as error:
                    raise LLSError(
                        f"layer {i} ({_describe(layer)}) does not take the output of the layer before for "
                        f"inputs of shape {input_shape}: {str(error).splitlines()[0]}"
                    ) from None
            macs.append(counter.get_total_flops() // 2 // PROBE_BATCH)
    return macs


def _balanced_cuts(costs: Sequence[int], parts: int) -> list[int]:
    """Start indices of ``parts`` contiguous groups of ``costs`` whose largest sum is the least
    (dynamic programming over the few units of a model)."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    best = {(0, 0): (0, [])}  # (units used, groups) -> (largest group, starts)
    for groups in range(1, parts + 1):
        for end in range(groups, n - (parts - groups) + 1):
            options = []
            for start in range(groups - 1, end):
                if (start, groups - 1) in best:
                    worst, starts = best[(start, groups - 1)]
                    options.append((max(worst, prefix[end] - prefix[start]), [*starts, start]))
            best[(end, groups)] = min(options, key=lambda o: o[0])
    return best[(n, parts)][1]


def _split_sequential(model: nn.Sequential, blocks, input_shape: tuple[int, ...]):
    layers = list(model)
    weighted = [i for i, layer in enumerate(layers) if _has_weights(layer)]
    if not weighted:
        raise LLSError("the model has no layer with weights: nothing to train")
    last = weighted[-1]
    if not isinstance(layers[last], nn.Linear):
        raise LLSError(
            f"the model's last layer with weights is a {_describe(layers[last])}: LLS needs a Linear "
            "head last (the classifier the blocks' outputs feed)"
        )
    after = [_describe(layer) for layer in layers[last + 1 :] if not isinstance(layer, nn.Identity)]
    if after:
        raise LLSError(
            f"the head (layer {last}, Linear) is not last: {', '.join(after)} follow it; drop them "
            "(the trainer's loss takes the head's logits)"
        )
    units = [i for i in weighted[:-1] if not isinstance(layers[i], NORMS)]
    if not units:
        raise LLSError("the model has no layer with weights before its Linear head: nothing to localize")
    units[0] = 0  # layers before the first with weights (a Flatten) join the first block
    if blocks is None:
        starts = units
    elif isinstance(blocks, int):
        if not 1 <= blocks <= len(units):
            raise LLSError(
                f"blocks={blocks}: the model has {len(units)} layers with weights before its head; "
                f"ask for 1 to {len(units)} blocks"
            )
        macs = _layer_macs(layers[:last], input_shape)
        ends = [*units[1:], last]
        unit_macs = [sum(macs[a:b]) for a, b in zip(units, ends, strict=True)]
        starts = [units[k] for k in _balanced_cuts(unit_macs, blocks)]
    else:
        starts = sorted({0, *(int(i) for i in blocks)})
        if starts != [0, *(int(i) for i in blocks if int(i) != 0)] or starts[-1] >= last:
            raise LLSError(
                f"blocks={list(blocks)}: block starts must be increasing layer indices "
                f"below the head's ({last})"
            )
    body, between = [], []
    for a, b in zip(starts, [*starts[1:], last], strict=True):
        group = layers[a:b]
        if not any(_has_weights(layer) for layer in group):
            raise LLSError(
                f"the block of layers {a}..{b - 1} has no weights; start blocks at layers with weights"
            )
        end = len(group)
        while end > 1 and isinstance(group[end - 1], BETWEEN):
            end -= 1
        body.append(group[0] if end == 1 else nn.Sequential(*group[:end]))
        ops = group[end:]
        between.append(None if not ops else ops[0] if len(ops) == 1 else nn.Sequential(*ops))
    return body, between, layers[last]


# --- any model, by names ------------------------------------------------------------------------


def _resolve(model: nn.Module, patterns: list[str]) -> list[str]:
    """The submodule names matching ``patterns`` (part by part between dots), in model order."""
    names = [name for name, _ in model.named_modules() if name]
    found = []
    for pattern in patterns:
        parts = pattern.split(".")
        matched = [n for n in names if _matches(n.split("."), parts)]
        if not matched:
            raise LLSError(f"the model has no submodule {pattern!r}; {_known_names(names, pattern)}")
        found += [n for n in matched if n not in found]
    for a in found:
        for b in found:
            if b.startswith(a + "."):
                raise LLSError(f"block {b!r} lies inside block {a!r}; name blocks that do not nest")
    return found


NAMES_PER_DEPTH = 8  # submodule names listed at each depth when a block's name matches none


def _known_names(names: list[str], pattern: str) -> str:
    """The closest names to ``pattern`` first (difflib), then the names at every depth."""
    close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.6)
    # the names with their numbers as "*" (layer1.0 -> layer*.*): patterns for stacks of layers
    generalized = sorted({re.sub(r"\d+", "*", n) for n in names} - set(names))
    patterns = difflib.get_close_matches(pattern, generalized, n=3, cutoff=0.6)
    close = patterns + close if any(c in pattern for c in "*?[") else close + patterns
    text = f"did you mean {', '.join(map(repr, close))}? " if close else ""
    depths: dict[int, list[str]] = {}
    for name in names:
        depths.setdefault(name.count("."), []).append(name)
    listed = []
    for depth, at in sorted(depths.items()):
        more = f" (+{len(at) - NAMES_PER_DEPTH} more)" if len(at) > NAMES_PER_DEPTH else ""
        listed.append(f"depth {depth + 1}: {', '.join(at[:NAMES_PER_DEPTH])}{more}")
    return text + "its submodules by depth: " + "; ".join(listed)


def _matches(name: list[str], pattern: list[str]) -> bool:
    return len(name) == len(pattern) and all(map(fnmatch.fnmatchcase, name, pattern))


class _BlockTracer(fx.Tracer):
    def __init__(self, blocks: set[str]) -> None:
        super().__init__()
        self.block_names = blocks

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.block_names or super().is_leaf_module(m, qualified_name)


def _split_traced(model: nn.Module, names: list[str], input_shape: tuple[int, ...]):
    tracer = _BlockTracer(set(names))
    try:
        graph = tracer.trace(model)
    except Exception as error:  # fx raises many kinds on forwards it cannot follow
        raise _NotTraceable(f"torch.fx cannot follow the forward: {error}") from None
    traced = fx.GraphModule(tracer.root, graph)
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise LLSError(f"the model's forward takes {len(inputs)} inputs; localize needs one (the batch)")
    (output,) = [n for n in graph.nodes if n.op == "output"]
    if not isinstance(output.args[0], fx.Node):  # a tuple, a dict, a ModelOutput: read at run time
        raise _NotTraceable("the model returns more than one tensor")
    segment = _segments(graph, traced, names)
    del segment[output]
    last_segment = 2 * len(names)
    pieces = _chain(segment, names)
    head_nodes = [n for n, s in segment.items() if s == last_segment]
    if not any(n.op == "call_module" and _has_weights(traced.get_submodule(n.target)) for n in head_nodes):
        raise LLSError(
            f"nothing with weights runs after the last block {names[-1]!r}: the head (a Linear) must be last"
        )

    def build(s: int) -> nn.Module | None:
        """Segment ``s`` as a module of its own: its nodes copied into a graph of one input."""
        nodes = [n for n, t in segment.items() if t == s]
        if not nodes:
            return None
        g = fx.Graph()
        env = {}
        x = g.placeholder("x")
        for node in nodes:
            env[node] = g.node_copy(node, lambda a: env.get(a, x))
        g.output(env[pieces.get(s, nodes[-1]) if s != last_segment else output.args[0]])
        return fx.GraphModule(traced, g)

    blocks_out, between = [], []
    for k, name in enumerate(names):
        module = model.get_submodule(name)
        stem = build(0) if k == 0 else None
        blocks_out.append(module if stem is None else nn.Sequential(stem, module))
        between.append(build(2 * k + 2) if k < len(names) - 1 else None)
    return blocks_out, between, build(last_segment)


def _segments(graph: fx.Graph, traced: fx.GraphModule, names: list[str]) -> dict[fx.Node, int | None]:
    """Every node's segment: -1 the input, 0 the stem, 2k+1 block k, 2k+2 what runs after block k
    (None: the output). Refuses blocks that run twice or out of order, or never, and weights that
    run between two blocks."""
    segment: dict[fx.Node, int | None] = {}
    order, calls, current = {name: k for k, name in enumerate(names)}, [], 0
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            segment[node] = -1 if node.op == "placeholder" else None
            continue
        if node.op == "call_module" and node.target in order:
            if node.target in calls:
                raise LLSError(f"block {node.target!r} runs twice in the forward; a block must run once")
            if order[node.target] != len(calls):
                raise LLSError(
                    f"the forward runs block {node.target!r} before {names[len(calls)]!r}; "
                    "name the blocks in the order they run"
                )
            calls.append(node.target)
            segment[node], current = 2 * len(calls) - 1, 2 * len(calls)
            continue
        segment[node] = current
        if 0 < current < 2 * len(names):  # between two blocks: nothing trainable may run here
            value = attrgetter(node.target)(traced) if node.op in ("call_module", "get_attr") else None
            if isinstance(value, nn.Parameter) or (isinstance(value, nn.Module) and _has_weights(value)):
                raise LLSError(
                    f"{node.target!r} runs between blocks {names[current // 2 - 1]!r} and "
                    f"{names[current // 2]!r} and has weights; name it as a block or inside one"
                )
    if len(calls) != len(names):
        missing = [n for n in names if n not in calls]
        raise LLSError(f"the forward never runs {', '.join(map(repr, missing))}")
    return segment


def _chain(segment: dict[fx.Node, int], names: list[str]) -> dict[int, fx.Node]:
    """Each segment's output node, checking that every segment reads only the value of the segment
    before it (the chain LLS trains) and that the head gives the model's output."""
    last_segment = 2 * len(names)
    describe = {-1: "the input", 0: "the stem", last_segment: "the head"}

    def where(s: int) -> str:
        if s in describe:
            return describe[s]
        return f"block {names[s // 2]!r}" if s % 2 else f"the ops after block {names[s // 2 - 1]!r}"

    pieces: dict[int, fx.Node] = {}  # segment -> its output node
    for node, s in segment.items():
        for user in list(node.users):
            t = segment.get(user, last_segment + 1)
            if t == s:
                continue
            if t > last_segment:  # the model's output
                if s != last_segment:
                    raise LLSError(f"the model's output comes from {where(s)}; the head must run last")
                continue
            if pieces.get(s, node) is not node:
                raise LLSError(f"{where(s)} passes two tensors on; a block must hand one tensor to the next")
            pieces[s] = node
            following = min(u for u in set(segment.values()) if u > s)
            if t != following:
                raise LLSError(
                    f"a tensor skips from {where(s)} to {where(t)}: blocks must form a chain; name blocks "
                    "that contain the skip connection (e.g. a whole residual stage)"
                )
    return pieces


def _check_same(model: nn.Module, net: LocalNet, x: torch.Tensor) -> None:
    """The chained blocks must compute the model's forward (in eval mode, on the probe batch)."""
    with evaluating(model):
        expected, got = logits_of(model(x)), net(x)
    if expected.shape != got.shape or not torch.allclose(expected, got, rtol=PROBE_RTOL, atol=PROBE_ATOL):
        raise LLSError(
            "the blocks chained do not compute the model's forward on a probe batch: its forward does "
            "more than run them in order (a tensor that skips from one block to a later one, or ops "
            "outside its layers); name the blocks so that each holds its skip connections"
        )


def as_local_net(net: nn.Module, input_shape: Sequence[int] | None) -> tuple[LocalNet, tuple[int, ...]]:
    """What a Trainer trains: ``net`` itself when it is a LocalNet (its own input shape when none is
    given), an ``nn.Sequential`` localized with one block per layer with weights, else refused."""
    if not isinstance(net, LocalNet):
        if not isinstance(net, nn.Sequential) or input_shape is None:
            raise LLSError(
                f"the network is a {type(net).__name__}, not a LocalNet: split it into blocks with "
                "lls.localize(model, blocks=..., input_shape=...) and train that"
            )
        net = localize(net, input_shape=input_shape)
    input_shape = input_shape if input_shape is not None else net.input_shape
    if input_shape is None:
        raise LLSError("the network does not know its input shape: give input_shape=(one sample's shape)")
    return net, tuple(input_shape)
