"""The 3D Improved UNet: networks only (no I/O, no argparse, no printing).

A 3D UNet (Cicek et al., MICCAI 2016) with four resolution steps, improved with
  * residual double convolutions (He et al., 2016; Isensee et al., "Brain tumor segmentation
    and radiomics survival prediction", 2017: the "improved UNet"),
  * additive attention gates on every skip connection (Oktay et al., "Attention U-Net", 2018),
  * GroupNorm (Wu & He, 2018) instead of BatchNorm: batch size 1 is the norm for 3D volumes,
    where BatchNorm statistics are meaningless,
  * LeakyReLU instead of ReLU.

Shapes: (B, C_in, D, H, W) -> (B, n_classes, D, H, W). Any D, H, W works: the input is padded up
to a multiple of 2**4 = 16 and the logits are cropped back.

MONAI's ``AttentionUnet`` has attention gates but plain (non-residual) blocks and BatchNorm; its
``UNet`` has residual units but no attention. Neither combines the four changes above, which is
why the blocks are written here; they are small and read top to bottom.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NEGATIVE_SLOPE = 0.01


def group_count(channels: int, max_groups: int = 8) -> int:
    """Largest number of GroupNorm groups <= max_groups that divides ``channels``."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels)


class ResidualDoubleConv(nn.Module):
    """Two (3x3x3 conv, GroupNorm, LeakyReLU) with a residual shortcut.

    ``(B, C_in, D, H, W) -> (B, C_out, D, H, W)``. The shortcut is a 1x1x1 conv + GroupNorm
    when the width changes, the identity otherwise. The second activation follows the sum,
    as in ResNet.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = norm(out_channels)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm(out_channels)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, bias=False), norm(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.norm1(self.conv1(x)), NEGATIVE_SLOPE, inplace=True)
        out = self.dropout(out)
        out = self.norm2(self.conv2(out))
        # In-place add and activation: one full-resolution activation fewer kept alive.
        out += self.shortcut(x)
        return F.leaky_relu(out, NEGATIVE_SLOPE, inplace=True)


class AttentionGate(nn.Module):
    """Additive attention gate on a skip connection (Oktay et al., 2018).

    ``skip (B, C_skip, D, H, W)`` and ``gate (B, C_gate, D, H, W)`` (the up-sampled decoder
    feature at the same resolution) -> ``(skip * alpha, alpha)`` with ``alpha`` of shape
    ``(B, 1, D, H, W)`` in [0, 1].
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int):
        super().__init__()
        self.project_skip = nn.Sequential(
            nn.Conv3d(skip_channels, inter_channels, 1, bias=False), norm(inter_channels)
        )
        self.project_gate = nn.Sequential(
            nn.Conv3d(gate_channels, inter_channels, 1, bias=False), norm(inter_channels)
        )
        self.to_coefficient = nn.Conv3d(inter_channels, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        joint = F.leaky_relu(self.project_skip(skip) + self.project_gate(gate), NEGATIVE_SLOPE)
        alpha = torch.sigmoid(self.to_coefficient(joint))
        return skip * alpha, alpha


class Down(nn.Module):
    """2x2x2 max-pooling, then a residual double conv: ``(B, C_in, D, H, W) -> (B, C_out, D/2, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.pool = nn.MaxPool3d(2)
        self.conv = ResidualDoubleConv(in_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class Up(nn.Module):
    """2x2x2 transposed conv up, attention-gated skip, concatenation, residual double conv.

    ``(B, C_in, D, H, W), skip (B, C_skip, 2D, 2H, 2W) -> (B, C_out, 2D, 2H, 2W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.up = nn.ConvTranspose3d(in_channels, skip_channels, 2, stride=2)
        self.attention = AttentionGate(skip_channels, skip_channels, max(skip_channels // 2, 1))
        self.conv = ResidualDoubleConv(2 * skip_channels, out_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        upsampled = self.up(x)
        gated_skip, alpha = self.attention(skip, upsampled)
        return self.conv(torch.cat([gated_skip, upsampled], dim=1)), alpha


class ImprovedUNet3D(nn.Module):
    """3D UNet with residual blocks, attention-gated skips, GroupNorm and LeakyReLU.

    Args:
        in_channels: image channels (1 for T2-weighted MRI).
        out_channels: number of classes; the network returns logits.
        channels: widths of the four resolution steps; the bottleneck is twice the last.
        dropout: Dropout3d probability inside every double conv (0 = off).
        deep_supervision: in training mode also return logits from the two lower decoder
            levels (at their own resolution), for a loss on each.
        gradient_checkpointing: recompute block activations in the backward pass instead of
            storing them (whole volumes in little GPU memory, about 30 % more compute).

    Shapes: ``(B, in_channels, D, H, W) -> (B, out_channels, D, H, W)`` for any D, H, W >= 1;
    inputs are zero-padded to a multiple of ``2**4`` and the logits cropped back.
    With ``deep_supervision`` and ``self.training``: ``(logits, [aux_d2, aux_d3])`` where
    ``aux_d2`` is at 1/2 and ``aux_d3`` at 1/4 of the padded input size.
    """

    depth = 4

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 6,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.0,
        deep_supervision: bool = False,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if len(channels) != self.depth:
            raise ValueError(f"channels must have {self.depth} widths (one per resolution step), got {tuple(channels)}")
        if any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must be positive, got {tuple(channels)}")
        c1, c2, c3, c4 = (int(c) for c in channels)
        bottleneck = 2 * c4
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.deep_supervision = deep_supervision
        self.gradient_checkpointing = gradient_checkpointing

        self.enc1 = ResidualDoubleConv(in_channels, c1, dropout)
        self.enc2 = Down(c1, c2, dropout)
        self.enc3 = Down(c2, c3, dropout)
        self.enc4 = Down(c3, c4, dropout)
        self.bottleneck = Down(c4, bottleneck, dropout)
        self.dec4 = Up(bottleneck, c4, c4, dropout)
        self.dec3 = Up(c4, c3, c3, dropout)
        self.dec2 = Up(c3, c2, c2, dropout)
        self.dec1 = Up(c2, c1, c1, dropout)
        self.head = nn.Conv3d(c1, out_channels, 1)
        if deep_supervision:
            self.aux_head2 = nn.Conv3d(c2, out_channels, 1)
            self.aux_head3 = nn.Conv3d(c3, out_channels, 1)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks: the units for regional torch.compile and for checkpointing."""
        return [self.enc1, self.enc2, self.enc3, self.enc4, self.bottleneck,
                self.dec4, self.dec3, self.dec2, self.dec1]

    def _run(self, block: nn.Module, *inputs: torch.Tensor):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *inputs, use_reentrant=False)
        return block(*inputs)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}"
            )
        spatial = x.shape[2:]
        multiple = 2**self.depth
        padding = []
        for size in reversed(spatial):  # F.pad lists the last axis first
            padding += [0, (-size) % multiple]
        if any(padding):
            x = F.pad(x, padding)

        e1 = self._run(self.enc1, x)
        e2 = self._run(self.enc2, e1)
        e3 = self._run(self.enc3, e2)
        e4 = self._run(self.enc4, e3)
        b = self._run(self.bottleneck, e4)
        d4, a4 = self._run(self.dec4, b, e4)
        d3, a3 = self._run(self.dec3, d4, e3)
        d2, a2 = self._run(self.dec2, d3, e2)
        d1, a1 = self._run(self.dec1, d2, e1)
        logits = self.head(d1)[(..., *(slice(0, s) for s in spatial))]

        if return_attention:
            crop = (..., *(slice(0, s) for s in spatial))
            return logits, [a1[crop], a2, a3, a4]
        if self.deep_supervision and self.training:
            return logits, [self.aux_head2(d2), self.aux_head3(d3)]
        return logits


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
