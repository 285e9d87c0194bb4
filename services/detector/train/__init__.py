"""Training of the sign detector: GTSDB scenes + GTSRB copy-paste, CenterNet-style head on ImageNet MobileNetV2.

Only ``data``, ``targets``, ``evaluate`` and ``cli`` import without torch; the rest needs the ``train`` extra.
"""
