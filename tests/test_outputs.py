"""Nothing a user runs destroys a run: every command that writes a file refuses, in one line, a run's
own files, its own inputs, links and anything that is not a regular file; the writes stay atomic."""

import os
import stat
from pathlib import Path

import pytest

import lls
from lls.cli import main
from lls.training.files import RUN_FILES, atomic_write, check_output


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
    with pytest.raises(lls.LLSError, match="is a file of the run directory .* destroy the run"):
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
    with pytest.raises(lls.LLSError, match="is a symbolic link .*/dev/null"):
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
    one_line(capsys, ["export", str(run), "--format", "torchscript", "--out", "/dev/null"], "character device")
    assert contents(run) == before


def test_plot_refuses_a_fifo_and_a_runs_curves(run, tmp_path, capsys):
    fifo = tmp_path / "basis.png"
    os.mkfifo(fifo)
    one_line(capsys, ["plot", "basis", "--dim", "8", "--out", str(fifo)], "is a FIFO")
    before = contents(run)
    one_line(capsys, ["plot", "basis", "--dim", "8", "--out", str(run / "curves.png")], "file of the run")
    assert contents(run) == before
