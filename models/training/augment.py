"""Batch augmentation for radiographs, on torch tensors (CPU-friendly, seeded).

Geometry (image and targets together): rotation ±8°, isotropic scale 0.85–1.2 (``SCALE``;
``train --scale-range`` sets another), anisotropic stretch ±8 %, shift ±6 %; no left–right
flip (the heart and the aortic knob are on the patient's left; a flipped chest is not a chest
we will be shown). Intensity (image only): gamma 0.6–1.6, contrast/brightness, Gaussian blur
or unsharp, Gaussian noise, random black or white borders (collimation) and burned-in
text-like marks. Compression (``jpeg``, on the uint8 image before the rest): with
probability ``JPEG_P`` a JPEG re-encode at a quality drawn from ``JPEG_QUALITY``, so that
JPEG's look (one NIH mass source is JPEG-coded, the others lossless) is no cue for a lesion.
All of these are applied to every source alike, so the look of a source (TBX11K is clean, NIH
has markers) is no cue.
"""

from __future__ import annotations

import io
import math

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.nn import functional as F

JPEG_P = 0.5
JPEG_QUALITY = (30, 95)
SCALE = (0.85, 1.2)
"""The isotropic scale range of the geometry (``train --scale-range`` sets another)."""


def random_affine(
    n: int, g: torch.Generator, scale_range: tuple[float, float] = SCALE
) -> torch.Tensor:
    """One random affine per sample, as ``F.affine_grid``'s theta (output → input, in
    normalised coordinates); the isotropic scale uniform in ``scale_range``."""

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=g)

    angle = u(-8, 8) * math.pi / 180
    scale = u(*scale_range)
    stretch = u(-0.08, 0.08)
    sx, sy = scale * (1 + stretch), scale * (1 - stretch)
    tx, ty = u(-0.06, 0.06), u(-0.06, 0.06)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos / sx, -sin / sx, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin / sy, cos / sy, ty
    return theta


def geometry(
    image: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Generator,
    theta: torch.Tensor | None = None,
    scale_range: tuple[float, float] = SCALE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one random affine per sample (``theta``, or drawn from ``g`` with its scale in
    ``scale_range``) to image, targets and weights."""
    if theta is None:
        theta = random_affine(image.shape[0], g, scale_range)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    target = F.grid_sample(target, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # Outside the source image the finding channels are negative (full weight).
    weight = F.grid_sample(
        weight, grid, mode="bilinear", padding_mode="border", align_corners=False
    )
    return image, target, weight


def jpeg(images: npt.NDArray[np.uint8], g: torch.Generator) -> npt.NDArray[np.uint8]:
    """Each uint8 image (N, H, W) JPEG re-encoded with probability ``JPEG_P`` at a quality
    uniform in ``JPEG_QUALITY``; the others as they were."""
    out = images.copy()
    for i in range(len(images)):
        if torch.rand(1, generator=g).item() >= JPEG_P:
            continue
        quality = int(torch.randint(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1, (1,), generator=g))
        buffer = io.BytesIO()
        Image.fromarray(images[i]).save(buffer, "JPEG", quality=quality)
        out[i] = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"))
    return out


def _marks(image: torch.Tensor, g: torch.Generator) -> None:
    """Burn bright rectangles (text markers, 'L'/'R' letters, rulers) into some images."""
    n, _, h, w = image.shape
    for i in range(n):
        if torch.rand(1, generator=g).item() < 0.5:
            continue
        for _ in range(int(torch.randint(1, 4, (1,), generator=g).item())):
            mh = int(torch.randint(h // 60 + 1, h // 14, (1,), generator=g).item())
            mw = int(torch.randint(w // 60 + 1, w // 6, (1,), generator=g).item())
            corner_y = torch.rand(1, generator=g).item() < 0.5
            y = int(torch.randint(0, h // 8, (1,), generator=g).item())
            y = y if corner_y else h - mh - y
            x = int(torch.randint(0, w - mw, (1,), generator=g).item())
            value = 0.85 + 0.15 * torch.rand(1, generator=g).item()
            stripes = torch.rand(mw, generator=g) < 0.6
            image[i, 0, y : y + mh, x : x + mw] = torch.where(
                stripes, torch.tensor(value), image[i, 0, y : y + mh, x : x + mw]
            )


def _borders(image: torch.Tensor, g: torch.Generator) -> None:
    """Collimation-like flat borders on some images."""
    n, _, h, w = image.shape
    for i in range(n):
        if torch.rand(1, generator=g).item() < 0.7:
            continue
        dark = torch.rand(1, generator=g).item() < 0.7
        shade = 0.1 * torch.rand(1, generator=g).item()
        value = shade if dark else 1.0 - shade
        t, b, left, r = (int(torch.randint(0, h // 12, (1,), generator=g).item()) for _ in range(4))
        image[i, 0, :t] = value
        image[i, 0, h - b :] = value
        image[i, 0, :, :left] = value
        image[i, 0, :, w - r :] = value


def intensity(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gamma, contrast, blur/sharpen, noise, borders and marks; result clipped to [0, 1]."""
    n = image.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=g)).view(n, 1, 1, 1)

    image = image.clamp(0, 1) ** torch.exp(u(math.log(0.6), math.log(1.6)))
    image = (image - 0.5) * u(0.75, 1.3) + 0.5 + u(-0.1, 0.1)
    blurred = F.avg_pool2d(image, 5, stride=1, padding=2, count_include_pad=False)
    mix = u(-0.8, 1.0)  # > 0 blurs, < 0 sharpens (unsharp mask)
    image = image + mix * (blurred - image)
    image = image + u(0.0, 0.04) * torch.randn(image.shape, generator=g)
    image = image.clamp(0, 1)
    _borders(image, g)
    _marks(image, g)
    return image


def transform_boxes(
    boxes: torch.Tensor, theta: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """Boxes (K, 4: x0, y0, x1, y1 in pixels of an H×W image) as they lie after ``geometry``
    with this sample's ``theta`` (2, 3): the bounding box of the four moved corners, clipped
    to the image. ``theta`` maps output to input coordinates, so corners move by its inverse."""
    h, w = size
    if boxes.numel() == 0:
        return boxes.reshape(0, 4)
    x0, y0, x1, y1 = boxes.unbind(1)
    xs = torch.stack([x0, x1, x1, x0], dim=1) * (2.0 / w) - 1.0
    ys = torch.stack([y0, y0, y1, y1], dim=1) * (2.0 / h) - 1.0
    a, t = theta[:, :2], theta[:, 2]
    inv = torch.linalg.inv(a)
    u, v = xs - t[0], ys - t[1]
    ox = inv[0, 0] * u + inv[0, 1] * v
    oy = inv[1, 0] * u + inv[1, 1] * v
    px, py = (ox + 1.0) * (w / 2.0), (oy + 1.0) * (h / 2.0)
    xs0, xs1 = px.amin(1).clamp(0, w), px.amax(1).clamp(0, w)
    ys0, ys1 = py.amin(1).clamp(0, h), py.amax(1).clamp(0, h)
    return torch.stack([xs0, ys0, xs1, ys1], dim=1)
