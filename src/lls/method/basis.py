"""The fixed class basis of LLS (METHOD.md section 4).

Row k of the basis is the pattern that block activity should line up with for class k. The basis is
a pure function of (num_classes, dim, kind, seed, width): it is generated, cached, never trained and
never written to a checkpoint, which is where LLS's "no extra parameters" claim comes from.

Values are computed in float64 on the CPU and then cast, so the same basis comes out on every
device. (The authors' code evaluates ``sin(f * t)`` in float32 on the GPU, where ``f * t`` reaches
about 1e6 and is rounded to a multiple of 0.06 rad; its entries for large ``t`` therefore drift from
the formula. Ours follow the formula.)
"""

from __future__ import annotations

import functools

import torch

from ..errors import LLSError

BASIS_KINDS = ("periodic", "square", "random")
MIN_FREQUENCY = 50.0  # rad per index step of the slowest class pattern
MAX_FREQUENCY = 512.0  # rad per index step of the fastest class pattern
RANDOM_STD = 0.1  # std of the Gaussian entries of the random-basis ablation


def frequencies(num_classes: int) -> torch.Tensor:
    """``f_k = linspace(50, 512, K)[k]`` in float64."""
    return torch.linspace(MIN_FREQUENCY, MAX_FREQUENCY, num_classes, dtype=torch.float64)


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
    """The ``num_classes x dim`` basis of the given kind.

    - ``periodic``: ``B[k, t] = sin(f_k * t)`` (the paper's "cosine" waveform),
    - ``square``: ``sign(sin(f_k * t))``, entries in {-1, 0, +1},
    - ``random``: N(0, 0.1^2) entries drawn from a generator seeded with ``seed``; with ``width``,
      drawn ``num_classes x width`` and each row average-pooled to ``dim`` (adaptive bins, as
      ``adaptive_avg_pool1d``): the reference code's convention, whose entries then have a smaller
      std where ``width > dim`` (0.1 / sqrt(2) for 2048 -> 1024).

    ``seed`` and ``width`` only matter for ``random``. The returned tensor is cached and shared: do
    not modify it in place.
    """
    if kind not in BASIS_KINDS:
        raise LLSError(f"unknown basis {kind!r}; known bases: {', '.join(BASIS_KINDS)}")
    if num_classes < 1 or dim < 1 or (width is not None and width < 1):
        raise LLSError(f"a basis needs num_classes, dim and width >= 1, got {num_classes} x {dim} ({width})")
    if kind != "random":  # keep one cache entry for the deterministic kinds
        seed, width = 0, None
    return _cached_basis(num_classes, dim, kind, seed, width, torch.device(device or "cpu"), dtype)


@functools.lru_cache(maxsize=512)
def _cached_basis(
    num_classes: int,
    dim: int,
    kind: str,
    seed: int,
    width: int | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        drawn = width or dim
        values = RANDOM_STD * torch.randn(num_classes, drawn, generator=generator, dtype=torch.float64)
        if drawn != dim:
            values = torch.nn.functional.adaptive_avg_pool1d(values, dim)
    else:
        t = torch.arange(dim, dtype=torch.float64)
        values = torch.sin(frequencies(num_classes)[:, None] * t[None, :])
        if kind == "square":
            values = torch.sign(values)
    return values.to(device=device, dtype=dtype)
