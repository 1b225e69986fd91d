"""Random augmentation of whole batches on tensors.

Every random number a batch needs is drawn first, in a fixed order, into a :class:`Draws`; the
images are transformed afterwards. Skipping a batch (to resume mid-epoch) is then drawing its
numbers without touching any image, and streamed datasets can use the crop draws while decoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Augment, seeded_generator  # noqa: F401 (seeded_generator: re-exported)

ERASE_SCALE = (0.02, 0.33)  # torchvision RandomErasing defaults: area fraction ...
ERASE_RATIO = (0.3, 3.3)  # ... and aspect ratio range


@dataclass
class Draws:
    """The random numbers of one batch of ``n`` images (uniforms in [0, 1) unless noted)."""

    crop: torch.Tensor | None  # (2, n): vertical and horizontal crop position
    flip: torch.Tensor | None  # (n,) bool
    erase: torch.Tensor | None  # (5, n): apply?, area, log-aspect, top, left

    def select(self, part: slice) -> Draws:
        """The draws of the images in ``part`` (a data-parallel rank's share of the batch)."""
        return Draws(
            self.crop[:, part] if self.crop is not None else None,
            self.flip[part] if self.flip is not None else None,
            self.erase[:, part] if self.erase is not None else None,
        )


def draw(n: int, augment: Augment, random_crop: bool, generator: torch.Generator) -> Draws:
    """The draws of ``n`` images, in a fixed order, on the generator's device."""
    device = generator.device
    crop = torch.rand(2, n, generator=generator, device=device) if random_crop else None
    flip = torch.rand(n, generator=generator, device=device) < 0.5 if augment.hflip else None
    erase = torch.rand(5, n, generator=generator, device=device) if augment.erasing else None
    return Draws(crop, flip, erase)


def crop_offsets(uniform: torch.Tensor, slack: int) -> torch.Tensor:
    """Offsets in 0..slack (inclusive) from uniforms in [0, 1)."""
    return (uniform * (slack + 1)).long().clamp_(max=slack)


def pad_crop(x: torch.Tensor, padding: int, position: torch.Tensor) -> torch.Tensor:
    """Zero-pad by ``padding`` and crop back to the original size at a per-image position."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy, dx = crop_offsets(position, 2 * padding).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None].expand(n, c, h, w + 2 * padding)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images where ``mask`` is true."""
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def erase(x: torch.Tensor, p: float, u: torch.Tensor) -> torch.Tensor:
    """Set one random rectangle of each image to 0 with probability ``p`` (after normalisation).

    Follows torchvision's ``RandomErasing`` ranges (area 2-33 % of the image, aspect 0.3-3.3), with
    one try per image; a rectangle larger than the image is clipped (torchvision retries up to 10
    times instead).
    """
    _, _, h, w = x.shape
    apply = u[0] < p
    area = h * w * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * u[1])
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    ratio = torch.exp(lo + (hi - lo) * u[2])
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
    top = (u[3] * (h - eh + 1)).long()
    left = (u[4] * (w - ew + 1)).long()
    ys, xs = torch.arange(h, device=u.device)[None, :], torch.arange(w, device=u.device)[None, :]
    inside_y = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    inside_x = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = inside_y[:, :, None] & inside_x[:, None, :] & apply[:, None, None]
    return x.masked_fill(mask.to(x.device)[:, None], 0.0)
