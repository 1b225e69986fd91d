"""Real processes for the tests that need a process boundary (signals, kill -9, torch.distributed),
without paying an interpreter start and a torch import for each: a multiprocessing fork server
imports torch and lls once, then forks every process from that clean state (it has never run a
parallel region, so forking it is safe). Each process runs a function (``lls.cli.main`` for a
command line) with its own environment, its stdout and stderr in files, and exits with its status.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TIMEOUT = 240
_CONTEXT = multiprocessing.get_context("forkserver")
# torch._dynamo: the first optimizer a process builds imports it (torch.optim's dynamo guard), 3.5 s
# of every child's start otherwise; sklearn.datasets: the digits set, 2 s; matplotlib: curves.png.
_CONTEXT.set_forkserver_preload(
    [
        "torch",
        "torch._dynamo",
        "sklearn.datasets",
        "matplotlib.backends.backend_agg",
        "lls",
        "lls.cli",
        "lls.training.pipeline",
        "tests.processes",
    ]
)


def _run(target: Callable[..., int | None], args: tuple, env: dict[str, str], out: str, err: str) -> None:
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    if "OMP_NUM_THREADS" in env:  # torch is already imported: tell it directly
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = target(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def lls_main(argv: Sequence[str]) -> int:
    from lls.cli import main

    return main(list(argv))


class Process:
    """A started process: ``signal``, ``poll`` and ``finish`` like subprocess.Popen's."""

    def __init__(self, target: Callable, args: tuple, env: dict[str, str]) -> None:
        folder = Path(tempfile.mkdtemp(prefix="lls-process-"))
        self.out, self.err = folder / "stdout", folder / "stderr"
        self.process = _CONTEXT.Process(target=_run, args=(target, args, env, str(self.out), str(self.err)))
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, number: int) -> None:
        os.kill(self.pid, number)

    def poll(self) -> int | None:
        return self.process.exitcode

    def finish(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        """(exit status, stdout, stderr) once the process has ended; a process still running at
        ``timeout`` is killed and reported as such."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.process.kill()
            self.process.join()
            raise AssertionError(f"process still running after {timeout} s: {self.stderr()}")
        return self.process.exitcode, self.out.read_text(), self.stderr()

    def stderr(self) -> str:
        return self.err.read_text() if self.err.exists() else ""


def start(target: Callable, *args, env: dict[str, str] | None = None) -> Process:
    """``target(*args)`` in a new process; it uses as many threads as this one unless ``env`` sets
    OMP_NUM_THREADS (thread counts change the order of float sums, so exactness tests keep them)."""
    env = dict(env or {})
    # the forked server was never told this process's thread count: pass it on (under xdist,
    # conftest sets one thread per worker)
    env.setdefault("OMP_NUM_THREADS", str(_threads()))
    return Process(target, args, env)


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def lls(*argv: str, env: dict[str, str] | None = None) -> Process:
    """``lls ARGV`` in a process of its own."""
    return start(lls_main, list(argv), env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: Callable, *args, world: int = 2) -> list[Process]:
    """``world`` processes with torchrun's environment, each running ``target(*args)``."""
    port = str(free_port())
    common = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port,
        "WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": "1",
    }
    return [
        start(target, *args, env={**common, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        for rank in range(world)
    ]


def lls_torchrun(*argv: str, world: int = 2) -> list[Process]:
    return torchrun(lls_main, list(argv), world=world)


def finish(processes: list[Process]) -> list[tuple[int, str, str]]:
    return [p.finish() for p in processes]


def wait_for(path: Path, processes: list[Process], timeout: float = TIMEOUT) -> None:
    """Wait until ``path`` exists, failing early if the first process ends without it."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if processes[0].poll() is not None:
            raise AssertionError(f"the process ended before {path} appeared: {processes[0].stderr()}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


__all__ = ["SIGINT", "finish", "lls", "lls_torchrun", "start", "torchrun", "wait_for"]
SIGINT = signal.SIGINT
