"""The learned box head: per pixel, the box of the lesion that pixel belongs to.

The U-Net's finding channels say *where* lesions are; their regions are blobs whose extent
follows the evidence, not the box a radiologist drew. The box head reads the decoder's
features at H/16, H/8 and H/4 and predicts, for every pixel, the distances (left, top,
right, bottom) from that pixel to the edges of its lesion's box, in working pixels (the
FCOS/UnitBox formulation). The pipeline reads those distances at a finding's pixels and
takes their weighted median as the finding's box (S700).

Training (``models.training.train_boxes``) keeps the U-Net frozen, so the probabilities of
the model it extends do not change, and fits the head on the abnormal training images:

* targets: for each feature cell (stride ``STRIDE``) whose centre lies on a lesion (finding
  target ≥ 0.5) and inside a lesion box, the distances to the smallest such box; the cell
  holding each box's centre is always a target, so lesions smaller than a cell count;
* loss: −log IoU of the predicted and target boxes (scale-free, so large and small boxes
  weigh alike), averaged per lesion first, then over lesions (a large shadow does not
  outvote a nodule).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from models.training.net import UNet, normalise

STRIDE = 4
LATERAL = 32
WIDTH = 64
SCALE_PX = 16.0  # distances are predicted as log(d / SCALE_PX)
MAX_LOG = math.log(2048.0 / SCALE_PX)


DILATIONS = (1, 2, 4)


class BoxHead(nn.Module):
    """Log-distances (N, 4, H/4, W/4) from the U-Net decoder's H/16, H/8 and H/4 outputs.

    The body is one 3×3 convolution of ``width`` channels per entry of ``dilations``: the
    head's own reach at H/4 grows with their sum (1, 2, 4: 15 cells, 60 working pixels).
    """

    def __init__(
        self, widths: tuple[int, ...], width: int = WIDTH, dilations: tuple[int, ...] = DILATIONS
    ) -> None:
        super().__init__()
        # decoder outputs, coarsest first: widths[-2], …, widths[0]; we read H/16, H/8, H/4.
        self.levels = (widths[3], widths[2], widths[1])
        self.lateral = nn.ModuleList(nn.Conv2d(c, LATERAL, 1) for c in self.levels)
        layers: list[nn.Module] = []
        cin = LATERAL * len(self.levels)
        for d in dilations:
            layers += [nn.Conv2d(cin, width, 3, padding=d, dilation=d), nn.ReLU(inplace=True)]
            cin = width
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 4, 1))
        last = self.body[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.constant_(last.bias, math.log(2.0))  # 32 px to each edge to start

    def forward(self, decoded: list[torch.Tensor]) -> torch.Tensor:
        feats = decoded[-4:-1]  # H/16, H/8, H/4
        size = feats[-1].shape[-2:]
        lat = [  # at H/4 itself the interpolation is the identity
            F.interpolate(conv(f), size=size, mode="bilinear", align_corners=False)
            for conv, f in zip(self.lateral, feats, strict=True)
        ]
        out: torch.Tensor = self.body(torch.cat(lat, dim=1))
        return out.clamp(-MAX_LOG, MAX_LOG)


class Detector(nn.Module):
    """The U-Net and its box head: (finding/lung logits at H×W, box log-distances at H/4)."""

    def __init__(
        self,
        net: UNet,
        widths: tuple[int, ...],
        width: int = WIDTH,
        dilations: tuple[int, ...] = DILATIONS,
    ) -> None:
        super().__init__()
        self.net = net
        self.boxes = BoxHead(widths, width, dilations)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, decoded = self.net.decode(x)
        return logits, self.boxes(decoded)


def distances(log_distances: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Box distances (N, 4, H, W) in working pixels from the head's log-distances."""
    d = SCALE_PX * torch.exp(log_distances)
    return F.interpolate(d, size=size, mode="bilinear", align_corners=False)


class ExportedDetector(nn.Module):
    """What goes into the ONNX file: [0, 1] image in; sigmoid probabilities and the box
    distances (left, top, right, bottom) in working pixels out, both at H×W."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, log_d = self.detector(normalise(image))
        return torch.sigmoid(logits), distances(log_d, (image.shape[-2], image.shape[-1]))


def box_targets(
    positive: torch.Tensor, boxes: list[torch.Tensor], stride: int = STRIDE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell targets at ``stride``: (distances (N, 4, h, w) in pixels, lesion index
    (N, h, w), −1 where the cell is no target). ``positive`` (N, H, W) marks lesion pixels;
    ``boxes[i]`` (K, 4) the sample's boxes (x0, y0, x1, y1) in pixels."""
    n, height, width = positive.shape
    h, w = height // stride, width // stride
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) * stride
    on = positive[:, stride // 2 :: stride, stride // 2 :: stride][:, :h, :w]
    target = torch.zeros(n, 4, h, w)
    index = torch.full((n, h, w), -1, dtype=torch.long)
    offset = 0
    for i, b in enumerate(boxes):
        if len(b) == 0:
            continue
        x0, y0, x1, y1 = (b[:, k].view(-1, 1, 1) for k in range(4))
        left, right = xs.view(1, 1, w) - x0, x1 - xs.view(1, 1, w)
        top, bottom = ys.view(1, h, 1) - y0, y1 - ys.view(1, h, 1)
        inside = (left > 0) & (right > 0) & (top > 0) & (bottom > 0)  # (K, h, w)
        # the cell holding each box's centre is always a target
        cy = ((y0 + y1).view(-1) / 2 / stride).long().clamp(0, h - 1)
        cx = ((x0 + x1).view(-1) / 2 / stride).long().clamp(0, w - 1)
        centre = torch.zeros_like(inside)
        centre[torch.arange(len(b)), cy, cx] = True
        cand = (inside & on[i].bool().unsqueeze(0)) | centre
        area = ((x1 - x0) * (y1 - y0)).expand(-1, h, w)
        area = torch.where(cand, area, torch.full_like(area, math.inf))
        smallest, k = area.min(dim=0)
        hit = torch.isfinite(smallest)
        shape = (len(b), h, w)
        d = torch.stack(
            [left.expand(shape), top.expand(shape), right.expand(shape), bottom.expand(shape)],
            dim=1,
        )  # (K, 4, h, w)
        chosen = d.gather(0, k.view(1, 1, h, w).expand(1, 4, h, w)).squeeze(0)
        target[i] = torch.where(hit.unsqueeze(0), chosen.clamp(min=0.5), target[i])
        index[i] = torch.where(hit, k + offset, index[i])
        offset += len(b)
    return target, index


def cell_iou(log_pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """IoU of the predicted and target boxes at every target cell (M,), cells in raster order."""
    cells = index >= 0
    pred = (SCALE_PX * torch.exp(log_pred)).permute(0, 2, 3, 1)[cells]  # (M, 4)
    tgt = target.permute(0, 2, 3, 1)[cells]
    inter = (torch.minimum(pred[:, 0], tgt[:, 0]) + torch.minimum(pred[:, 2], tgt[:, 2])) * (
        torch.minimum(pred[:, 1], tgt[:, 1]) + torch.minimum(pred[:, 3], tgt[:, 3])
    )
    area_p = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    area_t = (tgt[:, 0] + tgt[:, 2]) * (tgt[:, 1] + tgt[:, 3])
    return inter / (area_p + area_t - inter + 1e-6)


def iou_loss(log_pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Mean over lesions of the mean −log IoU over each lesion's target cells (0 when none)."""
    cells = index >= 0
    if not bool(cells.any()):
        return log_pred.sum() * 0.0
    per_cell = -torch.log(cell_iou(log_pred, target, index).clamp(min=1e-6))
    _, inverse = torch.unique(index[cells], return_inverse=True)
    count = torch.bincount(inverse).float()
    per_lesion = torch.zeros_like(count).index_add_(0, inverse, per_cell) / count
    return per_lesion.mean()
