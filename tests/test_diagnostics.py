"""Per-block readouts, alignment with BP, synchronisation; diagnostics never change training."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lls
from lls.cli import main
from lls.measure.diagnose import diagnose
from lls.method.rules import RULES, Rule
from lls.method.signals import BlockSignal

from .conftest import tiny_batch, tiny_trainer

K, D = 4, 32


def one_block_net(seed: int = 0) -> lls.LocalNet:
    torch.manual_seed(seed)
    return lls.LocalNet([nn.Sequential(nn.Linear(D, D), nn.Tanh())], head=nn.Linear(D, K), latent_pool=[None])


def batches(n: int = 3):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(16, D, generator=g), torch.randint(0, K, (16,), generator=g)) for _ in range(n)]


def test_bp_is_perfectly_aligned_with_itself():
    trainer = lls.Trainer(one_block_net(), "bp", input_shape=(D,))
    (block,) = diagnose(trainer, batches())
    assert block.cosines == pytest.approx([1.0] * 3, abs=1e-9)
    assert block.norm_ratio == pytest.approx(1.0, abs=1e-9)


def test_a_rule_that_follows_the_negated_gradient_is_anti_aligned(monkeypatch):
    net = one_block_net()

    class NegatedBP(BlockSignal):
        def forward(self, a, y, logits=None):
            return -F.cross_entropy(net.head(a), y)  # the head sees the block output directly

    @dataclasses.dataclass
    class NegBP(Rule):
        def signal(self, index, out_shape, pool, num_classes):
            return NegatedBP()

    NegBP.name = "negbp"
    monkeypatch.setitem(RULES._entries, "negbp", NegBP)
    trainer = lls.Trainer(net, "negbp", input_shape=(D,))
    (block,) = diagnose(trainer, batches())
    assert block.cosines == pytest.approx([-1.0] * 3, abs=1e-9)
    assert block.norm_ratio == pytest.approx(1.0, abs=1e-9)


def test_a_latent_equal_to_a_basis_row_is_read_out_as_its_class():
    torch.manual_seed(0)
    block = nn.Linear(D, D)
    with torch.no_grad():  # the block passes its input through unchanged
        block.weight.copy_(torch.eye(D))
        block.bias.zero_()
    net = lls.LocalNet([block], head=nn.Linear(D, K), latent_pool=[None])
    trainer = lls.Trainer(net, lls.create_rule("lls", basis="periodic"), input_shape=(D,))
    rows = lls.basis(K, D, "periodic")
    x = torch.cat([3.0 * rows, 0.5 * rows])  # any positive scale: the latent is normalised
    y = torch.cat([torch.arange(K), torch.arange(K)])
    result = trainer.evaluate([(x, y)], blocks=True)
    assert result.readout == "basis" and result.block_accuracy == [1.0]


def test_ridge_probe_readout_for_rules_without_a_basis():
    trainer = tiny_trainer("dfa")
    x, y = tiny_batch(n=64)
    result = trainer.evaluate([(x, y)], blocks=True, probe_batches=[(x, y)])
    assert result.readout == "ridge probe" and len(result.block_accuracy) == 3
    assert all(0.0 <= a <= 1.0 for a in result.block_accuracy)
    assert max(result.block_accuracy) > 1 / 5  # fitted on these very images: better than chance


@pytest.mark.parametrize("rule", ["lls", "dfa"])
def test_diagnostics_never_change_training(rule, digits, tmp_path):
    runs = []
    for readout in ("--block-accuracy", "--no-block-accuracy"):
        out = tmp_path / readout
        assert (
            main(
                [
                    "train",
                    "--dataset",
                    "digits",
                    "--rule",
                    rule,
                    "--limit",
                    "512",
                    "--epochs",
                    "2",
                    "--quiet",
                    readout,
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        runs.append(lls.training.rundir.load_checkpoint_file(out / "checkpoint.pt")["trainer"]["net"])
    for name, tensor in runs[0].items():
        assert torch.equal(tensor, runs[1][name]), name
    before = (tmp_path / "--block-accuracy" / "checkpoint.pt").read_bytes()
    assert main(["diagnose", str(tmp_path / "--block-accuracy"), "--batches", "2"]) == 0
    assert (tmp_path / "--block-accuracy" / "checkpoint.pt").read_bytes() == before


def test_diagnose_command_on_an_lls_run(digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "3", "--quiet", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["readout"] == "basis" and len(metrics["block_accuracy"]) == 4
    capsys.readouterr()
    assert main(["diagnose", str(out), "--batches", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    last = result["blocks"][-1]
    assert len(last["sync"]) == 10 and len(last["sync"][0]) == 10
    assert last["sync_accuracy"] > 0.5  # trained LLS blocks synchronise with their class's vector
    assert all(-1.0 <= b["cosine"] <= 1.0 for b in result["blocks"])
    assert (out / "diagnose" / "alignment.png").exists() and (out / "diagnose" / "sync-block3.png").exists()


def test_plot_basis(tmp_path, capsys):
    path = tmp_path / "b.png"
    assert (
        main(["plot", "basis", "--classes", "5", "--dim", "40", "--kind", "periodic", "--out", str(path)])
        == 0
    )
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", "basis", "--kind", "triangle"]) == 2
