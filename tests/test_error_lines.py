"""Error lines name only what the user typed or what the run recorded, appear once and stand alone:
files after an option, a resume adding --memory, damaged checkpoints of every kind of damage."""

import io
import json
import random
import zipfile

import pytest
import torch

import lls
from lls.cli import main
from lls.training.config import TrainConfig
from lls.training.rundir import RunDir, load_checkpoint_file


def one_line(capsys, argv, *expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lls: error: ") and err.count("error:") == 1, err
    assert all(e in err for e in expected), err
    return err


@pytest.fixture
def run(tmp_path) -> RunDir:
    """A run directory with config.json and a good checkpoint (written, not trained)."""
    run = RunDir.create(tmp_path / "run", TrainConfig(dataset="digits"), {})
    run.save_checkpoint({"epoch": 0, "weights": torch.arange(4096, dtype=torch.float32)})
    run.unlock()
    return run


def flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def bad_member(data: bytes) -> bytes:
    """The same zip with its pickle member's bytes replaced by garbage of the same length."""
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            member = source.read(info)
            target.writestr(info, b"\x80" * len(member) if info.filename.endswith(".pkl") else member)
    return out.getvalue()


def missing_member(data: bytes) -> bytes:
    source, out = zipfile.ZipFile(io.BytesIO(data)), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist()[1:]:
            target.writestr(info, source.read(info))
    return out.getvalue()


def damages():
    yield "empty", lambda d: b""
    for fraction in (0.01, 0.3, 0.5, 0.9, 0.999):
        yield f"truncated-{fraction}", lambda d, f=fraction: d[: int(len(d) * f)]
    for fraction in (0.0, 0.001, 0.05, 0.2, 0.5, 0.7, 0.95, 0.99, 0.9999):
        yield f"flipped-{fraction}", lambda d, f=fraction: flipped(d, int(len(d) * f))
    yield "random", lambda d: random.Random(0).randbytes(len(d))
    yield "text", lambda d: "é checkpoint".encode("latin-1") * 50
    yield "bad-member", bad_member
    yield "missing-member", missing_member
    yield "json", lambda d: json.dumps({"format": "lls-checkpoint"}).encode()


@pytest.mark.parametrize("name,damage", list(damages()), ids=[n for n, _ in damages()])
def test_every_damaged_checkpoint_says_damaged_the_file_and_what_to_do(run, name, damage, capsys):
    """Either the damage is refused in one line naming the file, or it touched bytes nothing reads
    (a zip's local header, padding) and the checksummed state loads unchanged."""
    data = run.checkpoint_path.read_bytes()
    original = load_checkpoint_file(run.checkpoint_path)
    run.checkpoint_path.write_bytes(damage(data))
    try:
        state = load_checkpoint_file(run.checkpoint_path)
    except lls.LLSError as error:
        message = str(error)
    else:
        assert state.keys() == original.keys() and torch.equal(state["weights"], original["weights"])
        return
    assert "\n" not in message, message
    assert f"{run.checkpoint_path} is damaged" in message and "resume from a copy" in message, message
    one_line(capsys, ["eval", str(run.path)], "is damaged", "resume from a copy")


def test_a_damaged_config_says_damaged(run, capsys):
    run.config_path.write_bytes(b"\xff\xfe{not json")
    one_line(capsys, ["eval", str(run.path)], f"{run.config_path} is damaged", "restore it from a copy")


def test_files_after_an_option_are_files(tmp_path, capsys):
    """`lls predict RUN --json a.png`: the files are taken (here the run is missing: that is said)."""
    one_line(capsys, ["predict", str(tmp_path / "none"), "--json", "a.png", "b.png"], "does not exist")
    one_line(capsys, ["predict", str(tmp_path / "none"), "--bogus"], "unrecognized arguments: --bogus")


@pytest.mark.parametrize(
    "recorded,expected",
    [
        ({"precision": "fp16"}, "trains in fp16 (its config.json's precision)"),
        ({"rule": "bp"}, "trains with bp, which back-propagates through every block at once"),
    ],
)
def test_a_resume_adding_memory_names_what_the_run_recorded(tmp_path, recorded, expected, capsys):
    run = RunDir.create(tmp_path / "run", TrainConfig(dataset="digits", **recorded), {})
    run.unlock()
    err = one_line(
        capsys, ["train", "--resume", str(run.path), "--memory", "low"], expected, "without --memory"
    )
    assert "--precision" not in err and "pick a local rule" not in err
