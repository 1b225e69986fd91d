"""The trained model out of a run: lls.load_run, lls predict, lls export (and the README's example)."""

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import pickle
import pickletools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import lls
from lls.cli import main
from lls.data import make_loader
from lls.data.inputs import read_images
from lls.method.models import create_model, model_specs
from lls.method.net import Conv, Dense, DWSeparable
from lls.training.export import export_model
from lls.training.trained import plain_model

pytestmark = pytest.mark.usefixtures("digits")
README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "### The trained model out"
HAS_ONNX = all(importlib.util.find_spec(p) for p in ("onnx", "onnxscript", "onnxruntime"))
NEEDS_ONNX = pytest.mark.skipif(
    not HAS_ONNX, reason="needs pip install 'lls[export]' (onnx, onnxscript, onnxruntime)"
)
EXPORT_TOLERANCE = 1e-5
ZOO_WIDTH = 16  # channels / units of every block of the zoo's models in the export tests: tiny and fast
ZOO_DEPTH = 2  # residual / encoder blocks per stage at most, ditto
# the paper's models are torch.nn layers only; the zoo's residual and transformer blocks are lls's own
# modules (their ONNX and TorchScript exports need no lls)
OWN_MODULES = "lls.method.zoo"


def readme_blocks() -> tuple[list[str], str]:
    """The README section's shell commands and Python example."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n### ", len(SECTION))]
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in shell.splitlines() if line.strip()]
    return commands, python


def run_command(line: str) -> int:
    """One README command line (``lls ...`` with an optional ``> file``), in the current folder."""
    words = shlex.split(line)
    assert words[0] == "lls"
    out = None
    if ">" in words:
        words, out = words[: words.index(">")], words[words.index(">") + 1]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        code = main(words[1:])
    if out is not None:
        Path(out).write_text(captured.getvalue())
    return code


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder where the README's ``lls train`` ran, with two image files of odd sizes."""
    folder = tmp_path_factory.mktemp("readme")
    data = lls.load_dataset("digits")
    for name, size in (("photo.png", (40, 31)), ("scan.jpg", (9, 12))):
        grey = data.test.images[0, 0].numpy()
        Image.fromarray(grey).convert("RGB").resize(size).save(folder / name)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        train = [line for line in readme_blocks()[0] if line.startswith("lls train")]
        assert train and run_command(train[0] + " --quiet") == 0
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture(scope="module")
def run(workdir) -> Path:
    return workdir / "runs" / "digits"


def eval_record(run: Path, capsys) -> dict:
    assert main(["eval", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])


def test_load_run_gives_lls_evals_accuracy_to_the_last_digit(run, capsys, digits):
    record = eval_record(run, capsys)
    model = lls.load_run(run)
    assert isinstance(model, nn.Sequential) and not model.training
    # the test images batched and normalised by hand, laid out as the run trained (channels last)
    correct = 0
    loader = make_loader(
        digits.test, 100, mean=digits.mean, std=digits.std, memory_format=torch.channels_last
    )
    with torch.no_grad():
        for x, y in loader.epoch():
            correct += int((model(x).argmax(1) == y).sum())
    accuracy = correct / len(digits.test)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert accuracy == record["accuracy"] == last["test_accuracy"]


def test_load_run_is_torch_only_and_pickles_and_scripts_without_lls(run, tmp_path):
    model = lls.load_run(run)
    assert all(type(m).__module__.startswith("torch.nn.") for m in model.modules())
    pickled = pickle.dumps(model)
    names = [arg for op, arg, _ in pickletools.genops(pickled) if isinstance(arg, str)]
    assert not [n for n in names if n == "lls" or n.startswith("lls.")]
    torch.save(model, tmp_path / "model.pt")
    torch.jit.script(model).save(str(tmp_path / "scripted.pt"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
    torch.save(x, tmp_path / "x.pt")
    # a fresh interpreter where `import lls` fails reads both files and computes the same outputs
    script = (
        "import sys, torch; sys.modules['lls'] = None; "
        f"p = {str(tmp_path)!r}; x = torch.load(p + '/x.pt'); "
        "a = torch.load(p + '/model.pt', weights_only=False)(x); b = torch.jit.load(p + '/scripted.pt')(x); "
        "torch.save((a.detach(), b.detach()), p + '/out.pt')"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    a, b = torch.load(tmp_path / "out.pt")
    assert torch.equal(a, expected) and torch.allclose(b, expected, atol=EXPORT_TOLERANCE)


def tiny_zoo_model(name: str, seed: int = 0) -> lls.LocalNet:
    """Model ``name`` of the registry with every block ZOO_WIDTH wide (its structure unchanged), at
    the smallest input its strides and poolings take, with BatchNorm statistics that are not 0 / 1."""
    specs = []
    for spec in model_specs(name):
        if isinstance(spec, (Conv, DWSeparable)):
            spec = dataclasses.replace(spec, channels=ZOO_WIDTH)
        elif isinstance(spec, Dense):
            spec = dataclasses.replace(spec, width=ZOO_WIDTH, pool=spec.pool and ZOO_WIDTH)
        elif hasattr(spec, "stages"):  # a ResNet: every stage kept, at most ZOO_DEPTH blocks deep
            stages = tuple(
                dataclasses.replace(st, channels=ZOO_WIDTH, depth=min(st.depth, ZOO_DEPTH))
                for st in spec.stages
            )
            spec = dataclasses.replace(spec, stem=ZOO_WIDTH, stages=stages)
        elif hasattr(spec, "heads"):  # a ViT
            spec = dataclasses.replace(spec, dim=ZOO_WIDTH, depth=min(spec.depth, ZOO_DEPTH), heads=2)
        specs.append(spec)
    torch.manual_seed(seed)
    net = create_model(specs, in_channels=3, input_size=32, num_classes=7)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize("name", lls.list_models())
def test_plain_model_computes_what_the_localnet_computes(name):
    net = tiny_zoo_model(name)
    model = plain_model(net)
    assert all(type(m).__module__.startswith(("torch.nn.", OWN_MODULES)) for m in model.modules())
    if not any(hasattr(spec, "stages") or hasattr(spec, "heads") for spec in model_specs(name)):
        assert all(type(m).__module__.startswith("torch.nn.") for m in model.modules())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


# Exporting costs seconds a model: one of each kind (plain CNN, residual, transformer) in the fast
# suite, every other model of the registry in the slow one
FAST_EXPORTS = {"smallconv", "resnet20", "vit"}


@NEEDS_ONNX
@pytest.mark.parametrize(
    "name", [n if n in FAST_EXPORTS else pytest.param(n, marks=pytest.mark.slow) for n in lls.list_models()]
)
def test_onnx_and_torchscript_exports_give_the_models_outputs(name, tmp_path):
    import onnxruntime

    model = plain_model(tiny_zoo_model(name))
    x = torch.randn(5, 3, 32, 32)  # another batch size than the traced one: the batch is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    export_model(model, (3, 32, 32), tmp_path / "m.onnx", "onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] not in (1, 2, 5)  # a named, free dimension
    got = session.run(["logits"], {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=EXPORT_TOLERANCE)
    export_model(model, (3, 32, 32), tmp_path / "m.pt", "torchscript")
    with torch.no_grad():
        traced = torch.jit.load(str(tmp_path / "m.pt"))(x).numpy()
    np.testing.assert_allclose(traced, expected, rtol=0, atol=EXPORT_TOLERANCE)


def test_predict_on_a_dataset_gives_evals_accuracy(run, capsys):
    record = eval_record(run, capsys)
    assert main(["predict", str(run), "--dataset", "digits", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["predictions"]
    assert len(rows) == 359 and out["classes"] == [str(k) for k in range(10)]
    assert sum(r["class"] == r["label"] for r in rows) / len(rows) == record["accuracy"]
    for r in rows[:20]:
        assert abs(sum(r["probabilities"]) - 1) < 1e-5 and r["class"] == int(np.argmax(r["probabilities"]))
    assert main(["predict", str(run), "--dataset", "digits"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "input,label,class,name," + ",".join(f"p_{k}" for k in range(10))
    first = lines[1].split(",")
    assert first[:4] == ["test[0]", str(rows[0]["label"]), str(rows[0]["class"]), rows[0]["name"]]


def test_predict_reads_image_files_as_the_datasets_images(run, tmp_path, capsys, digits):
    # an 8x8 grey file of a test image is that image: the same probabilities as the dataset's row;
    # so are its RGB copy (the luma of grey RGB is the grey) and a wider copy (centre-cropped back)
    grey = digits.test.images[3, 0].numpy()
    Image.fromarray(grey).save(tmp_path / "same.png")
    Image.fromarray(grey).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.pad(grey, ((0, 0), (2, 2)))).save(tmp_path / "wide.png")  # 8 x 12
    Image.fromarray(np.full((31, 40, 3), 200, dtype=np.uint8)).save(tmp_path / "big.jpg")  # resized
    files = [str(tmp_path / f) for f in ("same.png", "rgb.png", "wide.png", "big.jpg")]
    assert main(["predict", str(run), *files, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["predictions"]
    assert main(["predict", str(run), "--dataset", "digits", "--json"]) == 0
    reference = json.loads(capsys.readouterr().out)["predictions"][3]
    assert [r["input"] for r in rows] == files and "label" not in rows[0]
    for row in rows[:3]:
        np.testing.assert_allclose(row["probabilities"], reference["probabilities"], atol=1e-6)
    uniform = read_images([tmp_path / "big.jpg"], digits).images
    assert uniform.shape == (1, 1, 8, 8) and abs(float(uniform.float().mean()) - 200) <= 2  # JPEG's loss
    assert abs(sum(rows[3]["probabilities"]) - 1) < 1e-5


@NEEDS_ONNX
def test_the_readme_example_runs(workdir, monkeypatch):
    commands, python = readme_blocks()
    monkeypatch.chdir(workdir)
    for line in commands:
        if not line.startswith("lls train"):
            assert run_command(line) == 0, line
    exec(compile(python, str(README), "exec"), {})


def one_line(capsys, argv, expected: str) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in captured.err, captured.err
    return lines[0]


def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    one_line(
        capsys,
        ["export", str(tmp_path / "nope"), "--format", "torchscript", "--out", str(out)],
        "does not exist",
    )
    one_line(capsys, ["predict", str(tmp_path / "nope"), "--dataset", "digits"], "does not exist")
    one_line(capsys, ["export", str(run), "--format", "tflite", "--out", str(out)], "invalid choice")
    one_line(capsys, ["predict", str(run)], "give image files or --dataset")
    one_line(capsys, ["predict", str(run), str(tmp_path / "missing.png")], "is not a file")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    one_line(capsys, ["predict", str(run), str(tmp_path / "junk.png")], "cannot decode image")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("config.json", "checkpoint.pt"):
        damaged.joinpath(name).write_bytes(run.joinpath(name).read_bytes())
    blob = bytearray(damaged.joinpath("checkpoint.pt").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    damaged.joinpath("checkpoint.pt").write_bytes(bytes(blob))
    one_line(capsys, ["export", str(damaged), "--format", "torchscript", "--out", str(out)], "checkpoint")
    with pytest.raises(lls.LLSError, match="checkpoint"):
        lls.load_run(damaged)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxscript" else real_find_spec(name, *a),
    )
    one_line(capsys, ["export", str(run), "--format", "onnx", "--out", str(out)], "pip install 'lls[export]'")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "junk.png"]


def expected_metadata(digits) -> dict[str, str]:
    """What an export of the README's digits run must record, written out from the run's options."""
    return {
        "lls_version": lls.__version__,
        "input_mean": json.dumps(list(digits.mean)),
        "input_std": json.dumps(list(digits.std)),
        "input_shape": json.dumps([1, 8, 8]),
        "class_names": json.dumps([str(d) for d in range(10)]),
        "num_classes": "10",
        "model": "smallconv",
        "dataset": "digits",
    }


def check_metadata(found: dict[str, str], digits) -> None:
    for key, value in expected_metadata(digits).items():
        assert found[key] == value, key
    rule = json.loads(found["rule"])
    assert rule["name"] == "lls" and rule["basis"] == "square"  # the README's run: lls train's defaults
    assert "input_mean" in found["input_normalization"]


def test_torchscript_export_records_normalisation_classes_rule_and_version(run, tmp_path, capsys, digits):
    out = tmp_path / "digits.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    wanted = {key: "" for key in [*expected_metadata(digits), "rule", "input_normalization"]}
    torch.jit.load(str(out), _extra_files=wanted)
    check_metadata({key: value.decode() for key, value in wanted.items()}, digits)


@NEEDS_ONNX
def test_onnx_export_records_normalisation_classes_rule_and_version(run, tmp_path, capsys, digits):
    import onnx

    out = tmp_path / "digits.onnx"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    check_metadata(props, digits)
