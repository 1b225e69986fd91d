"""Schedule-free AdamW with its per-step scalars on the device, so a whole step can be captured.

:class:`AdamWScheduleFree` computes what ``schedulefree.AdamWScheduleFree`` (the package, 1.4.1)
computes and reads and writes the same state dict, but keeps the step count, warm-up factor,
``lr_max`` and weight sum as float64 tensors updated in place, so a CUDA graph can replay a step.
``bias_correction="lr"`` is the LLS authors' variant. docs/method.md, "The optimizer", has the
algorithm and the details. Like the package, ``step()`` overwrites each ``p.grad`` with its update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..errors import LLSError

BIAS_CORRECTIONS = ("moment", "lr")
# Group entries that change every step: float64 device tensors once stepped, plain numbers in a
# state dict (the package's format). The package computes them in Python floats, i.e. float64.
STEP_SCALARS = ("k", "lr_max", "weight_sum", "scheduled_lr")
SCALAR_DTYPE = torch.float64


class AdamWScheduleFree(torch.optim.Optimizer):
    """Schedule-free AdamW, capturable in a CUDA graph; arguments as ``schedulefree.AdamWScheduleFree``.

    Call ``train()`` before stepping and ``eval()`` before evaluating or reading the averaged
    weights. ``bias_correction="lr"`` gives the LLS authors' variant (docs/method.md, "The optimizer").
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        r: float = 0.0,
        weight_lr_power: float = 2.0,
        bias_correction: str = "moment",
    ) -> None:
        if bias_correction not in BIAS_CORRECTIONS:
            raise LLSError(
                f"bias_correction {bias_correction!r} is unknown; use one of {', '.join(BIAS_CORRECTIONS)}"
            )
        # The package's group entries, so state dicts are interchangeable ("foreach" is read by the
        # package's step; this implementation is always foreach).
        defaults = dict(
            lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
            weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
            weight_decay=weight_decay, foreach=True, bias_correction=bias_correction,
        )  # fmt: skip
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a package checkpoint names no variant: keep ours
            group.setdefault("bias_correction", self.defaults["bias_correction"])

    def state_dict(self) -> dict[str, Any]:
        """The package's format: step scalars as Python numbers (reading them syncs, once)."""
        state = super().state_dict()
        for group in state["param_groups"]:
            if isinstance(group["k"], torch.Tensor):
                values = torch.stack([group[name] for name in STEP_SCALARS]).tolist()
                group.update(zip(STEP_SCALARS, values, strict=True))
            group["k"] = round(group["k"])
        return state

    # --- train / eval ----------------------------------------------------------------------------

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters become the average x: y + (1 - 1/beta1) (z - y)."""
        self._switch(False, lambda beta1: 1 - 1 / beta1)

    @torch.no_grad()
    def train(self) -> None:
        """Parameters become the gradient point y: x + (1 - beta1) (z - x)."""
        self._switch(True, lambda beta1: 1 - beta1)

    def _switch(self, train_mode: bool, weight: Callable[[float], float]) -> None:
        for group in self.param_groups:
            if group["train_mode"] == train_mode:
                continue
            params = [p for p in group["params"] if "z" in self.state[p]]
            if params:
                torch._foreach_lerp_(params, [self.state[p]["z"] for p in params], weight(group["betas"][0]))
            group["train_mode"] = train_mode

    # --- step ------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if not self.param_groups[0]["train_mode"]:
            raise LLSError(
                "schedule-free AdamW stepped in eval mode; call optimizer.train() before training steps"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            bias_correction2, ckp1, lr, y_grad_coef = self._advance(group)
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params, bias_correction2, ckp1, lr, y_grad_coef)
        return loss

    def _device_scalars(self, group: dict[str, Any]) -> None:
        """Turn the group's step scalars into float64 tensors on its device (first step, after a load)."""
        params = group["params"]
        device, dtype = params[0].device, params[0].dtype
        k = group["k"]
        if isinstance(k, torch.Tensor) and k.device == device:
            return
        if any(p.device != device or p.dtype != dtype for p in params):
            raise LLSError(
                "schedule-free AdamW needs one device and dtype per parameter group; split the group"
            )
        for name in STEP_SCALARS:
            group[name] = torch.as_tensor(group[name], dtype=SCALAR_DTYPE, device=device).clone()

    def _advance(self, group: dict[str, Any]) -> list[torch.Tensor]:
        """Advance the step count and the average's weights; the step's coefficients, in the params' dtype.

        Every operation is on a 0-dim device tensor: no value reaches the host. Branches depend
        on hyperparameters only.
        """
        self._device_scalars(group)
        beta1, beta2 = group["betas"]
        k, lr, lr_max, weight_sum = (group[name] for name in ("k", "scheduled_lr", "lr_max", "weight_sum"))
        k.add_(1)
        if group["warmup_steps"] > 0:
            torch.mul(torch.clamp(k / group["warmup_steps"], max=1.0), group["lr"], out=lr)
        else:
            lr.fill_(group["lr"])
        bias_correction2 = 1 - beta2**k
        if group["bias_correction"] == "lr":
            lr.mul_(bias_correction2.sqrt())
        torch.maximum(lr_max, lr, out=lr_max)
        weight = lr_max ** group["weight_lr_power"]
        if group["r"] != 0:
            weight = k ** group["r"] * weight
        weight_sum.add_(weight)
        # The package's ZeroDivisionError case (every weight 0 so far) gives ckp1 = 0, as here.
        ckp1 = weight / weight_sum.clamp(min=torch.finfo(SCALAR_DTYPE).tiny)
        y_grad_coef = (1 - ckp1).mul_(beta1).sub_(1)  # y moves by lr * (beta1 (1 - ckp1) - 1) * update
        dtype = group["params"][0].dtype
        return list(torch.stack([bias_correction2, ckp1, lr, y_grad_coef]).to(dtype).unbind())

    def _update(
        self,
        group: dict[str, Any],
        y: list[torch.Tensor],
        bias_correction2: torch.Tensor,
        ckp1: torch.Tensor,
        lr: torch.Tensor,
        y_grad_coef: torch.Tensor,
    ) -> None:
        beta2 = group["betas"][1]
        for p in y:
            state = self.state[p]
            if "z" not in state:
                state["z"] = torch.clone(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        grad = [p.grad for p in y]
        z = [self.state[p]["z"] for p in y]
        exp_avg_sq = [self.state[p]["exp_avg_sq"] for p in y]

        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grad, grad, value=1 - beta2)
        if group["bias_correction"] == "moment":
            denom = torch._foreach_div(exp_avg_sq, bias_correction2)
            torch._foreach_sqrt_(denom)
        else:  # corrected through lr instead
            denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_div_(grad, denom)  # grad now holds the normalised step direction
        del denom
        if group["weight_decay"] != 0:
            torch._foreach_add_(grad, y, alpha=group["weight_decay"])  # decay taken at y

        # y <- lerp(y, z, ckp1) + lr (beta1 (1 - ckp1) - 1) update: x and y move without forming x.
        # A lerp with a tensor weight has no multi-tensor kernel, hence sub, mul, add.
        toward_z = torch._foreach_sub(z, y)
        torch._foreach_mul_(toward_z, ckp1)
        torch._foreach_add_(y, toward_z)
        del toward_z
        torch._foreach_mul_(grad, lr)
        torch._foreach_sub_(z, grad)  # z <- z - lr update
        torch._foreach_mul_(grad, y_grad_coef)
        torch._foreach_add_(y, grad)
