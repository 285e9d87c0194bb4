"""Errors roadlabel raises on purpose.

Hierarchy (each also inherits a built-in, so callers may catch either)::

    LabelingError
    ├── InputError (ValueError)            caller's fault: bad file, bad array, bad request -> 4xx
    │   ├── UnreadableImage
    │   ├── UnreadableVideo
    │   └── InvalidDetections
    ├── ConfigError (ValueError)           bad settings or profile -> fail at startup
    ├── ModelError (RuntimeError)          our model file or runtime is wrong -> 5xx
    └── ServiceUnavailable (ConnectionError)  a remote stage is down; retryable -> 503
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "InputError",
    "InvalidDetections",
    "LabelingError",
    "ModelError",
    "ServiceUnavailable",
    "UnreadableImage",
    "UnreadableVideo",
]


class LabelingError(Exception):
    """Base of every error roadlabel raises on purpose."""


class InputError(LabelingError, ValueError):
    """The caller's input is wrong (file, array, request)."""


class UnreadableImage(InputError):
    """An image file is missing, not an image, truncated or of an unsupported size or mode."""


class UnreadableVideo(InputError):
    """A video file is missing, not a video, or too damaged to decode."""


class InvalidDetections(InputError):
    """Detection columns have the wrong shape or dtype."""


class ConfigError(LabelingError, ValueError):
    """Settings or a profile are invalid."""


class ModelError(LabelingError, RuntimeError):
    """A model file or its card is missing, corrupt or inconsistent."""


class ServiceUnavailable(LabelingError, ConnectionError):
    """A remote stage cannot be reached; the call may be retried."""
