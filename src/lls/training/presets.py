"""The paper's experiments (docs/method.md, "Presets") as named presets, and a same-budget comparison.

Settings follow the authors' published run script: batch 128, schedule-free AdamW, lr 5e-3,
temperature 0.5, 100 epochs (300 for VGG8 on CIFAR, Imagenette, TinyImageNet and VWW), SmallConv
with the "basic" CIFAR / Imagenette augmentation and VGG8 with the "aug" one. Where the authors'
code fixes a detail the paper leaves open, the presets follow the code: VGG8's random bases and
local classifiers are K x 2048 matrices pooled to each block's d_l (``readout_width``), and dense
latents are pooled to the authors' lengths (the models' default, ``ModelOptions.dense_latent``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import LLSError
from ..method.rules import LLS, REFERENCE_READOUT_WIDTH, RULES, comparison_rules, seeded_options
from .config import TrainConfig

TABLES = ("table1", "table2", "table3", "compare")


@dataclass(frozen=True)
class Preset:
    table: str
    dataset: str
    model: str
    rule: str
    label: str  # the row name in the paper's tables
    epochs: int
    augment: str | None = None
    rule_options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        return self.label.lower().replace(" (", "-").replace(")", "").replace(" ", "-").replace("=", "")

    @property
    def name(self) -> str:
        return f"{self.table}/{self.dataset}/{self.model}/{self.slug}"

    def config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            dataset=self.dataset,
            model=self.model,
            rule=self.rule,
            rule_options=seeded_options(self.rule, self.rule_options, seed),  # as `lls train` does
            epochs=self.epochs,
            augment=self.augment,
            seed=seed,
        )

    def __hash__(self) -> int:
        return hash(self.name)


def _presets() -> list[Preset]:
    out: list[Preset] = []
    bases = (("LLS (random)", "random"), ("LLS (periodic)", "periodic"), ("LLS (square)", "square"))
    # Table 1: basis ablation, SmallConv and VGG8
    for dataset in ("mnist", "fashion-mnist", "cifar10", "imagenette"):
        for model in ("smallconv", "vgg8"):
            natural_images = dataset in ("cifar10", "imagenette")
            long_run = model == "vgg8" and natural_images
            augment = ("aug" if model == "vgg8" else "basic") if natural_images else None
            for label, basis in bases:
                options = {"basis": basis}
                if basis == "random" and model == "vgg8":  # the authors' K x 2048 draw, pooled
                    options["readout_width"] = REFERENCE_READOUT_WIDTH
                out.append(
                    Preset(
                        "table1",
                        dataset,
                        model,
                        "lls",
                        label,
                        300 if long_run else 100,
                        augment,
                        options,
                    )
                )
    # Table 2: SmallConvL, LLS (square) vs BP vs DFA; learning-signal MACs and memory
    for dataset in ("mnist", "cifar10", "cifar100"):
        augment = "basic" if dataset.startswith("cifar") else None
        out.append(Preset("table2", dataset, "smallconvl", "bp", "BP", 100, augment))
        out.append(Preset("table2", dataset, "smallconvl", "dfa", "DFA", 100, augment))
        out.append(
            Preset("table2", dataset, "smallconvl", "lls", "LLS (square)", 100, augment, {"basis": "square"})
        )
    # Table 3: VGG8, BP vs local classifiers vs LLS variants
    for dataset, augment in (
        ("cifar10", "aug"),
        ("cifar100", "aug"),
        ("imagenette", "aug"),
        ("tinyimagenet", "aug"),
        ("vww", None),
    ):
        rows = [
            ("bp", "BP", {}),
            ("local-classifier", "Local classifiers", {"readout_width": REFERENCE_READOUT_WIDTH}),
            ("lls", "LLS", {"basis": "square"}),
            ("lls-m", "LLS-M", {"basis": "square"}),
            ("lls-mxm", "LLS-MxM", {"basis": "square"}),
        ]
        if dataset in ("cifar100", "tinyimagenet"):
            rows.append(("lls-mxm", "LLS-MxM (R=100)", {"basis": "square", "reduced": 100}))
        for rule, label, options in rows:
            out.append(Preset("table3", dataset, "vgg8", rule, label, 300, augment, options))
    # Same budget for every rule and every basis kind (not a table of the paper): SmallConv on MNIST
    # and Fashion-MNIST, rows from the registries
    for dataset in ("mnist", "fashion-mnist"):
        for rule, options in comparison_rules():
            label = RULES.get(rule).label + (f" ({options['basis']})" if rule == LLS.name else "")
            out.append(Preset("compare", dataset, "smallconv", rule, label, 100, None, options))
    return out


PRESETS: tuple[Preset, ...] = tuple(_presets())


def select(
    table: str | None = None, dataset: str | None = None, model: str | None = None, rule: str | None = None
) -> list[Preset]:
    if table is not None and table not in TABLES:
        raise LLSError(f"unknown table {table!r}; known: {', '.join(TABLES)}")
    chosen = [
        p
        for p in PRESETS
        if (table is None or p.table == table)
        and (dataset is None or p.dataset == dataset)
        and (model is None or p.model == model)
        and (rule is None or p.rule == rule or p.slug == rule)
    ]
    if not chosen:
        raise LLSError(
            f"no preset matches table={table} dataset={dataset} model={model} rule={rule}; "
            "see `lls reproduce --list`"
        )
    return chosen


def with_epochs(preset: Preset, epochs: int | None) -> Preset:
    return preset if epochs is None else dataclasses.replace(preset, epochs=epochs)
