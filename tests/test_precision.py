"""Training precision: fp32 (the reference), bf16 and fp16 mixed precision, on the CPU (and CUDA)."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import lls
from lls.cli import main
from lls.method.fused import block_losses
from lls.step import precision as precision_module
from lls.training.run import open_trained
from lls.training.rundir import RunDir

from .conftest import NUM_CLASSES, TINY_INPUT, TINY_SPECS, tiny_batch

DIGITS_RUN = ["train", "--dataset", "digits", "--batch-size", "32", "--limit", "200", "--quiet"]
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
LOCAL_RULES = ["lls", "lls-m", "local-classifier", "dfa"]


def trainer(rule: str = "lls", precision: str = "bf16", **options) -> lls.Trainer:
    return lls.build_trainer(TINY_SPECS, rule, TINY_INPUT, NUM_CLASSES, precision=precision, **options)


def block_output_dtypes(t: lls.Trainer) -> list[torch.dtype]:
    seen = []
    for block in t.net.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    return seen


@pytest.mark.parametrize("rule", [*LOCAL_RULES, "bp"])
def test_bf16_runs_blocks_in_bf16_and_keeps_weights_losses_and_gradients_float32(rule):
    t = trainer(rule)
    seen = block_output_dtypes(t)
    latents = []
    for signal in t.signals:
        original = signal.latent_loss
        signal.latent_loss = lambda z, *a, f=original: latents.append(z.dtype) or f(z, *a)
    x, y = tiny_batch()
    result = t.train_step(x, y)
    assert seen == [torch.bfloat16] * len(t.net.blocks)
    assert latents == [torch.float32] * len(t.signals)  # the basis scores and the loss: float32
    assert result.loss.dtype == result.block_losses.dtype == result.logits.dtype == torch.float32
    for p in t.net.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
    for optimizer in t.optimizers:  # every optimizer stepped from float32 gradients
        assert all(p.grad is not None for group in optimizer.param_groups for p in group["params"])


@pytest.mark.parametrize("rule", [*LOCAL_RULES, "bp"])
def test_mixed_precision_steps_track_the_float32_steps(rule):
    x, y = tiny_batch(64)
    first, third = {}, {}
    for precision in ("fp32", "bf16", "fp16"):
        t = trainer(rule, precision)
        results = [t.train_step(x, y) for _ in range(3)]
        first[precision], third[precision] = (torch.cat([r.loss[None], r.block_losses]) for r in results[::2])
    # the first step's losses differ only by the forward pass's rounding: bf16 keeps 8 bits of
    # mantissa, fp16 11; Adam-type steps then amplify the rounding of small gradients
    torch.testing.assert_close(first["bf16"], first["fp32"], rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(first["fp16"], first["fp32"], rtol=4e-3, atol=4e-3)
    for precision in ("bf16", "fp16"):
        torch.testing.assert_close(third[precision], third["fp32"], rtol=1e-1, atol=1e-1)


def test_fp32_uses_no_autocast_and_no_scaler():
    t = trainer(precision="fp32")
    seen = block_output_dtypes(t)
    t.train_step(*tiny_batch())
    assert seen == [torch.float32] * len(t.net.blocks) and t.precision.scalers == []
    assert "scalers" not in t.state_dict()


def test_fp16_has_a_scaler_per_optimizer_and_an_overflow_skips_only_its_block():
    t = trainer(precision="fp16")
    assert len(t.precision.scalers) == len(t.optimizers) == len(t.net.blocks) + 1
    x, y = tiny_batch()
    t.train_step(x, y)  # lazy state; fp16's first steps may overflow at the initial scale of 2^16
    for scaler in t.precision.scalers:
        scaler.update(256.0)  # a scale at which nothing overflows
    scales = [s.get_scale() for s in t.precision.scalers]
    before = [[p.detach().clone() for p in block.parameters()] for block in t.net.blocks]
    # block 1's gradient overflows: its step is skipped and its scale halves; the others step
    t.net.blocks[1][0].weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    t.train_step(x, y)
    after = [list(block.parameters()) for block in t.net.blocks]
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        unchanged = all(torch.equal(a, b) for a, b in zip(old, new, strict=True))
        assert unchanged == (index == 1), index
    new_scales = [s.get_scale() for s in t.precision.scalers]
    assert new_scales[1] == scales[1] / 2
    assert all(new == old for i, (new, old) in enumerate(zip(new_scales, scales, strict=True)) if i != 1)


def test_fp16_scaler_state_is_checkpointed():
    t = trainer(precision="fp16")
    x, y = tiny_batch()
    t.train_step(x, y)
    t.precision.scalers[2].update(123.0)  # a scale no fresh scaler has
    state = t.state_dict()
    assert len(state["scalers"]) == len(t.optimizers)
    fresh = trainer(precision="fp16")
    fresh.load_state_dict(state)
    assert fresh.precision.scalers[2].get_scale() == 123.0
    with pytest.raises(ValueError, match="scalers"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "scalers"})


def test_the_graph_engines_fused_signals_take_the_float32_path_of_mixed_precision():
    # on a CPU the graph engine cannot run; its fused LLS-family losses can, and under bf16 they get
    # the up-cast block output: the same loss and gradient as the eager signal, to bf16's rounding
    for rule in ("lls", "lls-m", "local-classifier"):
        t = trainer(rule, "bf16")
        shapes = t.net.block_output_shapes(TINY_INPUT)
        fused = block_losses(t.signals, shapes, device=torch.device("cpu"), dtype=torch.float32)
        _, y = tiny_batch()
        a = torch.randn(16, *shapes[0]).to(torch.bfloat16).requires_grad_()
        grads = []
        for signal in (t.signals[0], fused[0]):
            loss = t.precision.signal_loss(signal, a, y)
            assert loss.dtype == torch.float32
            (grad,) = torch.autograd.grad(loss, a)
            grads.append(grad.float())
        torch.testing.assert_close(grads[1], grads[0], rtol=5e-2, atol=1e-3)


@NEEDS_CUDA
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_graph_and_eager(precision):
    x, y = tiny_batch(64)
    x, y = x.cuda(), y.cuda()
    eager = trainer("lls", precision, device="cuda", engine="eager")
    graph = trainer("lls", precision, device="cuda", engine="auto")
    assert (graph.engine is not None) == (precision == "bf16")  # fp16's scalers step eagerly
    for _ in range(6):  # past the graph's warm-up: captured and replayed
        a, b = eager.train_step(x, y), graph.train_step(x, y)
    torch.testing.assert_close(b.block_losses, a.block_losses, rtol=5e-2, atol=5e-2)


def one_line(capsys, argv, expected: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_bad_precision_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, digits):
    out = tmp_path / "r"
    one_line(capsys, [*DIGITS_RUN, "--precision", "fp8", "--out", str(out)], "unknown precision")
    one_line(capsys, [*DIGITS_RUN, "--precision", "bf16", "--memory", "low", "--out", str(out)], "--memory")
    monkeypatch.setattr(precision_module, "cpu_supports", lambda dtype: dtype is not torch.float16)
    one_line(capsys, [*DIGITS_RUN, "--precision", "fp16", "--out", str(out)], "cannot train in fp16")
    bench = ["bench", "--model", "smallconv", "--input", "1,8,8", "--classes", "3", "--steps", "1"]
    one_line(capsys, [*bench, "--precision", "fp16"], "cannot train in fp16")
    assert not out.exists()
    with pytest.raises(lls.LLSError, match="unknown precision 'fp8'"):
        trainer(precision="fp8")
    with pytest.raises(lls.LLSError, match="fp8"):
        lls.training.config.TrainConfig(precision="fp8")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, digits) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "bf16"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main([*DIGITS_RUN, "--precision", "bf16", "--out", str(out), "--json"]) == 0
    return out, json.loads(printed.getvalue().splitlines()[-1])


def test_precision_is_recorded_and_honoured_on_resume(bf16_run, tmp_path, capsys):
    out = tmp_path / "r"
    shutil.copytree(bf16_run[0], out)
    assert bf16_run[1]["config"]["precision"] == "bf16"
    assert RunDir.open(out).read_config().precision == "bf16"
    one_line(
        capsys, ["train", "--resume", str(out), "--precision", "fp32"], "--precision fp32 (the run has bf16)"
    )
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    _, state, session = open_trained(out, device=torch.device("cpu"), data_dir=None, download=False)
    assert session.trainer.precision.name == "bf16" and state["epoch"] == 2


def test_an_old_config_without_precision_reads_as_fp32(bf16_run, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(bf16_run[0], out)
    record = json.loads((out / "config.json").read_text())
    del record["config"]["precision"]
    (out / "config.json").write_text(json.dumps(record))
    assert RunDir.open(out).read_config().precision == "fp32"


def test_the_model_of_a_mixed_precision_run_is_float32(bf16_run):
    model = lls.load_run(bf16_run[0])
    assert all(p.dtype == torch.float32 for p in model.parameters()) and isinstance(model, nn.Sequential)


def test_bench_times_a_precision(capsys):
    bench = ["bench", "--model", "smallconv", "--input", "1,8,8", "--classes", "3", "--steps", "1"]
    assert main([*bench, "--precision", "bf16", "--warmup", "0", "--no-memory", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["precision"] == "bf16"
