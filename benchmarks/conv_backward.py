"""What the convolution kernels allow: forward, weight-gradient and input-gradient time per layer.

    python benchmarks/conv_backward.py --model vgg8 --input 3,32,32 --classes 10 --rounds 9

An LLS step runs every convolution's forward and weight gradient; a BP step also its input
gradient (all but the first convolution's, whose input is the image). By multiply-add count the
three cost the same, which is where the 0.67 bound on LLS / BP
step time comes from. This times each part on the model's own convolution shapes (batch 128,
channels-last, as training runs them), rounds interleaved, and prints the medians and the bound
that the kernels, not the multiply-adds, set: sum(forward + weight grad) / sum(all three).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lls


def conv_inputs(model: nn.Module, shape: tuple[int, ...], batch: int) -> list[tuple[nn.Conv2d, tuple]]:
    """Every Conv2d of the model with the input shape it sees, in forward order."""
    seen: list[tuple[nn.Conv2d, tuple]] = []
    hooks = [
        m.register_forward_hook(lambda m, args, _: seen.append((m, (batch, *args[0].shape[1:]))))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model.eval()(torch.zeros(2, *shape))
    for h in hooks:
        h.remove()
    return seen


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(conv: nn.Conv2d, in_shape: tuple, first: bool) -> tuple[float, float, float]:
    """Seconds of (forward, weight gradient, input gradient) of one convolution, channels-last."""
    conv = conv.to(memory_format=torch.channels_last).train()
    x = torch.randn(in_shape).to(memory_format=torch.channels_last)
    x_grad = x.clone().requires_grad_()
    g = torch.randn_like(conv(x))
    forward = timed(conv, x)
    lls_part = timed(lambda: torch.autograd.grad(conv(x), conv.weight, g))  # forward + dW
    # BP also needs dX, except for the first convolution, whose input is the image
    bp_part = (
        lls_part if first else timed(lambda: torch.autograd.grad(conv(x_grad), [conv.weight, x_grad], g))
    )
    return forward, lls_part - forward, bp_part - lls_part


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="vgg8")
    parser.add_argument("--input", default="3,32,32", help="C,H,W")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    lls.tune_malloc()  # as the lls command does
    shape = tuple(int(s) for s in args.input.split(","))
    model = lls.create_model(args.model, in_channels=shape[0], input_size=shape[1], num_classes=args.classes)
    layers = conv_inputs(model, shape, args.batch)
    times = {i: {"forward": [], "weight grad": [], "input grad": []} for i in range(len(layers))}
    for _ in range(args.rounds + 1):  # the first round warms up and is dropped
        for i, (conv, in_shape) in enumerate(layers):
            forward, weight, inputs = measure(conv, in_shape, first=i == 0)
            times[i]["forward"].append(forward)
            times[i]["weight grad"].append(weight)
            times[i]["input grad"].append(inputs)
    print(
        f"{args.model}, input {args.input}, batch {args.batch}, channels-last, {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians in ms"
    )
    print(f"{'layer':<28}{'forward':>10}{'weight grad':>13}{'input grad':>12}{'LLS / BP':>10}")
    totals = {"forward": 0.0, "weight grad": 0.0, "input grad": 0.0}
    for i, (conv, in_shape) in enumerate(layers):
        median = {k: 1000 * statistics.median(v[1:]) for k, v in times[i].items()}
        for k in totals:
            totals[k] += median[k]
        lls_part = median["forward"] + median["weight grad"]
        name = f"{conv.in_channels}->{conv.out_channels} @{in_shape[2]}x{in_shape[3]}"
        print(
            f"{name:<28}{median['forward']:>10.1f}{median['weight grad']:>13.1f}"
            f"{median['input grad']:>12.1f}{lls_part / (lls_part + median['input grad']):>10.2f}"
        )
    lls_total = totals["forward"] + totals["weight grad"]
    print(
        f"{'all convolutions':<28}{totals['forward']:>10.1f}{totals['weight grad']:>13.1f}"
        f"{totals['input grad']:>12.1f}{lls_total / (lls_total + totals['input grad']):>10.2f}"
    )


if __name__ == "__main__":
    main()
