"""JSON-lines logging for entry points.

Library modules only ever do ``log = logging.getLogger(__name__)``. An entry point (a CLI ``main``, an app
lifespan) calls ``setup()`` once; it installs one handler on the root logger that writes each record to stderr
as one JSON object per line::

    {"ts": "2026-11-21T19:50:01.123Z", "level": "INFO", "logger": "gateway.cli", "msg": "classified",
     "recording_id": null, "images": 13070, "seconds": 21.4}

Fields passed with ``extra=`` are included as keys; ``recording_id`` is always present (null outside a
recording) so that logs of many recordings can be filtered by it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Final

__all__ = ["JsonLinesFormatter", "setup"]

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD_ATTRS: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonLinesFormatter(logging.Formatter):
    """Formats a record as one line of JSON: ts, level, logger, msg, recording_id, extras, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single-line JSON object."""
        ts = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        payload: dict[str, object] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "recording_id": None,
        }
        payload.update({key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRS})
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (it may be replaced, e.g. by tests)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except (OSError, ValueError):  # stderr closed or gone: logging must never take the program down
            self.handleError(record)


def setup(level: int | str = logging.INFO) -> None:
    """Send log records at ``level`` and above to stderr as JSON lines.

    Call it from entry points only. Calling it again replaces the handler it installed before, so records are
    never written twice; handlers installed by others (pytest's, for instance) are left in place.

    Args:
        level: A logging level, as a number or a name such as ``"INFO"``.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(JsonLinesFormatter())
    root.addHandler(handler)
    root.setLevel(level)
