"""The fused LLS-family loss as the trainer's graph engine builds it: one loss per block, in the
dtype asked for, equal to each block's own signal (its gradients are tested in test_engine.py)."""

import pytest
import torch

import lls
from lls.method.fused import FusedProjection, block_losses
from lls.method.latent import CHANNEL_MAJOR, POSITION_MAJOR

SHAPES = [torch.Size((3, 4, 4)), torch.Size((6,))]
LABELS = torch.tensor([0, 2, 1, 2])


def _signals(rule, **options):
    torch.manual_seed(0)
    r = lls.create_rule(rule, **options)
    return [r.signal(0, SHAPES[0], 2, 3), r.signal(1, SHAPES[1], None, 3)]


@pytest.mark.parametrize(
    "rule,options", [("lls", {"basis": "periodic"}), ("lls-m", {}), ("local-classifier", {})]
)
def test_block_losses_equal_the_signals_in_the_dtype_asked_for(rule, options):
    signals = [s.double() for s in _signals(rule, **options)]
    losses = block_losses(signals, SHAPES, device=torch.device("cpu"), dtype=torch.float64)
    assert all(isinstance(loss, FusedProjection) for loss in losses)  # every projection signal has one
    g = torch.Generator().manual_seed(1)
    for loss, signal, shape in zip(losses, signals, SHAPES, strict=True):
        a = torch.randn(len(LABELS), *shape, generator=g, dtype=torch.float64)
        for layout in (
            (torch.contiguous_format, torch.channels_last) if len(shape) == 3 else (torch.contiguous_format,)
        ):
            x = a.contiguous(memory_format=layout)
            # float64 throughout: the closed form and the chain agree to rounding of float64
            torch.testing.assert_close(loss(x, LABELS), signal(x, LABELS), rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(loss.closed_form(x, LABELS), signal(x, LABELS), rtol=1e-12, atol=1e-14)


def test_signals_without_a_fused_form_are_used_as_they_are():
    signals = _signals("dfa")
    losses = block_losses(signals, SHAPES, device=torch.device("cpu"), dtype=torch.float32)
    assert all(loss is signal for loss, signal in zip(losses, signals, strict=True))
    with pytest.raises(ValueError):
        block_losses(signals, SHAPES[:1], device=torch.device("cpu"), dtype=torch.float32)  # one shape short
    (conv, _) = _signals("lls")
    with pytest.raises(
        lls.LLSError, match=r"block output \(5, 4, 4\) has latent size 20, its signal was built for 12"
    ):
        FusedProjection(conv, (5, 4, 4))


def test_a_fixed_readout_is_made_once_in_the_dtype_and_device_asked_for():
    (conv, _) = _signals("lls", basis="periodic")
    plan = FusedProjection(conv, SHAPES[0], dtype=torch.float64)
    b = lls.basis(3, 12, "periodic", dtype=torch.float64)
    torch.testing.assert_close(plan.readout[CHANNEL_MAJOR], b, rtol=0, atol=0)
    # channels-last latents are read (h, w, c): the readout's columns follow
    torch.testing.assert_close(plan.readout[POSITION_MAJOR], b.view(3, 3, 4).transpose(1, 2).reshape(3, 12))
    assert FusedProjection(conv, SHAPES[0]).readout[CHANNEL_MAJOR].dtype == torch.float32
    (lls_m, _) = _signals("lls-m")
    assert FusedProjection(lls_m.double(), SHAPES[0]).readout[CHANNEL_MAJOR].dtype == torch.float64


def test_constants_are_made_on_the_device_asked_for_else_the_signals():
    """Every constant (readout, pooling matrices) is made when the fused form is built, on the
    device asked for; without one, on the device of the signal's parameters (a fixed basis has
    none: then the CPU). The meta device stands in for an accelerator."""
    meta = torch.device("meta")
    (conv, _) = _signals("lls", basis="periodic")
    assert not list(conv.parameters())  # a fixed basis
    for plan in (
        FusedProjection(conv, (3, 5, 5), device=meta),
        *block_losses([conv], [(3, 5, 5)], device=meta, dtype=torch.float32),
    ):
        assert {t.device for t in (*plan.readout.values(), *plan.pooling.buffers())} == {meta}
    (lls_m, _) = _signals("lls-m")
    plan = FusedProjection(lls_m.to(meta), (3, 5, 5))
    assert {t.device for t in (*plan.readout.values(), *plan.pooling.buffers())} == {meta}
    plan = FusedProjection(conv, (3, 5, 5))
    assert {t.device.type for t in (*plan.readout.values(), *plan.pooling.buffers())} == {"cpu"}
