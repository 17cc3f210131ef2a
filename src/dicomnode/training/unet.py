"""A small 2D U-Net: one-channel slices → one logit map per label."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet2d"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet2d(nn.Module):
    """U-Net with ``levels`` resolutions (``levels - 1`` poolings), channels doubling per level.

    Parameters
    ----------
    n_labels
        Output channels (one logit per label, for a sigmoid).
    base
        Channels at full resolution.
    levels
        2 or more; H and W of the input must be multiples of ``2 ** (levels - 1)``
        (:attr:`size_multiple`).

    Notes
    -----
    BatchNorm: in eval mode ONNX Runtime folds it into the convolutions. Under
    DistributedDataParallel each process keeps its own batch statistics (no
    SyncBatchNorm, which needs CUDA); that is fine at per-process batches >= 8.
    """

    def __init__(self, n_labels: int = 1, base: int = 16, levels: int = 3) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels: need at least 2, got {levels}")
        if n_labels < 1 or base < 1:
            raise ValueError(f"n_labels and base must be positive, got {n_labels}, {base}")
        self.n_labels, self.base, self.levels = n_labels, base, levels
        chans = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList([_block(1, chans[0])])
        self.down.extend(_block(chans[i - 1], chans[i]) for i in range(1, levels))
        self.pool = nn.MaxPool2d(2)
        self.upconv = nn.ModuleList(
            nn.ConvTranspose2d(chans[i], chans[i - 1], 2, stride=2)
            for i in range(levels - 1, 0, -1)
        )
        self.up = nn.ModuleList(
            _block(2 * chans[i - 1], chans[i - 1]) for i in range(levels - 1, 0, -1)
        )
        self.head = nn.Conv2d(chans[0], n_labels, 1)

    @property
    def size_multiple(self) -> int:
        return int(2 ** (self.levels - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for upconv, block in zip(self.upconv, self.up, strict=True):
            x = block(torch.cat([upconv(x), skips.pop()], dim=1))
        return self.head(x)
