"""Nothing a user runs destroys a run: every command that writes a file refuses, in one line, a run's
own files, its own inputs, links and anything that is not a regular file; the writes stay atomic."""

import os
import stat
from pathlib import Path

import pytest

import lls
from lls.cli import main
from lls.files import RUN_FILES, atomic_write, check_output


@pytest.fixture
def run(tmp_path) -> Path:
    """A folder laid out as a run directory (what the refusals look at; nothing is read)."""
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "metrics.csv", "curves.png", ".lock"):
        (folder / name).write_bytes(b"the run's " + name.encode())
    (folder / "tensorboard").mkdir()
    (folder / "tensorboard" / "events").write_bytes(b"events")
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, argv, expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lls: error: ") and expected in err, err
    return err


@pytest.mark.parametrize("name", [n for n in RUN_FILES if n != "tensorboard"] + ["tensorboard/events"])
def test_a_runs_own_files_are_refused(run, name):
    with pytest.raises(lls.LLSError, match=r"is a file of the run directory .* destroy the run"):
        check_output(run / name)


def test_a_new_file_beside_a_runs_files_and_a_same_named_file_elsewhere_are_fine(run, tmp_path):
    assert check_output(run / "model.pt") == run / "model.pt"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "checkpoint.pt").write_bytes(b"mine")  # no run around it
    check_output(tmp_path / "elsewhere" / "checkpoint.pt")


def test_the_same_file_by_another_name_is_one_of_the_inputs(tmp_path):
    source = tmp_path / "input.bin"
    source.write_bytes(b"in")
    os.link(source, tmp_path / "hard.bin")
    for out in (source, tmp_path / "hard.bin", tmp_path / "." / "input.bin"):
        with pytest.raises(lls.LLSError, match="is one of the command's inputs"):
            check_output(out, inputs=[source])


def test_fifos_devices_and_links_are_refused_and_left_alone(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(lls.LLSError, match="is a FIFO"):
        check_output(fifo)
    with pytest.raises(lls.LLSError, match="is a character device"):
        check_output("/dev/null")
    link = tmp_path / "null"
    link.symlink_to("/dev/null")
    with pytest.raises(lls.LLSError, match=r"is a symbolic link .*/dev/null"):
        check_output(link)
    with pytest.raises(lls.LLSError, match="is a FIFO"):
        atomic_write(fifo, b"data")  # the last check, at the rename itself
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and link.is_symlink()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_export_never_writes_over_the_run(run, capsys):
    before = contents(run)
    for name in ("checkpoint.pt", "config.json", "metrics.csv"):
        argv = ["export", str(run), "--format", "torchscript", "--out", str(run / name)]
        one_line(capsys, argv, "is a file of the run directory")
    one_line(
        capsys, ["export", str(run), "--format", "torchscript", "--out", "/dev/null"], "character device"
    )
    assert contents(run) == before


def test_plot_refuses_a_fifo_and_a_runs_curves(run, tmp_path, capsys):
    fifo = tmp_path / "basis.png"
    os.mkfifo(fifo)
    one_line(capsys, ["plot", "basis", "--dim", "8", "--out", str(fifo)], "is a FIFO")
    before = contents(run)
    one_line(capsys, ["plot", "basis", "--dim", "8", "--out", str(run / "curves.png")], "file of the run")
    assert contents(run) == before


# --- options that do not apply are refused, never recorded and ignored -----------------------------


def structure(name: str, **options) -> str:
    """What a model is, built without the check (on the meta device: no memory, no time)."""
    import torch

    from lls.method.models import MODELS
    from lls.method.net import build

    with torch.device("meta"):
        net = build(MODELS.get(name), (3, 32, 32), 10, name=name, **options)
    return f"{net}{net.latent_pool}"


def model_option_cases():
    from lls.method.models import MODELS
    from lls.method.net import ModelOptions
    from lls.options import choices_of, options_of

    defaults = ModelOptions().as_dict()
    numeric = {"width": [0.5]}  # options without choices: a value away from the default
    for field in options_of(ModelOptions):
        for value in choices_of(field) or numeric[field.name]:
            if value != defaults[field.name]:
                for model in MODELS.names():
                    yield pytest.param(model, field.name, value, id=f"{model}-{field.name}={value}")


@pytest.mark.parametrize("model,option,value", list(model_option_cases()))
def test_every_model_option_is_taken_exactly_where_it_changes_the_model(model, option, value):
    """Independent of the check: build the model with and without the value; a model the value
    does not change must refuse it (API and CLI), one it changes must take it."""
    from lls.training.config import config_from_options

    changes = structure(model, **{option: value}) != structure(model)
    if changes:
        config = config_from_options({"model": model}, {}, {option: value})
        assert config.model_options[option] == value
        return
    flag = "--" + option.replace("_", "-")
    with pytest.raises(lls.LLSError, match=f"^model '{model}' has no use for {option} \\({flag}\\)"):
        config_from_options({"model": model}, {}, {option: value})
    with pytest.raises(lls.LLSError, match="has no use for"):
        lls.create_model(model, **{option: value})


def test_a_typed_default_of_an_option_a_model_has_no_use_for_is_refused_too():
    from lls.training.config import config_from_options

    with pytest.raises(lls.LLSError, match="has no use for block_granularity"):
        config_from_options({"model": "smallconv"}, {}, {"block_granularity": "block"})
    lls.create_model("smallconv", block_granularity="block")  # the API's default value: nothing ignored


def dataset_cases():
    from lls.data import DATASETS

    for name in DATASETS.names():
        source = DATASETS.get(name)
        yield pytest.param(name, {"image_size": 48}, source.takes_image_size, id=f"{name}-image_size")
        for augment in source.augmentations:
            yield pytest.param(name, {"augment": augment}, True, id=f"{name}-augment={augment}")
        yield pytest.param(name, {"augment": "no-such"}, False, id=f"{name}-augment=no-such")


@pytest.mark.parametrize("dataset,given,applies", list(dataset_cases()))
def test_every_dataset_option_is_refused_where_the_dataset_has_no_use_for_it(dataset, given, applies, capsys):
    """Refused when the config is made: before any data is read and before anything is written."""
    from lls.training.config import config_from_options

    if applies:
        config_from_options({"dataset": dataset, **given}, {}, {})
        return
    with pytest.raises(lls.LLSError, match=r"drop it|has no augmentation"):
        config_from_options({"dataset": dataset, **given}, {}, {})


@pytest.mark.parametrize(
    "option,expected",
    [
        (["--image-size", "16"], "digits has images of a fixed size"),
        (["--block-granularity", "stage"], "model 'smallconv' has no use for block_granularity"),
        (["--depthwise-padding", "stride"], "model 'smallconv' has no use for depthwise_padding"),
        (["--augment", "basic"], "digits has no augmentation 'basic'"),
    ],
)
def test_lls_train_refuses_an_option_that_does_not_apply_and_writes_nothing(
    option, expected, tmp_path, capsys
):
    out = tmp_path / "run"
    one_line(capsys, ["train", "--dataset", "digits", *option, "--out", str(out), "--quiet"], expected)
    assert not out.exists()
