"""Models whose forward torch.fx cannot follow, split by following their module calls at run time.

A Hugging Face model checks its inputs in Python, returns a ``ModelOutput``, loops over its layers;
a recurrent layer returns a tuple; a text model takes integer tokens. None of that is a chain of
traceable ops, but each runs the same module calls on every batch of a shape. So the model is run
on an example batch with hooks that record, in order, every call of a named block and of each
other outermost module (a *piece*: the embedder, a pooler, the classifier), what each returned,
and which dimension of each output is the batch (from a second run on another batch size).

The parts between blocks are then the model's own forward, *replayed*: to run what comes after
block k on its output ``a``, the model's forward runs with every module before it answering at
once (zeros of the recorded shapes; block k answers ``a``) and block k+1 stopping the forward with
its input, which is what the part returns. The forward's Python (checks, loops, slicing, the
``ModelOutput``) runs as written, and only the modules of the part compute. The stem (what runs
before the first block) is the forward stopped at the first block; the head runs from the last
block to the logits (``output.logits`` of a ``ModelOutput`` or a dict, else the first tensor).

A block that returns a tuple (a GRU's ``(output, h_n)``) hands on its first tensor, or the one that
``output(block, returned)`` picks; the replay puts the tensor back in its place. What the
forward does that this cannot reproduce (a tensor that skips a block, a piece with weights between
blocks, results that depend on more than the previous block's output) is refused, and the chained
parts are checked against the model's forward by ``localize``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import LLSError
from .net import evaluating

Picker = Callable[[str, Any], torch.Tensor]  # (block name, what it returned) -> the tensor it hands on


class _Stop(Exception):
    """Ends a replayed forward at a block, carrying that block's input."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


def leaves(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, torch.Tensor]]:
    """(path, tensor) of every tensor in a nest of tuples, lists and dicts (a ModelOutput is one)."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, (*path, key))
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from leaves(item, (*path, index))


def rebuilt(value: Any, make: Callable[[tuple, torch.Tensor], torch.Tensor], path: tuple = ()) -> Any:
    """``value`` with each tensor replaced by ``make(path, tensor)``, containers of the same types."""
    if isinstance(value, torch.Tensor):
        return make(path, value)
    if isinstance(value, dict):
        items = {key: rebuilt(item, make, (*path, key)) for key, item in value.items()}
        return type(value)(**items) if type(value) is not dict else items
    if isinstance(value, tuple):
        items = [rebuilt(item, make, (*path, index)) for index, item in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return [rebuilt(item, make, (*path, index)) for index, item in enumerate(value)]
    return value


def logits_of(output: Any) -> torch.Tensor:
    """A model's logits: the tensor it returns, ``.logits`` / ``["logits"]`` of a ModelOutput or a
    dict, else its first tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    first = next(leaves(output), None)
    if first is None:
        raise LLSError(f"the model returned {type(output).__name__} with no tensor: it must return logits")
    return first[1]


def first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    raise LLSError("a block was called without a tensor input")


@dataclass
class Call:
    name: str
    kind: str  # "block" or "piece"
    output: Any  # what it returned on the example (the larger batch)
    batch_dims: dict[tuple, int | None] = field(default_factory=dict)  # leaf path -> its batch dim


def containers_of(blocks: list[str]) -> set[str]:
    """The model ("") and the modules that hold blocks: their forwards are the glue replayed."""
    return {""} | {name.rsplit(".", k)[0] for name in blocks for k in range(1, name.count(".") + 1)}


def _record(model: nn.Module, blocks: list[str], x: torch.Tensor) -> tuple[list[Call], Any]:
    """Every call of a block or an outermost piece while ``model(x)`` runs, in order."""
    block_set = set(blocks)
    containers = containers_of(blocks)
    stack: list[str] = []
    calls: list[Call] = []
    handles = []

    def pre(name: str, module, args):
        stack.append(name)

    def post(name: str, module, args, output):
        stack.pop()
        outer = all(n in containers for n in stack)
        if outer and (name in block_set or name not in containers):
            calls.append(Call(name, "block" if name in block_set else "piece", output))

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: pre(n, m, a)))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: post(n, m, a, o)))
    try:
        output = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


class Plan:
    """What a model's forward calls, in order, and what each call returned (for the stand-ins)."""

    def __init__(
        self, model: nn.Module, blocks: list[str], example: torch.Tensor, pick: Picker | None
    ) -> None:
        small, large = _two_batches(example)
        with evaluating(model):  # the recording runs change no statistics
            first, _ = _record(model, blocks, small)
            calls, _ = _record(model, blocks, large)
        if [(c.name, c.kind) for c in first] != [(c.name, c.kind) for c in calls]:
            raise LLSError(
                "the model calls other modules for another batch size; localize needs a fixed order"
            )
        for a, b in zip(first, calls, strict=True):
            sizes_a = dict(leaves(a.output))
            for path, tensor in leaves(b.output):
                other = sizes_a.get(path)
                differ = [
                    d for d in range(tensor.dim()) if other is not None and other.shape[d] != tensor.shape[d]
                ]
                b.batch_dims[path] = differ[0] if differ else None
        self.blocks, self.calls = blocks, calls
        self.input_dtype, self.input_shape = example.dtype, tuple(example.shape[1:])
        self.segment: dict[str, int] = {}  # piece -> segment (0 stem, k + 1 after block k)
        ran = [c.name for c in calls if c.kind == "block"]
        for name in blocks:
            count = ran.count(name)
            if count != 1:
                raise LLSError(
                    f"block {name!r} runs {count} times in the forward; a block must run once"
                    if count
                    else f"the forward never runs block {name!r}"
                )
        if ran != blocks:
            raise LLSError(f"the forward runs the blocks in the order {ran}; name them in the order they run")
        current = 0
        for call in calls:
            if call.kind == "block":
                current = blocks.index(call.name) + 1
                continue
            if self.segment.setdefault(call.name, current) != current:
                raise LLSError(f"{call.name!r} runs both before and after a block; a part must run once")
        self.picked: dict[str, tuple] = {}  # block -> the leaf path of the tensor it hands on
        self.batch_dim: dict[str, int] = {}  # block -> that tensor's batch dimension (h_n's is 1)
        for call in calls:
            if call.kind == "block":
                path = self.picked[call.name] = _picked_path(call, pick)
                dim = call.batch_dims.get(path)
                if dim is None:
                    raise LLSError(f"block {call.name!r} hands on a tensor without a batch dimension")
                self.batch_dim[call.name] = dim

    def pieces(self, segment: int) -> list[str]:
        return [name for name, s in self.segment.items() if s == segment]

    def stand_in(self, call: Call, n: int, handed: torch.Tensor | None, like: torch.Tensor) -> Any:
        """What ``call`` returns in a replay for a batch of ``n``: zeros of its recorded shapes
        (``handed`` in the place of the tensor a block hands on)."""
        picked = self.picked.get(call.name)

        def make(path: tuple, tensor: torch.Tensor) -> torch.Tensor:
            if handed is not None and path == picked:
                return handed.movedim(0, self.batch_dim[call.name])  # back where the model has it
            shape = list(tensor.shape)
            dim = call.batch_dims.get(path)
            if dim is not None:
                shape[dim] = n
            dtype = tensor.dtype if not tensor.is_floating_point() else like.dtype
            return torch.zeros(shape, dtype=dtype, device=like.device)

        return rebuilt(call.output, make)


def _picked_path(call: Call, pick: Picker | None) -> tuple:
    found = list(leaves(call.output))
    if not found:
        raise LLSError(f"block {call.name!r} returns {type(call.output).__name__}, no tensor")
    if pick is None:
        return found[0][0]
    chosen = pick(call.name, call.output)
    for path, tensor in found:
        if tensor is chosen:
            return path
    raise LLSError(
        f"output= picked for block {call.name!r} a tensor that is not one the block returns; "
        "return one of them as it is (e.g. lambda name, out: out[0])"
    )


def _two_batches(example: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of 2 and 3 samples from ``example`` (repeated where it has fewer): the dimension
    whose size differs between the two runs is each output's batch dimension."""
    if len(example) == 0:
        raise LLSError("example= must hold at least one sample")
    repeated = example.repeat(3, *([1] * (example.dim() - 1))) if len(example) < 3 else example
    return repeated[:2], repeated[:3]


@contextlib.contextmanager
def _forwards(replacements: dict[nn.Module, Callable]) -> Iterator[None]:
    """Modules' forwards replaced for a while (an instance attribute shadows the method)."""
    saved = {module: module.__dict__.get("forward") for module in replacements}
    try:
        for module, forward in replacements.items():
            module.forward = forward
        yield
    finally:
        for module, previous in saved.items():
            if previous is None:
                del module.forward
            else:
                module.forward = previous


class Replay(nn.Module):
    """One part of a model's forward, replayed: from the output of block ``start`` (the model's
    input when -1) to the input of block ``stop`` (the logits when None)."""

    def __init__(self, model: nn.Module, plan: Plan, start: int, stop: int | None) -> None:
        super().__init__()
        segment = start + 1
        # the part's own modules: registered so that they train, switch modes and move with it
        self.parts = nn.ModuleList(model.get_submodule(name) for name in plan.pieces(segment))
        self._model = (model,)  # in a tuple: as an attribute it would be a submodule
        self.plan, self.start, self.stop = plan, start, stop

    def extra_repr(self) -> str:
        blocks = self.plan.blocks
        start = "input" if self.start < 0 else f"output of {blocks[self.start]!r}"
        stop = "logits" if self.stop is None else f"input of {blocks[self.stop]!r}"
        return f"{start} -> {stop}"

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        model, plan = self._model[0], self.plan
        n = h.shape[0]
        like = next(self.parameters(), None)
        like = like if like is not None else next(model.parameters())
        replacements: dict[nn.Module, Callable] = {}
        if self.start >= 0:
            before = {name for name, s in plan.segment.items() if s <= self.start}
            for call in plan.calls:
                index = plan.blocks.index(call.name) if call.kind == "block" else None
                if call.name in before or (index is not None and index <= self.start):
                    handed = h if index == self.start else None
                    value = plan.stand_in(call, n, handed, like)
                    replacements[model.get_submodule(call.name)] = lambda *a, _v=value, **k: _v
            x = torch.zeros((n, *plan.input_shape), dtype=plan.input_dtype, device=h.device)
            if x.is_floating_point():
                x = x.to(like.dtype)
        else:
            x = h
        if self.stop is not None:
            replacements[model.get_submodule(plan.blocks[self.stop])] = _stop
        containers = [model.get_submodule(name) for name in containers_of(plan.blocks)]
        modes = [(m, m.training) for m in containers]
        try:
            for m in containers:  # the forward's own checks of self.training follow this part's mode
                m.training = self.training
            with _forwards(replacements):
                out = model(x)
        except _Stop as stop:
            return stop.value
        finally:
            for m, mode in modes:
                m.training = mode
        if self.stop is not None:
            raise LLSError(f"the forward did not reach block {plan.blocks[self.stop]!r} when replayed")
        return logits_of(out)


def _stop(*args, **kwargs):
    raise _Stop(first_input(args, kwargs))


class Handing(nn.Module):
    """A block that returns a nest of tensors, handing on the one its plan picked, batch first."""

    def __init__(self, block: nn.Module, path: tuple, batch_dim: int) -> None:
        super().__init__()
        self.block, self.path, self.batch_dim = block, path, batch_dim

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return dict(leaves(self.block(*args, **kwargs)))[self.path].movedim(self.batch_dim, 0)


def split(model: nn.Module, names: list[str], example: torch.Tensor, pick: Picker | None):
    """(blocks, between, head) of ``model`` at the blocks ``names``, following its forward on
    ``example`` (see the module's docstring)."""
    plan = Plan(model, names, example, pick)
    last = len(names) - 1
    for k in range(last):
        for name in plan.pieces(k + 1):
            if any(p.requires_grad for p in model.get_submodule(name).parameters()):
                raise LLSError(
                    f"{name!r} runs between blocks {names[k]!r} and {names[k + 1]!r} and has weights; "
                    "name it as a block or inside one"
                )
    head_pieces = plan.pieces(last + 1)
    if not any(any(True for _ in model.get_submodule(n).parameters()) for n in head_pieces):
        raise LLSError(
            f"nothing with weights runs after the last block {names[-1]!r}: the head (a Linear) must be last"
        )
    blocks_out, between = [], []
    for k, name in enumerate(names):
        module = model.get_submodule(name)
        path = plan.picked[name]
        dim = plan.batch_dim[name]
        block = module if path == () and dim == 0 else Handing(module, path, dim)
        if k == 0:
            block = nn.Sequential(Replay(model, plan, -1, 0), block)
        blocks_out.append(block)
        between.append(Replay(model, plan, k, k + 1) if k < last else None)
    return blocks_out, between, Replay(model, plan, last, None), plan
