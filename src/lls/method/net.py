"""A network as LLS sees it: trainable blocks, fixed ops between them, and a linear head.

``LocalNet`` is the one container every rule trains. Users build one from their own modules, or
from a list of block specs (a model is data: see ``models.py``). At inference it is an ordinary
feed-forward network.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ..checks import checked
from ..errors import LLSError
from ..options import check, option
from .activation import LEAKY_SLOPE, LeakyReLU

ACTIVATIONS = {
    "leaky_relu": lambda: LeakyReLU(LEAKY_SLOPE),
    "relu": nn.ReLU,
    "tanh": nn.Tanh,  # DRTP's choice
}


class LocalNet(nn.Module):
    """Blocks ``b_0..b_{L-1}``, fixed ops ``o_l`` after each block, and a head.

    ``forward(x) = head(o_{L-1}(b_{L-1}(... o_0(b_0(x)))))``. ``latent_pool[l]`` says how block l's
    output becomes its LLS latent (docs/method.md, "The local loss"): for a conv output, the side p_l of the
    adaptive average pool; for a flat (dense) output, the length it is adaptively average-pooled to
    (the reference code's ``adaptive_avg_pool1d``); ``None`` uses the flattened output as it is.
    """

    @checked
    def __init__(
        self,
        blocks: Sequence[nn.Module],
        head: nn.Module,
        between: Sequence[nn.Module | None] | None = None,
        latent_pool: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise LLSError("a LocalNet needs at least one block")
        between = list(between) if between is not None else [None] * len(blocks)
        latent_pool = list(latent_pool) if latent_pool is not None else [None] * len(blocks)
        if not len(between) == len(latent_pool) == len(blocks):
            raise LLSError(
                f"LocalNet got {len(blocks)} blocks, {len(between)} between-ops and "
                f"{len(latent_pool)} latent pool sizes; give one of each per block"
            )
        self.blocks = nn.ModuleList(blocks)
        self.between = nn.ModuleList(op if op is not None else nn.Identity() for op in between)
        self.head = head
        self.latent_pool: list[int | None] = latent_pool
        self.input_shape: tuple[int, ...] | None = None  # one sample's, where the builder knows it
        self.input_dtype: torch.dtype | None = None  # integer inputs (token ids); None: floats
        # the model localize() split, in a tuple: as an attribute it would be a submodule, its
        # parameters counted twice
        self._localized_from: tuple[nn.Module, ...] = ()

    @property
    def localized_from(self) -> nn.Module | None:
        """The model :func:`~lls.localize` split into this network (they share parameters), or None."""
        return self._localized_from[0] if self._localized_from else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for _, out in self.walk(x):  # noqa: B007 (keep only the last output alive, not every block's)
            pass
        return out

    def walk(
        self,
        h: torch.Tensor,
        blocks: range | None = None,
        *,
        detach: bool = False,
        slicer: Callable[[int, torch.Tensor], Any] | None = None,
    ) -> Iterator[tuple[int, Any]]:
        """The one loop over the blocks: yields ``(l, a_l)``, block l's output, for l in ``blocks``
        (all by default), then ``(stop, out)``: the head's logits when the range ends with the last
        block, else the input of block ``stop`` (what a pipeline stage passes on).

        ``h`` is the input of the range's first block. With ``detach`` every block and the head get
        a detached copy of their input, so no gradient can cross from one block to the one before:
        the walk of every local rule. ``slicer(l, h)`` may take block l's step over instead (the
        low-memory step, ``lowmem.py``): what it returns is yielded in place of ``a_l`` and its
        ``next_input()`` is the next block's input; ``None`` leaves the block to the walk.
        """
        blocks = range(len(self.blocks)) if blocks is None else blocks
        for index in blocks:
            step = slicer(index, h.detach()) if slicer is not None else None
            if step is not None:
                yield index, step
                h = step.next_input()
                continue
            a = self.blocks[index](h.detach() if detach else h)
            yield index, a
            h = self.between[index](a.detach() if detach else a)
            del a  # the walk keeps nothing of a block but the next one's input
        if blocks.stop == len(self.blocks):
            yield blocks.stop, self.head(h.detach() if detach else h)
        else:
            yield blocks.stop, h

    def block_output_shapes(self, input_shape: Sequence[int]) -> list[torch.Size]:
        """Output shape (without batch) of every block for inputs of ``input_shape``."""
        return [out for _, out in self.block_shapes(input_shape)]

    @torch.no_grad()
    def block_shapes(self, input_shape: Sequence[int]) -> list[tuple[torch.Size, torch.Size]]:
        """(input shape, output shape), without batch, of every block for inputs of ``input_shape``."""
        param = next(self.parameters())
        was_training = self.training
        self.eval()  # BatchNorm must not update its statistics on the dummy batch
        try:
            h = torch.zeros(2, *input_shape, device=param.device, dtype=self.input_dtype or param.dtype)
            shapes = []
            for index in range(len(self.blocks)):
                (_, a), (_, after) = self.walk(h, range(index, index + 1))
                shapes.append((h.shape[1:], a.shape[1:]))
                h = after
        except RuntimeError as error:
            raise LLSError(
                f"the network does not accept inputs of shape {tuple(input_shape)}: "
                f"{str(error).splitlines()[0]}"
            ) from None
        finally:
            self.train(was_training)
        return shapes


# --- block specs: a model is a list of these -------------------------------------------------
# Each spec adds itself to the network being built (``add_to``); a new kind of layer is one class.


class Spec(Protocol):
    """A block spec: adds its blocks or fixed ops to a :class:`NetBuilder`."""

    def add_to(self, net: NetBuilder) -> None: ...


@dataclass
class NetBuilder:
    """The network being built from specs: the activation shape so far (``(C, H, W)`` while
    spatial, ``(D,)`` once flat), the blocks, the fixed ops after each, and each block's latent pool."""

    input_shape: tuple[int, ...]
    activation: str
    options: ModelOptions
    name: str
    shape: tuple[int, ...] = ()
    blocks: list[nn.Module] = dataclasses.field(default_factory=list)
    between: list[list[nn.Module]] = dataclasses.field(default_factory=list)
    pools: list[int | None] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self.shape = self.shape or self.input_shape

    def act(self) -> nn.Module:
        return ACTIVATIONS[self.activation]()

    def add_block(
        self, block: nn.Module, pool: int | None, shape: tuple[int, ...], ops: Sequence[nn.Module] = ()
    ) -> None:
        """A trainable block whose output has ``shape``, with ``ops`` after it."""
        self.blocks.append(block)
        self.between.append(list(ops))
        self.pools.append(pool)
        self.shape = tuple(shape)

    def add_ops(self, spec: Spec, *ops: nn.Module, shape: tuple[int, ...] | None = None) -> None:
        """Fixed ops after the last block (the activation then has ``shape``, if it changes)."""
        if not self.between:
            raise ValueError(f"a fixed op ({spec}) cannot come before the first block")
        self.between[-1].extend(ops)
        self.shape = self.shape if shape is None else tuple(shape)

    def spatial(self) -> tuple[int, int, int]:
        """The (C, H, W) activation a conv block takes."""
        if len(self.shape) != 3:
            raise ValueError(f"{self.name}: a conv block follows a flat activation")
        return self.shape

    def too_small(self, what: str) -> LLSError:
        return LLSError(
            f"{self.name} cannot take inputs of shape {self.input_shape}: the activations shrink to "
            f"{self.shape} before {what}; use larger inputs or a model with fewer poolings"
        )

    def finish(self, num_classes: int) -> LocalNet:
        """The LocalNet: the last activation flattened into a linear head of ``num_classes``."""
        if len(self.shape) != 1:
            self.between[-1].append(nn.Flatten())
            self.shape = (math.prod(self.shape),)
        head = nn.Linear(self.shape[0], num_classes)
        ops = [nn.Sequential(*ops) if len(ops) > 1 else (ops[0] if ops else None) for ops in self.between]
        net = LocalNet(self.blocks, head, ops, self.pools)
        net.input_shape = self.input_shape  # what a Trainer takes when it is given no input shape
        return net


def _conv_out(size: int, padding: int, stride: int) -> int:
    """Side of a 3x3 convolution's output."""
    return (size + 2 * padding - 3) // stride + 1


@dataclass(frozen=True)
class Conv:
    """Trainable block: Conv2d(3x3, pad 1, bias) -> BatchNorm2d -> activation."""

    channels: int
    pool: int | None  # LLS latent pool side p_l
    stride: int = 1

    def add_to(self, net: NetBuilder) -> None:
        c, h, w = net.spatial()
        block = nn.Sequential(
            nn.Conv2d(c, self.channels, 3, stride=self.stride, padding=1, bias=True),
            nn.BatchNorm2d(self.channels),
            net.act(),
        )
        out = (self.channels, _conv_out(h, 1, self.stride), _conv_out(w, 1, self.stride))
        net.add_block(block, self.pool, out)


@dataclass(frozen=True)
class DWSeparable:
    """Trainable block (MobileNet): depthwise 3x3 + BN + act, then pointwise 1x1 + BN + act.

    The depthwise convolution is padded by 1, or by its stride with ``build(...,
    depthwise_padding="stride")`` (the authors' code: 33 x 33 rather than 32 x 32 out of 64 x 64)."""

    channels: int
    pool: int | None
    stride: int = 1

    def add_to(self, net: NetBuilder) -> None:
        c, h, w = net.spatial()
        padding = self.stride if net.options.depthwise_padding == "stride" else 1
        block = nn.Sequential(
            nn.Conv2d(c, c, 3, stride=self.stride, padding=padding, groups=c, bias=False),
            nn.BatchNorm2d(c),
            net.act(),
            nn.Conv2d(c, self.channels, 1, bias=False),
            nn.BatchNorm2d(self.channels),
            net.act(),
        )
        out = (self.channels, _conv_out(h, padding, self.stride), _conv_out(w, padding, self.stride))
        net.add_block(block, self.pool, out)


@dataclass(frozen=True)
class Dense:
    """Trainable block: Linear -> BatchNorm1d -> activation.

    ``pool``: the length the reference code average-pools the output to for the LLS latent
    (``adaptive_avg_pool1d``: a longer one repeats entries, a shorter one averages neighbours);
    ``None``, or ``build(..., dense_latent="output")``, scores the output as it is."""

    width: int
    pool: int | None = None

    def add_to(self, net: NetBuilder) -> None:
        if len(net.shape) != 1:  # flatten whatever spatial activation comes in
            net.add_ops(self, nn.Flatten(), shape=(math.prod(net.shape),))
        block = nn.Sequential(nn.Linear(net.shape[0], self.width), nn.BatchNorm1d(self.width), net.act())
        # pooling to the output's own length changes nothing: leave it out of every count
        pooled = net.options.dense_latent == "pooled" and self.pool is not None and self.pool != self.width
        net.add_block(block, self.pool if pooled else None, (self.width,))


@dataclass(frozen=True)
class MaxPool:
    """Fixed 2x2 max-pool, stride 2."""

    def add_to(self, net: NetBuilder) -> None:
        if len(net.shape) != 3 or min(net.shape[1:]) < 2:
            raise net.too_small("a 2x2 max-pool")
        c, h, w = net.shape
        net.add_ops(self, nn.MaxPool2d(2, 2), shape=(c, h // 2, w // 2))


@dataclass(frozen=True)
class AvgPool:
    """Fixed adaptive average pool to size x size, then flatten."""

    size: int

    def add_to(self, net: NetBuilder) -> None:
        shape = (net.shape[0] * self.size * self.size,)
        net.add_ops(self, nn.AdaptiveAvgPool2d(self.size), nn.Flatten(), shape=shape)


@dataclass(frozen=True)
class Dropout:
    p: float

    def add_to(self, net: NetBuilder) -> None:
        net.add_ops(self, nn.Dropout(self.p))


# block, the fixed ops after it, its latent pool, its output shape
BlockPlan = tuple[nn.Module, list[nn.Module], "int | None", tuple[int, ...]]


class Expanding:
    """A spec that expands into several blocks at once (zoo.py: residual nets, transformers): it
    says how in ``expand(shape, make_act, options)``, an iterator of :data:`BlockPlan`, following
    the model options that concern it (``options.block_granularity``, ``options.last_latent``)."""

    def expand(
        self, shape: tuple[int, ...], make_act: Callable[[], nn.Module], options: ModelOptions
    ) -> Iterator[BlockPlan]:
        raise NotImplementedError

    def add_to(self, net: NetBuilder) -> None:
        for block, ops, pool, shape in self.expand(net.shape, net.act, net.options):
            net.add_block(block, pool, shape, ops)


DENSE_LATENTS = ("pooled", "output")
DEPTHWISE_PADDINGS = ("1", "stride")
GRANULARITIES = ("block", "stage")  # residual networks: a LocalNet block per residual block, or per stage
LAST_LATENTS = ("head", "pooled")  # residual networks' last block: the head's global average, or pooled
MAX_WIDTH = 16.0  # the largest width multiplier (a 16x wider VGG8 already has 8192-channel layers)


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded down, at least 1 (Keras's MobileNet ``alpha``:
    ``int(filters * alpha)``; MLPerf Tiny's VWW model at 0.25 has 8, 16, 32, ... 256 channels)."""
    return max(1, int(channels * width))


def widen(spec: Spec, width: float) -> Spec:
    """``spec`` with its channels scaled by ``width`` (the fixed ops and latent pool sides unchanged;
    a dense block's latent length scales with its units)."""
    if width == 1:
        return spec
    if isinstance(spec, (Conv, DWSeparable)):
        return dataclasses.replace(spec, channels=scaled(spec.channels, width))
    if isinstance(spec, Dense):
        return dataclasses.replace(
            spec, width=scaled(spec.width, width), pool=spec.pool and scaled(spec.pool, width)
        )
    if hasattr(spec, "widen"):  # the zoo's residual networks and transformers scale themselves
        return spec.widen(width)
    return spec


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode without gradients, every submodule's mode put back on exit (a probe
    forward that must change no BatchNorm statistics and leave the model as the user had it)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, mode in modes:
            m.train(mode)


@dataclass(frozen=True)
class ModelOptions:
    """How a model is built from its specs where the paper's text and the authors' code could differ
    (options of :func:`build` and of ``create_model``, checked here).

    Defaults: the authors' dense latents (what the paper's tables ran, docs/method.md) and the
    standard MobileNetV1 padding (no table of the paper uses MobileNetV1)."""

    dense_latent: str = option(
        "pooled",
        help="LLS latent of a dense block: its output 'pooled' to the authors' length with "
        "adaptive_avg_pool1d (SmallConvL 1024 -> 2048, VGG11 4096 -> 2048), or the 'output' as it is",
        choices=DENSE_LATENTS,
        known="dense latents",
    )
    depthwise_padding: str = option(
        "1",
        help="padding of MobileNetV1's depthwise convolutions: 1, or equal to their 'stride' as the "
        "authors' code (spatial sizes 64, 33, 18, 10, 6 at 128 px instead of 64, 32, 16, 8, 4)",
        choices=DEPTHWISE_PADDINGS,
        known="paddings",
    )
    block_granularity: str = option(
        "block",
        help="residual networks: one LLS block per residual 'block', or per 'stage' of them",
        choices=GRANULARITIES,
        known="granularities",
    )
    width: float = option(
        1.0,
        help="width multiplier: every block's channels (units, embedding size) times this, rounded "
        "down as Keras's and MLPerf Tiny's MobileNetV1 alpha (0.25: the Visual Wake Words model)",
        positive=True,
        maximum=MAX_WIDTH,
    )
    last_latent: str = option(
        "head",
        help="residual networks: the last block's LLS latent is what the 'head' reads (its global "
        "average), or 'pooled' as the other blocks' (the largest pool of at most 2048 entries; "
        "runs made before this option)",
        choices=LAST_LATENTS,
        known="last-block latents",
    )

    def __post_init__(self) -> None:
        check(self)

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def build(
    specs: Sequence[Spec],
    input_shape: Sequence[int],
    num_classes: int,
    activation: str = "leaky_relu",
    name: str = "model",
    *,
    dense_latent: str = "pooled",
    depthwise_padding: str = "1",
    block_granularity: str = "block",
    width: float = 1.0,
    last_latent: str = "head",
) -> LocalNet:
    """Turn block specs into a :class:`LocalNet` for inputs of ``input_shape`` (C, H, W): each spec
    adds itself (``spec.add_to``), then the last activation is flattened into a linear head.

    ``dense_latent``: "pooled" takes each :class:`Dense` spec's ``pool`` as its latent length,
    "output" scores dense outputs as they are. ``depthwise_padding``: "1", or "stride" to pad each
    depthwise convolution by its stride (see :class:`DWSeparable`). ``width``: the width multiplier
    (:func:`widen`). ``block_granularity`` and ``last_latent``: see :class:`ModelOptions`.
    """
    options = ModelOptions(dense_latent, depthwise_padding, block_granularity, width, last_latent)  # checked
    specs = [widen(spec, width) for spec in specs]
    if activation not in ACTIVATIONS:
        raise LLSError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    if num_classes < 2:
        raise LLSError(f"a classifier needs at least 2 classes, got {num_classes}")
    net = NetBuilder(tuple(input_shape), activation, options, name)
    for spec in specs:
        if not hasattr(spec, "add_to"):
            raise TypeError(f"{name}: unknown block spec {spec!r}")
        spec.add_to(net)
    return net.finish(num_classes)
