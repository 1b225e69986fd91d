"""Per-block accuracy: how well each block classifies on its own.

A signal that has a readout of its own says so (``BlockSignal.readout``, its name, and
``BlockSignal.predict``): LLS blocks come with a classifier for free, since a block's signal scores
its latent against the class basis and ``argmax`` of those scores is a prediction ("basis"; for
local classifiers, their learned matrix). Blocks whose signal has none (DFA, DRTP, BP) get a cheap
linear probe instead: ridge regression from the block's pooled latent (the LLS latent of
docs/method.md, not normalised) to one-hot labels, solved in closed form on a fixed subset of the
training set without augmentation ("ridge probe").

Readouts run in evaluation mode without gradients and draw no random numbers, so they never change
training (tested: weights are identical with readouts on and off).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from .latent import latent

PROBE_IMAGES = 2048  # training images the ridge probes are fitted on (the first ones, unaugmented)
RIDGE = 1e-3  # ridge strength, relative to the mean eigenvalue of the latents' Gram matrix


RIDGE_PROBE = "ridge probe"


def readout_kind(signals: list) -> str:
    """How the blocks are read out: the signals' own readout when every one has the same, else
    ridge probes (for every block: a rule has one readout)."""
    names = {s.readout for s in signals}
    if len(names) == 1 and None not in names:
        return names.pop()
    return RIDGE_PROBE


class RidgeProbe:
    """Closed-form ridge regression to one-hot targets on centred features."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        x = features.double()
        self.mean = x.mean(0)
        x = x - self.mean
        y = F.one_hot(labels, classes).double()
        gram = x.T @ x
        strength = RIDGE * gram.diagonal().mean().clamp_min(1e-12)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        self.weight = torch.linalg.solve(gram + strength * eye, x.T @ (y - y.mean(0)))
        self.bias = y.mean(0)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return ((features.double() - self.mean) @ self.weight + self.bias).argmax(1)


@torch.no_grad()
def fit_probes(net, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int) -> list[RidgeProbe]:
    features: list[list[torch.Tensor]] = [[] for _ in net.blocks]
    labels = []
    for x, y in batches:
        *outputs, _ = net.walk(x)
        for i, a in outputs:
            features[i].append(latent(a, net.latent_pool[i]))
        labels.append(y)
    if not labels:  # no probe batch: no probes (the caller reports no block accuracy)
        return []
    y = torch.cat(labels)
    return [RidgeProbe(torch.cat(f), y, classes) for f in features]


def block_predictions(
    signals: list,
    probes: Sequence[RidgeProbe] | Mapping[int, RidgeProbe] | None,
    index: int,
    a: torch.Tensor,
    pool,
) -> torch.Tensor:
    """Block ``index``'s predicted classes from its output ``a``: its ridge probe when ``probes``
    are given (by block index), else its signal's own readout (which refuses, naming the signal,
    if it has none)."""
    if probes is not None:
        return probes[index].predict(latent(a, pool))
    return signals[index].predict(a)
