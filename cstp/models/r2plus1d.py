"""R(2+1)D-10: the backbone of CSTP (docs/method.md#backbone).

The network of VCOP / PRP / Pace as the CSTP reference builds it
(`models/pace/r21d_byol.py`): a stem and four stages of one residual block
each, every 3-D convolution factorised into a spatial (1×k×k) and a temporal
(k×1×1) convolution. 14,365,303 parameters at width 1.0.

Initialisation is left to PyTorch's defaults here; the CSTP model applies the
reference's Glorot initialisation to the whole network (see
`cstp_model.reference_init_`).
"""

import math

import torch
import torch.nn as nn

STAGE_CHANNELS = (64, 128, 256, 512)  # conv2 .. conv5 at width 1.0


def _triple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value, value)


def intermediate_channels(kernel_size, in_channels, out_channels):
    """M of Tran et al. 2018: the (2+1)D pair has as many parameters as the full 3-D conv."""
    kt, kh, kw = kernel_size
    return math.floor(kt * kh * kw * in_channels * out_channels / (kh * kw * in_channels + kt * out_channels))


class SpatioTemporalConv(nn.Module):
    """A k_t×k_h×k_w convolution factorised as spatial conv → BN → ReLU → temporal conv.

    The BN + ReLU between the two halves is what gives (2+1)D its extra
    non-linearity; the BN after the temporal half belongs to the caller.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__()
        kt, kh, kw = _triple(kernel_size)
        st, sh, sw = _triple(stride)
        pt, ph, pw = _triple(padding)
        self.intermediate_channels = intermediate_channels((kt, kh, kw), in_channels, out_channels)

        self.spatial_conv = nn.Conv3d(
            in_channels, self.intermediate_channels, (1, kh, kw),
            stride=(1, sh, sw), padding=(0, ph, pw), bias=False,
        )
        self.bn = nn.BatchNorm3d(self.intermediate_channels)
        self.relu = nn.ReLU(inplace=True)
        self.temporal_conv = nn.Conv3d(
            self.intermediate_channels, out_channels, (kt, 1, 1),
            stride=(st, 1, 1), padding=(pt, 0, 0), bias=False,
        )

    def forward(self, x):
        return self.temporal_conv(self.relu(self.bn(self.spatial_conv(x))))


class ResidualBlock(nn.Module):
    """Two 3×3×3 (2+1)D convs with a shortcut; `downsample` halves T, H and W."""

    def __init__(self, in_channels, out_channels, downsample=False):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = SpatioTemporalConv(in_channels, out_channels, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm3d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = SpatioTemporalConv(out_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm3d(out_channels)
        if downsample:
            # A factorised 1×1×1 conv (it too has the internal BN + ReLU), as in the reference.
            self.shortcut = nn.Sequential(
                SpatioTemporalConv(in_channels, out_channels, 1, stride=2),
                nn.BatchNorm3d(out_channels),
            )
        else:
            assert in_channels == out_channels, "an identity shortcut needs equal widths"
            self.shortcut = nn.Identity()

    def forward(self, x):
        residual = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(residual + self.shortcut(x))


class R2Plus1D10(nn.Module):
    """(B, 3, T, H, W) clips → (B, feature_dim) pooled features.

    `width` scales the stage widths (64, 128, 256, 512) for small demo runs;
    the reference network is width 1.0 (feature_dim 512).
    """

    def __init__(self, width: float = 1.0):
        super().__init__()
        c2, c3, c4, c5 = (max(4, round(c * width)) for c in STAGE_CHANNELS)
        self.stage_channels = (c2, c3, c4, c5)
        self.feature_dim = c5

        # No max-pool after the stem (docs/method.md#backbone); the reference comment says 1×7×7, the kernel is 3×7×7.
        self.stem = nn.Sequential(
            SpatioTemporalConv(3, c2, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3)),
            nn.BatchNorm3d(c2),
            nn.ReLU(inplace=True),
        )
        self.conv2 = ResidualBlock(c2, c2)
        self.conv3 = ResidualBlock(c2, c3, downsample=True)
        self.conv4 = ResidualBlock(c3, c4, downsample=True)
        self.conv5 = ResidualBlock(c4, c5, downsample=True)
        self.pool = nn.AdaptiveAvgPool3d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        return self.pool(x).flatten(1)
