"""docs/edge/train_method.cpp, the app's loop in C++ against the runtime the executorch pip package
ships, compiled here and run: its SGD steps of a training method equal PyTorch's."""

import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from .test_edge_memory import ConvStep

SOURCE = Path(__file__).resolve().parents[1] / "docs" / "edge" / "train_method.cpp"
STEPS, LR = 5, 0.1
TOLERANCE = 1e-5


def compile_app(folder: Path) -> Path:
    """The C++ loop built with g++ against the pip package's headers and libraries."""
    executorch = pytest.importorskip("executorch", reason="needs executorch (docs/edge.md)")
    root = Path(executorch.__path__[0])
    compiler = shutil.which("g++") or shutil.which("c++")
    if (
        compiler is None
        or not (root / "include").is_dir()
        or not (root / "lib" / "libexecutorch.so").exists()
    ):
        pytest.skip("needs a C++ compiler and the executorch package's include/ and lib/")
    binary = folder / "train_method"
    c10 = root / "include" / "executorch" / "runtime" / "core" / "portable_type" / "c10"
    command = [
        compiler, "-std=c++17", "-O1", "-w", "-DC10_USING_CUSTOM_GENERATED_MACROS",
        f"-I{root / 'include'}", f"-I{c10}", str(SOURCE), "-o", str(binary), f"-L{root / 'lib'}",
        "-Wl,--no-as-needed", "-lexecutorch_kernels_optimized", "-lexecutorch", f"-Wl,-rpath,{root / 'lib'}",
    ]  # fmt: skip
    subprocess.run(command, check=True, timeout=300)
    return binary


@pytest.mark.slow  # a C++ compile (10-60 s) and a lowered training method
def test_the_cpp_loop_trains_a_method_as_pytorchs_sgd(tmp_path):
    binary = compile_app(tmp_path)
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    torch.manual_seed(0)
    model = ConvStep()
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = _export_forward_backward(torch.export.export(model, (x, y), strict=False))
        (tmp_path / "step.pte").write_bytes(to_edge(program).to_executorch().buffer)
    (tmp_path / "inputs.bin").write_bytes(x.numpy().tobytes() + y.numpy().tobytes())
    args = ["step.pte", "forward", str(STEPS), str(LR), "inputs.bin", "params.bin"]
    out = subprocess.run([str(binary), *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    losses = [float(line.split()[-1]) for line in out.stdout.splitlines() if line.startswith("step")]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    expected = []
    for _ in range(STEPS):
        loss, _ = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    np.testing.assert_allclose(losses, expected, rtol=TOLERANCE)
    trained = np.fromfile(tmp_path / "params.bin", dtype=np.float32)
    reference = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    np.testing.assert_allclose(trained, reference, rtol=0, atol=TOLERANCE)
