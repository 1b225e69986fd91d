"""The LLS latent (docs/method.md, "The local loss", step 2) against independent definitions: PyTorch's
adaptive average pooling and its autograd, the mean over tokens written by hand, and the pooling's
operation counts recounted from the pooling's own matrix."""

import math

import pytest
import torch
import torch.nn.functional as F

from lls.method.latent import CHANNEL_MAJOR, POSITION_MAJOR, LatentPool, latent, latent_dim, pooling_ops


def _bin_entries(sizes: tuple[int, ...], pool: int) -> torch.Tensor:
    """(entries x bins) 0/1 matrix: which entries each adaptive-average bin holds, read off PyTorch's
    own pooling of the unit vectors."""
    n = math.prod(sizes)
    units = torch.eye(n, dtype=torch.float64).view(n, 1, *sizes)
    pooled = F.adaptive_avg_pool1d(units, pool) if len(sizes) == 1 else F.adaptive_avg_pool2d(units, pool)
    return (pooled.reshape(n, -1) != 0).double()


def _recount(sizes: tuple[int, ...], pool: int) -> tuple[int, int]:
    """The pooling's (multiplies, additions), forward and backward, counted bin by bin and entry by
    entry: a bin of k entries sums them (k - 1 additions) and scales the sum and, backward, its
    gradient (2 multiplies, none for a bin of one entry); an entry held by b bins adds b - 1
    gradients."""
    held = _bin_entries(sizes, pool)
    per_bin, per_entry = held.sum(0), held.sum(1)
    mults = 2 * int((per_bin > 1).sum())
    adds = int((per_bin - 1).sum()) + int((per_entry - 1).sum())
    return mults, adds


@pytest.mark.parametrize(
    "sizes,pool",
    [((4, 4), 2), ((7, 7), 2), ((4, 7), 2), ((3, 5), 4), ((6, 2), 3), ((7,), 2), ((5,), 3), ((4,), 8)],
)
def test_pooling_ops_recounted_from_the_bins(sizes, pool):
    assert pooling_ops(sizes, pool) == _recount(sizes, pool)


def test_pooling_ops_by_hand():
    # 4x4 -> 2x2: four bins of 4 entries: 3 additions each, one scaling forward and one backward
    assert pooling_ops((4, 4), 2) == (8, 12)
    # 7x7 -> 2x2: bins [0, 4) and [3, 7) per side share row and column 3: 4 bins of 16 entries
    # (60 additions), and 64 - 49 = 15 entries' gradients that meet another one's
    assert pooling_ops((7, 7), 2) == (8, 75)
    # 1024 -> 2048 repeats every entry: no scaling, each entry adds its two bins' gradients
    assert pooling_ops((1024,), 2048) == (0, 1024)
    # 4096 -> 2048 averages pairs: one addition and two scalings per bin
    assert pooling_ops((4096,), 2048) == (2 * 2048, 2048)


def test_latent_pool_ops_per_sample():
    """A conv output's pooling costs one channel's, C times; a dense one's its own; a token mean
    (T - 1) d additions and d scalings each way; flattening nothing."""
    c, h, w = 3, 4, 6  # 4 -> 2 pairs, 6 -> 2 triples: 4 bins of 6 entries per channel
    assert LatentPool((c, h, w), 2).ops() == (c * 2 * 4, c * 4 * 5)
    assert LatentPool((7,), 2).ops() == pooling_ops((7,), 2) == _recount((7,), 2)
    assert LatentPool((5, 3), None).ops() == (2 * 3, 4 * 3)
    assert LatentPool((c, h, w), None).ops() == (0, 0)
    assert LatentPool((6,), None).ops() == (0, 0)
    assert LatentPool((6,), 6).ops() == (0, 0)  # pooled to its own length: taken as it is


def test_token_latent_is_the_mean_over_tokens():
    """A (tokens, dim) output is scored by its mean over tokens, whatever ``pool`` says; the
    gradient back gives every token 1 / T of the mean's."""
    tokens, dim, n = 5, 3, 2
    a = torch.randn(n, tokens, dim, dtype=torch.float64)
    by_hand = torch.stack([sum(a[i, t] for t in range(tokens)) / tokens for i in range(n)])
    for pool in (None, 2):
        module = LatentPool((tokens, dim), pool)
        assert module.dim == latent_dim((tokens, dim), pool) == dim
        torch.testing.assert_close(module(a), by_hand)
        torch.testing.assert_close(latent(a, pool), by_hand)
        z, order = module.flat(a)
        assert order == CHANNEL_MAJOR
        torch.testing.assert_close(z, by_hand)
        g = torch.randn(n, dim, dtype=torch.float64)
        spread = module.spread(g, order)
        assert spread.shape == (n, tokens, dim)
        for t in range(tokens):
            torch.testing.assert_close(spread[:, t], g / tokens)


@pytest.mark.parametrize("shape,pool", [((2, 4, 2), 2), ((2, 2, 4), 2), ((2, 4, 7), 2), ((3, 7, 4), 2)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_spread_is_the_gradient_of_adaptive_average_pooling(shape, pool, layout):
    """``flat`` and ``spread`` against PyTorch's pooling and its autograd, for bins of two entries
    (one side halved, the other kept) and for uneven bins on one side only."""
    n = 3
    a = torch.randn(n, *shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    module = LatentPool(shape, pool)
    pooled = F.adaptive_avg_pool2d(a, pool)  # (n, c, pool, pool)
    z, order = module.flat(a.detach())
    g = torch.randn_like(pooled)
    (expected,) = torch.autograd.grad((pooled * g).sum(), a)
    if order == POSITION_MAJOR:
        torch.testing.assert_close(z, pooled.detach().permute(0, 2, 3, 1).flatten(1))
        grad = module.spread(g.permute(0, 2, 3, 1).flatten(1), order)
    else:
        torch.testing.assert_close(z, pooled.detach().flatten(1))
        grad = module.spread(g.flatten(1), order)
    assert order == (POSITION_MAJOR if layout == torch.channels_last else CHANNEL_MAJOR)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_channels_last_output_of_another_size_is_pooled_to_the_same_length(dtype):
    """A module built for 4x4 outputs pools a 6x5 channels-last output to the same p x p, as
    adaptive average pooling does, in the output's dtype."""
    module = LatentPool((2, 4, 4), 2)
    for h, w in ((4, 4), (6, 5)):
        a = torch.randn(3, 2, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
        z = module(a)
        assert z.dtype == dtype
        torch.testing.assert_close(z, F.adaptive_avg_pool2d(a, 2).flatten(1))


@pytest.mark.parametrize("shape,pool", [((2, 7, 4), 2), ((5,), 3), ((4,), 8)])
def test_pooling_constants_stay_out_of_the_state_dict(shape, pool):
    """The pooling's constants are non-persistent buffers, rebuilt from the shape: a checkpoint of a
    signal that holds them has none of them."""
    module = LatentPool(shape, pool)
    assert module.mode in ("pooled", "dense")
    assert len(list(module.buffers())) > 0
    assert module.state_dict() == {}


@pytest.mark.parametrize("shape", [(2, 4, 4), (3, 1, 4), (3, 5, 7)])
def test_a_channels_last_outputs_gradient_stays_channels_last(shape):
    """docs/method.md ("Latent pooling"): under channels-last the pooling's gradient keeps the
    layout (a channels-first gradient would run every backward kernel of the block on mismatched
    strides), and is still adaptive average pooling's."""
    a = torch.randn(3, *shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    a.requires_grad_(True)
    z = LatentPool(shape, 2)(a)
    g = torch.randn_like(z)
    (grad,) = torch.autograd.grad((z * g).sum(), a)
    assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
    ref = a.detach().contiguous().requires_grad_(True)
    (expected,) = torch.autograd.grad((F.adaptive_avg_pool2d(ref, 2).flatten(1) * g).sum(), ref)
    torch.testing.assert_close(grad, expected)
