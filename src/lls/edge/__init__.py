"""Learning on the device: LLS training programs for ExecuTorch (``lls export --training``,
``lls edge train``, ``lls edge check``).

A trained (or fresh) run becomes one ExecuTorch program with one training method per block
(``block0``, ``block1``, ...) and one for the head (``head``); BP gets one whole-network method
(``network``). Each method's first output is its loss; ExecuTorch's joint forward-backward export
adds the gradients of that method's own parameters, which the runtime's SGD applies. So a device
holds one block's activations at a time, the block-local rule made real on an edge runtime.

- :mod:`lls.edge.layers`: the export-friendly forms of the pieces a block is made of (BatchNorm
  in training mode with its running statistics as inputs and outputs, the LLS latent pooling
  without adaptive pooling, the plain activation);
- :mod:`lls.edge.programs`: the builder, :func:`~lls.edge.programs.training_program`, and the
  program's layout (which method takes and gives what), also stored inside the program;
- :mod:`lls.edge.runtime`: the loop an app runs, in ExecuTorch's Python runtime.

``executorch`` is an optional extra: without it these modules import, and using them raises one
line saying ``pip install 'lls[edge]'``.
"""

from __future__ import annotations

from ..errors import LLSError
from ..training.export import INSTALL_EDGE


def require_executorch(what: str = "on-device training programs") -> None:
    """Refuse, in one line naming the install, when ``executorch`` is not installed."""
    try:
        import executorch.exir
        import executorch.extension.training  # noqa: F401
    except ImportError:
        raise LLSError(f"{what} need the executorch package: {INSTALL_EDGE}") from None
