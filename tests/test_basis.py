import math

import pytest
import torch

import lls
from lls.method.basis import BASIS_KINDS, frequencies


def test_periodic_entries_match_the_formula_by_hand():
    # K = 3 -> f = linspace(50, 512, 3) = (50, 281, 512); B[k, t] = sin(f_k * t) in radians
    b = lls.basis(3, 5, "periodic", dtype=torch.float64)
    assert b.shape == (3, 5)
    assert b[0, 1].item() == pytest.approx(-0.26237485370392877, abs=1e-12)  # sin(50)
    assert b[1, 2].item() == pytest.approx(math.sin(562.0), abs=1e-12)
    assert b[2, 3].item() == pytest.approx(math.sin(1536.0), abs=1e-12)
    assert torch.all(b[:, 0] == 0)  # sin(0)


def test_square_is_the_sign_of_periodic_and_needs_no_multiplies():
    periodic = lls.basis(10, 512, "periodic", dtype=torch.float64)
    square = lls.basis(10, 512, "square", dtype=torch.float64)
    assert set(square.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(square, torch.sign(periodic))
    assert square[0, 1].item() == -1.0  # sin(50) < 0
    assert square[1, 2].item() == (1.0 if math.sin(562.0) > 0 else -1.0)


def test_frequencies_span_50_to_512():
    f = frequencies(10)
    assert f[0].item() == 50.0 and f[-1].item() == 512.0
    assert torch.allclose(f.diff(), torch.full((9,), 462.0 / 9, dtype=torch.float64))


def test_random_basis_is_seeded_gaussian_with_std_0_1():
    a = lls.basis(10, 4000, "random", seed=3)
    assert torch.equal(a, lls.basis(10, 4000, "random", seed=3).clone())
    assert not torch.equal(a, lls.basis(10, 4000, "random", seed=4))
    assert abs(a.mean().item()) < 0.005
    assert a.std().item() == pytest.approx(0.1, rel=0.03)


def _sylvester(order: int) -> torch.Tensor:
    """Sylvester's construction by Kronecker products: H_1 = [1], H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while len(h) < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_hadamard_entries_by_hand():
    # H_4 = [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]; rows 1..3, row 0 skipped
    want = [[1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]]
    assert lls.basis(3, 4, "hadamard", dtype=torch.float64).tolist() == want


@pytest.mark.parametrize("classes,dim", [(10, 512), (3, 6), (10, 100), (100, 1024), (10, 4)])
def test_hadamard_is_sylvesters_matrix_of_order_at_least_d_truncated(classes, dim):
    order = 2 ** math.ceil(math.log2(max(dim, classes + 1)))
    want = _sylvester(order)[1 : classes + 1, :dim]
    assert torch.equal(lls.basis(classes, dim, "hadamard", dtype=torch.float64), want)


@pytest.mark.parametrize("classes,dim", [(10, 512), (10, 256), (100, 1024), (200, 2048), (10, 48)])
def test_hadamard_rows_are_exactly_orthogonal_where_the_square_waves_are_not(classes, dim):
    """For d a multiple of 2^ceil(log2(K + 1)) (every latent of the models here), B B^T = d I
    exactly and every row sums to 0; the square wave's rows are only nearly orthogonal."""
    b = lls.basis(classes, dim, "hadamard", dtype=torch.float64)
    assert torch.equal(b @ b.T, dim * torch.eye(classes, dtype=torch.float64))
    assert torch.equal(b.sum(1), torch.zeros(classes, dtype=torch.float64))
    square = lls.basis(classes, dim, "square", dtype=torch.float64)
    off_diagonal = (square @ square.T).fill_diagonal_(0)
    assert off_diagonal.abs().max() > 0


# --- every registered kind (a new kind gets these with no edit here) ---------------------------------


@pytest.mark.parametrize("kind", BASIS_KINDS)
def test_basis_is_pure_and_follows_device_and_dtype(kind):
    b = lls.basis(4, 9, kind, seed=1, device="cpu", dtype=torch.float64)
    assert b.shape == (4, 9) and b.dtype == torch.float64 and b.device.type == "cpu"
    assert torch.equal(b, lls.basis(4, 9, kind, seed=1, dtype=torch.float64))
    assert not b.requires_grad and torch.isfinite(b).all()
    drawn = BASIS_KINDS.get(kind).drawn  # only a drawn kind depends on the seed
    assert torch.equal(b, lls.basis(4, 9, kind, seed=2, dtype=torch.float64)) != drawn


@pytest.mark.parametrize("kind", BASIS_KINDS)
def test_a_sign_basis_has_only_signs_and_its_scoring_no_multiplies(kind):
    entry = BASIS_KINDS.get(kind)
    b = lls.basis(10, 300, kind, dtype=torch.float64)
    assert set(b.unique().tolist()) <= {-1.0, 0.0, 1.0} if entry.signs else len(b.unique()) > 3
    mults, adds = entry.scoring_ops(10, 300)
    assert adds == 2 * 10 * 300 and mults == (0 if entry.signs else adds)


@pytest.mark.parametrize("kind", BASIS_KINDS)
def test_the_lls_signal_owns_its_basis_and_normalises_as_the_kind_says(kind):
    signal = lls.create_rule("lls", basis=kind, seed=3).signal(2, torch.Size((4, 6, 6)), 2, 10)
    assert signal.normalize == BASIS_KINDS.get(kind).normalized
    assert "basis" in dict(signal.named_buffers()) and signal.state_dict() == {}  # not in checkpoints
    want = lls.basis(10, 16, kind, seed=signal.seed, dtype=torch.float64)
    assert torch.equal(signal.class_patterns(), want)


def test_unknown_basis_names_the_known_ones():
    known = ", ".join(sorted(BASIS_KINDS))
    with pytest.raises(lls.LLSError, match=f"known bases: {known}"):
        lls.basis(3, 3, "triangle")


def test_defaults_are_the_square_basis_in_float32_on_the_cpu():
    b = lls.basis(3, 6)
    assert b.dtype == torch.float32 and b.device.type == "cpu"
    f = (50.0, 281.0, 512.0)
    expected = [[math.copysign(1.0, math.sin(fk * t)) if t else 0.0 for t in range(6)] for fk in f]
    assert b.tolist() == expected


def test_random_basis_default_seed_is_zero_and_seeds_a_gaussian_generator():
    drawn = 0.1 * torch.randn(3, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(lls.basis(3, 50, "random", dtype=torch.float64), drawn)
    assert torch.equal(lls.basis(3, 50, "random"), lls.basis(3, 50, "random", seed=0))


def test_smallest_basis_is_one_class_by_one_entry():
    assert lls.basis(1, 1, "periodic").tolist() == [[0.0]]  # sin(50 * 0)
    assert frequencies(1).tolist() == [50.0]
    assert lls.basis(2, 1, "random", width=1).shape == (2, 1)


@pytest.mark.parametrize("shape", [(0, 5, None), (3, 0, None), (3, 5, 0), (-1, 5, None)])
def test_empty_basis_is_refused_naming_the_sizes(shape):
    k, d, width = shape
    with pytest.raises(lls.LLSError, match=rf"num_classes, dim and width >= 1, got {k} x {d} \({width}\)"):
        lls.basis(k, d, "random", width=width)


def test_a_basis_for_sizes_only_is_an_empty_meta_tensor_of_the_asked_dtype():
    # a model built on the meta device (to count its sizes) computes no basis values
    with torch.device("meta"):
        b = lls.basis(3, 8, "periodic", dtype=torch.float16)
    assert b.device.type == "meta" and b.shape == (3, 8) and b.dtype == torch.float16


def test_basis_goes_to_the_asked_device():
    b = lls.basis(3, 8, "random", device="meta", dtype=torch.float64)
    assert b.device.type == "meta" and b.shape == (3, 8) and b.dtype == torch.float64


def test_a_registered_kind_is_a_basis_with_its_properties(monkeypatch):
    """Adding a kind is one ``register_basis`` call: its values and properties come back by name."""
    from lls.method.basis import register_basis

    monkeypatch.setattr(BASIS_KINDS, "_entries", dict(BASIS_KINDS._entries))  # undone after the test

    def ramp(num_classes, dim, seed, width):
        return torch.arange(num_classes * dim, dtype=torch.float64).view(num_classes, dim) + seed

    assert register_basis("ramp", "entries 0, 1, 2, ...", signs=True, drawn=True)(ramp) is ramp
    entry = BASIS_KINDS.get("ramp")
    assert (entry.name, entry.values, entry.help) == ("ramp", ramp, "entries 0, 1, 2, ...")
    assert (entry.signs, entry.drawn, entry.normalized, entry.readout) == (True, True, True, "basis")
    assert lls.basis(2, 3, "ramp", seed=10).tolist() == [[10.0, 11.0, 12.0], [13.0, 14.0, 15.0]]
