"""`lls export --format executorch`: the evaluated model as an ExecuTorch inference program, run in
ExecuTorch's own runtime (not PyTorch) and compared with lls.load_run; its metadata read back."""

import json
import sys

import pytest
import torch

import lls
from lls.cli import main
from lls.data import make_loader
from lls.training.export import EXECUTORCH_MAX_BATCH, export_model
from lls.training.trained import plain_model

from .test_model_out import EXPORT_TOLERANCE, tiny_zoo_model

pytestmark = pytest.mark.usefixtures("digits")
# a conv block and a dense block on 8 x 8 digits: the smallest program the CLI test can export
RUN_MODEL = ["--model", "smallconv", "--epochs", "1", "--limit", "128", "--batch-size", "64"]


def runtime():
    pytest.importorskip("executorch", reason="needs executorch (docs/edge.md)")
    from executorch.runtime import Runtime

    return Runtime.get()


def run_method(program, name: str, *inputs):
    return program.load_method(name).execute(list(inputs))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge-run") / "digits"
    argv = ["train", "--dataset", "digits", *RUN_MODEL, "--rule", "lls", "--out", str(folder), "--quiet"]
    assert main(argv) == 0
    return folder


def test_executorch_program_gives_load_runs_logits_and_says_what_it_needs(run, tmp_path, digits, capsys):
    rt = runtime()
    out = tmp_path / "model.pte"
    assert main(["export", str(run), "--format", "executorch", "--out", str(out)]) == 0
    assert "model.pte" in capsys.readouterr().out
    program = rt.load_program(out.read_bytes())
    model = lls.load_run(run)
    loader = make_loader(digits.test, 7, mean=digits.mean, std=digits.std)
    x, _ = next(iter(loader.epoch()))
    with torch.no_grad():
        expected = model(x)
    for batch in (x, x[:1]):  # any batch up to the largest one planned
        (logits,) = run_method(program, "forward", batch.contiguous())
        torch.testing.assert_close(logits, expected[: len(batch)], rtol=0, atol=EXPORT_TOLERANCE)
    with pytest.raises(RuntimeError):  # the arena holds the largest batch planned, not one more
        run_method(program, "forward", torch.zeros(EXECUTORCH_MAX_BATCH + 1, 1, 8, 8))
    # what an app needs to feed the program, read from the program alone (strings, as in ONNX's file)
    meta = json.loads(run_method(program, "lls_metadata")[0])
    assert json.loads(meta["input_shape"]) == [1, 8, 8] == list(run_method(program, "input_shape"))
    assert json.loads(meta["input_mean"]) == pytest.approx(digits.mean)
    assert list(run_method(program, "input_mean")) == pytest.approx(digits.mean)
    assert list(run_method(program, "input_std")) == pytest.approx(digits.std)
    assert meta["num_classes"] == "10" and list(run_method(program, "num_classes")) == [10]
    assert list(run_method(program, "class_names")) == list(digits.classes)
    assert json.loads(meta["rule"])["name"] == "lls"
    assert (meta["model"], meta["dataset"], meta["lls_version"]) == ("smallconv", "digits", lls.__version__)


def test_without_executorch_export_says_in_one_line_what_to_install(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if it were not installed
    out = tmp_path / "model.pte"
    assert main(["export", str(run), "--format", "executorch", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'lls[edge]'" in err and "executorch" in err
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", lls.list_models())
def test_every_zoo_model_runs_in_executorch_with_its_pytorch_logits(name, tmp_path):
    rt = runtime()
    model = plain_model(tiny_zoo_model(name))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    export_model(model, (3, 32, 32), tmp_path / "m.pte", "executorch", {"model": name})
    program = rt.load_program((tmp_path / "m.pte").read_bytes())
    (logits,) = run_method(program, "forward", x)
    torch.testing.assert_close(logits, expected, rtol=0, atol=EXPORT_TOLERANCE)
    assert json.loads(run_method(program, "lls_metadata")[0]) == {"model": name, "input_shape": "[3, 32, 32]"}
