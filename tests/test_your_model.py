"""Your model in, your model out: lls.localize on models torch.fx cannot trace (run-time module
calls: Hugging Face models, control flow, tuple outputs, integer inputs), your module given the
evaluated weights back (trainer.evaluated_state_dict), trainer.evaluation() undone bit for bit, and
lls.save_run writing a run directory the commands read."""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lls

SHAPE, CLASSES = (1, 12, 12), 4


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return torch.relu(x + self.body(x))


class SmallResNet(nn.Module):
    """A user's model: named children, skip connections inside its stages, BatchNorm."""

    def __init__(self, classes: int = CLASSES, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = nn.Sequential(Residual(width))
        self.layer2 = nn.Sequential(Residual(width))
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def data(n: int = 48, batch: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
    train = DataLoader(
        TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    return train, DataLoader(TensorDataset(x, y), batch_size=n)


def trained(rule: str = "lls", epochs: int = 1):
    torch.manual_seed(0)
    model = SmallResNet()
    net = lls.localize(model, ["layer1", "layer2"], input_shape=SHAPE)
    trainer = lls.Trainer(net, rule)
    train, test = data()
    history = lls.fit(trainer, train, epochs=epochs, test=test, progress=False)
    return model, trainer, history, train, test


def equal_states(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(equal_states(p, q) for p, q in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_your_module_gets_the_evaluated_weights_and_gives_fits_test_accuracy():
    model, trainer, history, _, test = trained()
    record = history.records[-1]
    ((x, y),) = list(test)

    def measured(module):
        module.eval()
        with torch.no_grad():
            logits = module(x)
        return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()

    # the module as training left it holds the schedule-free training weights: not the model evaluated
    assert measured(copy.deepcopy(model))[0] != pytest.approx(record.test_loss, abs=1e-6)
    model.load_state_dict(trainer.evaluated_state_dict())  # keyed as the model: strict load
    loss, accuracy = measured(model)
    assert loss == pytest.approx(record.test_loss, abs=1e-6)
    assert accuracy == pytest.approx(record.test_accuracy, abs=1e-6)


def test_evaluated_state_dict_refuses_stale_statistics_and_refreshes_on_batches():
    model, trainer, _, train, _ = trained()
    x, y = next(iter(train))
    trainer.train_step(x, y)
    with pytest.raises(lls.LLSError, match=r"trained 1 step.* give refresh="):
        trainer.evaluated_state_dict()
    before = copy.deepcopy(trainer.state_dict())
    state = trainer.evaluated_state_dict(refresh=train)
    assert equal_states(before, trainer.state_dict())  # the trainer is left as it was
    # the refreshed statistics are those of the averaged weights on the training batches
    stats = state["stem.1.running_mean"]
    assert not torch.equal(stats, model.stem[1].running_mean)


def test_evaluation_puts_back_everything_it_changed_bit_for_bit():
    model, trainer, _, train, test = trained()
    x, y = next(iter(train))
    trainer.train_step(x, y)  # the network's statistics are now training's, not an evaluation's
    before = copy.deepcopy(trainer.state_dict())
    modes = [m.training for m in trainer.net.modules()]
    with trainer.evaluation(train) as net:
        assert not net.training
        net(next(iter(test))[0])
        changed = not torch.equal(model.stem[1].running_mean, before["net"]["blocks.0.0.stem.1.running_mean"])
    assert changed  # the refresh did change the statistics inside
    assert equal_states(
        before, trainer.state_dict()
    )  # weights, running stats, num_batches_tracked, optimizers
    assert [m.training for m in trainer.net.modules()] == modes
    trainer.train_step(x, y)  # and training goes on


# --- models torch.fx cannot trace -----------------------------------------------------------------


def logits(output):
    return output if isinstance(output, torch.Tensor) else output["logits"]


def check_localized(model: nn.Module, net: lls.LocalNet, x: torch.Tensor, classes: int = CLASSES) -> None:
    """The three things a localized model must do: compute the model's forward; let no gradient
    cross from a block to another (autograd, on the walk every local rule takes); train with LLS."""
    model.eval(), net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), logits(model(x)), rtol=1e-5, atol=1e-6)
    net.train()
    parts = [list(block.parameters()) for block in net.blocks] + [list(net.head.parameters())]
    outputs = [out for _, out in net.walk(x, detach=True)]
    assert len(outputs) == len(parts)
    for k, out in enumerate(outputs):
        others = [p for j, group in enumerate(parts) if j != k for p in group]
        grads = torch.autograd.grad(out.float().sum(), [*parts[k], *others], allow_unused=True)
        assert any(g is not None and bool(g.abs().sum() > 0) for g in grads[: len(parts[k])]), k
        assert all(g is None for g in grads[len(parts[k]) :]), f"a gradient crosses from part {k}"
    y = torch.arange(len(x)) % classes
    trainer = lls.Trainer(net, "lls", optimizer="adam", lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train_step(x, y)
    assert torch.isfinite(result.block_losses).all() and len(result.block_losses) == len(net.blocks)
    assert all(
        not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True) if b.requires_grad
    )


def tiny_hf_resnet():
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=CLASSES,
    )
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config)


def tiny_hf_vit():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=12,
        patch_size=4,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=CLASSES,
    )
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(config)


def layer_pattern(model: nn.Module, *candidates: str) -> str:
    """The pattern of the encoder's layers (transformers renamed them between major versions)."""
    names = {name for name, _ in model.named_modules()}
    return next(c for c in candidates if c.replace("*", "0") in names)


def test_a_hugging_face_resnet_localizes_by_stage_patterns():
    model = tiny_hf_resnet()
    net = lls.localize(model, ["resnet.encoder.stages.*"], input_shape=SHAPE)
    assert len(net.blocks) == 2 and net.blocks[1] is model.resnet.encoder.stages[1]
    check_localized(model, net, torch.randn(4, *SHAPE))


def test_a_hugging_face_vit_localizes_by_layer_patterns_and_is_read_by_its_logits():
    model = tiny_hf_vit()
    pattern = layer_pattern(model, "vit.encoder.layer.*", "vit.layers.*")
    net = lls.localize(model, [pattern], input_shape=SHAPE)
    assert len(net.blocks) == 2
    assert [tuple(s) for s in net.block_output_shapes(SHAPE)] == [(10, 16), (10, 16)]  # 9 patches + [CLS]
    check_localized(model, net, torch.randn(4, *SHAPE))


class Branching(nn.Module):
    """Control flow torch.fx cannot follow: a check on the input's values, a loop of variable length."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.stages = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3)]
        )
        self.fc = nn.Linear(8, CLASSES)

    def forward(self, x):
        if not torch.isfinite(x).all():  # data-dependent: fx refuses
            raise ValueError("inputs must be finite")
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return {"logits": self.fc(x.mean((2, 3))), "features": x}


def test_a_model_with_control_flow_returning_a_dict_localizes_by_names():
    model = Branching()
    with pytest.raises(Exception, match=r"symbolically traced|Proxy|traced"):
        torch.fx.symbolic_trace(model)
    net = lls.localize(model, ["stages.*"], input_shape=SHAPE)
    check_localized(model, net, torch.randn(4, *SHAPE))


class TextGRU(nn.Module):
    """Integer tokens, an embedding, recurrent blocks that return (output, h_n)."""

    def __init__(self, vocabulary: int = 30) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, 8)
        self.gru1 = nn.GRU(8, 12, batch_first=True)
        self.gru2 = nn.GRU(12, 12, batch_first=True)
        self.fc = nn.Linear(12, CLASSES)

    def forward(self, tokens):
        out, _ = self.gru1(self.embed(tokens))
        _, h = self.gru2(out)
        return self.fc(h[-1])


def test_recurrent_blocks_hand_on_their_first_tensor_or_the_one_picked():
    tokens = torch.randint(0, 30, (6, 7), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = TextGRU()
    # gru2's h_n is what the head reads: pick it (its first tensor, the output, is not)
    with pytest.raises(lls.LLSError, match=r"do not compute the model's forward"):
        lls.localize(model, ["gru1", "gru2"], example=tokens)
    net = lls.localize(
        model, ["gru1", "gru2"], example=tokens, output=lambda name, out: out[0] if name == "gru1" else out[1]
    )
    assert net.input_dtype is not None and [tuple(s) for s in net.block_output_shapes((7,))] == [
        (7, 12),
        (1, 12),
    ]
    check_localized(model, net, tokens)


def test_integer_inputs_train_with_fit_from_an_example_batch():
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 30, (40, 7), generator=g), torch.randint(0, CLASSES, (40,), generator=g)
    torch.manual_seed(0)
    model = TextGRU()
    with pytest.raises(lls.LLSError, match="example="):
        lls.localize(model, ["gru1"], input_shape=(7,))  # a float probe batch cannot index an embedding
    net = lls.localize(
        model,
        ["gru1", "gru2"],
        example=tokens[:4],
        output=lambda name, out: out[0] if name == "gru1" else out[1],
    )
    trainer = lls.Trainer(net, "lls")
    train = DataLoader(TensorDataset(tokens, labels), batch_size=16)
    history = lls.fit(trainer, train, epochs=1, test=train, progress=False)
    assert 0 <= history.final_test_accuracy <= 1
    with pytest.raises(lls.LLSError, match="inputs must be integers"):
        trainer.train_step(tokens.float(), labels)


def test_a_wrong_name_lists_close_matches_first_and_the_names_at_every_depth():
    model = SmallResNet()
    with pytest.raises(lls.LLSError) as error:
        lls.localize(model, ["layer1.0.bdy"], input_shape=SHAPE)
    message = str(error.value)
    assert message.index("'layer1.0.body'") < message.index("depth 1:")  # the closest match first
    listed = message.split("depth 1:")[1]
    assert "depth 4: layer1.0.body.0" in listed  # every depth is listed
    for name in ("stem", "layer2.0", "layer2.0.body"):
        assert name in listed
    with pytest.raises(lls.LLSError, match=r"did you mean 'layer\*\.\*'"):
        lls.localize(model, ["layr*.*"], input_shape=SHAPE)


# --- lls.save_run ----------------------------------------------------------------------------------


def small_resnet_net(input_shape, num_classes, width=8):
    """A model factory as a user writes one: their model, localized (what save_run records)."""
    model = SmallResNet(num_classes, width)
    model.stem[0] = nn.Conv2d(input_shape[0], width, 3, padding=1)
    return lls.localize(model, ["layer1", "layer2"], input_shape=input_shape)


FACTORY = f"{__name__}:small_resnet_net"
LIMIT, BATCH = 256, 64


@pytest.fixture(scope="module")
def saved(tmp_path_factory, digits):
    torch.manual_seed(0)
    net = small_resnet_net(digits.input_shape, digits.num_classes, width=6)
    trainer = lls.Trainer(net, "lls")
    loaders = lls.Loaders.for_dataset(digits, BATCH, limit=LIMIT, channels_last=False)
    history = lls.fit(trainer, loaders, epochs=1, progress=False)
    path = tmp_path_factory.mktemp("saved") / "mine"
    lls.save_run(
        trainer, path, history, model=FACTORY, model_options={"width": 6}, dataset="digits", limit=LIMIT,
        batch_size=BATCH,
    )  # fmt: skip
    return path, history


def test_save_run_writes_a_run_that_eval_predict_export_and_resume_read(saved, tmp_path, capsys):
    from lls.cli import main

    path, history = saved
    assert main(["eval", str(path), "--json"]) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert record["accuracy"] == pytest.approx(history.final_test_accuracy, abs=1e-6)
    assert main(["predict", str(path), "--dataset", "digits", "--json"]) == 0
    predictions = json.loads(capsys.readouterr().out)["predictions"]
    labels = [row["label"] for row in predictions]
    correct = sum(row["class"] == label for row, label in zip(predictions, labels, strict=True))
    assert correct / len(labels) == pytest.approx(record["accuracy"], abs=1e-6)
    assert main(["export", str(path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(path, resumed)
    assert main(["train", "--resume", str(resumed), "--epochs", "2", "--quiet"]) == 0
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    config = json.loads((path / "config.json").read_text())["config"]
    assert config["model"] == FACTORY and config["model_options"] == {"width": 6}


def test_save_run_refuses_what_cannot_be_rebuilt_and_writes_nothing(saved, tmp_path, digits):
    torch.manual_seed(0)
    trainer = lls.Trainer(small_resnet_net(digits.input_shape, digits.num_classes), "lls")
    loaders = lls.Loaders.for_dataset(digits, BATCH, limit=LIMIT, channels_last=False)
    history = lls.fit(trainer, loaders, epochs=1, progress=False)
    cases = [
        ({"model": "no_such_package.models:net", "dataset": "digits"}, "cannot import the model factory"),
        (
            {"model": FACTORY, "model_options": {"width": 4}, "dataset": "digits"},
            "does not build the trainer's network",
        ),
        ({"model": "smallconv", "dataset": "digits"}, "does not build the trainer's network"),
        ({"model": FACTORY, "dataset": "my-own-data"}, "registered dataset"),
    ]
    for options, match in cases:
        out = tmp_path / "run"
        with pytest.raises(lls.LLSError, match=match):
            lls.save_run(trainer, out, history, **options)
        assert not out.exists()
    x, y = next(iter(loaders.train.epoch(1)))
    trainer.train_step(x, y)
    with pytest.raises(lls.LLSError, match="since its last evaluation"):
        lls.save_run(trainer, tmp_path / "run", history, model=FACTORY, dataset="digits")
