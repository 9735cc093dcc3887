"""Image classifiers: deep and wide FCNs, ResNets, the plain ConvNet (ResNet without skips), a ViT.

Every model maps ``(n, C, H, W)`` images to ``(n, num_classes)`` logits. Defaults fit
Fashion-MNIST (1×28×28, 10 classes), the image data available offline.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

from repguide.errors import ModelError
import torch
from torch import Tensor, nn

from repguide.models._registry import register
from repguide.models._transformer import LearnedPositions, init_weights, make_blocks

__all__ = [
    "FCN",
    "ResNet",
    "ResNetBlock",
    "ViT",
    "deep_fcn",
    "plain_convnet",
    "resnet18",
    "resnet50",
    "vit",
    "wide_fcn",
]


# --------------------------------------------------------------------------------------------
# Fully connected networks


def _linear_block(in_features: int, width: int, batchnorm: bool, dropout: float) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(in_features, width))
    if batchnorm:
        layers["norm"] = nn.BatchNorm1d(width)
    layers["act"] = nn.ReLU()
    if dropout > 0:
        layers["drop"] = nn.Dropout(dropout)
    return nn.Sequential(layers)


class FCN(nn.Module):
    """Flatten, ``depth`` blocks of [Linear, BatchNorm1d, ReLU, Dropout], Linear head.

    Blocks are ``blocks.i.{linear,norm,act,drop}`` (norm/drop absent when switched off), the head
    is ``head``. ``(n, *input_shape) → (n, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        depth: int,
        width: int,
        num_classes: int,
        batchnorm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ModelError(f"depth must be at least 1, got {depth}")
        self.flatten = nn.Flatten()
        in_features = math.prod(input_shape)
        self.blocks = nn.Sequential(
            *(
                _linear_block(in_features if i == 0 else width, width, batchnorm, dropout)
                for i in range(depth)
            )
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.flatten(x)))


@register("deep_fcn")
def deep_fcn(
    input_shape: Sequence[int] = (1, 28, 28),
    depth: int = 48,
    width: int = 256,
    num_classes: int = 10,
    batchnorm: bool = True,
    dropout: float = 0.1,
) -> FCN:
    """The paper's Deep FCN: ``depth`` hidden Linear layers (48 in the paper) plus the head."""
    return FCN(input_shape, depth, width, num_classes, batchnorm, dropout)


@register("wide_fcn")
def wide_fcn(
    input_shape: Sequence[int] = (1, 28, 28),
    width: int = 4096,
    depth: int = 3,
    num_classes: int = 10,
    batchnorm: bool = True,
    dropout: float = 0.0,
) -> FCN:
    """The paper's Wide FCN: a few very wide hidden layers (3 × 8192 in the paper)."""
    return FCN(input_shape, depth, width, num_classes, batchnorm, dropout)


# --------------------------------------------------------------------------------------------
# ResNets and the plain ConvNet

_EXPANSION = 4  # bottleneck blocks output 4× their inner width


class ResNetBlock(nn.Module):
    """A ResNet block, with or without its skip connection.

    Basic: conv 3×3 → conv 3×3. Bottleneck: conv 1×1 → conv 3×3 → conv 1×1 (×4 channels).
    Each ``conv{i}`` is followed by ``bn{i}`` and ``act{i}`` (ReLU); with ``residual`` the last
    ReLU comes after adding the skip (through ``downsample``, a 1×1 conv + BN, where the shape
    changes).
    Without ``residual`` there is no skip and no ``downsample``: a plain stack of conv-BN-ReLU.
    ``(n, in_channels, h, w) → (n, out_channels, h / stride, w / stride)``.
    """

    def __init__(
        self, in_channels: int, planes: int, stride: int, bottleneck: bool, residual: bool
    ) -> None:
        super().__init__()
        if bottleneck:
            # The stride sits on the 3×3 conv, as in torchvision's ResNet (v1.5).
            specs = [(1, 1, planes), (3, stride, planes), (1, 1, planes * _EXPANSION)]
        else:
            specs = [(3, stride, planes), (3, 1, planes)]
        self.residual = residual
        self.num_convs = len(specs)
        channels = in_channels
        for i, (kernel, conv_stride, out) in enumerate(specs, start=1):
            conv = nn.Conv2d(channels, out, kernel, conv_stride, padding=kernel // 2, bias=False)
            self.add_module(f"conv{i}", conv)
            self.add_module(f"bn{i}", nn.BatchNorm2d(out))
            self.add_module(f"act{i}", nn.ReLU())
            channels = out
        self.out_channels = channels
        self.downsample: nn.Module | None = None
        if residual and (stride != 1 or in_channels != channels):
            self.downsample = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                    bn=nn.BatchNorm2d(channels),
                )
            )

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i in range(1, self.num_convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.num_convs:
                out = getattr(self, f"act{i}")(out)
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return getattr(self, f"act{self.num_convs}")(out)


class ResNet(nn.Module):
    """ResNet topology: stem, stages ``layer1..layer4`` of :class:`ResNetBlock`, avgpool, ``fc``.

    Stage widths are ``width × (1, 2, 4, 8)`` (× 4 for bottleneck outputs). ``small_input`` uses a
    3×3 stride-1 stem conv and no max-pool (28×28 / 32×32 images); otherwise the ImageNet stem
    (7×7 stride-2 conv, 3×3 stride-2 max-pool). ``(n, in_channels, H, W) → (n, num_classes)``.
    """

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        bottleneck: bool,
        residual: bool = True,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 64,
        small_input: bool = True,
    ) -> None:
        super().__init__()
        if len(blocks_per_stage) != 4:
            raise ModelError(f"blocks_per_stage needs 4 stages, got {list(blocks_per_stage)}")
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, width, 3, 1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU()
        channels = width
        for stage, count in enumerate(blocks_per_stage):
            blocks = []
            for b in range(count):
                stride = 2 if stage > 0 and b == 0 else 1
                block = ResNetBlock(channels, width * 2**stage, stride, bottleneck, residual)
                channels = block.out_channels
                blocks.append(block)
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


_ARCHS = {"resnet18": ((2, 2, 2, 2), False), "resnet50": ((3, 4, 6, 3), True)}


def _resnet(
    arch: str, residual: bool, in_channels: int, num_classes: int, width: int, small_input: bool
) -> ResNet:
    if arch not in _ARCHS:
        raise ModelError(f"arch must be one of {sorted(_ARCHS)}, got {arch!r}")
    blocks_per_stage, bottleneck = _ARCHS[arch]
    return ResNet(
        blocks_per_stage, bottleneck, residual, in_channels, num_classes, width, small_input
    )


@register("resnet18")
def resnet18(
    in_channels: int = 1, num_classes: int = 10, width: int = 64, small_input: bool = True
) -> ResNet:
    """ResNet-18: basic blocks [2, 2, 2, 2]; ``width``: the stem's channels (64 standard)."""
    return _resnet("resnet18", True, in_channels, num_classes, width, small_input)


@register("resnet50")
def resnet50(
    in_channels: int = 1, num_classes: int = 10, width: int = 64, small_input: bool = True
) -> ResNet:
    """ResNet-50: bottleneck blocks [3, 4, 6, 3]; ``width``: the stem's channels (64 standard)."""
    return _resnet("resnet50", True, in_channels, num_classes, width, small_input)


@register("plain_convnet")
def plain_convnet(
    arch: str = "resnet50",
    in_channels: int = 1,
    num_classes: int = 10,
    width: int = 64,
    small_input: bool = True,
) -> ResNet:
    """The paper's Deep ConvNet: the ``arch`` ResNet without any skip or downsample projection."""
    return _resnet(arch, False, in_channels, num_classes, width, small_input)


# --------------------------------------------------------------------------------------------
# Vision Transformer


class ViT(nn.Module):
    """Vision Transformer: patch embedding, cls token, learned positions, pre-norm ``blocks``.

    ``(n, in_channels, image_size, image_size) → (n, num_classes)``, classified from the cls token
    after the final ``norm``.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        in_channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        num_classes: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ModelError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size})"
            )
        self.image_size = image_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = LearnedPositions((image_size // patch_size) ** 2 + 1, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = make_blocks(depth, dim, heads, mlp_dim, dropout, causal=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_weights(self, positions="learned")

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ModelError(
                f"expected {self.image_size}×{self.image_size} images, got {tuple(x.shape[-2:])}"
            )
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.drop(self.pos(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@register("vit")
def vit(
    image_size: int = 28,
    patch_size: int = 4,
    in_channels: int = 1,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_dim: int = 128,
    num_classes: int = 10,
    dropout: float = 0.0,
) -> ViT:
    """A small ViT (the official code's ViT-B/16 guide, at CPU scale)."""
    return ViT(
        image_size, patch_size, in_channels, dim, depth, heads, mlp_dim, num_classes, dropout
    )
