"""The fixed class bases of LLS (docs/method.md, "The bases"), one registry entry per kind.

Row k of a basis is the pattern that block activity should line up with for class k. A basis is a
pure function of (num_classes, dim, kind, seed, width): it is generated, never trained and never
written to a checkpoint (a signal keeps it as a non-persistent buffer), which is where LLS's "no
extra parameters" claim comes from.

A kind is a :class:`BasisKind` in :data:`BASIS_KINDS`: its values, and the properties the rest of
``lls`` asks it for (whether the latent is normalised before scoring, what scoring costs, how a
block is read out, whether a seed draws it). Adding a kind is one ``@register_basis`` function here;
the rules, ``lls train --basis``, ``lls cost``, ``lls diagnose``, ``lls plot basis`` and the tests
generated from the registry take it from there.

Values are computed in float64 on the CPU and then cast, so the same basis comes out on every
device. (The authors' code evaluates ``sin(f * t)`` in float32 on the GPU, where ``f * t`` reaches
about 1e6 and is rounded to a multiple of 0.06 rad; its entries for large ``t`` therefore drift from
the formula. Ours follow the formula.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checks import checked
from ..errors import LLSError
from ..registry import Registry

MIN_FREQUENCY = 50.0  # rad per index step of the slowest class pattern
MAX_FREQUENCY = 512.0  # rad per index step of the fastest class pattern
RANDOM_STD = 0.1  # std of the Gaussian entries of the random-basis ablation

# (num_classes, dim, seed, width) -> the num_classes x dim float64 values
Values = Callable[[int, int, int, "int | None"], torch.Tensor]


@dataclass(frozen=True)
class BasisKind:
    """One kind of fixed basis and the properties the rest of ``lls`` reads from it.

    - ``normalized``: the latent is L2-normalised before it is scored (the paper's LLS); the random
      basis is not, as in the authors' code;
    - ``signs``: every entry is -1, 0 or +1, so scoring ``z @ B^T`` (and its backward ``g @ B``)
      adds and subtracts, with no multiplies (:meth:`scoring_ops`); plots draw its rows as steps;
    - ``drawn``: the values come from the rule's seed (and may be drawn ``width`` wide and pooled to
      ``dim``, ``readout_width``); other kinds are formulas and ignore both;
    - ``readout``: how a block is read out with this basis: the name its per-block accuracy is
      reported under (argmax of the block's scores against the rows).
    """

    name: str
    values: Values
    help: str
    normalized: bool = True
    signs: bool = False
    drawn: bool = False
    readout: str = "basis"

    def scoring_ops(self, rows: int, dim: int) -> tuple[int, int]:
        """(multiplies, additions) per sample of scoring a ``dim``-latent against ``rows`` rows,
        forward (``z @ B^T``) and backward (``g @ B``): ``rows * dim`` of each per direction,
        without the multiplies where the entries are signs."""
        products = 2 * rows * dim
        return (0 if self.signs else products), products


BASIS_KINDS: Registry[BasisKind] = Registry("basis", plural="bases")


@checked
def register_basis(name: str, help: str, **properties) -> Callable[[Values], Values]:
    """Register ``values(num_classes, dim, seed, width)`` as basis kind ``name``."""

    def add(values: Values) -> Values:
        BASIS_KINDS.register(name)(BasisKind(name, values, help, **properties))
        return values

    return add


def frequencies(num_classes: int) -> torch.Tensor:
    """``f_k = linspace(50, 512, K)[k]`` in float64."""
    return torch.linspace(MIN_FREQUENCY, MAX_FREQUENCY, num_classes, dtype=torch.float64)


@register_basis("periodic", "B[k, t] = sin(f_k t), f = linspace(50, 512, K) (the paper's cosine waveform)")
def periodic(num_classes: int, dim: int, seed: int, width: int | None) -> torch.Tensor:
    t = torch.arange(dim, dtype=torch.float64)
    return torch.sin(frequencies(num_classes)[:, None] * t[None, :])


@register_basis("square", "sign(sin(f_k t)): the periodic basis as signs (the default)", signs=True)
def square(num_classes: int, dim: int, seed: int, width: int | None) -> torch.Tensor:
    return torch.sign(periodic(num_classes, dim, seed, width))


@register_basis(
    "random",
    "N(0, 0.1^2) entries drawn from the rule's seed; the latent is not normalised",
    normalized=False,
    drawn=True,
)
def random(num_classes: int, dim: int, seed: int, width: int | None) -> torch.Tensor:
    """Drawn ``num_classes x width`` and each row average-pooled to ``dim`` (adaptive bins, as
    ``adaptive_avg_pool1d``) when ``width`` is given: the reference code's convention, whose
    entries then have a smaller std where ``width > dim`` (0.1 / sqrt(2) for 2048 -> 1024)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = width or dim
    values = RANDOM_STD * torch.randn(num_classes, drawn, generator=generator, dtype=torch.float64)
    return values if drawn == dim else F.adaptive_avg_pool1d(values, dim)


@register_basis(
    "hadamard",
    "rows 1..K of a Sylvester Hadamard matrix, truncated to d columns: signs, exactly orthogonal",
    signs=True,
)
def hadamard(num_classes: int, dim: int, seed: int, width: int | None) -> torch.Tensor:
    """Rows 1..K of the Sylvester (Walsh-Hadamard) matrix H of order n = 2^ceil(log2(max(d, K + 1))),
    its first d columns: ``B[k, t] = H[k + 1, t] = (-1)^popcount((k + 1) & t)``.

    Entries are +-1, so scoring needs no multiplies (as the square wave's). Which rows: row 0 is all
    ones and would score a latent by its plain sum, the same evidence for every input, so it is
    skipped; rows 1..K in Sylvester's (natural) order depend only on the lowest m = ceil(log2(K+1))
    bits of t, so each pair of them stays exactly orthogonal (and each sums to 0) over any first d
    columns with d a multiple of 2^m, which every latent of this project's models is (multiples of
    256). Rows in sequency order would lose that as soon as d < n. Like the square wave's fastest
    patterns, these alternate quickly along the latent, mixing neighbouring positions and channels.
    """
    # (-1)^popcount(i & t) is entry (i, t) of Sylvester's matrix of every order 2^m > i, t, so the
    # order n itself never needs to be built
    rows = torch.arange(1, num_classes + 1)[:, None]
    t = torch.arange(dim)[None, :]
    bits = rows & t
    parity = torch.zeros_like(bits)
    while bool(bits.any()):  # popcount, one bit at a time
        parity ^= bits & 1
        bits = bits >> 1
    return (1 - 2 * parity).to(torch.float64)


@checked
def basis(
    num_classes: int,
    dim: int,
    kind: str = "square",
    seed: int = 0,
    *,
    width: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``num_classes x dim`` basis of the given kind (see :data:`BASIS_KINDS`), a new tensor.

    ``seed`` and ``width`` only matter for drawn kinds (``random``).
    """
    entry = BASIS_KINDS.get(kind)
    if num_classes < 1 or dim < 1 or (width is not None and width < 1):
        raise LLSError(f"a basis needs num_classes, dim and width >= 1, got {num_classes} x {dim} ({width})")
    if not entry.drawn:
        seed, width = 0, None
    if torch.get_default_device().type == "meta":  # a model built for its sizes only (lls.measure.fits)
        return torch.empty(num_classes, dim, device="meta", dtype=dtype)
    values = entry.values(num_classes, dim, seed, width)
    return values.to(device=device or "cpu", dtype=dtype)
