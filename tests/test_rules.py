"""Each rule's loss against an independent computation of its formula in docs/method.md."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import torch

import lls
from lls.method.signals import FEEDBACK_SCALE, block_seed

from .conftest import NUM_CLASSES, tiny_batch, tiny_trainer

K = 4
C, H, W = 3, 6, 6
POOL = 2
D = C * POOL * POOL


def reference_latent(a: np.ndarray, pool: int) -> np.ndarray:
    """Adaptive average pooling to pool x pool when H, W are multiples of pool, then flatten."""
    n, c, h, w = a.shape
    return a.reshape(n, c, pool, h // pool, pool, w // pool).mean(axis=(3, 5)).reshape(n, -1)


def reference_cross_entropy(scores: np.ndarray, y: np.ndarray) -> float:
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def reference_basis(kind: str, rows: int, dim: int) -> np.ndarray:
    f = np.linspace(50, 512, rows)
    b = np.sin(np.outer(f, np.arange(dim)))
    return np.sign(b) if kind == "square" else b


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, C, H, W, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (8,), generator=g)
    return a, y


def make_signal(rule: str, **options):
    torch.manual_seed(0)
    signal = lls.create_rule(rule, **options).signal(0, torch.Size((C, H, W)), POOL, K)
    return signal.double()


@pytest.mark.parametrize("kind", ["periodic", "square"])
def test_lls_loss(batch, kind):
    a, y = batch
    z = reference_latent(a.numpy(), POOL)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = reference_cross_entropy(z @ reference_basis(kind, K, D).T / 0.5, y.numpy())
    assert make_signal("lls", basis=kind)(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_lls_random_basis_is_not_normalised(batch):
    a, y = batch
    signal = make_signal("lls", basis="random", seed=5)
    b = lls.basis(K, D, "random", seed=block_seed(5, 0), dtype=torch.float64).numpy()
    z = reference_latent(a.numpy(), POOL)  # no L2 normalisation, as in the reference code
    expected = reference_cross_entropy(z @ b.T / 0.5, y.numpy())
    assert signal(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_temperature_divides_the_scores(batch):
    a, y = batch
    z = reference_latent(a.numpy(), POOL)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = reference_cross_entropy(z @ reference_basis("square", K, D).T / 2.0, y.numpy())
    assert make_signal("lls", temperature=2.0)(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_lls_m_scales_scores_by_a_learned_vector(batch):
    a, y = batch
    signal = make_signal("lls-m")
    m = signal.modulation.detach().numpy()
    assert m.shape == (K,)
    z = reference_latent(a.numpy(), POOL)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = reference_cross_entropy((z @ reference_basis("square", K, D).T) * m / 0.5, y.numpy())
    assert signal(a, y).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("reduced", [None, 3])
def test_lls_mxm_mixes_scores_by_a_learned_matrix(batch, reduced):
    a, y = batch
    signal = make_signal("lls-mxm", reduced=reduced)
    rows = reduced or K
    m = signal.modulation.detach().numpy()
    assert m.shape == (rows, K)
    z = reference_latent(a.numpy(), POOL)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = reference_cross_entropy((z @ reference_basis("square", rows, D).T) @ m / 0.5, y.numpy())
    assert signal(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_modulation_initialised_small():
    torch.manual_seed(0)
    signal = lls.create_rule("lls-mxm", reduced=50).signal(0, torch.Size((512,)), None, 100)
    assert signal.modulation.std().item() == pytest.approx(0.01, rel=0.05)


def test_local_classifier_scores_the_raw_latent_with_a_trainable_matrix(batch):
    a, y = batch
    signal = make_signal("local-classifier")
    w = signal.classifier.detach().numpy()
    assert w.shape == (K, D) and signal.classifier.requires_grad
    expected = reference_cross_entropy(reference_latent(a.numpy(), POOL) @ w.T / 0.5, y.numpy())
    assert signal(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_dense_latent_is_used_as_is():
    signal = lls.create_rule("lls", basis="periodic").signal(0, torch.Size((6,)), None, 3)
    a = torch.randn(4, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    z = a.numpy() / np.linalg.norm(a.numpy(), axis=1, keepdims=True)
    expected = reference_cross_entropy(z @ reference_basis("periodic", 3, 6).T / 0.5, y.numpy())
    assert signal.double()(a, y).item() == pytest.approx(expected, rel=1e-10)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("feedback", ["uniform", "centred"])
@pytest.mark.parametrize("rule", ["dfa", "drtp"])
def test_feedback_gradient_at_block_output(batch, rule, feedback):
    a, y = batch
    a = a.clone().requires_grad_(True)
    logits = torch.randn(len(y), K, dtype=torch.float64)
    signal = make_signal(rule, seed=2, feedback=feedback)
    feedback_matrix = signal.feedback.numpy()
    assert feedback_matrix.shape == (K, C * H * W)
    low = 0 if feedback == "uniform" else -FEEDBACK_SCALE  # U[0, s) as specified, or U[-s, s)
    assert feedback_matrix.min() >= low and feedback_matrix.max() < FEEDBACK_SCALE
    if feedback == "centred":  # both signs, mean near 0 (K*C*H*W draws)
        assert feedback_matrix.min() < 0 < feedback_matrix.max()
        assert abs(feedback_matrix.mean()) < 0.1 * FEEDBACK_SCALE
    (grad,) = torch.autograd.grad(signal(a, y, logits), a)
    onehot = np.eye(K)[y.numpy()]
    e = softmax(logits.numpy()) - onehot if rule == "dfa" else onehot
    np.testing.assert_allclose(grad.reshape(len(y), -1).numpy(), e @ feedback_matrix, rtol=1e-10, atol=1e-20)


def test_dfa_trainer_sends_the_heads_error_to_every_block():
    trainer = tiny_trainer("dfa")
    captured = {}

    def capture(index):
        def hook(module, inputs, output):
            output.register_hook(lambda g: captured.__setitem__(index, g.clone()))

        return hook

    for i, block in enumerate(trainer.net.blocks):
        block.register_forward_hook(capture(i))
    x, y = tiny_batch()
    result = trainer.train_step(x, y)
    e = torch.softmax(result.logits, 1) - torch.nn.functional.one_hot(y, NUM_CLASSES)
    for i, signal in enumerate(trainer.signals):
        expected = (e @ signal.feedback).view_as(captured[i])
        torch.testing.assert_close(captured[i], expected)


EXPECTED_EXTRA = {
    "lls": lambda dims, k: 0,
    "lls-m": lambda dims, k: k * len(dims),
    "lls-mxm": lambda dims, k: k * k * len(dims),
    "local-classifier": lambda dims, k: k * sum(dims),
    "dfa": lambda dims, k: 0,
    "drtp": lambda dims, k: 0,
    "bp": lambda dims, k: 0,
}


@pytest.mark.parametrize("rule", lls.list_rules())
def test_extra_trainable_parameters(rule):
    # smallconv on 28 x 28: latent sizes 32*4*4, 64*2*2, 128*2*2 and the 512-wide dense block
    dims, k = [512, 256, 512, 512], 10
    r = lls.create_rule(rule)
    net = lls.create_model("smallconv", in_channels=1, input_size=28, num_classes=k, activation=r.activation)
    trainer = lls.Trainer(net, r, input_shape=(1, 28, 28))
    assert sum(trainer.extra_parameters()) == EXPECTED_EXTRA[rule](dims, k)


@pytest.mark.parametrize("basis", ["periodic", "square", "random"])
def test_lls_adds_nothing_to_the_checkpoint(basis):
    trainer = tiny_trainer("lls", basis=basis)
    assert sum(trainer.extra_parameters()) == 0
    assert all(state == {} for state in trainer.state_dict()["signals"])


def test_reduced_mxm_parameters():
    trainer = tiny_trainer("lls-mxm", reduced=3)
    assert trainer.extra_parameters() == [3 * NUM_CLASSES] * len(trainer.net.blocks)


def test_unknown_rule_and_option_errors():
    with pytest.raises(lls.LLSError, match="known rules: bp, dfa, drtp, lls"):
        lls.create_rule("hebbian")
    with pytest.raises(lls.LLSError, match="rule 'dfa' has no option 'basis'"):
        lls.create_rule("dfa", basis="square")
    with pytest.raises(lls.LLSError, match="unknown basis"):
        lls.create_rule("lls", basis="wavelet")


def test_drtp_builds_tanh_networks():
    assert lls.create_rule("drtp").activation == "tanh"
    trainer = tiny_trainer("drtp")
    assert any(isinstance(m, torch.nn.Tanh) for m in trainer.net.modules())


@pytest.mark.parametrize("size,pool", [(28, 4), (14, 2), (7, 2), (5, 3), (4, 4), (3, 1)])
def test_latent_is_adaptive_average_pooling_in_any_memory_format(size, pool):
    from lls.method.signals import latent

    a = torch.randn(3, 5, size, size + 1, dtype=torch.float64)
    expected = torch.nn.functional.adaptive_avg_pool2d(a, pool).flatten(1)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = a.contiguous(memory_format=layout).requires_grad_(True)
        z = latent(x, pool)
        torch.testing.assert_close(z, expected)
        weights = torch.randn_like(z)
        (grad,) = torch.autograd.grad((z * weights).sum(), x)
        (ref,) = torch.autograd.grad((latent(a.requires_grad_(True), pool) * weights).sum(), a)
        torch.testing.assert_close(grad, ref)


def test_unknown_feedback_kind_names_the_known_ones():
    with pytest.raises(lls.LLSError, match="known kinds: uniform, centred"):
        lls.create_rule("drtp", feedback="gaussian")


@pytest.mark.parametrize("width,pool", [(6, 12), (6, 3)])
def test_dense_latent_pooled_to_the_reference_length(width, pool):
    """adaptive_avg_pool1d of a dense output: 6 -> 12 repeats every unit, 6 -> 3 averages pairs
    (the authors' SmallConvL 1024 -> 2048 and VGG11 4096 -> 2048); the basis has the pooled length."""
    signal = lls.create_rule("lls", basis="periodic").signal(0, torch.Size((width,)), pool, 3).double()
    assert signal.dim == pool
    a = torch.randn(4, width, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    units = a.numpy()
    z = np.repeat(units, 2, axis=1) if pool > width else units.reshape(4, pool, 2).mean(axis=2)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    expected = reference_cross_entropy(z @ reference_basis("periodic", 3, pool).T / 0.5, y.numpy())
    assert signal(a, y).item() == pytest.approx(expected, rel=1e-10)


def test_random_basis_drawn_wide_and_pooled_as_the_reference():
    """readout_width=W: the K x W draw averaged down to d, so the same seed's K x 2d basis averaged
    over pairs of columns; its entries' std is 0.1 / sqrt(2) (the reference code's 0.071 at 1024)."""
    signal = make_signal("lls", basis="random", seed=5, readout_width=2 * D)
    wide = lls.basis(K, 2 * D, "random", seed=block_seed(5, 0), dtype=torch.float64).numpy()
    b = wide.reshape(K, D, 2).mean(axis=2)
    np.testing.assert_allclose(
        signal.readout_matrix(torch.zeros((), dtype=torch.float64)).numpy(), b, rtol=1e-12
    )
    big = lls.basis(10, 1024, "random", seed=1, width=2048)
    assert big.std().item() == pytest.approx(0.1 / np.sqrt(2), rel=0.03)  # 10240 entries: 1 % error
    assert torch.equal(lls.basis(10, 64, "random", seed=1, width=64), lls.basis(10, 64, "random", seed=1))


def test_local_classifier_trained_wide_and_pooled(batch):
    a, y = batch
    signal = make_signal("local-classifier", readout_width=3 * D)
    w = signal.classifier.detach().numpy()
    assert w.shape == (K, 3 * D) and w.std() == pytest.approx(0.1, rel=0.3)
    pooled = w.reshape(K, D, 3).mean(axis=2)
    expected = reference_cross_entropy(reference_latent(a.numpy(), POOL) @ pooled.T / 0.5, y.numpy())
    loss = signal(a, y)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert (signal.classifier.grad != 0).all()  # every one of the K x W entries is trained
    trainer = tiny_trainer("local-classifier", readout_width=64)
    assert trainer.extra_parameters() == [NUM_CLASSES * 64] * len(trainer.net.blocks)


def test_readout_width_is_for_the_random_basis_only():
    with pytest.raises(lls.LLSError, match="readout_width applies to drawn bases only"):
        lls.create_rule("lls-m", basis="square", readout_width=2048)
    with pytest.raises(lls.LLSError, match="readout_width must be >= 1"):
        lls.create_rule("lls", basis="random", readout_width=0)


# Each rule's extra parameters and fixed random tensors at initialisation (docs/method.md):
# (attribute of the block signal, distribution). None: the rule adds nothing.
INIT = {
    "bp": None,
    "lls": None,  # a fixed basis, regenerated, no parameter (entries tested in test_basis.py)
    "lls-m": ("modulation", "normal", 0.01),
    "lls-mxm": ("modulation", "normal", 0.01),
    "local-classifier": ("classifier", "normal", 0.1),
    "dfa": ("feedback", "uniform", 1e-4),
    "drtp": ("feedback", "uniform", 1e-4),
}


def test_every_rule_has_an_initialisation_scale():
    assert sorted(INIT) == lls.list_rules()


@pytest.mark.parametrize("rule", sorted(INIT))
def test_initialisation_scale(rule):
    """Thousands of draws, so a 5 % tolerance on the std is over 3 standard errors wide."""
    torch.manual_seed(0)
    classes, shape = 100, torch.Size((16, 4, 4))  # 100 x 100 LLS-MxM entries, 100 x 64 classifier ones
    r = lls.create_rule(rule)
    signal = r.signal(0, shape, 2, classes)
    expected = INIT[rule]
    if expected is None:
        assert signal is None or list(signal.parameters()) == []
        return
    name, law, scale = expected
    if rule == "lls-m":  # a K-vector: use many classes for a tight estimate
        signal = r.signal(0, shape, 2, 4000)
    values = getattr(signal, name).detach().double()
    assert values.numel() >= 4000
    if law == "normal":
        assert values.mean().item() == pytest.approx(0.0, abs=4 * scale / values.numel() ** 0.5)
        assert values.std().item() == pytest.approx(scale, rel=0.05)
    else:  # U[0, scale): all positive, as the reference draws them
        assert values.min().item() >= 0 and values.max().item() < scale
        assert values.mean().item() == pytest.approx(scale / 2, rel=0.05)
        assert values.std().item() == pytest.approx(scale / 12**0.5, rel=0.05)


@pytest.mark.parametrize("scale", [1e-9, 1e3])
def test_lls_latent_is_scale_free(batch, scale):
    """z = a / max(||a||, eps) with eps = 1e-12: a block whose activity is tiny (or huge) is scored
    as if it had unit norm; only an all-zero latent is left at zero (scores 0: loss log K)."""
    a, y = batch
    signal = make_signal("lls", basis="periodic")
    assert signal(a * scale, y).item() == pytest.approx(signal(a, y).item(), rel=1e-9)
    assert signal(torch.zeros_like(a), y).item() == pytest.approx(np.log(K), rel=1e-12)


def test_lls_loss_gradient_matches_its_formula(batch):
    """d loss / d z for loss = CE((z / |z|) @ B^T / T, y), written out by hand:
    g_u = (softmax(u) - onehot) / N, g_zhat = g_u @ B / T, g_z = (g_zhat - zhat <zhat, g_zhat>) / |z|."""
    _, y = batch
    signal = make_signal("lls", basis="periodic", temperature=0.25)
    z = torch.randn(len(y), D, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(signal.latent_loss(z, y), z)
    zn = z.detach().numpy()
    norm = np.linalg.norm(zn, axis=1, keepdims=True)
    b = reference_basis("periodic", K, D)
    u = (zn / norm) @ b.T / 0.25
    g_u = (softmax(u) - np.eye(K)[y.numpy()]) / len(y)
    g_hat = g_u @ b / 0.25
    zhat = zn / norm
    expected = (g_hat - zhat * (zhat * g_hat).sum(axis=1, keepdims=True)) / norm
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-9, atol=1e-15)


def test_dfa_feedback_is_a_fixed_signal_not_a_path_into_the_head():
    """DFA's error e = softmax(logits) - onehot is sent to the blocks as a constant: the local loss
    has no gradient with respect to the logits (the head learns from its own cross-entropy only)."""
    signal = lls.create_rule("dfa").signal(0, torch.Size((6,)), None, 3)
    a = torch.randn(4, 6, requires_grad=True)
    logits = torch.randn(4, 3, requires_grad=True)
    loss = signal(a, torch.tensor([0, 1, 2, 0]), logits)
    assert torch.autograd.grad(loss, logits, allow_unused=True)[0] is None
    with pytest.raises(ValueError, match="DFA's signal needs the head's logits"):
        signal(a, torch.tensor([0, 1, 2, 0]))


def test_signal_refuses_a_latent_of_another_size(batch):
    _, y = batch
    signal = make_signal("lls")
    with pytest.raises(
        lls.LLSError, match=f"block output has latent size {2 * D}, its signal was built for {D}"
    ):
        signal.latent_loss(torch.randn(len(y), 2 * D, dtype=torch.float64), y)


def test_a_reduced_basis_needs_the_matrix_modulation():
    from lls.method.signals import ProjectionSignal

    with pytest.raises(ValueError, match=r"^a reduced basis \(rows != classes\) needs a matrix modulation$"):
        ProjectionSignal(5, (8,), None, basis="square", temperature=0.5, rows=3, modulation="vector")
    signal = ProjectionSignal(5, (8,), None, basis="square", temperature=0.5, rows=5)
    assert signal.rows == 5 and signal.modulation is None and signal.classifier is None
    drawn = ProjectionSignal(5, (8,), None, basis="random", temperature=0.5, width=8)
    assert drawn.width is None  # a width equal to d draws K x d directly
    assert torch.equal(
        drawn.basis, lls.basis(5, 8, "random", seed=0, dtype=torch.float64)
    )  # seed 0 by default


def test_block_seeds_differ_between_blocks_and_runs():
    seeds = {block_seed(seed, index) for seed in range(3) for index in range(20)}
    assert len(seeds) == 60
    trainer = tiny_trainer("lls", basis="random", seed=4)
    bases = [s.readout_matrix(torch.zeros(())) for s in trainer.signals]
    assert trainer.signals[1].seed == block_seed(4, 1)
    assert not torch.equal(bases[0][:, :4], bases[1][:, :4])  # every block its own draw


def test_latent_of_flat_and_unpooled_outputs():
    from lls.method.signals import latent, latent_dim

    a = torch.randn(2, 3, 4, 4)
    assert torch.equal(latent(a, None), a.flatten(1))
    assert latent_dim(torch.Size((3, 4, 4)), None) == 48 and latent_dim(torch.Size((3, 4, 4)), 2) == 12
    assert latent_dim(torch.Size((6,)), 12) == 12 and latent_dim(torch.Size((6,)), None) == 6
    flat = torch.randn(2, 6)
    assert latent(flat, 6) is flat
    video = torch.randn(2, 3, 2, 2, 2)  # neither dense nor a map: taken as it is
    assert torch.equal(latent(video, 2), video.flatten(1))
    one_channel = torch.randn(2, 1, 6, 6).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        latent(one_channel, 3), torch.nn.functional.adaptive_avg_pool2d(one_channel, 3).flatten(1)
    )


def test_rule_configs_and_specs():
    from lls.method.rules import parse_rule_spec, rule_options, seeded_options

    assert lls.create_rule("lls", basis="periodic").config() == {
        "name": "lls",
        "basis": "periodic",
        "temperature": 0.5,
        "seed": 0,
        "readout_width": None,
    }
    assert parse_rule_spec("lls:basis=periodic,temperature=0.25") == (
        "lls",
        {"basis": "periodic", "temperature": 0.25},
    )
    assert parse_rule_spec("lls-mxm:reduced=3") == ("lls-mxm", {"reduced": 3})
    assert parse_rule_spec("bp") == ("bp", {})
    for bad in ("lls:basis", "lls:=3"):
        with pytest.raises(lls.LLSError, match=r"key=value pairs after a colon \(lls:basis=periodic\)"):
            parse_rule_spec(bad)
    with pytest.raises(lls.LLSError, match="rule 'bp' has no option 'seed'; it takes no options"):
        parse_rule_spec("bp:seed=1")
    assert seeded_options("dfa", {}, 9) == {"seed": 9}
    assert seeded_options("lls", {"seed": 2}, 9) == {"seed": 2}  # an explicit seed wins
    assert seeded_options("local-classifier", {"temperature": 1.0}, 9) == {"temperature": 1.0}
    options = rule_options()
    field, declared_by, rules = options["temperature"]
    assert field.name == "temperature" and set(rules) == {"lls", "lls-m", "lls-mxm", "local-classifier"}
    assert options["reduced"][2] == ["lls-mxm"] and options["feedback"][2] == ["dfa", "drtp"]
    assert declared_by.name in rules


def test_reduced_rows_cannot_exceed_the_classes():
    rule = lls.create_rule("lls-mxm", reduced=6)
    with pytest.raises(lls.LLSError, match=r"reduced \(6\) must not exceed the number of classes \(5\)"):
        rule.signal(0, torch.Size((8,)), None, 5)
    assert rule.signal(0, torch.Size((8,)), None, 6).modulation.shape == (6, 6)


def test_timings_and_activations_of_the_rules():
    timing = {name: lls.create_rule(name).timing for name in lls.list_rules()}
    assert timing == {
        "bp": "end-to-end",
        "dfa": "head",
        "drtp": "block",
        "lls": "block",
        "lls-m": "block",
        "lls-mxm": "block",
        "local-classifier": "block",
    }
    assert {n for n in lls.list_rules() if lls.create_rule(n).activation != "leaky_relu"} == {"drtp"}
    assert lls.create_rule("drtp").signal(0, torch.Size((4,)), None, 3).use_error is False
    assert lls.create_rule("dfa").signal(0, torch.Size((4,)), None, 3).use_error is True
    assert lls.create_rule("bp").signal(0, torch.Size((4,)), None, 3) is None


def test_scores_are_the_normalised_latent_against_the_basis(batch):
    """What a block's basis readout predicts from: s = (z / |z|) @ B^T, before the temperature."""
    a, _ = batch
    signal = make_signal("lls", basis="periodic")
    z = reference_latent(a.numpy(), POOL)
    expected = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ reference_basis("periodic", K, D).T
    np.testing.assert_allclose(signal.scores(a).detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def test_what_each_signal_offers_readouts_and_costs():
    """The basis readout predicts argmax of the scores; the class patterns are the basis itself where
    it has one row per class; DFA's projection costs K x (size of the block output) multiply-adds."""
    a = torch.randn(5, C, H, W, dtype=torch.float64)
    lls_signal = make_signal("lls", basis="periodic")
    assert torch.equal(lls_signal.predict(a), lls_signal.scores(a).argmax(1))
    torch.testing.assert_close(lls_signal.class_patterns(), torch.tensor(reference_basis("periodic", K, D)))
    assert make_signal("lls-mxm", reduced=3).class_patterns() is None
    assert make_signal("local-classifier").class_patterns() is None
    dfa = make_signal("dfa")
    assert dfa.class_patterns() is None
    assert dfa.ops(torch.Size((C, H, W))) == (K * C * H * W, K * C * H * W)
    with pytest.raises(lls.LLSError, match=r"^FeedbackSignal has no readout of its own; read its blocks"):
        dfa.predict(a)
    with pytest.raises(lls.LLSError, match=r"^BlockSignal does not say what its signal costs"):
        lls.BlockSignal().ops(torch.Size((C, H, W)))


def test_option_errors_name_the_rule_and_the_fix(monkeypatch):
    """Whole messages, as the user reads them on the command line."""
    from lls.method.basis import BASIS_KINDS, register_basis
    from lls.method.rules import parse_rule_spec

    cases = [
        (dict(name="lls", temperature=0), "rule 'lls': temperature must be > 0, got 0"),
        (dict(name="dfa", seed=-1), "rule 'dfa': seed must be >= 0, got -1"),
        (
            dict(name="lls", foo=1),
            "rule 'lls' has no option 'foo'; its options: basis, temperature, seed, readout_width",
        ),
        (
            dict(name="lls-m", basis="square", readout_width=2048),
            "rule 'lls-m': readout_width applies to drawn bases only (random), not 'square'; "
            "drop it or use one of those",
        ),
    ]
    for options, message in cases:
        with pytest.raises(lls.LLSError) as error:
            lls.create_rule(options.pop("name"), **options)
        assert str(error.value) == message
    with pytest.raises(lls.LLSError) as error:
        lls.create_rule("lls-mxm", reduced=6).signal(0, torch.Size((8,)), None, 5)
    assert str(error.value) == (
        "reduced (6) must not exceed the number of classes (5): "
        "it is how many basis rows the K x K mixing is reduced to"
    )
    monkeypatch.setattr(BASIS_KINDS, "_entries", dict(BASIS_KINDS._entries))  # undone after the test
    register_basis("gaussian", "a second drawn kind", drawn=True)(lambda k, d, seed, width: torch.zeros(k, d))
    with pytest.raises(lls.LLSError, match=r"drawn bases only \(gaussian, random\), not 'square'; drop it"):
        lls.create_rule("lls", basis="square", readout_width=2048)
    with pytest.raises(lls.LLSError, match="unknown basis 'x=y'"):  # the value is all after the first '='
        parse_rule_spec("lls:basis=x=y")


def test_a_rule_declared_with_the_shared_helpers_is_a_rule_like_the_built_in_ones(monkeypatch):
    """A new rule is one ``register_rule`` class whose seed and readout width are declared with the
    helpers the built-in rules use: it gets their defaults, help, bounds and command-line exposure,
    is created by name, and takes its place in the comparison after BP whatever its name."""
    from lls.method.rules import (
        LLS,
        RULES,
        Rule,
        comparison_rules,
        readout_width_option,
        register_rule,
        seed_option,
    )

    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))  # undone after the test

    @register_rule("a-probe")  # sorts before "bp" by name
    @dataclasses.dataclass
    class Probe(Rule):
        label: ClassVar[str] = "Probe"
        seed: int = seed_option()
        readout_width: int | None = readout_width_option("the random basis is drawn")

        def signal(self, index, out_shape, pool, num_classes):
            return None

    assert Probe.name == "a-probe" and RULES.get("a-probe") is Probe
    assert lls.create_rule("a-probe").config() == {"name": "a-probe", "seed": 0, "readout_width": None}
    declared = {f.name: (f.default, dict(f.metadata)) for f in dataclasses.fields(Probe)}
    built_in = {f.name: (f.default, dict(f.metadata)) for f in dataclasses.fields(LLS)}  # made at import
    assert declared == {name: built_in[name] for name in ("seed", "readout_width")}
    assert declared["seed"][1]["cli"] is False  # the run's --seed sets it
    assert lls.create_rule("a-probe", seed=2**63 - 1, readout_width=1).seed == 2**63 - 1
    for options, problem in [
        ({"seed": 2**63}, f"seed must be <= {2**63 - 1}, got {2**63}"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"readout_width": 0}, "readout_width must be >= 1, got 0"),
    ]:
        with pytest.raises(lls.LLSError) as error:
            lls.create_rule("a-probe", **options)
        assert str(error.value) == f"rule 'a-probe': {problem}"
    rows = comparison_rules()
    assert rows[0] == ("bp", {}) and ("a-probe", {}) in rows


def test_the_readout_a_block_is_reported_under():
    for kind in lls.BASIS_KINDS:
        assert make_signal("lls", basis=kind).readout == lls.BASIS_KINDS.get(kind).readout == "basis"
    assert make_signal("local-classifier").readout == "learned classifier"


def test_projection_costs_by_hand():
    """Per sample, on a flat 8-wide output (no pooling), K = 4 classes: normalisation 5d multiplies and
    3d - 1 additions; scoring 2 K d multiply-adds (additions only for signs); a learned classifier
    3 K d multiply-adds; modulation 3 K (vector) or 3 R K (matrix) multiply-adds."""
    d, shape = 8, torch.Size((8,))

    def signal(rule, **options):
        return lls.create_rule(rule, **options).signal(0, shape, None, K)

    assert signal("local-classifier").ops(shape) == (3 * K * d, 3 * K * d)
    assert signal("lls-m", basis="square").ops(shape) == (5 * d + 3 * K, 3 * d - 1 + 2 * K * d + 3 * K)
    mxm = signal("lls-mxm", basis="periodic", reduced=3).ops(shape)
    assert mxm == (5 * d + 2 * 3 * d + 3 * 3 * K, 3 * d - 1 + 2 * 3 * d + 3 * 3 * K)


def test_feedback_matrices_are_rebuilt_from_their_seed_alone():
    """Not in the state dict, so a resumed run rebuilds them: from the seed, whatever the global
    generator did before; drawn from U[0, 1e-4) unless asked otherwise; DFA without logits is refused."""
    from lls.method.signals import FeedbackSignal

    torch.manual_seed(1)
    first = FeedbackSignal(K, torch.Size((3, 5)), use_error=True, seed=7)
    torch.rand(100)
    again = FeedbackSignal(K, torch.Size((3, 5)), use_error=True, seed=7)
    assert torch.equal(first.feedback, again.feedback) and first.state_dict() == {}
    assert first.feedback.min() >= 0 and first.feedback.max() < FEEDBACK_SCALE
    assert not torch.equal(
        first.feedback, FeedbackSignal(K, torch.Size((3, 5)), use_error=True, seed=8).feedback
    )
    with pytest.raises(ValueError, match=r"^DFA's signal needs the head's logits$"):
        first(torch.randn(2, 3, 5), torch.tensor([0, 1]))


def test_block_seeds_are_fixed_by_the_run_seed_and_the_block_index():
    # A checkpoint holds no basis and no feedback matrix: resuming rebuilds them from these seeds, so
    # the formula is part of every saved run (changing it silently changes a resumed run's tensors).
    assert [block_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert [block_seed(2, i) for i in range(3)] == [200_006, 200_007, 200_008]
