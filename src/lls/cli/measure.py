"""``lls cost`` and ``lls bench``: what a training step costs, counted and measured, next to BP."""

from __future__ import annotations

import argparse
import json

import torch

from ..edge.memory import edge_compare_text, edge_cost_text, training_footprint
from ..errors import LLSError
from ..measure.bench import bench_text, run_bench, split_engine, split_rules, summarize
from ..measure.cost import compare_text, cost_text, count_costs
from ..measure.fits import check_fits, estimated_bytes, meta_trainer
from ..measure.memory import measure_memory
from ..method.models import model_options
from ..method.net import ModelOptions
from ..method.rules import RULES, comparison_rules, create_rule, parse_rule_spec
from ..options import add_arguments, given, options_of
from ..step.config import StepConfig
from ..step.lowmem import memory_plan, parse_memory
from ..training.export import INSTALL_EDGE, installed
from .common import (
    MIN_TRAINING_BATCH,
    add_config_options,
    add_device,
    add_problem,
    config_value,
    counted,
    problem_shape,
    resolve_device,
    threads,
)

RULE_SPEC = "name, optionally with options: lls:basis=periodic,temperature=0.25"
RUNTIMES = ("torch", "executorch")
EDGE_RULES = "lls,bp"  # --runtime executorch --compare's default: a block-local rule against BP


def add(commands) -> None:
    cost = commands.add_parser(
        "cost",
        help="multiply-adds, parameters and memory of a training step",
        description="Count multiply-adds per training sample, block by block, and measure memory; "
        "or, with --runtime executorch, read the memory of the ExecuTorch training programs (one method "
        "per block and one for the head; one for BP) from their memory plans, where --memory SIZE "
        "runs a local rule's blocks that do not fit SIZE in slices of the batch.",
    )
    add_problem(cost, min_batch=1)  # batch 1 for the runtime's conv-only models; checked in cost_of
    cost.add_argument("--rule", default="lls", help=f"rule ({RULE_SPEC}; default lls)")
    cost.add_argument("--compare", action="store_true", help="every rule side by side, with ratios to bp")
    cost.add_argument(
        "--rules",
        help=f"comma-separated rules for --compare (default {','.join(compare_rules())}; "
        f"with --runtime executorch {EDGE_RULES})",
    )
    cost.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="torch: count and measure a PyTorch step (default); executorch: the planned memory of the "
        "on-device training programs (weights, gradients, optimizer state, largest arena; needs executorch)",
    )
    model = cost.add_argument_group("the model's options (as on lls train)")
    add_arguments(model, options_of(ModelOptions), lambda field: ModelOptions)
    add_config_options(cost, "memory")  # measures the low-memory step instead
    common(cost)
    cost.set_defaults(func=cmd_cost)

    bench = commands.add_parser(
        "bench",
        help="time training steps of several rules, interleaved",
        description="Time training steps of several rules, interleaved in one process (medians).",
    )
    add_problem(bench)
    bench.add_argument(
        "--rules",
        default="lls,bp",
        help=f"comma-separated rules ({RULE_SPEC}; an entry may name its own engine after @, "
        "e.g. lls@graph,bp@eager; default lls,bp)",
    )
    add_arguments(
        bench.add_argument_group("the model's options (as on lls train)"),
        options_of(ModelOptions),
        lambda field: ModelOptions,
    )
    bench.add_argument(
        "--steps", type=counted("--steps"), default=20, help="timed steps per rule (default 20)"
    )
    bench.add_argument(
        "--warmup", type=counted("--warmup", 0), default=3, help="untimed steps first (default 3)"
    )
    bench.add_argument("--threads", type=threads, help="torch threads (default: all cores)")
    bench.add_argument("--compile", action="store_true", help="torch.compile every block first")
    add_config_options(bench, "channels_last", "engine", "precision")  # an entry's own @engine first
    bench.add_argument(
        "--memory",
        type=memory_settings,
        default=[],
        help="also time every local rule's low-memory step, under each comma-separated setting "
        "('low' or a budget such as 256MiB), interleaved with the rest",
    )
    common(bench)
    bench.set_defaults(func=cmd_bench)


def compare_rules() -> list[str]:
    """``--compare``'s default: :func:`~lls.method.rules.comparison_rules` as rule specs."""
    specs = []
    for name, options in comparison_rules():
        given = {k: v for k, v in options.items() if getattr(RULES.get(name)(), k) != v}  # not defaults
        specs.append(name + (":" + ",".join(f"{k}={v}" for k, v in given.items()) if given else ""))
    return specs


def memory_setting(text: str) -> str:
    """A ``--memory`` value, checked now (the error names the flag)."""
    try:
        memory_plan(text)
    except LLSError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def memory_settings(text: str) -> list[str]:
    return [memory_setting(part) for part in text.split(",")]


def common(parser: argparse.ArgumentParser) -> None:
    add_device(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--json", action="store_true", help="print a JSON object as the last line of stdout")


def problem_record(args: argparse.Namespace, shape, classes: int) -> dict:
    """What `lls cost` and `lls bench` measured on, as their JSON output starts."""
    return {"model": args.model, "input": list(shape), "classes": classes, "batch": args.batch}


FIX = "lower --batch (or --classes, or the input size)"


def cost_of(args: argparse.Namespace, spec: str, shape, classes) -> dict:
    name, options = parse_rule_spec(spec)
    built = model_options(given(args, options_of(ModelOptions)))  # checked, defaults filled in
    if args.runtime == "executorch":
        budget = parse_memory(args.memory) if isinstance(args.memory, str) else args.memory
        if budget is not None and not isinstance(budget, int):
            raise LLSError(
                f"with --runtime executorch, --memory takes a budget such as 128MiB, not {budget!r}"
            )
        footprint = training_footprint(
            args.model,
            name,
            shape,
            classes,
            args.batch,
            rule_options=options,
            model_options=built,
            max_memory=budget,
        )
        return footprint.as_dict()
    if args.batch < MIN_TRAINING_BATCH:
        raise LLSError(
            f"--batch must be at least {MIN_TRAINING_BATCH} (BatchNorm needs 2 images per batch in "
            f"training), got {args.batch}"
        )
    rule = create_rule(name, **options)
    memory = args.memory
    if args.compare and rule.timing == "end-to-end":
        memory = None  # --compare shows BP's ordinary step beside the others' low-memory ones
    StepConfig(memory=memory).check_for(rule)
    device = resolve_device(args.device)
    trainer = meta_trainer(
        args.model, name, shape, classes, rule_options=options, model_options=built, memory=memory
    )
    what = f"{spec} on {args.model} with {classes} classes at batch {args.batch}"
    check_fits(estimated_bytes(trainer, args.batch), device, what, FIX)
    result = count_costs(args.model, rule, shape, classes, model_options=built).as_dict()
    if not args.no_memory:
        result["memory"] = measure_memory(
            args.model,
            name,
            shape,
            classes,
            batch=args.batch,
            device=str(device),
            rule_options=options,
            memory=memory,
            model_options=built,
        )
    return result


def cmd_cost(args: argparse.Namespace) -> int:
    edge = args.runtime == "executorch"
    if edge and not installed("executorch"):
        raise LLSError(f"--runtime executorch needs the executorch package: {INSTALL_EDGE}")
    shape, classes = problem_shape(args)
    where = f"{args.model}, input {'x'.join(map(str, shape))}, {classes} classes"
    if edge:
        where += f", batch {args.batch}"
    if args.compare:
        default = split_rules(EDGE_RULES) if edge else compare_rules()
        specs = split_rules(args.rules) if args.rules else default
        results = {spec: cost_of(args, spec, shape, classes) for spec in specs}
        print(edge_compare_text(results, where) if edge else compare_text(results, where, args.batch))
        output = {**problem_record(args, shape, classes), "rules": results}
        if edge:
            output["runtime"] = "executorch"
    else:
        output = cost_of(args, args.rule, shape, classes)
        print(edge_cost_text(output, where) if edge else cost_text(output, where))
    if args.json:
        print(json.dumps(output))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    shape, classes = problem_shape(args)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = split_rules(args.rules)
    needed = 0  # every entry's trainer is alive at once
    for spec in specs:
        name, options = parse_rule_spec(split_engine(spec)[0])  # checked before anything is timed
        for memory in [None, *args.memory] if RULES.get(name).timing != "end-to-end" else [None]:
            trainer = meta_trainer(args.model, name, shape, classes, rule_options=options, memory=memory)
            needed += estimated_bytes(trainer, args.batch)
    what = f"benchmarking {', '.join(specs)} on {args.model} with {classes} classes at batch {args.batch}"
    check_fits(needed, device, what, FIX + " or time fewer rules")
    precision = config_value(args, "precision")
    results = run_bench(
        args.model,
        shape,
        classes,
        specs,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        device=str(device),
        channels_last=config_value(args, "channels_last"),
        compile_blocks=args.compile,
        measure_peak=not args.no_memory,
        memory=[None, *args.memory],
        model_options=model_options(given(args, options_of(ModelOptions))),
        config=StepConfig(engine=config_value(args, "engine"), precision=precision),
    )
    summary = summarize(results)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    heading = (
        f"{args.model}, input {'x'.join(map(str, shape))}, {classes} classes, batch {args.batch}, "
        f"{args.steps} interleaved steps per rule after {args.warmup} warm-up, {precision}, {name}, "
        f"torch {torch.__version__}"
    )
    print(bench_text(summary, heading))
    if args.json:
        device_record = {"device": str(device), "device_name": name, "torch_version": torch.__version__}
        device_record["precision"] = precision
        print(json.dumps({**problem_record(args, shape, classes), **device_record, "rules": summary}))
    return 0
