"""The LLS loss is one function, ``lls_loss``; every path that trains a block computes it.

The function is checked against a value worked out by hand; then the eager signal, the graph
engine's fused form, the sliced low-memory step and mixed precision are each held to it on the same
block outputs.
"""

import math

import pytest
import torch
from torch import nn

from lls.method.basis import basis
from lls.method.fused import FusedProjection
from lls.method.rules import create_rule
from lls.method.signals import lls_loss
from lls.step.precision import Precision, cpu_supports
from lls.step.sliced import SlicedBlock

K = 4
LABELS = torch.tensor([0, 3, 1, 1, 2, 0])
OUT_SHAPE = (3, 6, 6)  # a conv block's output, pooled 2 x 2: latent d = 12
POOL = 2
# (rule, options): a fixed basis of each normalisation, and each modulation
VARIANTS = [
    ("lls", {"basis": "square"}),
    ("lls", {"basis": "periodic"}),
    ("lls", {"basis": "random"}),  # scored unnormalised
    ("lls-m", {}),
    ("lls-mxm", {}),
]


def test_lls_loss_by_hand():
    """z = (3, 4) normalises to (0.6, 0.8); against the identity basis the scores are (0.6, 0.8), at
    T = 0.5 (1.2, 1.6); the cross-entropy for class 0 is log(1 + e^0.4)."""
    z = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    got = lls_loss(z, eye, 0.5, torch.tensor([0]))
    assert got.item() == pytest.approx(math.log(1 + math.exp(0.4)), rel=1e-12)
    # unnormalised (the random basis's reading): scores (3, 4) / 0.5, CE for class 1 = log(1 + e^-2)
    got = lls_loss(z, eye, 0.5, torch.tensor([1]), normalize=False)
    assert got.item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-12)


def test_lls_loss_modulations_by_hand():
    """LLS-M multiplies the scores by m, LLS-MxM multiplies them by M, before the temperature."""
    z = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # unit length: scores = (1, 0)
    eye = torch.eye(2, dtype=torch.float64)
    m = torch.tensor([2.0, 1.0], dtype=torch.float64)  # scores (2, 0); at T = 1, CE(y=1) = log(1 + e^2)
    assert lls_loss(z, eye, 1.0, torch.tensor([1]), m).item() == pytest.approx(math.log(1 + math.e**2))
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)  # scores (0, 1)
    assert lls_loss(z, eye, 1.0, torch.tensor([1]), swap).item() == pytest.approx(math.log(1 + math.e**-1))


def test_lls_loss_exports():
    """Pure tensor code: torch.export traces it (what an on-device export builds on)."""

    class Loss(nn.Module):
        def forward(self, z, b, y):
            return lls_loss(z, b, 0.5, y)

    z, b = torch.randn(6, 12), basis(K, 12, "square", 0)
    exported = torch.export.export(Loss(), (z, b.float(), LABELS))
    torch.testing.assert_close(exported.module()(z, b.float(), LABELS), lls_loss(z, b.float(), 0.5, LABELS))


def _signal(rule, options):
    torch.manual_seed(0)
    return create_rule(rule, **options).signal(0, torch.Size(OUT_SHAPE), POOL, K)


def _reference(signal, a):
    """lls_loss on the signal's latent of ``a``, with the signal's basis, temperature and modulation."""
    z = signal.latent(a)
    readout = signal.readout_matrix(z)
    return lls_loss(z, readout, signal.temperature, LABELS, signal.modulation, normalize=signal.normalize)


def _output(seed=0):
    return torch.randn(len(LABELS), *OUT_SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rule,options", VARIANTS, ids=str)
def test_every_path_computes_lls_loss(rule, options):
    signal = _signal(rule, options)
    a = _output()
    want = _reference(signal, a)
    # the eager signal: the same ops in the same order, bit for bit
    assert torch.equal(signal(a, LABELS), want)
    # the graph engine's closed form: the same loss to float32 rounding
    fused = FusedProjection(signal, OUT_SHAPE)
    torch.testing.assert_close(fused.closed_form(a, LABELS), want, rtol=1e-5, atol=1e-6)
    # the sliced low-memory step: slices of 2 samples, each weighted by its share of the mean
    block = nn.Conv2d(OUT_SHAPE[0], OUT_SHAPE[0], 1)
    h = _output(seed=1)
    sliced = SlicedBlock(block, nn.Identity(), h, 2).loss(signal, LABELS)
    torch.testing.assert_close(sliced, _reference(signal, block(h)), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_supports(torch.bfloat16), reason="this CPU has no bfloat16 autocast")
@pytest.mark.parametrize("rule,options", VARIANTS, ids=str)
def test_mixed_precision_computes_lls_loss_in_float32(rule, options):
    """bf16: the latent under autocast, then lls_loss in float32 on it."""
    signal = _signal(rule, options)
    a = _output()
    got = Precision("bf16", torch.device("cpu"), 1).signal_loss(signal, a, LABELS)
    assert got.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = signal.latent(a)
    z = z.float()
    want = lls_loss(
        z, signal.readout_matrix(z), signal.temperature, LABELS, signal.modulation, normalize=signal.normalize
    )
    assert torch.equal(got, want)
    # and within bfloat16's rounding of the float32 loss
    torch.testing.assert_close(got, _reference(signal, a), rtol=2e-2, atol=2e-2)
