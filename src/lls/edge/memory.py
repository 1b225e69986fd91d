"""Memory as an ExecuTorch device sees it: read from a lowered program's memory plan, not measured.

ExecuTorch's memory planner fixes, at export time, where every tensor a method computes lives: in
the method's *arena* (``non_const_buffer_sizes`` of its execution plan; entry 0 is reserved). An app
allocates exactly that many bytes per loaded method and nothing more for the method's tensors. Read
back from the emitted program (:func:`method_memory`), each method's arena splits into:

- ``parameters``: a training method's weights. ExecuTorch 1.5's training programs plan them into the
  arena (they are mutable: the optimizer updates them in place), copied there from the program's
  constant data when the method is loaded. An inference program keeps them as ``constants`` instead
  (read-only data that can stay in flash);
- ``gradients``: the outputs ``_export_forward_backward`` adds, one per parameter;
- ``working``: the rest, inputs, activations held for backward, temporaries and the other outputs,
  packed by the planner (tensors whose lifetimes do not overlap share bytes).

:func:`training_footprint` builds the training programs of a rule (``lls.edge.programs``: one method
per block and one for the head for a local rule, one whole-network method for BP) and sums what a
device holds for a step:

- ``weights``, ``gradients``: every parameter, once, and its gradient;
- ``optimizer``: the runtime SGD's state, one momentum buffer per parameter (none without momentum);
- ``largest``: the largest method's arena;
- ``footprint``: weights + optimizer state + the largest method's arena less its own weights: what an
  app holds that keeps the weights apart and runs one method at a time in one scratch arena (a block's
  gradients are spent by its optimizer step before the next block runs, so only one method's
  gradients and activations are alive). For BP, one method, this is its arena + optimizer state.
  A block run in slices of the batch (``lls.edge.sliced``) adds what the app holds beside the
  slice's arena (the block's whole input and output, the gradient sums): ``MethodMemory.need``;
- ``resident``: every method's arena + optimizer state: what ExecuTorch's ``Module`` holds as it is,
  every method loaded with its own arena (weights inside).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LLSError

KB = 1000  # the on-device figures are in kB, as MCUNetV3's and MLPerf Tiny's are
# bytes per element of ExecuTorch's scalar types (executorch.exir.scalar_type.ScalarType)
ELEMENT_BYTES = {0: 1, 1: 1, 2: 2, 3: 4, 4: 8, 5: 2, 6: 4, 7: 8, 11: 1, 12: 1, 13: 1, 14: 4, 15: 2}
GRADIENTS_INDEX = "__et_training_gradients_index_"  # the joint export's getters: where, among a
PARAMETERS_INDEX = "__et_training_parameters_index_"  # method's outputs, gradients and weights start
TRAINING_GETTERS = (GRADIENTS_INDEX, PARAMETERS_INDEX, "__et_training_fqn_")


@dataclass
class MethodMemory:
    """One method's planned memory, in bytes."""

    name: str
    arena: int  # the planned arena (non-constant buffers)
    parameters: int  # weights planned into the arena (training methods)
    gradients: int  # gradients planned into the arena (training methods)
    constants: int  # read-only tensors of the program the method uses (an inference program's weights)
    # A sliced block's methods (lls.edge.sliced), from the program's layout: the weights they take
    # as inputs (copies of the block method's parameters) and what the app holds outside the arena
    # while they run (the whole batch's input and output, the gradient sums); "probe": the sums
    # passes' parameters, zeros never stepped, that are no weights of the network
    weight_inputs: int = 0
    held: int = 0
    probe: bool = False

    @property
    def working(self) -> int:
        """Inputs, activations, temporaries and the other outputs: the arena less weights and gradients."""
        return self.arena - self.parameters - self.gradients

    @property
    def need(self) -> int:
        """What running this method adds to the weights kept apart: its arena less the weights in it
        (its own or given as inputs), plus what the app holds beside it."""
        return self.arena - self.parameters - self.weight_inputs + self.held

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "working": self.working, "need": self.need}


def _program(program: Any):
    """The flatbuffer ``Program`` of an ``ExecutorchProgramManager``, a ``.pte``'s bytes or itself."""
    if isinstance(program, (bytes, bytearray, memoryview)):
        from executorch.exir._serialize._program import deserialize_pte_binary

        try:
            return deserialize_pte_binary(bytes(program)).program
        except Exception as error:
            raise LLSError(f"not an ExecuTorch program ({str(error).strip()[:160]})") from None
    return getattr(program, "executorch_program", program)


def _tensor_bytes(tensor) -> int:
    return math.prod(tensor.sizes) * ELEMENT_BYTES.get(int(tensor.scalar_type), 4)


def _getter(plans: dict[str, Any], name: str) -> int | None:
    plan = plans.get(name)
    return None if plan is None else int(plan.values[0].val.int_val)


def method_memory(program: Any) -> dict[str, MethodMemory]:
    """Every method's planned memory, read from ``program`` (an ``ExecutorchProgramManager``, the
    bytes of a ``.pte`` file, or its ``Program``). Constant methods (no arena) are left out."""
    from executorch.exir.schema import Tensor

    plans = {plan.name: plan for plan in _program(program).execution_plan}
    out = {}
    for name, plan in plans.items():
        if name.startswith(TRAINING_GETTERS) or not plan.chains or not plan.chains[0].instructions:
            continue  # a constant method: no arena, nothing computed
        outputs = list(plan.outputs)
        first_gradient, first_parameter = (
            _getter(plans, GRADIENTS_INDEX + name),
            _getter(plans, PARAMETERS_INDEX + name),
        )
        gradients = outputs[first_gradient:first_parameter] if first_gradient is not None else []
        parameters = outputs[first_parameter:] if first_parameter is not None else []
        constants = 0
        for value in plan.values:
            tensor = value.val
            if isinstance(tensor, Tensor) and tensor.data_buffer_idx > 0 and tensor.allocation_info is None:
                constants += _tensor_bytes(tensor)
        out[name] = MethodMemory(
            name,
            sum(plan.non_const_buffer_sizes[1:]),
            sum(_tensor_bytes(plan.values[i].val) for i in parameters),
            sum(_tensor_bytes(plan.values[i].val) for i in gradients),
            constants,
        )
    return dict(sorted(out.items(), key=lambda item: _natural(item[0])))


def _natural(name: str) -> tuple[str, int]:
    """block2 before block10 (the program lists its methods by name)."""
    stem = name.rstrip("0123456789")
    return stem, int(name[len(stem) :] or -1)


@dataclass
class TrainingFootprint:
    """What a device holds for one training step of a rule's programs (bytes; module docstring)."""

    rule: str
    batch: int
    methods: list[MethodMemory]
    weights: int
    gradients: int
    optimizer: int
    sliced: dict[str, int] = field(default_factory=dict)  # blocks run in slices: method -> slices

    @property
    def largest(self) -> MethodMemory:
        return max(self.methods, key=lambda m: m.arena)

    @property
    def footprint(self) -> int:
        """Weights + optimizer state + the largest need of a method (one at a time: ``need``)."""
        return self.weights + self.optimizer + max(m.need for m in self.methods)

    @property
    def resident(self) -> int:
        """Every method's arena + optimizer state: all methods loaded, as ExecuTorch's Module does."""
        return sum(m.arena for m in self.methods) + self.optimizer

    def as_dict(self) -> dict[str, Any]:
        largest = self.largest
        return {
            "rule": self.rule,
            "batch": self.batch,
            "weights_bytes": self.weights,
            "gradients_bytes": self.gradients,
            "optimizer_bytes": self.optimizer,
            "largest_method": largest.name,
            "largest_arena_bytes": largest.arena,
            "footprint_bytes": self.footprint,
            "resident_bytes": self.resident,
            "slices": dict(self.sliced),
            "methods": [m.as_dict() for m in self.methods],
        }


def footprint_of(
    program: Any, rule: str, batch: int, momentum: float, layout: Any = None
) -> TrainingFootprint:
    """The footprint of a built training program (``lls.edge.programs``), from its memory plan;
    ``layout`` (its :class:`~lls.edge.programs.ProgramLayout`) says which blocks run in slices."""
    from .sliced import STATS, SUMS

    methods = list(method_memory(program).values())
    if not methods or not any(m.gradients for m in methods):
        raise LLSError("not a training program: no method gives gradients (export one with --training)")
    sliced = {}
    by_name = {m.name: m for m in methods}
    for method in layout.methods if layout is not None else []:
        if not method.sliced:
            continue
        s = method.sliced
        sliced[method.name] = s["slices"]
        by_name[method.name].held = s["held_bytes"]
        for m in methods:
            if m.name.startswith(method.name + STATS):
                m.weight_inputs, m.held = s["block_parameter_bytes"], s["held_bytes"]
            elif m.name.startswith(method.name + SUMS):
                m.weight_inputs, m.held, m.probe = s["parameter_bytes"], s["held_bytes"], True
    network = [m for m in methods if not m.probe]
    weights = sum(m.parameters for m in network)
    return TrainingFootprint(
        rule,
        batch,
        methods,
        weights,
        sum(m.gradients for m in network),
        weights if momentum else 0,
        sliced,
    )


def training_footprint(
    model: str,
    rule: str,
    input_shape: tuple[int, int, int],
    classes: int,
    batch: int,
    *,
    rule_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None,
    momentum: float | None = None,
    max_memory: int | None = None,
) -> TrainingFootprint:
    """Build ``rule``'s training programs of ``model`` (``lls.edge.programs.build_program``, the
    runtime's SGD) for batches of ``batch`` and read their footprint from the memory plans. With
    ``max_memory`` (bytes), a local rule's blocks that do not fit run in slices of the batch where
    that fits them (:func:`~lls.edge.programs.fit_slices`); nothing is refused."""
    from ..method.rules import create_rule
    from ..step.factory import build_trainer
    from .programs import SGD_MOMENTUM, build_program, fit_slices

    momentum = SGD_MOMENTUM if momentum is None else momentum
    trainer = build_trainer(
        model, create_rule(rule, **(rule_options or {})), input_shape, classes, model_options=model_options
    )
    built = build_program(trainer, batch, lr=0.01, momentum=momentum)  # lr changes no byte
    if max_memory is not None:
        built = fit_slices(trainer, built, max_memory, lr=0.01, momentum=momentum) or built
    return footprint_of(built.manager, rule, batch, momentum, built.layout)


# --- the table of ``lls cost --runtime executorch`` -----------------------------------------------


def kb(n: int) -> str:
    return f"{n / KB:,.1f} kB"


def edge_compare_text(results: dict[str, dict[str, Any]], where: str) -> str:
    """Every rule's footprint side by side, with the ratio to BP's."""
    from ..measure.report_format import ratio, table

    bp = results.get("bp")
    keys = (
        "weights_bytes",
        "gradients_bytes",
        "optimizer_bytes",
        "largest_arena_bytes",
        "footprint_bytes",
        "resident_bytes",
    )
    rows = []
    for spec, r in results.items():
        vs = {
            k: ratio(r[k] / bp[k]) if bp and bp[k] else "-"
            for k in ("largest_arena_bytes", "footprint_bytes")
        }
        rows.append(
            [
                spec,
                f"{len(r['methods'])}",
                *(kb(r[k]) for k in keys[:3]),
                f"{kb(r['largest_arena_bytes'])} ({r['largest_method']})",
                vs["largest_arena_bytes"],
                kb(r["footprint_bytes"]),
                vs["footprint_bytes"],
                kb(r["resident_bytes"]),
            ]
        )
    header = ["rule", "methods", "weights", "gradients", "optimizer", "largest arena", "vs bp"]
    return "\n".join(
        [
            f"{where}; ExecuTorch training programs' memory plans (fp32, SGD with momentum)",
            table([*header, "footprint", "vs bp", "all loaded"], rows),
            *(f"{spec}: {slices_text(r)}" for spec, r in results.items() if r.get("slices")),
            "footprint: weights + optimizer state + the largest method's arena less its own weights "
            "(one method at a time; a block run in slices adds what the app holds beside it); "
            "all loaded: every method's arena (weights inside) + optimizer state",
        ]
    )


def slices_text(result: dict[str, Any]) -> str:
    """``block1 in 2 slices of 16 samples``, for the blocks a footprint runs in slices."""
    batch = result["batch"]
    return ", ".join(f"{name} in {s} slices of {batch // s}" for name, s in result["slices"].items())


def edge_cost_text(result: dict[str, Any], where: str) -> str:
    """One rule's programs, method by method, and its footprint."""
    from ..measure.report_format import table

    rows = [
        [m["name"], kb(m["arena"]), kb(m["parameters"]), kb(m["gradients"]), kb(m["working"])]
        for m in result["methods"]
    ]
    return "\n".join(
        [
            f"{where}, rule {result['rule']}; ExecuTorch training programs' memory plans (fp32)",
            table(["method", "arena", "weights in it", "gradients in it", "activations etc."], rows),
            f"weights {kb(result['weights_bytes'])}, gradients {kb(result['gradients_bytes'])}, optimizer "
            f"state {kb(result['optimizer_bytes'])}, largest arena {kb(result['largest_arena_bytes'])} "
            f"({result['largest_method']}); footprint {kb(result['footprint_bytes'])}, every method "
            f"loaded {kb(result['resident_bytes'])}",
            *([slices_text(result)] if result.get("slices") else []),
        ]
    )
