"""Learning rules: where each block's learning signal comes from (METHOD.md sections 3 and 5).

A rule is a small config object in a registry. For every trainable block it makes one
:class:`BlockSignal`: an ``nn.Module`` that holds the rule's extra parameters and fixed buffers for
that block and turns the block's output ``a`` (and the labels) into a scalar loss. The gradient of
that loss with respect to the block's parameters is the block's update; the trainer owns the
backward pass and the optimizers. Rules never call ``backward()`` or ``step()``.

``timing`` says when a rule's signal is available:

- ``"block"``: right after the block's own forward pass (LLS family, local classifiers, DRTP);
- ``"head"``: only once the head's output is known (DFA needs the output error);
- ``"end-to-end"``: back-propagation through the whole network (BP).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .basis import BASIS_KINDS, basis
from .errors import LLSError
from .options import check, option, options_of
from .registry import Registry

Timing = Literal["block", "head", "end-to-end"]
NORMALIZE_EPS = 1e-12  # eps of the row-wise L2 normalisation max(||a||, eps)
MODULATION_INIT_STD = 0.01  # N(0, 0.01^2) init of LLS-M's vector and LLS-MxM's matrix
CLASSIFIER_INIT_STD = 0.1  # N(0, 0.1^2) init of the local learned classifiers
FEEDBACK_SCALE = 1e-4  # DFA / DRTP feedback matrices are drawn from U[0, 1e-4) (the specification)
# U[0, s) is the reference code's draw (all entries positive); "centred" draws from U[-s, s), zero
# mean, so that onehot(y) @ F does not push every unit of a block the same way for every class
FEEDBACK_KINDS = ("uniform", "centred")


def latent(a: torch.Tensor, pool: int | None) -> torch.Tensor:
    """A block output as the flat latent the LLS-family losses score (METHOD.md section 3, step 2).

    Conv outputs are average-pooled adaptively to ``pool x pool`` (PyTorch's ``adaptive_avg_pool2d``
    bins) and flattened channel-major, ``d = C * pool^2``. Flat (dense) outputs are average-pooled
    adaptively to length ``pool`` as the reference code does (``adaptive_avg_pool1d``: 1024 -> 2048
    repeats every entry, 4096 -> 2048 averages pairs). With ``pool`` None, outputs are flattened as
    they are.
    """
    if pool is None:
        return a.flatten(1)
    if a.dim() == 2:
        return a if a.shape[1] == pool else F.adaptive_avg_pool1d(a.unsqueeze(1), pool).squeeze(1)
    if a.dim() != 4:
        return a.flatten(1)
    if not a.is_contiguous(memory_format=torch.channels_last) or a.shape[1] == 1:
        return F.adaptive_avg_pool2d(a, pool).flatten(1)
    # Channels-last: adaptive_avg_pool2d's backward (and torch.matmul's, which transposes a
    # broadcast operand) hands back a channels-first gradient, and every backward kernel of the
    # block then runs on mismatched strides (measured 5x slower for LeakyReLU's). The same pooling
    # as two explicit batched matmuls over the (N, H, W, C) view keeps the gradient channels-last.
    n, c, h, w = a.shape
    rows, cols = pooling_matrix(h, pool, a.dtype, a.device), pooling_matrix(w, pool, a.dtype, a.device)
    pooled = torch.bmm(rows.expand(n, pool, h), a.permute(0, 2, 3, 1).reshape(n, h, w * c))
    pooled = torch.bmm(cols.expand(n * pool, pool, w), pooled.view(n * pool, w, c))
    return pooled.view(n, pool, pool, c).permute(0, 3, 1, 2).flatten(1)


@functools.lru_cache(maxsize=64)
def pooling_matrix(size: int, pool: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``pool x size`` matrix averaging the adaptive-pooling bins [i*size//pool, ceil((i+1)*size/pool))."""
    matrix = torch.zeros(pool, size, dtype=torch.float64)
    for i in range(pool):
        start, end = (i * size) // pool, -(-(i + 1) * size // pool)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix.to(device=device, dtype=dtype)


def latent_dim(out_shape: torch.Size, pool: int | None) -> int:
    """``d_l``, the length of :func:`latent` of an output of shape ``out_shape`` (without batch)."""
    if len(out_shape) == 3 and pool is not None:
        return out_shape[0] * pool * pool
    if len(out_shape) == 1 and pool is not None:
        return pool
    return math.prod(out_shape)


def block_seed(seed: int, index: int) -> int:
    """Seed of block ``index``'s fixed random tensors, so that blocks do not share them."""
    return seed * 100_003 + index


class BlockSignal(nn.Module):
    """The learning signal of one block: ``forward(a, y, logits) -> scalar loss``.

    ``a`` is the block's output (a graph leaf's descendant: the trainer detaches the block's input),
    ``y`` the integer labels and ``logits`` the head's output, given only to ``timing == "head"``
    rules. Parameters registered here are the rule's extra trainable parameters for this block and
    are updated by this block's optimizer.
    """

    # How the loss combines the samples of a batch: "mean" (a slice's loss weighs by its share of the
    # batch) or "sum" (slices add up as they are). The low-memory step (lowmem.py) needs to know.
    batch_reduction: ClassVar[Literal["mean", "sum"]] = "mean"

    def forward(self, a: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> torch.Tensor:
        return self.latent_loss(self.latent(a), y, logits)

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        """What of the block output the loss reads (all of it unless a signal says less): the
        low-memory step keeps this one's gradient, when it is smaller than ``a``, instead of
        recomputing the loss."""
        return a

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss from :meth:`latent`'s output; ``forward`` is ``latent_loss(latent(a), y, logits)``."""
        raise NotImplementedError


class ProjectionSignal(BlockSignal):
    """LLS and its relatives: scores ``s = z @ B^T`` (optionally modulated), loss ``CE(s / T, y)``.

    ``readout`` is a basis kind (fixed, regenerated on demand, never stored) or ``"learned"`` for a
    local learned classifier (a trainable K x d matrix). ``modulation`` is ``None``, ``"vector"``
    (LLS-M, ``s * m``) or ``"matrix"`` (LLS-MxM, ``s @ M`` with M of shape rows x K).

    ``width``: the random basis is drawn, and the learned classifier trained, as a K x width
    matrix average-pooled to K x d each time it is used (the reference code's convention);
    ``None`` (or ``d``) makes it K x d directly.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        pool: int | None,
        *,
        readout: str,
        temperature: float,
        normalize: bool,
        seed: int = 0,
        modulation: Literal["vector", "matrix"] | None = None,
        rows: int | None = None,
        width: int | None = None,
    ) -> None:
        super().__init__()
        self.num_classes, self.dim, self.pool = num_classes, dim, pool
        self.readout, self.temperature, self.normalize, self.seed = readout, temperature, normalize, seed
        self.rows = rows or num_classes
        self.width = width if width != dim else None
        if modulation != "matrix" and self.rows != num_classes:
            raise ValueError("a reduced basis (rows != classes) needs a matrix modulation")
        self.classifier = (
            nn.Parameter(CLASSIFIER_INIT_STD * torch.randn(self.rows, width or dim))
            if readout == "learned"
            else None
        )
        self.modulation = None
        if modulation == "vector":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(num_classes))
        elif modulation == "matrix":
            self.modulation = nn.Parameter(MODULATION_INIT_STD * torch.randn(self.rows, num_classes))

    def readout_matrix(self, like: torch.Tensor) -> torch.Tensor:
        """The rows x d matrix the latent is scored against, on ``like``'s device and dtype."""
        if self.classifier is not None:
            if self.width is None:
                return self.classifier
            return F.adaptive_avg_pool1d(self.classifier, self.dim)  # differentiable: trains all of it
        return basis(
            self.rows,
            self.dim,
            self.readout,
            self.seed,
            width=self.width,
            device=like.device,
            dtype=like.dtype,
        )

    def latent(self, a: torch.Tensor) -> torch.Tensor:
        return latent(a, self.pool)

    def scores(self, a: torch.Tensor) -> torch.Tensor:
        return self.latent_scores(self.latent(a))

    def latent_scores(self, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] != self.dim:
            raise LLSError(f"block output has latent size {z.shape[1]}, its signal was built for {self.dim}")
        if self.normalize:
            z = F.normalize(z, dim=1, eps=NORMALIZE_EPS)
        s = z @ self.readout_matrix(z).T
        if self.modulation is not None:
            s = s * self.modulation if self.modulation.dim() == 1 else s @ self.modulation
        return s

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.cross_entropy(self.latent_scores(z) / self.temperature, y)


class FeedbackSignal(BlockSignal):
    """DFA / DRTP: a fixed random projection ``F`` (K x size of the block output) of a K-vector.

    The loss is the surrogate ``sum(a * (t @ F))`` whose gradient with respect to ``a`` is exactly
    ``t @ F``: ``t = softmax(logits) - onehot(y)`` for DFA, ``t = onehot(y)`` for DRTP. ``F`` is
    regenerated from its seed (a non-persistent buffer), like the LLS basis.
    """

    batch_reduction: ClassVar[Literal["mean", "sum"]] = "sum"  # each sample's gradient is t @ F, unscaled

    def __init__(
        self, num_classes: int, out_shape: torch.Size, *, use_error: bool, seed: int, kind: str = "uniform"
    ) -> None:
        super().__init__()
        self.num_classes, self.use_error = num_classes, use_error
        generator = torch.Generator().manual_seed(seed)
        draw = torch.rand(num_classes, math.prod(out_shape), generator=generator)
        feedback = FEEDBACK_SCALE * (draw if kind == "uniform" else 2 * draw - 1)
        self.register_buffer("feedback", feedback, persistent=False)

    def target(self, y: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        onehot = F.one_hot(y, self.num_classes).to(self.feedback.dtype)
        if not self.use_error:
            return onehot
        if logits is None:
            raise ValueError("DFA's signal needs the head's logits")
        return torch.softmax(logits.detach(), dim=1) - onehot

    def latent_loss(
        self, z: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        grad = (self.target(y, logits) @ self.feedback).view_as(z)
        return (z * grad).sum()


# --- the registry -------------------------------------------------------------------------------


@dataclass
class Rule:
    """Base of every rule. Fields are the rule's options; defaults are the paper's."""

    name: ClassVar[str]
    timing: ClassVar[Timing] = "block"
    activation: ClassVar[str] = "leaky_relu"  # the activation the rule's networks are built with

    def signal(
        self, index: int, out_shape: torch.Size, pool: int | None, num_classes: int
    ) -> BlockSignal | None:
        """The signal of block ``index`` whose output (without batch) has ``out_shape``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}

    def __post_init__(self) -> None:
        check(self, f"rule {self.name!r}: ")


RULES: Registry[type[Rule]] = Registry("rule")


def seed_option() -> Any:
    """The seed of a rule's fixed random tensors: the run's --seed (see :func:`seeded_options`)."""
    return option(0, help="seeds the rule's fixed random tensors", cli=False, minimum=0, maximum=2**63 - 1)


REFERENCE_READOUT_WIDTH = 2048  # the K x 2048 matrices of the reference code's VGG and MobileNet


def readout_width_option(what: str) -> Any:
    return option(
        None,
        help=f"{what} as a K x W matrix average-pooled to K x d_l, as the reference code "
        f"(W = {REFERENCE_READOUT_WIDTH} for VGG8, VGG11, MobileNetV1; d_l itself for SmallConv(L), "
        "the default)",
        minimum=1,
    )


def register_rule(name: str):
    def add(cls: type[Rule]) -> type[Rule]:
        cls.name = name
        return RULES.register(name)(cls)

    return add


@register_rule("bp")
@dataclass
class BP(Rule):
    """End-to-end back-propagation of the head's cross-entropy."""

    timing: ClassVar[Timing] = "end-to-end"

    def signal(self, index, out_shape, pool, num_classes):
        return None


@register_rule("lls")
@dataclass
class LLS(Rule):
    """LLS: pooled, L2-normalised activity scored against a fixed periodic/square/random basis."""

    basis: str = option("square", help="LLS basis", choices=BASIS_KINDS, known="bases")
    temperature: float = option(0.5, help="temperature T of the local loss CE(s / T, y)", positive=True)
    seed: int = seed_option()
    readout_width: int | None = readout_width_option("the random basis is drawn")

    modulation: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.readout_width is not None and self.basis != "random":
            raise LLSError(
                f"rule {self.name!r}: readout_width applies to the random basis only, not {self.basis!r}; "
                "drop it or use basis random"
            )

    def rows(self, num_classes: int) -> int:
        return num_classes

    def signal(self, index, out_shape, pool, num_classes):
        return ProjectionSignal(
            num_classes,
            latent_dim(out_shape, pool),
            pool,
            readout=self.basis,
            temperature=self.temperature,
            normalize=self.basis != "random",  # the reference code does not normalise for random
            seed=block_seed(self.seed, index),
            modulation=self.modulation,
            rows=self.rows(num_classes),
            width=self.readout_width,
        )


@register_rule("lls-m")
@dataclass
class LLSM(LLS):
    """LLS-M: scores scaled by a learned K-vector per block."""

    modulation: ClassVar[str | None] = "vector"


@register_rule("lls-mxm")
@dataclass
class LLSMxM(LLS):
    """LLS-MxM: scores mixed by a learned matrix per block; ``reduced=R`` uses R basis rows (R x K)."""

    reduced: int | None = option(
        None, help="use R <= K basis rows, mixed by an R x K matrix (fewer parameters)", minimum=1
    )

    modulation: ClassVar[str | None] = "matrix"

    def rows(self, num_classes: int) -> int:
        if self.reduced is not None and self.reduced > num_classes:
            raise LLSError(
                f"reduced ({self.reduced}) must not exceed the number of classes ({num_classes}): "
                "it is how many basis rows the K x K mixing is reduced to"
            )
        return self.reduced or num_classes


@register_rule("local-classifier")
@dataclass
class LocalClassifier(Rule):
    """Local learned classifiers: like LLS with a trainable K x d matrix and no normalisation."""

    temperature: float = option(0.5, help="temperature T of the local loss CE(s / T, y)", positive=True)
    readout_width: int | None = readout_width_option("each classifier is trained")

    def signal(self, index, out_shape, pool, num_classes):
        return ProjectionSignal(
            num_classes,
            latent_dim(out_shape, pool),
            pool,
            readout="learned",
            temperature=self.temperature,
            normalize=False,
            width=self.readout_width,
        )


@register_rule("dfa")
@dataclass
class DFA(Rule):
    """Direct feedback alignment: the head's error through a fixed random matrix to every block.

    ``feedback``: "uniform" draws the matrices from U[0, 1e-4) as METHOD.md specifies, "centred"
    from U[-1e-4, 1e-4)."""

    seed: int = seed_option()
    feedback: str = option(
        "uniform",
        help="feedback matrices drawn from U[0, 1e-4) (uniform, as specified) or U[-1e-4, 1e-4) (centred)",
        choices=FEEDBACK_KINDS,
        known="kinds",
    )

    timing: ClassVar[Timing] = "head"
    use_error: ClassVar[bool] = True

    def signal(self, index, out_shape, pool, num_classes):
        return FeedbackSignal(
            num_classes,
            out_shape,
            use_error=self.use_error,
            seed=block_seed(self.seed, index),
            kind=self.feedback,
        )


@register_rule("drtp")
@dataclass
class DRTP(DFA):
    """Direct random target projection: ``onehot(y)`` through a fixed random matrix; Tanh blocks."""

    timing: ClassVar[Timing] = "block"
    activation: ClassVar[str] = "tanh"
    use_error: ClassVar[bool] = False


def list_rules() -> list[str]:
    return RULES.names()


def seeded_options(name: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """``options`` with the run's ``seed`` for a rule that draws fixed random tensors (a random
    basis, feedback matrices), so that the run's seed decides them too."""
    fields = {f.name for f in dataclasses.fields(RULES.get(name))}
    return {"seed": seed, **options} if "seed" in fields else dict(options)


def create_rule(name: str, **options: Any) -> Rule:
    """``create_rule("lls", basis="periodic")``; unknown names or options fail with the valid ones."""
    cls = RULES.get(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            hint = f"its options: {', '.join(valid)}" if valid else "it takes no options"
            raise LLSError(f"rule {name!r} has no option {key!r}; {hint}")
    return cls(**options)


def rule_options() -> dict[str, tuple[dataclasses.Field, type[Rule], list[str]]]:
    """Every option any rule takes: name -> (field, the first rule class declaring it, rule names)."""
    found: dict[str, tuple[dataclasses.Field, type[Rule], list[str]]] = {}
    for name in RULES.names():
        cls = RULES.get(name)
        for f in options_of(cls):
            entry = found.setdefault(f.name, (f, cls, []))
            entry[2].append(name)
    return found


def parse_rule_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``lls:basis=periodic,temperature=0.25`` -> ("lls", {"basis": "periodic", "temperature": 0.25}).

    Values are read as int or float where they can be; the rule checks them (and names the option).
    """
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LLSError(
                f"rule options are key=value pairs after a colon (lls:basis=periodic), got {spec!r}"
            )
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        options[key] = value
    create_rule(name, **options)  # validate now, with the registry's error messages
    return name, options
