"""CIFAR ResNets (ResNet-20/32/44/56) with option-A shortcuts (SPEC §6.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dnet_fast.models.heads import build_head

__all__ = ["CifarBasicBlock", "CifarResNet", "PadShortcut", "resnet20", "resnet32", "resnet44", "resnet56"]


class PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling plus zero-padding of the new channels (no parameters).

    Args:
        in_channels: channels of the block input.
        out_channels: channels of the block output (>= ``in_channels``).
        stride: spatial subsampling factor.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        # Split the zero channels evenly on both sides, as the reference LambdaLayer pads planes//4 each side.
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (B, Cin, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (B, Cout, H/s, W/s)


class CifarBasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or option-A shortcut.

    Args:
        in_channels: input channels.
        channels: output channels.
        stride: stride of the first convolution.
    """

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        needs_shortcut = stride != 1 or in_channels != channels
        self.shortcut = PadShortcut(in_channels, channels, stride) if needs_shortcut else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3×3 stem, three stages of ``depth`` BasicBlocks (widths w/2w/4w, strides 1/2/2), avg pool, head ``fc``.

    Args:
        depth: BasicBlocks per stage (n; the network has 6n + 2 layers).
        num_classes: number of classes C.
        width: stem and first-stage width w.
        head: ``linear`` or ``cosine``.
        head_scale: cosine head scale.
    """

    #: state-dict key prefixes that a pretrained checkpoint does not provide (the new head).
    pretrained_skip: tuple[str, ...] = ("fc.",)

    def __init__(
        self, depth: int, num_classes: int, width: int = 16, head: str = "linear", head_scale: float = 30.0
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._stage(width, width, depth, 1)
        self.layer2 = self._stage(width, 2 * width, depth, 2)
        self.layer3 = self._stage(2 * width, 4 * width, depth, 2)
        self.num_features = 4 * width
        self.fc = build_head(head, self.num_features, num_classes, head_scale)
        self._init_weights()

    @staticmethod
    def _stage(in_channels: int, channels: int, depth: int, stride: int) -> nn.Sequential:
        blocks = [CifarBasicBlock(in_channels, channels, stride)]
        blocks += [CifarBasicBlock(channels, channels) for _ in range(depth - 1)]
        return nn.Sequential(*blocks)

    def _init_weights(self) -> None:
        # Kaiming-normal fan_in on conv and linear weights (the reference `_weights_init`); linear bias, BN and
        # the cosine head keep their own initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W) to pooled features (B, 4w)."""
        x = F.relu(self.bn1(self.conv1(x)))  # (B, w, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 4w, H/4, W/4)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, 4w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W) to logits (B, C)."""
        return self.fc(self.forward_features(x))


def _builder(depth: int):
    def build(
        num_classes: int,
        *,
        head: str = "linear",
        head_scale: float = 30.0,
        width: int = 16,
        **_ignored: object,
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, width, head, head_scale)

    build.__name__ = f"resnet{6 * depth + 2}"
    build.__doc__ = (
        f"CIFAR ResNet-{6 * depth + 2} ({depth} BasicBlocks per stage); extra keyword arguments are ignored."
    )
    return build


resnet20 = _builder(3)
resnet32 = _builder(5)
resnet44 = _builder(7)
resnet56 = _builder(9)
