"""Small U-Nets: one-channel slices (2D) or patches (3D) → one logit map per label."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["UNet2d", "UNet3d"]

_LAYERS = {
    2: (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.ConvTranspose3d),
}


def _block(c_in: int, c_out: int, dims: int = 2) -> nn.Sequential:
    conv, norm, _, _ = _LAYERS[dims]
    return nn.Sequential(
        conv(c_in, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
        conv(c_out, c_out, 3, padding=1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


class _UNet(nn.Module):
    dims = 2

    def __init__(self, n_labels: int = 1, base: int = 16, levels: int = 3) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels: need at least 2, got {levels}")
        if n_labels < 1 or base < 1:
            raise ValueError(f"n_labels and base must be positive, got {n_labels}, {base}")
        _, _, pool, upconv = _LAYERS[self.dims]
        conv = _LAYERS[self.dims][0]
        self.n_labels, self.base, self.levels = n_labels, base, levels
        chans = [base * 2**i for i in range(levels)]
        self.down = nn.ModuleList([_block(1, chans[0], self.dims)])
        self.down.extend(_block(chans[i - 1], chans[i], self.dims) for i in range(1, levels))
        self.pool = pool(2)
        self.upconv = nn.ModuleList(
            upconv(chans[i], chans[i - 1], 2, stride=2) for i in range(levels - 1, 0, -1)
        )
        self.up = nn.ModuleList(
            _block(2 * chans[i - 1], chans[i - 1], self.dims) for i in range(levels - 1, 0, -1)
        )
        self.head = conv(chans[0], n_labels, 1)

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


class UNet2d(_UNet):
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

    dims = 2


class UNet3d(_UNet):
    """The same U-Net on (N, 1, D, H, W) patches: 3x3x3 convolutions, 2x2x2 pooling.

    D, H and W must each be a multiple of :attr:`size_multiple`. Same parameters and
    state-dict layout as :class:`UNet2d` (the retraining loop and checkpoints treat both
    alike).
    """

    dims = 3
