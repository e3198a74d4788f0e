"""ImageNet ResNets (10/18/34/50/101/152) with torchvision's module names, and the Places-LT ResNet-152 (SPEC §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dnet_fast.models.heads import build_head

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PlacesResNet152",
    "ResNet",
    "places_resnet152",
    "resnet10",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
]


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    # torchvision's projection shortcut: downsample.0 = 1×1 conv, downsample.1 = BN.
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus shortcut (torchvision ``BasicBlock``).

    Args:
        in_channels: input channels.
        planes: output channels.
        stride: stride of the first convolution.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(in_channels, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, P, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 conv-BN layers plus shortcut (torchvision ``Bottleneck``, ResNet v1.5).

    Args:
        in_channels: input channels.
        planes: bottleneck width; the output has ``4 * planes`` channels.
        stride: stride of the 3×3 convolution.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)  # (B, 4P, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet(nn.Module):
    """ImageNet ResNet whose parameter and buffer names equal torchvision's, so its checkpoints load.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage (four stages of 64/128/256/512 planes).
        num_classes: number of classes C.
        head: ``linear`` or ``cosine``.
        head_scale: cosine head scale.
    """

    #: state-dict key prefixes that a pretrained checkpoint does not provide (the new head).
    pretrained_skip: tuple[str, ...] = ("fc.",)

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int,
        head: str = "linear",
        head_scale: float = 30.0,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        channels = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stage, channels = self._stage(block, channels, planes, depth, 1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", stage)
        self.num_features = channels
        self.fc = build_head(head, channels, num_classes, head_scale)
        self._init_weights()

    @staticmethod
    def _stage(
        block: type[BasicBlock | Bottleneck], in_channels: int, planes: int, depth: int, stride: int
    ) -> tuple[nn.Sequential, int]:
        out_channels = planes * block.expansion
        blocks = [block(in_channels, planes, stride)]
        blocks += [block(out_channels, planes) for _ in range(depth - 1)]
        return nn.Sequential(*blocks), out_channels

    def _init_weights(self) -> None:
        # torchvision's init without zero-init of the last BN (SPEC §6.2); the head keeps its own.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W) to pooled features (B, F)."""
        x = F.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        x = F.max_pool2d(x, 3, 2, 1)  # (B, 64, H/4, W/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, F, H/32, W/32)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # (B, F)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images (B, 3, H, W) to logits (B, C)."""
        return self.fc(self.forward_features(x))


class PlacesResNet152(ResNet):
    """ResNet-152 for Places-LT: layer4 keeps its first two pretrained Bottlenecks, then an extra block (SPEC §6.3).

    The extra block (Bottleneck 2048→512→2048, PyTorch default init) sits at ``layer4.2``, the position of the
    Bottleneck it replaces, so a torchvision ResNet-152 checkpoint loads everything except ``layer4.2.*`` and
    ``fc.*`` and the fine-tuned model's state dict keeps torchvision's key names.

    Args:
        num_classes: number of classes C.
        head: ``cosine`` (the reference) or ``linear``.
        head_scale: cosine head scale.
    """

    pretrained_skip = ("layer4.2.", "fc.")

    def __init__(self, num_classes: int, head: str = "cosine", head_scale: float = 30.0) -> None:
        super().__init__(Bottleneck, [3, 8, 36, 3], num_classes, head, head_scale)
        # A freshly constructed block has PyTorch's default conv init, not the backbone's Kaiming fan_out.
        self.layer4[2] = Bottleneck(2048, 512)

    @property
    def extra_block(self) -> Bottleneck:
        """The freshly initialised block at ``layer4.2``."""
        return self.layer4[2]


def _builder(name: str, block: type[BasicBlock | Bottleneck], layers: list[int]):
    def build(
        num_classes: int, *, head: str = "linear", head_scale: float = 30.0, **_ignored: object
    ) -> ResNet:
        return ResNet(block, layers, num_classes, head, head_scale)

    build.__name__ = name
    build.__doc__ = f"{block.__name__} ResNet with stages {layers}; extra keyword arguments are ignored."
    return build


resnet10 = _builder("resnet10", BasicBlock, [1, 1, 1, 1])
resnet18 = _builder("resnet18", BasicBlock, [2, 2, 2, 2])
resnet34 = _builder("resnet34", BasicBlock, [3, 4, 6, 3])
resnet50 = _builder("resnet50", Bottleneck, [3, 4, 6, 3])
resnet101 = _builder("resnet101", Bottleneck, [3, 4, 23, 3])
resnet152 = _builder("resnet152", Bottleneck, [3, 8, 36, 3])


def places_resnet152(
    num_classes: int, *, head: str = "cosine", head_scale: float = 30.0, **_ignored: object
) -> PlacesResNet152:
    """Places-LT ResNet-152 (extra block at ``layer4.2``); extra keyword arguments are ignored."""
    return PlacesResNet152(num_classes, head, head_scale)
