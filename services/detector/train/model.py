"""The sign detector network: ImageNet MobileNetV2 -> FPN-lite -> CenterNet head at stride 8.

:class:`SignDetectorNet` returns the raw maps the losses need. :class:`SignDetectorInference` wraps it into the
served contract, the same graph that is exported to ONNX: input ``images`` (B, 3, H, W) float32, normalised RGB;
outputs ``heatmap`` (B, 1, H/8, W/8) probabilities kept only at 3x3 local maxima (else 0) and ``boxes``
(B, 4, H/8, W/8) ``xyxy`` in input pixels. :func:`load_inference_model` rebuilds it from a training checkpoint,
for a torch backend.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from services.backbones.mobilenet_v2 import MobileNetV2, load_imagenet_weights

__all__ = [
    "HEAT_PRIOR",
    "STRIDE",
    "SignDetectorInference",
    "SignDetectorNet",
    "build_model",
    "load_checkpoint",
    "load_inference_model",
]

STRIDE = 8
"""Input pixels per output cell."""
HEAT_PRIOR = 0.01
"""Initial heatmap probability everywhere: the bias starts at logit(0.01) = -4.6, so the focal loss starts small."""

# MobileNetV2 feature indices whose outputs feed the FPN: stride 8 (32 ch), 16 (96 ch), 32 (320 ch).
_TAPS = (6, 13, 17)
_TAP_CHANNELS = (32, 96, 320)
_SIZE_BIAS = math.log(3.0)  # signs are ~24 input px: log(24 / 8)


def _dw_separable(channels: int) -> nn.Sequential:
    """3x3 depthwise + 1x1 pointwise, each with BN; ReLU at the end."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1, groups=channels, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


def _init_output(conv: nn.Conv2d, bias: list[float]) -> None:
    """Small random weights and the given bias: the head starts out predicting the prior everywhere."""
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        with torch.no_grad():
            conv.bias.copy_(torch.tensor(bias))


class SignDetectorNet(nn.Module):
    """MobileNetV2 features to stride 32, a top-down FPN to stride 8 and CenterNet heads.

    Args:
        channels: width of the FPN and the heads.
    """

    def __init__(self, channels: int = 64) -> None:
        super().__init__()
        backbone = MobileNetV2()
        # Keys stay torchvision's ("features.N..."); the final 1280-channel conv is not used.
        self.features = nn.Sequential(*list(backbone.features.children())[: _TAPS[-1] + 1])
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in _TAP_CHANNELS)
        self.smooth16 = _dw_separable(channels)
        self.smooth8 = _dw_separable(channels)
        self.heat_head = _dw_separable(channels)
        self.heat_out = nn.Conv2d(channels, 1, 1)
        self.box_head = _dw_separable(channels)
        self.box_out = nn.Conv2d(channels, 4, 1)  # offset x, y (logits), log w, log h
        self.channels = channels
        _init_output(self.heat_out, [math.log(HEAT_PRIOR / (1 - HEAT_PRIOR))])
        _init_output(self.box_out, [0.0, 0.0, _SIZE_BIAS, _SIZE_BIAS])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw maps of a normalised (B, 3, H, W) batch, H and W multiples of 32.

        Returns:
            heat logits (B, 1, H/8, W/8), offset logits (B, 2, H/8, W/8) (sigmoid -> cells) and log sizes
            (B, 2, H/8, W/8) (exp -> strides).
        """
        taps: list[torch.Tensor] = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _TAPS:
                taps.append(x)
        c8, c16, c32 = taps
        p = self.lateral[2](c32)
        p = self.smooth16(self.lateral[1](c16) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        p = self.smooth8(self.lateral[0](c8) + F.interpolate(p, scale_factor=2.0, mode="nearest"))
        heat: torch.Tensor = self.heat_out(self.heat_head(p))
        box: torch.Tensor = self.box_out(self.box_head(p))
        return heat, box[:, :2], box[:, 2:]


class SignDetectorInference(nn.Module):
    """The served graph: normalised images -> (peak-suppressed heatmap, boxes in input pixels).

    Args:
        net: the trained network (used as is; call ``eval()`` first).
    """

    def __init__(self, net: SignDetectorNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) -> heatmap (B, 1, H/8, W/8) in [0, 1] (0 off the peaks), boxes (B, 4, H/8, W/8) xyxy."""
        heat_logits, offset_logits, log_size = self.net(images)
        heat = torch.sigmoid(heat_logits)
        peaks = F.max_pool2d(heat, 3, stride=1, padding=1)
        heat = torch.where(peaks == heat, heat, torch.zeros_like(heat))
        h, w = heat.shape[-2:]
        cols = torch.arange(w, device=heat.device, dtype=heat.dtype).view(1, 1, 1, w)
        rows = torch.arange(h, device=heat.device, dtype=heat.dtype).view(1, 1, h, 1)
        offset = torch.sigmoid(offset_logits)
        cx = (cols + offset[:, 0:1]) * STRIDE
        cy = (rows + offset[:, 1:2]) * STRIDE
        half = torch.exp(log_size.clamp(-4.0, 6.0)) * (STRIDE / 2)
        boxes = torch.cat([cx - half[:, 0:1], cy - half[:, 1:2], cx + half[:, 0:1], cy + half[:, 1:2]], dim=1)
        return heat, boxes


def build_model(*, imagenet: bool = True, channels: int = 64) -> SignDetectorNet:
    """A fresh detector; with ``imagenet`` the backbone starts from the sha256-checked ImageNet weights."""
    net = SignDetectorNet(channels)
    if imagenet:
        backbone = MobileNetV2()
        load_imagenet_weights(backbone)
        keep = {k: v for k, v in backbone.features.state_dict().items() if int(k.split(".")[0]) <= _TAPS[-1]}
        net.features.load_state_dict(keep, strict=True)
    return net


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[SignDetectorNet, dict[str, Any]]:
    """Rebuild the network from ``checkpoint.pt`` (its ``model`` is the EMA weights that were exported).

    Returns:
        The network in eval mode and the training settings stored with it.

    Raises:
        FileNotFoundError: no such file.
        KeyError: the file is no detector checkpoint.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    settings: dict[str, Any] = dict(checkpoint.get("settings", {}))
    net = SignDetectorNet(int(settings.get("channels", 64)))
    net.load_state_dict(checkpoint["model"], strict=True)
    return net.to(map_location).eval(), settings


def load_inference_model(path: Path, device: str | torch.device = "cpu") -> SignDetectorInference:
    """The served graph (as exported to ONNX) from a training checkpoint, in eval mode on ``device``."""
    net, _ = load_checkpoint(path, device)
    return SignDetectorInference(net).to(device).eval()
