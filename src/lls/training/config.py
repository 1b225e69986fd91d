"""What defines a run: :class:`TrainConfig`, the step's options (:class:`~lls.step.config.StepConfig`)
and the run's own, declared once as options: ``lls train``'s flags, ``config.json``'s keys, the
checks and the report columns all come from these declarations (the rule's own options from the
rule dataclasses, kept in ``rule_options``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from ..data import DATASETS
from ..errors import LLSError
from ..method.models import MODELS, check_options_apply, is_factory, model_options, taken_options
from ..method.net import ModelOptions
from ..method.rules import RULES, create_rule, rule_options, seeded_options
from ..options import check, check_values, flag, option, options_of
from ..step import config as step_defaults
from ..step.config import STEP_OPTIONS, StepConfig
from ..step.precision import is_mixed

MAX_SEED = 2**63 - 1  # torch.manual_seed's range
# Upper bounds far above any real run, so that a mistyped number is refused, not run for ever
MAX_EPOCHS = 100_000
MAX_BATCH = 2**24
MAX_IMAGES = 2**40  # --limit / --holdout: above any dataset, so "all of them" stays expressible
MAX_IMAGE_SIZE = 2**14
# Model options added after runs were recorded without them: the value those runs trained with
RECORDED_BEFORE = {"last_latent": "pooled"}


@dataclass
class TrainConfig(StepConfig):
    """What defines a run: how it steps (the :class:`StepConfig` fields) and what it trains. Two runs
    with equal configs train identically on the CPU."""

    dataset: str = option(
        "fashion-mnist", help="dataset (see `lls list`)", choices=DATASETS, distinguishing=False
    )
    model: str = option("smallconv", help="model", choices=MODELS, distinguishing=False)
    rule: str = option(step_defaults.RULE, help="learning rule", choices=RULES, distinguishing=False)
    rule_options: dict[str, Any] = option(
        default_factory=dict, help="the rule's options", cli=False, distinguishing=False
    )
    model_options: dict[str, Any] = option(
        default_factory=dict, help="the model's options", cli=False, distinguishing=False
    )
    epochs: int = option(
        step_defaults.EPOCHS,
        help="epochs to train (a resumed run may be given more)",
        minimum=1,
        maximum=MAX_EPOCHS,
        resumable=True,
        distinguishing=False,  # a report shows the budget in a column of its own
    )
    batch_size: int = option(step_defaults.BATCH_SIZE, help="minibatch size", minimum=1, maximum=MAX_BATCH)
    seed: int = option(
        step_defaults.SEED,
        help="seed of the initial weights, shuffling, augmentation and the rule's random tensors",
        minimum=0,
        maximum=MAX_SEED,
        distinguishing=False,
    )
    limit: int | None = option(
        None, help="use only the first N training and test images", minimum=1, maximum=MAX_IMAGES
    )
    augment: str | None = option(
        None, help="augmentation preset of the dataset (e.g. cifar10: basic, aug, none)"
    )
    image_size: int | None = option(
        None, help="imagefolder: side of the square crops (default 64)", minimum=1, maximum=MAX_IMAGE_SIZE
    )
    channels_last: bool = option(
        step_defaults.CHANNELS_LAST, help="channels-last memory layout (faster convolutions on CPU)"
    )
    holdout: int | None = option(
        None,
        help="hold out N training images and evaluate on them instead of the test set (for tuning)",
        minimum=1,
        maximum=MAX_IMAGES,
        distinguishing=False,
    )

    def __post_init__(self) -> None:
        check(self)
        rule = create_rule(self.rule, **self.rule_options)  # the rule checks its own options
        # Resolved: every option with the value the run uses, so that config.json records it and a
        # run re-read later keeps it whatever today's defaults are.
        self.rule_options = dataclasses.asdict(rule)
        if not is_factory(self.model):  # a factory's options are its keyword arguments, its own
            self.model_options = model_options(self.model_options)  # checked, defaults filled in
        self.check_for(rule)

    def as_dict(self) -> dict[str, Any]:
        """The run's own options first, then the step's (config.json's order)."""
        values = dataclasses.asdict(self)
        return {k: values[k] for k in sorted(values, key=lambda k: k in STEP_OPTIONS)}

    @classmethod
    def from_dict(cls, values: Any, where: str = "") -> TrainConfig:
        """A config read from a file; ``where`` names the file in errors."""
        if not isinstance(values, dict):
            raise LLSError(f"{where}the config is not a JSON object")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LLSError(f"{where}unknown keys {sorted(unknown)}; was it written by another version?")
        try:
            return cls(**recorded_before(values))
        except LLSError as error:
            raise LLSError(f"{where}{error}") from None

    def rule_config(self) -> dict[str, Any]:
        """Every option of the rule, defaults included (what the run trains with)."""
        return create_rule(self.rule, **self.rule_options).config()

    def default_name(self) -> str:
        basis = self.rule_config().get("basis")
        parts = [self.dataset, self.model, self.rule + (f"-{basis}" if basis else ""), f"s{self.seed}"]
        return "-".join(parts) + time.strftime("-%Y%m%d-%H%M%S")

    def resumed(
        self,
        given: dict[str, Any],
        given_rule: dict[str, Any],
        where: str,
        given_model: dict[str, Any] | None = None,
    ) -> TrainConfig:
        """This (saved) config with what a resume may change; any other option given that differs
        from the run's is refused, naming each conflict."""
        check_values(TrainConfig, given, name=flag)
        given_model = given_model or {}
        check_values(ModelOptions, given_model, name=flag)
        conflicts = []
        saved_rule = self.rule_config()
        saved_model = self.model_options if is_factory(self.model) else model_options(self.model_options)
        for name, value in {**given, **given_rule, **given_model}.items():
            if name in given_model:
                old = saved_model[name]
            elif name in given_rule:
                old = saved_rule.get(name)
            else:
                old = getattr(self, name)
            if name not in RESUMABLE and value != old:
                conflicts.append(f"{flag(name)} {value} (the run has {old})")
        if conflicts:
            raise LLSError(
                f"{where} was made with another configuration: {'; '.join(conflicts)}; "
                "resume without those options, or start a new run with --out"
            )
        if given.get("memory") is not None:  # named as the run recorded it, not as a flag not typed
            check_resumed_memory(self, where)
        return dataclasses.replace(self, **{k: v for k, v in given.items() if k in RESUMABLE})


def default(name: str) -> Any:
    """The default of the run option ``name``: the one place each default is declared (the API's
    ``Trainer``, ``build_trainer`` and ``Loaders`` take theirs from here)."""
    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def check_resumed_memory(config: TrainConfig, where: str) -> None:
    """Refuse --memory on resuming a run it cannot apply to, naming what the run recorded."""
    rule = create_rule(config.rule, **config.rule_options)
    if is_mixed(config.precision):
        why = f"trains in {config.precision} (its config.json's precision) and --memory runs in float32"
    elif rule.timing == "end-to-end":
        why = f"trains with {config.rule}, which back-propagates through every block at once"
    else:
        return
    raise LLSError(f"{where} {why}; resume without --memory")


# The defaults as attributes (``DEFAULTS.lr``), for signatures outside the configuration.
DEFAULTS = SimpleNamespace(**{f.name: default(f.name) for f in dataclasses.fields(TrainConfig)})
# The run's own options first, then the step's (the order of ``lls train --help``)
CONFIG_OPTIONS = sorted(
    (f for f in options_of(TrainConfig) if f.metadata["cli"]), key=lambda f: f.name in STEP_OPTIONS
)
RESUMABLE = {f.name for f in options_of(TrainConfig) if f.metadata["resumable"]}
DISTINGUISHING = [f.name for f in CONFIG_OPTIONS if f.metadata["distinguishing"]]


def config_from_options(
    given: dict[str, Any], given_rule: dict[str, Any], given_model: dict[str, Any] | None = None
) -> TrainConfig:
    """A new run's config from the options a user typed (the rest at their defaults); errors name
    the flags. The run's seed also seeds the rule's random tensors."""
    check_values(TrainConfig, given, name=flag)
    check_values(ModelOptions, given_model or {}, name=flag)
    config = TrainConfig(**given, model_options=dict(given_model or {}))
    cls, fields = RULES.get(config.rule), rule_options()
    for name in given_rule:
        if name not in {f.name for f in options_of(cls)}:
            takes = ", ".join(fields[name][2]) if name in fields else "no rule"
            raise LLSError(f"rule {config.rule!r} has no option {flag(name)} ({takes} take it)")
    check_values(cls, given_rule, f"rule {config.rule!r}: ", name=flag)
    check_options_apply(config.model, MODELS.get(config.model), config.model_options, list(given_model or {}))
    DATASETS.get(config.dataset).check_options(config.augment, config.image_size)
    options = seeded_options(config.rule, given_rule, config.seed)
    return dataclasses.replace(config, rule_options=options)


def recorded_before(values: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with each model option added since (:data:`RECORDED_BEFORE`) set to what
    the run trained with, where its model takes the option: an older run reads back, resumes and
    evaluates as it was trained, whatever today's default."""
    model, options = values.get("model"), values.get("model_options")
    if not isinstance(model, str) or is_factory(model) or model not in MODELS.names():
        return values
    if not isinstance(options, dict):
        return values
    taken = taken_options(MODELS.get(model))
    missing = {k: v for k, v in RECORDED_BEFORE.items() if k in taken and k not in options}
    return {**values, "model_options": {**options, **missing}} if missing else values
