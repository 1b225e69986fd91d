"""Learning rules: where each block's learning signal comes from (docs/method.md).

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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..checks import checked
from ..errors import LLSError
from ..options import check, option, options_of
from ..registry import Registry
from .basis import BASIS_KINDS
from .signals import FEEDBACK_KINDS, BlockSignal, FeedbackSignal, ProjectionSignal, block_seed

Timing = Literal["block", "head", "end-to-end"]

# --- the registry -------------------------------------------------------------------------------


@dataclass
class Rule:
    """Base of every rule. Fields are the rule's options; defaults are the paper's."""

    name: ClassVar[str]
    label: ClassVar[str]  # the rule's name in tables (the paper's where it has one)
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


@checked
def register_rule(name: str):
    def add(cls: type[Rule]) -> type[Rule]:
        cls.name = name
        return RULES.register(name)(cls)

    return add


@register_rule("bp")
@dataclass
class BP(Rule):
    """End-to-end back-propagation of the head's cross-entropy."""

    label: ClassVar[str] = "BP"

    timing: ClassVar[Timing] = "end-to-end"

    def signal(self, index, out_shape, pool, num_classes):
        return None


@register_rule("lls")
@dataclass
class LLS(Rule):
    """LLS: pooled, L2-normalised activity scored against a fixed basis (any kind in basis.py)."""

    label: ClassVar[str] = "LLS"

    basis: str = option("square", help="LLS basis", choices=BASIS_KINDS, known="bases")
    temperature: float = option(0.5, help="temperature T of the local loss CE(s / T, y)", positive=True)
    seed: int = seed_option()
    readout_width: int | None = readout_width_option("the random basis is drawn")

    modulation: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.readout_width is not None and not BASIS_KINDS.get(self.basis).drawn:
            drawn = ", ".join(name for name in BASIS_KINDS if BASIS_KINDS.get(name).drawn)
            raise LLSError(
                f"rule {self.name!r}: readout_width applies to drawn bases only ({drawn}), not "
                f"{self.basis!r}; drop it or use one of those"
            )

    def rows(self, num_classes: int) -> int:
        return num_classes

    def signal(self, index, out_shape, pool, num_classes):
        return ProjectionSignal(
            num_classes,
            out_shape,
            pool,
            basis=self.basis,  # the kind says whether the latent is normalised
            temperature=self.temperature,
            seed=block_seed(self.seed, index),
            modulation=self.modulation,
            rows=self.rows(num_classes),
            width=self.readout_width,
        )


@register_rule("lls-m")
@dataclass
class LLSM(LLS):
    """LLS-M: scores scaled by a learned K-vector per block."""

    label: ClassVar[str] = "LLS-M"

    modulation: ClassVar[str | None] = "vector"


@register_rule("lls-mxm")
@dataclass
class LLSMxM(LLS):
    """LLS-MxM: scores mixed by a learned matrix per block; ``reduced=R`` uses R basis rows (R x K)."""

    label: ClassVar[str] = "LLS-MxM"

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

    label: ClassVar[str] = "Local classifiers"

    temperature: float = option(0.5, help="temperature T of the local loss CE(s / T, y)", positive=True)
    readout_width: int | None = readout_width_option("each classifier is trained")

    def signal(self, index, out_shape, pool, num_classes):
        return ProjectionSignal(
            num_classes,
            out_shape,
            pool,
            basis=None,  # a learned readout, not normalised
            temperature=self.temperature,
            width=self.readout_width,
        )


@register_rule("dfa")
@dataclass
class DFA(Rule):
    """Direct feedback alignment: the head's error through a fixed random matrix to every block.

    ``feedback``: "uniform" draws the matrices from U[0, 1e-4) as the paper specifies, "centred"
    from U[-1e-4, 1e-4)."""

    label: ClassVar[str] = "DFA"

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

    label: ClassVar[str] = "DRTP"

    timing: ClassVar[Timing] = "block"
    activation: ClassVar[str] = "tanh"
    use_error: ClassVar[bool] = False


def list_rules() -> list[str]:
    return RULES.names()


def comparison_rules() -> list[tuple[str, dict[str, Any]]]:
    """Every registered rule with its default options, BP (the rule everything is measured against)
    first, and LLS once with each basis kind, the default first: the rows of ``lls cost --compare``
    and of the "compare" preset."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in sorted(RULES.names(), key=lambda name: RULES.get(name).timing != "end-to-end"):
        if name != LLS.name:
            out.append((name, {}))
            continue
        default = LLS().basis
        out += [(name, {"basis": kind}) for kind in [default, *(k for k in BASIS_KINDS if k != default)]]
    return out


def seeded_options(name: str, options: dict[str, Any], seed: int) -> dict[str, Any]:
    """``options`` with the run's ``seed`` for a rule that draws fixed random tensors (a random
    basis, feedback matrices), so that the run's seed decides them too."""
    fields = {f.name for f in dataclasses.fields(RULES.get(name))}
    return {"seed": seed, **options} if "seed" in fields else dict(options)


@checked
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
