"""The reviewer page: static files (vanilla JavaScript modules, no build step) served by the gateway at ``/ui/``.

Visualisation lives here and nowhere else (STYLE.md section 1); the page talks to the gateway only through its
HTTP API.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STATIC_DIR"]

STATIC_DIR = Path(__file__).with_name("static")
"""index.html, app.js, style.css."""
