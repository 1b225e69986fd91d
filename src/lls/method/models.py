"""The paper's models as data (docs/method.md, "The models"), looked up by name.

Each entry is a list of block specs; ``pool`` is the block's LLS latent pool side p_l from the
paper, and for a dense block the length the authors' code pools its output to (``pooling_size`` of
their layers: 2048 for SmallConvL's 1024 units and VGG11's 4096; the output's own length for
SmallConv and VGG8). ``create_model`` turns a spec list into a :class:`~lls.method.net.LocalNet` for any
number of input channels, input size and classes, with the options of :class:`ModelOptions`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..checks import checked
from ..errors import LLSError
from ..registry import Registry
from .net import AvgPool, Conv, Dense, DWSeparable, LocalNet, MaxPool, ModelOptions, Spec, build
from .zoo import ResNet, Stage, ViT

FACTORY_SEPARATOR = ":"  # "package.module:function": a model built by an importable factory


class ModelRegistry(Registry):
    """The zoo's models by name, and any model an importable factory builds: a name
    ``"package.module:function"`` is the function, called as ``function(input_shape=(C, H, W),
    num_classes=K, **model_options)``; it returns the network (an ``lls.LocalNet``, e.g. from
    ``lls.localize``). This is how a run of your own model records it (``lls.save_run``)."""

    def get(self, name: str):
        if isinstance(name, str) and FACTORY_SEPARATOR in name:
            return model_factory(name)
        return super().get(name)

    def __contains__(self, name: object) -> bool:
        return (isinstance(name, str) and FACTORY_SEPARATOR in name) or super().__contains__(name)


def is_factory(name: object) -> bool:
    return isinstance(name, str) and FACTORY_SEPARATOR in name


def model_factory(path: str) -> Callable[..., nn.Module]:
    """The function ``"package.module:function"`` names (a dotted path after the colon: a class's
    method), or one line saying why it cannot be imported."""
    module_name, _, qualname = path.partition(FACTORY_SEPARATOR)
    try:
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError, ValueError) as error:
        raise LLSError(
            f"cannot import the model factory {path!r} ({error}); a model is recorded as "
            "'package.module:function', importable where the run is read"
        ) from None
    if not callable(target):
        raise LLSError(f"the model factory {path!r} is a {type(target).__name__}, not a function")
    return target


MODELS: Registry[tuple[Spec, ...]] = ModelRegistry("model")

MODELS.register("smallconv")(
    (
        Conv(32, pool=4),
        MaxPool(),
        Conv(64, pool=2),
        MaxPool(),
        Conv(128, pool=2),
        AvgPool(2),
        Dense(512, pool=512),
    )
)
MODELS.register("smallconvl")(
    (
        Conv(96, pool=4),
        MaxPool(),
        Conv(192, pool=2),
        MaxPool(),
        Conv(512, pool=2),
        AvgPool(2),
        Dense(1024, pool=2048),
    )
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
        Dense(1024, pool=1024),
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
        Dense(4096, pool=2048),  # the authors' code averages pairs of units
        Dense(4096, pool=2048),
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


# Residual networks (He et al. 2016): the CIFAR family, 6n + 2 layers in three stages of 16, 32 and
# 64 channels, and ResNet-18/34's four stages of 64..512 channels with the CIFAR-style stem (a
# stride-1 3x3 convolution, no max-pool) for 28-64 px inputs. Global average pool, then the head.
CIFAR_RESNET_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}  # n per stage
for _name, _n in CIFAR_RESNET_DEPTHS.items():
    MODELS.register(_name)((ResNet(16, (Stage(16, _n), Stage(32, _n, 2), Stage(64, _n, 2))), AvgPool(1)))
RESNET_DEPTHS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}  # basic blocks per stage
for _name, _depths in RESNET_DEPTHS.items():
    _stages = tuple(
        Stage(c, d, 1 if c == 64 else 2) for c, d in zip((64, 128, 256, 512), _depths, strict=True)
    )
    MODELS.register(_name)((ResNet(64, _stages), AvgPool(1)))
# A small vision transformer for 28-32 px inputs: 4 x 4 patches (49 or 64 tokens) of dimension 64,
# six pre-norm blocks of 4 heads; its LLS latents are token means of 64 entries.
MODELS.register("vit")((ViT(dim=64, depth=6, heads=4, patch=4),))


def list_models() -> list[str]:
    return MODELS.names()


def model_specs(name: str) -> tuple[Spec, ...]:
    return MODELS.get(name)


@checked
def create_model(
    name: str | Sequence[Spec],
    *,
    in_channels: int = 3,
    input_size: int | Sequence[int] = 32,
    num_classes: int = 10,
    activation: str = "leaky_relu",
    **options: str,
) -> LocalNet:
    """Build a registered model, e.g. ``create_model("vgg8", in_channels=3, input_size=32)``, or
    one given as its list of block specs.

    ``options`` are :class:`ModelOptions` fields, e.g. ``dense_latent="output"``."""
    if is_factory(name):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        net = model_factory(name)(input_shape=(in_channels, *size), num_classes=num_classes, **options)
        if not isinstance(net, LocalNet):
            raise LLSError(
                f"the model factory {name!r} returned a {type(net).__name__}; it must return the "
                "network as trained: an lls.LocalNet (e.g. lls.localize(model, ...))"
            )
        return net
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    specs, label = (MODELS.get(name), name) if isinstance(name, str) else (tuple(name), "model")
    options = model_options(options)
    check_options_apply(label, specs, options)
    return build(specs, (in_channels, h, w), num_classes, activation, name=label, **options)


# Why a model has no use for an option, when it has none (taken_options)
NO_USE = {
    "dense_latent": "none of its dense blocks pools its latent to another length",
    "depthwise_padding": "it has no strided depthwise convolution",
    "block_granularity": "it has no residual stages",
    "width": "it has no block whose channels scale",
    "last_latent": "it is not a residual network (its last block's latent is fixed by its spec)",
}


def taken_options(specs: Sequence[Spec]) -> set[str]:
    """The :class:`ModelOptions` that change what ``specs`` build (the others would be ignored)."""
    taken = set()
    for spec in specs:
        if isinstance(spec, Dense) and spec.pool is not None and spec.pool != spec.width:
            taken.add("dense_latent")
        if isinstance(spec, DWSeparable) and spec.stride != 1:
            taken.add("depthwise_padding")
        if hasattr(spec, "count") and spec.count("block") != spec.count("stage"):
            taken.add("block_granularity")
        if isinstance(spec, (Conv, DWSeparable, Dense)) or hasattr(spec, "widen"):
            taken.add("width")
        if isinstance(spec, ResNet):
            taken.add("last_latent")
    return taken


def check_options_apply(name: str, specs: Sequence[Spec], options: dict, given: Sequence[str] = ()) -> None:
    """Refuse a model option ``specs`` have no use for: one ``given`` (typed), or set away from its
    default; one line naming it, why, and the models that take it."""
    defaults, taken = ModelOptions().as_dict(), taken_options(specs)
    for key, value in options.items():
        if key not in taken and (key in given or value != defaults[key]):
            users = [m for m in MODELS.names() if key in taken_options(MODELS.get(m))]
            raise LLSError(
                f"model {name!r} has no use for {key} (--{key.replace('_', '-')}): {NO_USE[key]}; "
                f"drop it (models that take it: {', '.join(users)})"
            )


def applicable_options(name: str, options: dict) -> dict:
    """``options`` without those the model ``name`` has no use for (a run recorded before they were
    refused: it trained without them)."""
    if is_factory(name):  # a factory's options are its own keyword arguments
        return dict(options)
    taken = taken_options(MODELS.get(name))
    return {k: v for k, v in model_options(options).items() if k in taken}


def model_options(options: dict | None) -> dict[str, str]:
    """``options`` checked against :class:`ModelOptions`, with the defaults filled in."""
    valid = [f.name for f in dataclasses.fields(ModelOptions)]
    for key in options or {}:
        if key not in valid:
            raise LLSError(f"models have no option {key!r}; their options: {', '.join(valid)}")
    return ModelOptions(**(options or {})).as_dict()
