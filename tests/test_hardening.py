"""Nothing a user types or a machine does ends in a traceback or loses a run."""

import contextlib
import errno
import json
import os
import shutil
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch

import lls
from lls.cli import main
from lls.files import Lock
from lls.training.rundir import RunDir, load_checkpoint_file

from .test_engine import capturable_sgd

pytestmark = pytest.mark.usefixtures("digits")
RUN = ["train", "--dataset", "digits", "--batch-size", "64", "--quiet"]


def one_line(capsys, argv, *fragments, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith("lls: error: "), err
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-epoch run to copy and damage."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main([*RUN, "--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# 1. a run killed between its checkpoint and its metrics heals when resumed


def test_metrics_are_rewritten_from_the_checkpoint_on_resume(run, capsys):
    (run / "metrics.jsonl").write_text(json.dumps(rows(run)[0]) + "\n")  # epoch 2's row lost
    (run / "metrics.csv").unlink()
    (run / "curves.png").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # finished: nothing to train
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3 and (run / "curves.png").exists()
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(run.parent / "report"), "--no-costs"]) == 0
    assert "not included" not in capsys.readouterr().out


# 2. a last batch of one image


@pytest.mark.parametrize("rule", lls.list_rules())
def test_a_last_batch_of_one_image_is_merged_into_the_one_before(rule, tmp_path, capsys):
    out = tmp_path / "r"
    assert main([*RUN, "--rule", rule, "--limit", "65", "--out", str(out)]) == 0  # 64 + 1 images
    assert rows(out)[0]["train_accuracy"] > 0
    assert "(65 train" in capsys.readouterr().out


def test_a_batch_of_one_image_is_refused_before_the_run_starts(tmp_path, capsys):
    one_line(capsys, [*RUN, "--batch-size", "1", "--out", str(tmp_path / "r")], "--batch-size 2 or more")
    assert not (tmp_path / "r").exists()


# 3. filesystem errors


def test_out_on_a_file_or_under_a_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line(capsys, [*RUN, "--out", str(blocker)], "is a file")
    one_line(capsys, [*RUN, "--out", str(blocker / "run")], "cannot write", "choose another path")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_out_on_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        one_line(capsys, [*RUN, "--out", str(folder / "run")], "cannot write", "writable location")
    finally:
        folder.chmod(0o700)


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "r"
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 5:  # config.json, then epoch 1's checkpoint, metrics and curves are written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr("lls.files.os.fsync", fsync)
    one_line(capsys, [*RUN, "--epochs", "3", "--out", str(out)], "No space left on device", "free disk space")
    monkeypatch.undo()
    assert load_checkpoint_file(out / "checkpoint.pt")["epoch"] == 1
    assert not list(out.glob(".*.tmp"))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0


# 4. resuming: fewer epochs, two writers, stale files


def test_fewer_epochs_than_done_is_refused(run, capsys):
    before = (run / "config.json").read_bytes()
    one_line(
        capsys, ["train", "--resume", str(run), "--epochs", "1"], "trained 2 epochs", "--epochs 2 or more"
    )
    assert (run / "config.json").read_bytes() == before


def test_two_processes_never_write_one_run(run, capsys):
    with Lock(run):
        one_line(capsys, ["train", "--resume", str(run), "--epochs", "3"], "is being written by pid", "wait")
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"half")  # left by a writer killed mid-write
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # the stale lock file is no lock
    assert not list(run.glob(".*.tmp"))


def test_a_resume_may_repeat_the_defaults_it_ran_with(run, capsys):
    assert main(["train", "--resume", str(run), "--temperature", "0.5", "--lr", "0.005", "--quiet"]) == 0
    capsys.readouterr()
    one_line(capsys, ["train", "--resume", str(run), "--out", str(run)], "--resume already names the run")


# 5, 6. damaged dataset files


def test_an_idx_header_whose_size_overflows_is_refused(tmp_path):
    from lls.data.idx import read_idx

    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2**32 - 1, 2**32 - 1, 2**32 - 1))
    with pytest.raises(lls.LLSError, match="truncated"):
        read_idx(path)


def test_an_oversized_image_is_refused_with_its_name(tmp_path, monkeypatch):
    from PIL import Image

    from lls.data.loader import decode_image

    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # > 2x over the limit: a decompression bomb
    with pytest.raises(lls.LLSError, match=r"huge\.png"):
        decode_image(path, None, 32, None)


def test_a_labels_file_error_names_the_labels_file(tmp_path):
    from lls.data.mnist import SPLIT_FILES, IdxSource

    from .idx_files import write_idx

    rng = np.random.default_rng(0)
    for key, stem in SPLIT_FILES.items():
        shape = (4, 28, 28) if key.endswith("images") else (4,)
        write_idx(tmp_path / stem, rng.integers(0, 3, shape, dtype=np.uint8))
    write_idx(tmp_path / SPLIT_FILES["test_labels"], np.zeros(3, dtype=np.uint8))
    with pytest.raises(lls.LLSError, match="t10k-labels-idx1-ubyte holds"):
        IdxSource(name="tiny", classes=tuple("abc"), counts=None).load(tmp_path, download=False)


def test_an_empty_data_dir_is_not_replaced_by_another_copy(tmp_path, capsys):
    one_line(
        capsys, ["data", "check", "fashion-mnist", "--data-dir", str(tmp_path)], str(tmp_path), "not found"
    )


def test_archives_are_bounded_in_size_and_count_without_a_checksum(tmp_path, monkeypatch):
    from lls.data import archive

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("zeros.bin", b"\0" * (4 << 20))  # 4 MiB of zeros: a few KiB packed
    monkeypatch.setattr(archive, "MIN_UNPACKED_LIMIT", 1 << 20)
    with pytest.raises(lls.LLSError, match="would unpack to"):
        archive.extract(bomb, tmp_path / "out")
    assert not (tmp_path / "out" / "zeros.bin").exists()
    many = tmp_path / "many.tar"
    with tarfile.open(many, "w") as t:
        for i in range(5):
            (tmp_path / f"f{i}").write_text("x")
            t.add(tmp_path / f"f{i}", arcname=f"f{i}")
    monkeypatch.setattr(archive, "MAX_MEMBERS", 4)
    with pytest.raises(lls.LLSError, match="holds 5 files"):
        archive.extract(many, tmp_path / "out")


# 8. damaged run files: every one named with its file and field


def rewrite_checkpoint(run, change):
    state = load_checkpoint_file(run / "checkpoint.pt")
    change(state)
    RunDir(run).save_checkpoint(state)  # a valid checksum: the content is what is wrong


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda s: s.pop("rng"), "'rng' is missing"),
        (lambda s: s.update(history="many"), "'history'"),
        (lambda s: s.update(history=[{"epoch": 1}] * 2), "'history'"),
        (lambda s: s.update(progress=[1, 2]), "'progress'"),
        (lambda s: s.update(progress={"epoch": "x"}), "'progress'"),
        (lambda s: s.update(epoch=-1), "'epoch'"),
        (lambda s: s["trainer"]["net"].pop("head.weight"), "does not fit the model"),
    ],
)
def test_a_damaged_checkpoint_is_named_in_resume_and_eval(run, capsys, change, field):
    rewrite_checkpoint(run, change)
    one_line(capsys, ["train", "--resume", str(run), "--epochs", "3"], "checkpoint.pt", field)
    one_line(capsys, ["eval", str(run)], "checkpoint.pt", field)


def test_a_flipped_byte_is_caught_by_the_checksum(run, capsys):
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(data))
    one_line(capsys, ["eval", str(run)], "checkpoint.pt")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "not readable JSON"),
        ('{"config": {"epochs": "many"}}', "epochs must be a whole number"),
        ('{"config": {"rule": "hebb"}}', "unknown rule 'hebb'"),
        ('["a list"]', 'no "config" object'),
    ],
)
def test_a_damaged_config_is_named_everywhere(run, capsys, content, fragment):
    (run / "config.json").write_text(content)
    for argv in (["train", "--resume", str(run)], ["eval", str(run)], ["report", str(run)]):
        one_line(capsys, argv, "config.json", fragment)


def test_damaged_metrics_are_named_by_report_and_healed_by_resume(run, capsys):
    (run / "metrics.jsonl").write_text("{oops\n")
    one_line(
        capsys, ["report", str(run), "--out", str(run.parent / "rep")], "metrics.jsonl line 1", "--resume"
    )
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert len(rows(run)) == 2


# 9 and the smaller cases


def test_outputs_that_are_the_wrong_kind_of_path(run, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_line(capsys, ["diagnose", str(run), "--batches", "1", "--out", str(tmp_path / "file")], "is a file")
    one_line(capsys, ["plot", "basis", "--out", str(tmp_path)], "is a folder")


def test_bp_divergence_blames_the_heads_loss(tmp_path, capsys, monkeypatch):
    original = lls.Trainer.train_step

    def poisoned(self, x, y):
        result = original(self, x, y)
        result.loss.fill_(float("nan"))
        return result

    monkeypatch.setattr(lls.Trainer, "train_step", poisoned)
    line = one_line(
        capsys, [*RUN, "--rule", "bp", "--out", str(tmp_path / "r")], "the head's loss is nan", code=3
    )
    assert "block" not in line.split("step 1:")[1]


def test_reduced_above_the_class_count_is_refused(tmp_path, capsys):
    argv = [*RUN, "--rule", "lls-mxm", "--reduced", "20", "--out", str(tmp_path / "r")]
    one_line(capsys, argv, "reduced (20) must not exceed the number of classes (10)")
    assert not (tmp_path / "r").exists()


def test_tensorboard_missing_leaves_nothing_behind(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    one_line(capsys, [*RUN, "--tensorboard", "--out", str(tmp_path / "r")], "pip install tensorboard")
    assert not (tmp_path / "r").exists()


def test_old_checkpoints_without_a_checksum_still_load(run):
    state = load_checkpoint_file(run / "checkpoint.pt")
    torch.save({**state, "format": "lls-checkpoint", "version": 1}, run / "checkpoint.pt")
    assert load_checkpoint_file(run / "checkpoint.pt")["epoch"] == 2


# 10. the last hostile inputs: rows, headers, sizes, paths, resumes, signals


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"[1, 2, 3]\n", "line 1 is list, not an epoch's record"),
        (b"5\n", "line 1 is int, not an epoch's record"),
        (b'{"epoch": 1}\n', "line 1 lacks the fields ["),
        (None, "has train_loss = 'low'"),  # a string where a number belongs
        (None, "has unknown fields ['nope']"),
        (np.random.default_rng(0).bytes(300), "metrics.jsonl"),
        (b'{"epoch": 1, "note": "caf\xe9"}\n', "is not text (byte 25)"),
    ],
)
def test_metrics_rows_are_checked_one_by_one(run, capsys, content, fragment):
    if content is None:
        row = rows(run)[0]
        row.update(train_loss="low") if "train_loss" in fragment else row.update(nope=1)
        content = (json.dumps(row) + "\n").encode()
    (run / "metrics.jsonl").write_bytes(content)
    one_line(
        capsys, ["report", str(run), "--out", str(run.parent / "rep"), "--no-costs"], fragment, "--resume"
    )
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # rewritten from the checkpoint
    assert [r["epoch"] for r in rows(run)] == [1, 2]


def test_an_idx_header_with_too_many_dimensions_is_refused(tmp_path):
    from lls.data.idx import read_idx

    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 255]) + b"\0\0\0\1" * 255 + b"\7")  # 255 dimensions of 1: 1 byte
    with pytest.raises(lls.LLSError, match="declares 255 dimensions"):
        read_idx(path)


@pytest.fixture
def memory_of(monkeypatch):
    """Pretend the machine has ``size`` bytes free (what a step is checked against)."""

    def set_free(size):
        monkeypatch.setattr("lls.measure.fits.available_bytes", lambda device: size)

    return set_free


def test_steps_and_plots_that_cannot_fit_are_refused_before_they_allocate(memory_of, tmp_path, capsys):
    memory_of(64 << 30)  # 64 GiB free
    # the head alone is 512 x 10^7 weights (19 GiB), five copies of them with gradients and moments
    one_line(
        capsys, ["cost", "--input", "1,28,28", "--classes", "10000000"], "would not fit", "64 GiB available"
    )
    one_line(capsys, ["bench", "--input", "1,28,28", "--classes", "10000000"], "would not fit")
    memory_of(16 << 30)  # 10 x 10^8 float64 entries are 7.45 GiB, drawn through several copies
    one_line(
        capsys, ["plot", "basis", "--dim", "100000000", "--out", str(tmp_path / "b.png")], "would not fit"
    )
    assert not (tmp_path / "b.png").exists()
    memory_of(1 << 20)  # 1 MiB: digits' 1438 training images in one batch need more
    out = tmp_path / "r"
    argv = [
        "train",
        "--dataset",
        "digits",
        "--limit",
        "10000000000",
        "--batch-size",
        "100000",
        "--out",
        str(out),
    ]
    one_line(capsys, argv, "at batch 1438 would not fit in memory", "1 MiB available", "--memory low")
    assert not out.exists()


@pytest.mark.slow  # three measured steps, each in a fresh process
@pytest.mark.parametrize("rule", ["lls", "bp", "dfa"])
def test_the_estimate_errs_high(rule):
    from lls.measure.fits import estimated_bytes, meta_trainer
    from lls.measure.memory import measure_memory

    shape, batch = (1, 28, 28), 128
    measured = measure_memory("smallconv", rule, shape, 10, batch=batch)
    held = measured["param_bytes"] + measured["optimizer_bytes"] + measured["step_peak_bytes"]
    estimate = estimated_bytes(meta_trainer("smallconv", rule, shape, 10), batch)
    assert held < estimate < 3 * held  # above what a step holds, and not absurdly so


def test_paths_that_are_files_or_too_long_say_so(run, tmp_path, capsys):
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0\n")
    one_line(capsys, ["eval", str(file)], "is a file, not a folder")
    one_line(capsys, ["train", "--resume", str(file)], "is a file, not a folder")
    one_line(capsys, ["report", str(file)], "is a file, not a folder")
    argv = [*RUN, "--dataset", "fashion-mnist", "--data-dir", str(file), "--out", str(tmp_path / "r")]
    one_line(capsys, argv, "--data-dir", "is a file, not a folder")
    long = tmp_path / ("a" * 300)
    one_line(capsys, [*RUN, "--out", str(long / "r")], "is too long (300 bytes; a name may have at most 255)")
    one_line(capsys, ["eval", str(long)], "is too long")
    assert not (tmp_path / "r").exists()


def test_report_counts_a_run_named_twice_once(run, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(run), str(run), str(run.parent), "--out", str(out), "--no-costs"]) == 0
    (row,) = json.loads((out / "report.json").read_text())
    assert row["seeds"] == [0] and len(row["final"]) == 1


@pytest.mark.parametrize(
    "progress, fragment",
    [
        ({"epoch": 0, "step": 5, "nope": 1}, "has unknown fields ['nope']"),
        ({"epoch": 2, "step": 5}, "lacks the fields ['correct', 'loss_sum', 'seconds', 'seen']"),
        ({"epoch": 0, "step": 1, "loss_sum": 1.0, "correct": 1, "seen": 64, "seconds": 1.0}, "of epoch 1"),
        (
            {"epoch": 2, "step": 10**9, "loss_sum": 1.0, "correct": 1, "seen": 10**11, "seconds": 1.0},
            "step 1000000000",
        ),
        (
            {"epoch": 2, "step": 3, "loss_sum": 1.0, "correct": 9, "seen": 2, "seconds": 1.0},
            "counts 2 images",
        ),
    ],
)
def test_a_bogus_progress_record_is_named(run, capsys, progress, fragment):
    rewrite_checkpoint(run, lambda s: s.update(progress=progress))
    one_line(capsys, ["train", "--resume", str(run), "--epochs", "3"], "field 'progress'", fragment)
    one_line(capsys, ["eval", str(run)], "field 'progress'", fragment)


def test_a_resume_may_change_how_it_runs_and_names_what_it_may_not(run, capsys, monkeypatch):
    assert main(["train", "--resume", str(run), "--memory", "low", "--engine", "eager", "--quiet"]) == 0
    record = json.loads((run / "config.json").read_text())
    assert record["config"]["memory"] == "low"
    assert record["resumed"][-1]["memory"] == [None, "low"] and record["resumed"][-1]["engine"] == [
        "auto",
        "eager",
    ]
    capsys.readouterr()
    rewrite_checkpoint(run, lambda s: s["config"].update(batch_size=32))  # config.json says 64

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was loaded before the conflict was found")

    monkeypatch.setattr("lls.training.run.load_dataset", no_data)
    one_line(
        capsys, ["train", "--resume", str(run), "--epochs", "4"], "--batch-size 64 (the checkpoint has 32)"
    )


def test_bench_rules_keep_a_rules_options_together(capsys):
    from lls.measure.bench import split_rules

    assert split_rules("lls:basis=periodic,temperature=0.25,bp@eager") == [
        "lls:basis=periodic,temperature=0.25",
        "bp@eager",
    ]
    assert split_rules("lls,bp") == ["lls", "bp"]
    assert split_rules("lls:seed=1,dfa:seed=2,feedback=centred") == [
        "lls:seed=1",
        "dfa:seed=2,feedback=centred",
    ]
    spec = "lls:basis=periodic,temperature=0.25"  # the example `lls bench --help` gives
    argv = ["bench", "--dataset", "digits", "--rules", spec, "--steps", "1", "--warmup", "0", "--batch", "8"]
    assert main([*argv, "--no-memory", "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out.splitlines()[-1])["rules"]) == [spec]


@pytest.mark.parametrize("suffix, magic", [(".pdf", b"%PDF"), (".svg", b"<?xml"), (".png", b"\x89PNG")])
def test_a_figure_is_written_in_its_suffixs_format(tmp_path, suffix, magic):
    path = tmp_path / f"b{suffix}"
    assert main(["plot", "basis", "--classes", "3", "--dim", "16", "--out", str(path)]) == 0
    assert path.read_bytes().startswith(magic)


def test_ctrl_c_while_the_libraries_load_ends_with_the_aborted_line(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen(
        [sys.executable, "-m", "lls", "train", "--dataset", "digits", "--out", str(tmp_path / "r")],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.3)  # torch is still importing
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1].decode()
    assert child.returncode == 130 and err.strip().splitlines()[-1] == "lls: aborted", err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


# 11. the graph engine's state, read on a CPU (the CUDA tests skip without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")


def small_trainer(device="cpu", engine="eager", optimizer="adamw-sf"):
    return lls.build_trainer(
        "smallconv", "lls", (1, 8, 8), 10, device=device, engine=engine, optimizer=optimizer, lr=1e-3
    )


def small_batch(device="cpu", n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


@pytest.mark.parametrize("optimizer", ["adamw-sf", "sgd"])
def test_a_training_step_inside_evaluation_is_refused(optimizer):
    trainer = small_trainer(optimizer=optimizer)
    x, y = small_batch()
    trainer.train_step(x, y)
    with trainer.evaluation(refresh=[(x, y)]), pytest.raises(lls.LLSError, match=r"inside evaluation\(\)"):
        trainer.train_step(x, y)
    trainer.train_step(x, y)  # after it, training goes on


def test_the_hyperparameters_a_graph_holds_are_the_hosts():
    from lls.step.engine import hyperparameters

    trainer = small_trainer()
    trainer.train_step(*small_batch())  # the step scalars are device tensors now
    before = hyperparameters(trainer.optimizers)
    assert before == hyperparameters(trainer.optimizers)
    assert all("lr" in group and not any(torch.is_tensor(v) for v in group.values()) for group in before)
    trainer.optimizers[1].param_groups[0]["lr"] = 1e-4
    assert hyperparameters(trainer.optimizers) != before


def test_a_mid_epoch_checkpoint_records_its_data_path_and_a_resume_keeps_it(tmp_path, capsys, monkeypatch):
    out, polls = tmp_path / "r", {"n": 0}

    @contextlib.contextmanager
    def stop_after_two_steps():
        yield lambda: polls.__setitem__("n", polls["n"] + 1) or polls["n"] > 2

    monkeypatch.setattr("lls.training.run.graceful_interrupt", stop_after_two_steps)
    assert main([*RUN, "--limit", "320", "--out", str(out)]) == 130
    monkeypatch.undo()
    progress = load_checkpoint_file(out / "checkpoint.pt")["progress"]
    assert 0 < progress["step"] < 5 and progress["draws"] == "host"  # the eager engine's, on a CPU

    real_build = lls.training.run.build_session
    asked = []
    monkeypatch.setattr(
        "lls.training.run.build_session", lambda *a, **k: asked.append(k["draws"]) or real_build(*a, **k)
    )
    rewrite_checkpoint(out, lambda s: s["progress"].update(draws="device:cuda"))  # drawn by a GPU run
    one_line(capsys, ["train", "--resume", str(out)], "'draws'", "'device:cuda'", "this run is on cpu")
    assert asked == []  # refused before the dataset was loaded
    rewrite_checkpoint(out, lambda s: s["progress"].update(draws="device:cpu"))
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    assert asked == ["device"]  # the rest of the epoch from the permutation it started with


@needs_cuda
def test_under_the_graph_engine_a_step_inside_evaluation_is_refused_after_capture():
    trainer = small_trainer("cuda", "graph")
    x, y = small_batch("cuda")
    for _ in range(6):  # warm-up steps, then captured and replayed
        trainer.train_step(x, y)
    assert trainer.engine.replays > 0
    with trainer.evaluation(refresh=[(x, y)]), pytest.raises(lls.LLSError, match=r"inside evaluation\(\)"):
        trainer.train_step(x, y)


@needs_cuda
def test_under_the_graph_engine_a_new_learning_rate_takes_effect(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the engines compared in float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager, graph = (small_trainer("cuda", engine, capturable_sgd) for engine in ("eager", "graph"))
    x, y = small_batch("cuda")
    for step in range(12):
        if step == 8:  # after the graph was captured
            for trainer in (eager, graph):
                for optimizer in trainer.optimizers:
                    optimizer.param_groups[0]["lr"] = 0.0
        eager.train_step(x, y), graph.train_step(x, y)
    frozen = {k: v.clone() for k, v in graph.net.state_dict().items() if "weight" in k}
    graph.train_step(x, y)  # lr 0: the weights do not move
    assert all(torch.equal(v, graph.net.state_dict()[k]) for k, v in frozen.items())
    for a, b in zip(eager.net.parameters(), graph.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_under_the_graph_engine_a_divergence_stops_at_the_step(tmp_path):
    from lls.training.fit import TrainingDiverged, train_epoch

    trainer = small_trainer("cuda", "graph")

    class Batches:  # 12 good batches, then one holding a NaN: replayed by the captured graph
        device, batch_size = torch.device("cuda"), 16

        def __len__(self):
            return 20

        def epoch(self, epoch, start=0):
            for step in range(start, 20):
                x, y = small_batch("cuda", seed=step)
                if step == 12:
                    x[0, 0, 0, 0] = float("nan")
                yield x, y

    with pytest.raises(TrainingDiverged, match=r"step 13: "):
        train_epoch(trainer, Batches(), 0, progress=False)
    assert trainer.engine.replays > 0
