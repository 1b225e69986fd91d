"""Residual networks and a vision transformer as block specs (the zoo beyond the paper's plain CNNs).

A :class:`ResNet` or :class:`ViT` spec expands into several LocalNet blocks at once (``expand``),
at the granularity the model options ask for: ``block`` makes every residual (or transformer) block
a LocalNet block, ``stage`` one LocalNet block per stage of residual blocks. The stem always joins
the first block, so every block ends in a residual sum and no tensor skips from one LocalNet block
to a later one: the shortcut of a residual block lives inside it.

Each block's LLS latent follows :func:`~lls.method.localize.choose_pool`: the largest adaptive pool
whose latent has at most ``MAX_LATENT`` entries (the largest d_l of the paper's presets), except a
ResNet's last block, whose latent is by default the global average its head reads
(``last_latent="head"``: LLS then trains the last block for the features the head is given; pooled
to 4 x 4 instead, ResNet-20 by stage ended 17-21 points lower in docs/results.md's screening). A ViT
block's output is (tokens, dim); its latent is the mean over tokens (``signals.latent``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .localize import MAX_LATENT, choose_pool
from .net import BlockPlan, Expanding, ModelOptions

LAYER_NORM_EPS = 1e-6  # the ViT paper's LayerNorm eps
GLOBAL = 1  # a latent pool of 1 x 1: the global average
POSITION_INIT_STD = 0.02  # N(0, 0.02^2) learned position embeddings (ViT, timm)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with BatchNorm, a shortcut, the activation after
    the sum. The shortcut is the identity, or a strided 1x1 convolution + BatchNorm where the shape
    changes (He et al.'s option B, what torchvision's ResNet-18/34 use)."""

    def __init__(self, cin: int, cout: int, stride: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = activation()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.act2 = activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(out + self.shortcut(x))


@dataclass(frozen=True)
class Stage:
    """``depth`` basic blocks of ``channels``; the first one strides by ``stride``."""

    channels: int
    depth: int
    stride: int = 1


@dataclass(frozen=True)
class ResNet(Expanding):
    """A stem (3x3 convolution of ``stem`` channels + BatchNorm + activation, stride 1: the
    CIFAR-style stem, for 28-64 px inputs) and stages of basic blocks."""

    stem: int
    stages: tuple[Stage, ...]

    def widen(self, width: float) -> ResNet:
        """Every stage's channels and the stem's times ``width`` (rounded down, at least 1)."""
        stages = tuple(dataclasses.replace(s, channels=max(1, int(s.channels * width))) for s in self.stages)
        return ResNet(max(1, int(self.stem * width)), stages)

    def count(self, granularity: str) -> int:
        """How many LocalNet blocks this spec expands into."""
        return len(self.stages) if granularity == "stage" else sum(s.depth for s in self.stages)

    def expand(
        self, shape: tuple[int, ...], make_act: Callable[[], nn.Module], options: ModelOptions
    ) -> Iterator[BlockPlan]:
        c, h, w = shape
        granularity = options.block_granularity
        pending: list[nn.Module] = [
            nn.Conv2d(c, self.stem, 3, padding=1, bias=False),
            nn.BatchNorm2d(self.stem),
            make_act(),
        ]
        c = self.stem
        for stage in self.stages:
            for i in range(stage.depth):
                stride = stage.stride if i == 0 else 1
                pending.append(BasicBlock(c, stage.channels, stride, make_act))
                c, h, w = stage.channels, (h - 1) // stride + 1, (w - 1) // stride + 1
                if granularity == "block" or i == stage.depth - 1:
                    block = pending[0] if len(pending) == 1 else nn.Sequential(*pending)
                    last = stage is self.stages[-1] and i == stage.depth - 1
                    pool = (
                        GLOBAL
                        if last and options.last_latent == "head"
                        else choose_pool((c, h, w), MAX_LATENT)
                    )
                    yield block, [], pool, (c, h, w)
                    pending = []


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch`` x ``patch`` patches, each flattened and mapped to ``dim`` by one
    Linear (no convolution), plus learned position embeddings: (N, C, H, W) -> (N, tokens, dim)."""

    def __init__(self, channels: int, size: tuple[int, int], patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.grid = (size[0] // patch, size[1] // patch)
        self.project = nn.Linear(channels * patch * patch, dim)
        self.position = nn.Parameter(POSITION_INIT_STD * torch.randn(1, self.grid[0] * self.grid[1], dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        (gh, gw), p = self.grid, self.patch
        x = x[:, :, : gh * p, : gw * p].reshape(n, c, gh, p, gw, p)  # a border short of a patch is cut
        patches = x.permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, c * p * p)
        return self.project(patches) + self.position


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, activation: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim), activation(), nn.Linear(mlp_ratio * dim, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TokenMean(nn.Module):
    """(N, tokens, dim) -> (N, dim): the mean over tokens (the ViT's pooling before its head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


@dataclass(frozen=True)
class ViT(Expanding):
    """A small vision transformer: patch embedding (joining the first block), ``depth`` pre-norm
    encoder blocks, a final LayerNorm (in the last block), the token mean, then the linear head."""

    dim: int
    depth: int
    heads: int
    patch: int
    mlp_ratio: int = 2

    def widen(self, width: float) -> ViT:
        """The embedding size times ``width``, rounded down to a multiple of the heads (at least one
        channel per head)."""
        per_head = max(1, int(self.dim * width) // self.heads)
        return dataclasses.replace(self, dim=per_head * self.heads)

    def count(self, granularity: str) -> int:
        return self.depth

    def expand(
        self, shape: tuple[int, ...], make_act: Callable[[], nn.Module], options: ModelOptions
    ) -> Iterator[BlockPlan]:
        c, h, w = shape
        tokens = (h // self.patch) * (w // self.patch)
        for i in range(self.depth):
            layers: list[nn.Module] = [EncoderBlock(self.dim, self.heads, self.mlp_ratio, make_act)]
            if i == 0:
                layers.insert(0, PatchEmbedding(c, (h, w), self.patch, self.dim))
            if i == self.depth - 1:
                layers.append(nn.LayerNorm(self.dim, eps=LAYER_NORM_EPS))
            last = i == self.depth - 1
            block = layers[0] if len(layers) == 1 else nn.Sequential(*layers)
            yield block, [TokenMean()] if last else [], None, (self.dim,) if last else (tokens, self.dim)
