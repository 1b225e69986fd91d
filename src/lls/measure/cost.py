"""What a training step costs, per sample: multiply-adds, parameters and memory (``lls cost``).

Multiply-add counts of convolutions and linear layers come from PyTorch's own FLOP counter
(``torch.utils.flop_counter``; one multiply-add = 2 FLOPs), measured block by block:

- ``forward``: the block's forward pass;
- ``weight_grad``: its backward pass with a detached input (the weight gradients only);
- ``input_grad``: the extra backward work when the input needs a gradient (what BP spends to
  propagate the error to the block before; local rules never do it).

The *learning signal* is what a rule spends to give each block its gradient at the block output:

- ``bp``: the error propagated back through the next block (its ``input_grad``);
- every local rule: what its block signal says it spends (``BlockSignal.ops``, signals.py), with
  multiplies and additions counted apart: ``dfa`` / ``drtp`` the feedback projection ``t @ F_l``,
  K x (size of the block output) multiply-adds; the LLS family pooling, normalisation and scoring
  against the basis, forward and backward, where a basis of signs (square) needs no multiplies;
  ``local-classifier`` the same without normalisation, plus its own weight gradient.

Memory is measured, not estimated: see ``memory.py``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from ..method.net import LocalNet
from ..method.rules import BP, Rule, create_rule
from ..step.factory import build_trainer
from ..step.trainer import Trainer
from .report_format import mib, ratio, si, table

COUNT_BATCH = 2  # FLOP counts are exact and linear in the batch; 2 keeps BatchNorm1d in train mode happy


@dataclass
class BlockCost:
    """Per-sample costs of one block (or of the head, ``index == -1``)."""

    index: int
    output: list[int]
    forward: int
    weight_grad: int
    input_grad: int  # spent by this rule (0 unless the rule back-propagates through this module)
    signal_mults: int
    signal_adds: int
    params: int
    extra_params: int


@dataclass
class CostReport:
    model: str
    rule: str
    rule_config: dict[str, Any]
    input_shape: list[int]
    classes: int
    blocks: list[BlockCost]
    memory: dict[str, Any] = field(default_factory=dict)

    def total(self, key: str) -> int:
        return sum(getattr(b, key) for b in self.blocks)

    @property
    def step_macs(self) -> int:
        """Every multiply-add of a training step: forward, backward and the learning signal."""
        keys = ("forward", "weight_grad", "input_grad")
        own = sum(self.total(k) for k in keys)
        # BP's signal *is* its input gradients; do not count them twice
        return own + (0 if self.rule == "bp" else self.total("signal_mults"))

    def as_dict(self) -> dict[str, Any]:
        totals = {
            k: self.total(k)
            for k in (
                "forward",
                "weight_grad",
                "input_grad",
                "signal_mults",
                "signal_adds",
                "params",
                "extra_params",
            )
        }
        return {**asdict(self), "totals": {**totals, "step_macs": self.step_macs}}


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    bias,
    stride,
    padding,
    dilation,
    transposed,
    output_padding,
    groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Each gradient of a convolution costs what its forward does: 2 * N * C_out * H_out * W_out *
    (C_in / groups) * kh * kw FLOPs. (torch 2.13's own formula ignores ``groups`` for the weight
    gradient and counts a depthwise convolution's C times over.)"""
    forward = 2 * math.prod(grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The CPU kernel of scaled dot-product attention, counted as torch counts the GPU ones (torch
    2.13's counter leaves the CPU kernel out): scores and weighting, 2 * B * H * T_q * T_k * d each."""
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


COUNTER_FIXES = {
    torch.ops.aten.convolution_backward: _conv_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _count(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping=COUNTER_FIXES) as counter:
        fn()
    return counter.get_total_flops() // 2


def module_costs(module: nn.Module, x: torch.Tensor) -> tuple[int, int, int, torch.Tensor]:
    """(forward, weight-grad, input-grad) multiply-adds per sample, and the output, of one module."""
    n = x.shape[0]
    out = module(x.detach())
    forward = _count(lambda: module(x.detach()))
    grad = torch.ones_like(out)
    weight = _count(lambda: module(x.detach()).backward(grad)) - forward  # the counts include the forward
    both = _count(lambda: module(x.detach().requires_grad_(True)).backward(grad)) - forward
    module.zero_grad(set_to_none=True)
    return forward // n, weight // n, (both - weight) // n, out.detach()


def count_costs(
    model: str | LocalNet,
    rule: str | Rule,
    input_shape: tuple[int, int, int],
    classes: int,
    *,
    model_options: dict[str, Any] | None = None,
) -> CostReport:
    """Per-sample multiply-adds and parameters of one training step of ``rule`` on ``model``
    (a registered name, built with ``model_options``, or a network)."""
    rule = create_rule(rule) if isinstance(rule, str) else rule
    if isinstance(model, str):
        trainer = build_trainer(model, rule, input_shape, classes, model_options=model_options)
    else:
        trainer = Trainer(model, rule, input_shape=input_shape)
    net = trainer.net
    net.train()
    extra = trainer.extra_parameters()
    x = torch.randn(COUNT_BATCH, *input_shape)
    costs: list[BlockCost] = []
    input_grads: list[int] = []
    for i, block in enumerate(net.blocks):
        forward, weight, inputs, out = module_costs(block, x)
        input_grads.append(inputs)
        params = sum(p.numel() for p in block.parameters())
        costs.append(BlockCost(i, list(out.shape[1:]), forward, weight, 0, 0, 0, params, extra[i]))
        x = net.between[i](out)
    forward, weight, inputs, out = module_costs(net.head, x)
    head_params = sum(p.numel() for p in net.head.parameters())
    head = BlockCost(-1, list(out.shape[1:]), forward, weight, 0, 0, 0, head_params, 0)
    input_grads.append(inputs)
    if isinstance(rule, BP):
        # BP computes every input gradient but the first block's (its input is the data)
        for i, block_cost in enumerate(costs):
            if i > 0:
                block_cost.input_grad = input_grads[i]
            downstream = input_grads[i + 1]
            block_cost.signal_mults = block_cost.signal_adds = downstream
        head.input_grad = input_grads[-1]
    else:
        for block_cost, signal in zip(costs, trainer.signals, strict=True):
            block_cost.signal_mults, block_cost.signal_adds = signal.ops(torch.Size(block_cost.output))
    costs.append(head)
    return CostReport(
        model if isinstance(model, str) else "custom",
        rule.name,
        rule.config(),
        list(input_shape),
        classes,
        costs,
    )


# --- tables for the command line -----------------------------------------------------------------


def cost_text(result: dict[str, Any], where: str) -> str:
    """``lls cost``'s table of one rule: every block's counts, the totals and the memory."""
    keys = ("forward", "weight_grad", "input_grad", "signal_mults", "signal_adds", "params", "extra_params")
    rows = []
    for b in result["blocks"]:
        name = "head" if b["index"] < 0 else f"block {b['index']}"
        rows.append([name, "x".join(map(str, b["output"])), *(si(b[k]) for k in keys)])
    t = result["totals"]
    rows.append(["total", "", *(si(t[k]) for k in keys)])
    config = ", ".join(f"{k}={v}" for k, v in result["rule_config"].items() if k != "name" and v is not None)
    header = ["", "output", "forward", "weight grad", "input grad", "signal mults", "signal adds"]
    lines = [
        f"{where}, rule {result['rule']}({config}); multiply-adds per training sample",
        table([*header, "params", "extra"], rows),
        f"step multiply-adds (forward + backward + learning signal): {si(t['step_macs'])}",
    ]
    m = result.get("memory")
    if m:
        lines.append(
            f"memory, batch {m['batch']}: parameters {mib(m['param_bytes'])}, optimizer state "
            f"{mib(m['optimizer_bytes'])}, activations held for backward at the peak "
            f"{mib(m['activation_peak_bytes'])}, step peak {mib(m.get('step_peak_bytes'))} "
            f"({m.get('step_peak_method', 'not measured')})"
        )
    return "\n".join(lines)


def compare_text(results: dict[str, dict[str, Any]], where: str, batch: int) -> str:
    """``lls cost --compare``: every rule's totals side by side, with ratios to BP."""
    bp = results.get("bp")
    bp_memory = (bp or {}).get("memory", {})
    rows = []
    for spec, r in results.items():
        t, m = r["totals"], r.get("memory", {})
        fewer = "no multiplies"
        if spec == "bp":
            fewer = "-"
        elif bp is not None and t["signal_mults"]:
            times = bp["totals"]["signal_mults"] / t["signal_mults"]
            fewer = f"{times:.0f}x fewer" if times >= 1 else f"{1 / times:.1f}x more"  # a ViT's can be more
        step_ratio = t["step_macs"] / bp["totals"]["step_macs"] if bp else None
        memory = []
        for key in ("activation_peak_bytes", "step_peak_bytes"):
            mine, theirs = m.get(key), bp_memory.get(key)
            memory += [mib(mine), ratio(mine / theirs if mine and theirs else None)]
        counts = [si(t["step_macs"]), ratio(step_ratio), si(t["signal_mults"]), si(t["signal_adds"])]
        rows.append([spec, *counts, fewer, si(t["extra_params"]), *memory])
    header = ["rule", "step MACs", "vs bp", "signal mults", "signal adds", "signal vs bp", "extra params"]
    return "\n".join(
        [
            f"{where}; multiply-adds per training sample; memory of one step with batch {batch}",
            table([*header, "activations", "vs bp", "step peak", "vs bp"], rows),
        ]
    )
