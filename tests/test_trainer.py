"""The block-local training step: locality, BP equivalence, evaluation procedure, determinism."""

import copy

import pytest
import schedulefree
import torch
import torch.nn.functional as F

import lls
from lls.step.optim import is_schedule_free

from .conftest import TINY_INPUT, tiny_batch, tiny_net, tiny_trainer

LOCAL_RULES = [r for r in lls.list_rules() if r != "bp"]


def record_gradient_flow(trainer: lls.Trainer) -> list[tuple[int, int]]:
    """(update index, block index) for every parameter gradient autograd computes in one step.

    Update index l < L is block l's own signal, L is the head's loss. The head counts as block L.
    """
    owners = {}
    for i, block in enumerate(trainer.net.blocks):
        for p in block.parameters():
            owners[p] = i
    for p in trainer.net.head.parameters():
        owners[p] = len(trainer.net.blocks)
    current = {"update": None}
    flow = []
    for p, owner in owners.items():
        p.register_hook(lambda g, owner=owner: flow.append((current["update"], owner)))
    original = trainer.step.update

    def update(index, loss):
        current["update"] = index
        return original(index, loss)

    trainer.step.update = update  # the step the trainer issues
    if trainer.rule.timing == "end-to-end":
        current["update"] = "end-to-end"
    return flow


@pytest.mark.parametrize("rule", LOCAL_RULES)
def test_no_gradient_crosses_a_block(rule):
    trainer = tiny_trainer(rule)
    flow = record_gradient_flow(trainer)
    trainer.train_step(*tiny_batch())
    assert flow, "no gradient was computed at all"
    crossing = [(update, owner) for update, owner in flow if update != owner]
    assert crossing == []
    assert {owner for _, owner in flow} == set(range(len(trainer.net.blocks) + 1))  # everyone learns


def test_bp_gradients_do_cross_blocks():
    """The same probe sees BP's single backward pass reach every block: the probe can fail."""
    trainer = tiny_trainer("bp")
    flow = record_gradient_flow(trainer)
    trainer.train_step(*tiny_batch())
    assert {owner for _, owner in flow} == set(range(len(trainer.net.blocks) + 1))
    assert {update for update, _ in flow} == {"end-to-end"}


@pytest.mark.parametrize("optimizer", ["adamw-sf", "sgd", "adam"])
def test_bp_matches_a_plain_pytorch_loop(optimizer):
    steps = 4
    trainer = lls.Trainer(tiny_net(seed=3), "bp", input_shape=TINY_INPUT, optimizer=optimizer, lr=1e-2)
    net = tiny_net(seed=3)
    params = list(net.parameters())
    opt = {
        "adamw-sf": lambda: schedulefree.AdamWScheduleFree(params, lr=1e-2),
        "sgd": lambda: torch.optim.SGD(params, lr=1e-2, momentum=0.9),
        "adam": lambda: torch.optim.Adam(params, lr=1e-2),
    }[optimizer]()
    if optimizer == "adamw-sf":
        opt.train()
    net.train()
    for step in range(steps):
        x, y = tiny_batch(seed=10 + step)
        trainer.train_step(x, y)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    for (name, mine), theirs in zip(trainer.net.state_dict().items(), net.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_local_step_uses_pre_update_outputs_downstream():
    """Block l+1 learns from the output block l produced *before* its own update on this batch."""
    trainer = tiny_trainer("lls")
    seen = []
    trainer.net.blocks[1].register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    x, y = tiny_batch()
    before = [p.clone() for p in trainer.net.blocks[0].parameters()]
    trainer.train_step(x, y)
    frozen = tiny_net()
    frozen.load_state_dict(trainer.net.state_dict())
    with torch.no_grad():
        for p, old in zip(frozen.blocks[0].parameters(), before, strict=True):
            p.copy_(old)
        frozen.train()
        expected = frozen.between[0](frozen.blocks[0](x))
    torch.testing.assert_close(seen[0], expected)


def test_evaluation_swaps_in_averaged_weights_and_refreshes_batchnorm():
    trainer = tiny_trainer("lls")
    for step in range(3):
        trainer.train_step(*tiny_batch(seed=step))
    train_weights = [p.clone() for p in trainer.net.parameters()]
    bn = trainer.net.blocks[0][1]
    stats_before = bn.running_mean.clone()
    with trainer.evaluation(refresh=[tiny_batch(seed=99)]) as net:
        assert not net.training
        # schedule-free eval weights x = y moved back towards z: not the training weights y
        assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), train_weights, strict=True))
        assert not torch.equal(bn.running_mean, stats_before)  # refreshed on the given batch
        for opt in trainer.optimizers:
            assert not opt.param_groups[0]["train_mode"]
    assert trainer.net.training
    for opt in trainer.optimizers:
        assert opt.param_groups[0]["train_mode"]
    for p, q in zip(trainer.net.parameters(), train_weights, strict=True):
        torch.testing.assert_close(p, q)  # back to the training weights (up to lerp rounding)


def test_evaluate_counts_accuracy():
    trainer = tiny_trainer("lls")
    x, y = tiny_batch(n=40)
    result = trainer.evaluate([(x[:25], y[:25]), (x[25:], y[25:])])
    loss, accuracy = result.loss, result.accuracy
    with trainer.evaluation() as net, torch.no_grad():
        logits = net(x)
    assert accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


@pytest.mark.parametrize("rule", lls.list_rules())
def test_same_seed_same_weights(rule):
    def run(seed):
        trainer = tiny_trainer(rule, seed=seed)
        for step in range(3):
            trainer.train_step(*tiny_batch(seed=step))
        return torch.cat([p.flatten() for p in trainer.net.parameters()])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_between_ops_must_be_fixed():
    net = tiny_net()
    net.between[0] = torch.nn.Linear(2, 2)
    with pytest.raises(lls.LLSError, match="has trainable parameters"):
        lls.Trainer(net, "lls", input_shape=TINY_INPUT)


def test_user_network_of_plain_modules():
    """Any list of nn.Module blocks + fixed ops + head trains with any rule."""
    torch.manual_seed(0)
    blocks = [
        torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Linear(4 * 4 * 4, 16), torch.nn.ReLU()),
    ]
    between = [torch.nn.Sequential(torch.nn.MaxPool2d(2), torch.nn.Flatten()), None]
    net = lls.LocalNet(blocks, torch.nn.Linear(16, 3), between, latent_pool=[2, None])
    trainer = lls.Trainer(net, "lls-m", input_shape=(1, 8, 8))
    assert trainer.extra_parameters() == [3, 3]
    result = trainer.train_step(torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert result.block_losses.shape == (2,) and torch.isfinite(result.block_losses).all()


def test_network_that_rejects_the_input_shape():
    with pytest.raises(lls.LLSError, match="does not accept inputs of shape"):
        lls.Trainer(tiny_net(), "lls", input_shape=(3, 8, 8))


@pytest.mark.parametrize("rule", LOCAL_RULES)
def test_one_optimizer_per_block_for_every_local_rule(rule):
    """Block l's optimizer holds block l's parameters and its signal's, nothing else, and steps
    once per training step: schedule-free AdamW's step count k (its averaging weights depend on it)
    would run L + 1 times faster with one optimizer shared by all blocks."""
    trainer = tiny_trainer(rule)
    blocks = len(trainer.net.blocks)
    assert len(trainer.optimizers) == blocks + 1
    assert len({id(o) for o in trainer.optimizers}) == blocks + 1
    owned = [{id(p) for p in block.parameters()} for block in trainer.net.blocks]
    for i, signal in enumerate(trainer.signals):
        owned[i] |= {id(p) for p in signal.parameters()}
    owned.append({id(p) for p in trainer.net.head.parameters()})
    for i, optimizer in enumerate(trainer.optimizers):
        held = [id(p) for group in optimizer.param_groups for p in group["params"]]
        assert len(held) == len(set(held)) and set(held) == owned[i], f"optimizer {i}"
    steps = 3
    for step in range(steps):
        trainer.train_step(*tiny_batch(seed=step))
    assert [o.param_groups[0]["k"] for o in trainer.optimizers] == [steps] * (blocks + 1)


def test_fit_refreshes_batchnorm_on_50_training_batches(digits):
    """docs/method.md, "The evaluation procedure": before each evaluation, 50 training batches
    forwarded in train mode without gradients. Counted at the first block: train mode without
    gradients is the refresh."""
    from lls.method.net import build

    from .conftest import TINY_SPECS

    torch.manual_seed(0)
    net = build(TINY_SPECS, digits.input_shape, digits.num_classes)
    trainer = lls.Trainer(net, "lls", input_shape=digits.input_shape)
    loaders = lls.Loaders.for_dataset(digits, batch_size=4, limit=240)  # 60 training batches
    calls = []
    net.blocks[0].register_forward_pre_hook(
        lambda module, inputs: calls.append((module.training, torch.is_grad_enabled(), len(inputs[0])))
    )
    lls.fit(trainer, loaders, 1, progress=False)
    training = [c for c in calls if c[0] and c[1]]
    refresh = [c for c in calls if c[0] and not c[1]]
    assert len(training) == 60 and len(refresh) == 50
    assert all(n == 4 for _, _, n in refresh)  # training batches, at the training batch size


@pytest.mark.parametrize("pool", [16, 4])
def test_basis_readout_of_a_pooled_dense_latent(pool):
    """A dense block's own accuracy scores its pooled latent (8 units -> 16 repeats, -> 4 averages
    pairs) against the basis of the pooled length, as its training signal does."""
    from lls.method.net import AvgPool, Conv, Dense, MaxPool, build

    from .conftest import NUM_CLASSES

    torch.manual_seed(0)
    specs = (Conv(4, pool=2), MaxPool(), Conv(6, pool=1), AvgPool(2), Dense(8, pool=pool))
    net = build(specs, TINY_INPUT, NUM_CLASSES)
    trainer = lls.Trainer(net, lls.create_rule("lls", basis="periodic"), input_shape=TINY_INPUT)
    assert trainer.signals[-1].dim == pool
    for step in range(2):
        trainer.train_step(*tiny_batch(seed=step))
    x, y = tiny_batch(n=64, seed=7)
    result = trainer.evaluate([(x, y)], blocks=True)
    with trainer.evaluation() as evaluated, torch.no_grad():
        *outputs, _ = evaluated.walk(x)
        a = outputs[-1][1].double()
    z = a.repeat_interleave(2, dim=1) if pool > 8 else a.view(len(a), pool, 2).mean(2)
    t = torch.arange(pool, dtype=torch.float64)
    b = torch.sin(torch.linspace(50, 512, NUM_CLASSES, dtype=torch.float64)[:, None] * t)
    expected = ((F.normalize(z, dim=1) @ b.T).argmax(1) == y).double().mean().item()
    assert result.block_accuracy[-1] == pytest.approx(expected)


def test_every_optimizer_gets_the_learning_rate_and_weight_decay():
    """The paper's recipe by default (schedule-free AdamW, lr 5e-3, no decay, LLS with the square
    basis); what is asked for otherwise reaches every block's optimizer and the head's."""
    trainer = lls.Trainer(tiny_net(), input_shape=TINY_INPUT)
    assert trainer.rule.name == "lls" and trainer.rule.basis == "square" and trainer.lr == 5e-3
    for optimizer in trainer.optimizers:
        assert is_schedule_free(optimizer)
        assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (5e-3, 0.0)
    trainer = lls.Trainer(
        tiny_net(), "dfa", input_shape=TINY_INPUT, optimizer="sgd", lr=0.1, weight_decay=0.2
    )
    assert trainer.lr == 0.1
    assert all(
        isinstance(o, torch.optim.SGD) and (o.defaults["lr"], o.defaults["weight_decay"]) == (0.1, 0.2)
        for o in trainer.optimizers
    )
    made = []

    def factory(params, lr, weight_decay):
        made.append((len(params), lr, weight_decay))
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)

    trainer = lls.Trainer(
        tiny_net(), "lls-m", input_shape=TINY_INPUT, optimizer=factory, lr=0.3, weight_decay=0.4
    )
    # first tried on one throw-away parameter when the trainer is made (checks.py's probe), then
    # three blocks: weight, bias, two BatchNorm parameters and LLS-M's vector; head: weight, bias
    assert made == [(1, 1e-3, 0.4)] + [(5, 0.3, 0.4)] * 3 + [(2, 0.3, 0.4)]


def test_a_step_reports_the_heads_loss_on_its_training_mode_logits():
    trainer = tiny_trainer("lls")
    x, y = tiny_batch()
    seen = []
    trainer.net.head.register_forward_hook(lambda m, i, out: seen.append(out.detach().clone()))
    result = trainer.train_step(x, y)
    assert trainer.batch_size_in_step == len(y)
    torch.testing.assert_close(result.logits, seen[0])
    torch.testing.assert_close(result.loss, F.cross_entropy(seen[0], y))
    assert result.block_losses.shape == (len(trainer.net.blocks),) and not result.loss.requires_grad
    bp = tiny_trainer("bp").train_step(x, y)
    assert bp.block_losses.shape == (0,)
    torch.testing.assert_close(bp.loss, F.cross_entropy(bp.logits, y))


@pytest.mark.parametrize("rule", ["lls", "bp"])
def test_gradients_are_synchronised_once_per_optimizer_per_step(rule):
    trainer = tiny_trainer(rule)
    synced = []
    trainer.sync_gradients = lambda optimizer: synced.append(trainer.optimizers.index(optimizer))
    trainer.train_step(*tiny_batch())
    assert sorted(synced) == list(range(len(trainer.optimizers)))


def test_a_checkpoint_resumes_training_exactly():
    trainer = tiny_trainer("lls-m")
    for step in range(2):
        trainer.train_step(*tiny_batch(seed=step))
    state = copy.deepcopy(trainer.state_dict())  # as written to a checkpoint: no tensor shared
    resumed = tiny_trainer("lls-m", seed=5)
    resumed.load_state_dict(state)
    for t in (trainer, resumed):
        t.train_step(*tiny_batch(seed=7))
    for p, q in zip(trainer.net.parameters(), resumed.net.parameters(), strict=True):
        assert torch.equal(p, q)
    for s, r in zip(trainer.signals, resumed.signals, strict=True):
        assert torch.equal(s.modulation, r.modulation)


def test_errors_name_the_problem():
    net = tiny_net()
    with pytest.raises(
        lls.LLSError, match="--memory slices one block's step at a time and bp back-propagates"
    ):
        lls.Trainer(net, "bp", input_shape=TINY_INPUT, memory="low")
    with pytest.raises(lls.LLSError, match="evaluation got no batches"):
        tiny_trainer("lls").evaluate([])
    dfa = tiny_trainer("dfa")
    x, y = tiny_batch()
    with pytest.raises(ValueError, match="rule dfa needs the head's output for every block"):
        dfa.local_pass(x, y, dfa.update, range(0, 1))
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8)), torch.nn.ReLU()]
    plain = lls.LocalNet(blocks, torch.nn.Linear(8, 3), [None, None], latent_pool=[None, None])
    with pytest.raises(lls.LLSError, match="block 1 has no trainable parameters; merge it into a neighbour"):
        lls.Trainer(plain, "lls", input_shape=TINY_INPUT)
    headless = lls.LocalNet(blocks[:1], torch.nn.ReLU(), [None], latent_pool=[None])
    with pytest.raises(lls.LLSError, match=r"cannot tell the number of classes: the head has no nn\.Linear"):
        lls.Trainer(headless, "lls", input_shape=TINY_INPUT)


def test_the_class_count_comes_from_the_heads_last_linear_layer():
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    block = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8))
    net = lls.LocalNet([block], head, [None], latent_pool=[None])
    trainer = lls.Trainer(net, "lls", input_shape=TINY_INPUT)
    assert trainer.num_classes == 4 and trainer.signals[0].num_classes == 4


def test_build_trainer_from_a_dataset_or_a_shape():
    from .conftest import NUM_CLASSES, TINY_SPECS

    data = type("Data", (), {"input_shape": TINY_INPUT, "num_classes": NUM_CLASSES})()
    a = lls.build_trainer(TINY_SPECS, "dfa", data, seed=3)
    b = lls.build_trainer(TINY_SPECS, "dfa", TINY_INPUT, NUM_CLASSES, seed=3)
    assert a.input_shape == b.input_shape == TINY_INPUT and a.num_classes == NUM_CLASSES
    for p, q in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(p, q)  # the seed decides the weights
    assert a.rule.seed == 3 and torch.equal(a.signals[0].feedback, b.signals[0].feedback)  # and the feedback
    assert torch.equal(
        lls.build_trainer(TINY_SPECS, "lls-m", TINY_INPUT, NUM_CLASSES, seed=3).signals[0].modulation,
        lls.build_trainer(TINY_SPECS, "lls-m", TINY_INPUT, NUM_CLASSES, seed=3).signals[0].modulation,
    )
    with pytest.raises(lls.LLSError, match="data must be a dataset, or an input shape"):
        lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT)
    with pytest.raises(lls.LLSError, match="rule_options go with a rule name"):
        lls.build_trainer(
            TINY_SPECS, lls.create_rule("lls"), TINY_INPUT, NUM_CLASSES, rule_options={"basis": "square"}
        )
    rule = lls.create_rule("lls", basis="periodic")
    trainer = lls.build_trainer(
        TINY_SPECS, rule, TINY_INPUT, NUM_CLASSES, channels_last=True, lr=0.01, optimizer="adam"
    )
    assert trainer.rule is rule and trainer.lr == 0.01 and isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert trainer.net.blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert isinstance(
        lls.build_trainer(TINY_SPECS, "drtp", TINY_INPUT, NUM_CLASSES).net.blocks[0][-1], torch.nn.Tanh
    )
    low = lls.build_trainer(TINY_SPECS, "lls", TINY_INPUT, NUM_CLASSES, memory="low", weight_decay=0.5)
    assert low.memory == "low" and low.low_memory is not None
    assert low.optimizers[0].defaults["weight_decay"] == 0.5


def test_bp_has_no_extra_parameters_and_no_signals():
    trainer = tiny_trainer("bp")
    assert trainer.signals == [] and trainer.extra_parameters() == [0, 0, 0]
    assert trainer.state_dict()["signals"] == []


def test_a_checkpoint_of_another_network_is_refused():
    trainer = tiny_trainer("lls-m")
    state = copy.deepcopy(trainer.state_dict())
    state["signals"] = state["signals"][:-1]  # one block fewer
    with pytest.raises(ValueError):
        tiny_trainer("lls-m").load_state_dict(state)
