"""The paper's models as data (METHOD.md section 2), looked up by name.

Each entry is a list of block specs; ``pool`` is the block's LLS latent pool side p_l from the
paper. ``create_model`` turns a spec list into a :class:`~lls.net.LocalNet` for any number of input
channels, input size and classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from .net import AvgPool, Conv, Dense, DWSeparable, LocalNet, MaxPool, Spec, build
from .registry import Registry

MODELS: Registry[tuple[Spec, ...]] = Registry("model")

MODELS.register("smallconv")(
    (Conv(32, pool=4), MaxPool(), Conv(64, pool=2), MaxPool(), Conv(128, pool=2), AvgPool(2), Dense(512))
)
MODELS.register("smallconvl")(
    (Conv(96, pool=4), MaxPool(), Conv(192, pool=2), MaxPool(), Conv(512, pool=2), AvgPool(2), Dense(1024))
)
MODELS.register("vgg8")(
    (
        Conv(128, pool=4),
        Conv(256, pool=2),
        MaxPool(),
        Conv(256, pool=2),
        Conv(256, pool=2),
        MaxPool(),
        Conv(512, pool=2),
        MaxPool(),
        Conv(512, pool=2),
        AvgPool(2),
        Dense(1024),
    )
)
MODELS.register("vgg11")(
    (
        Conv(64, pool=4),
        MaxPool(),
        Conv(128, pool=2),
        MaxPool(),
        Conv(256, pool=2),
        Conv(256, pool=2),
        MaxPool(),
        Conv(512, pool=2),
        Conv(512, pool=2),
        MaxPool(),
        Conv(512, pool=2),
        Conv(512, pool=2),
        AvgPool(8),
        Dense(4096),
        Dense(4096),
    )
)
MODELS.register("mobilenetv1")(
    (
        Conv(32, pool=8, stride=2),
        DWSeparable(64, pool=4),
        DWSeparable(128, pool=4, stride=2),
        DWSeparable(128, pool=4),
        DWSeparable(256, pool=2, stride=2),
        DWSeparable(256, pool=2),
        DWSeparable(512, pool=2, stride=2),
        *(DWSeparable(512, pool=2) for _ in range(5)),
        DWSeparable(1024, pool=1, stride=2),
        DWSeparable(1024, pool=1),
        AvgPool(1),
    )
)


def list_models() -> list[str]:
    return MODELS.names()


def model_specs(name: str) -> tuple[Spec, ...]:
    return MODELS.get(name)


def create_model(
    name: str | Sequence[Spec],
    *,
    in_channels: int = 3,
    input_size: int | Sequence[int] = 32,
    num_classes: int = 10,
    activation: str = "leaky_relu",
) -> LocalNet:
    """Build a registered model, e.g. ``create_model("vgg8", in_channels=3, input_size=32)``, or
    one given as its list of block specs."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    specs, label = (MODELS.get(name), name) if isinstance(name, str) else (tuple(name), "model")
    return build(specs, (in_channels, h, w), num_classes, activation, name=label)
