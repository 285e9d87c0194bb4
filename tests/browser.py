"""A real browser for end-to-end tests: Debian's Chromium (`chromium` package) driven by Playwright for Python.

Playwright's wheel bundles its Node driver but no browser; `playwright install` is never run. Chromium comes from
Debian (.ci/run installs it) and is started through ``executable_path``. Nothing may reach the network: besides the
flags that stop Chromium's own background traffic, ``--host-resolver-rules`` makes every host name other than
``localhost`` and ``127.0.0.1`` unresolvable inside the browser, so a page that loads anything from the internet
gets ``net::ERR_NAME_NOT_RESOLVED`` (a console error) instead of a DNS query; without that rule Chromium 156 still
looks up accounts.google.com and update.googleapis.com at start. Serve pages under test on 127.0.0.1.

Example::

    with browser_page() as browser:
        browser.page.goto(url)
        browser.page.keyboard.press("j")
        browser.assert_no_errors()

Tests use the ``browser`` fixture (tests/conftest.py), which skips (fails in CI) when Chromium or Playwright is
missing: see ``missing_reason``.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Error, Page

__all__ = ["CHROMIUM_ARGS", "BrowserPage", "browser_page", "chromium_path", "missing_reason"]

# Debian's launcher script; it sources /etc/chromium.d/* and runs /usr/lib/chromium/chromium.
CHROMIUM_CANDIDATES = (Path("/usr/bin/chromium"),)
CHROMIUM_ARGS = (
    # Playwright also adds --headless and --no-sandbox (and most of the rest); they are named here so that the
    # launch does not depend on Playwright's defaults. --no-sandbox: Chromium refuses to start as root without it.
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    # No background traffic to Google hosts (updates, sync, field trials, QUIC probes).
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # The network guard described in the module docstring.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
)
# Playwright's per-action default is 30 s; a reviewer page on loopback answers far sooner, even on a busy machine.
DEFAULT_TIMEOUT_MS = 10_000
LAUNCH_TIMEOUT_MS = 60_000


def chromium_path() -> Path | None:
    """Debian's Chromium, or ``chromium`` on PATH; ``None`` when neither is there."""
    for candidate in CHROMIUM_CANDIDATES:
        if candidate.is_file():
            return candidate
    found = shutil.which("chromium")
    return Path(found) if found else None


def missing_reason() -> str | None:
    """Why ``browser_page`` cannot run here (Chromium or Playwright missing), or ``None`` when it can."""
    missing = []
    if chromium_path() is None:
        missing.append("Chromium (Debian: apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright for Python (pip install -e '.[dev]')")
    return " and ".join(missing) + " not found" if missing else None


@dataclass
class BrowserPage:
    """A page in a fresh headless Chromium, and the errors it has reported so far.

    ``errors`` collects, as text, every ``console.error`` message (including Chromium's own "Failed to load
    resource" for a failed or HTTP-error subresource) and every uncaught exception or unhandled promise rejection
    (``pageerror``). The browser's automatic ``/favicon.ico`` request is not counted: a page that declares no icon
    gets a 404 for it that no page code asked for. Tests decide when to look: ``assert_no_errors()``.
    """

    page: Page
    errors: list[str] = field(default_factory=list)

    def assert_no_errors(self) -> None:
        """Fail with the collected errors, if any."""
        assert not self.errors, "browser reported errors:\n" + "\n".join(self.errors)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        url = message.location.get("url", "")
        if urlsplit(url).path == "/favicon.ico":
            return
        line = message.location.get("lineNumber", 0)
        self.errors.append(f"console.error: {message.text}" + (f" ({url}:{line})" if url else ""))

    def _on_pageerror(self, error: Error) -> None:
        # The stack, where there is one, starts with "Name: message".
        self.errors.append(f"pageerror: {error.stack or f'{error.name}: {error.message}'}")


@contextmanager
def browser_page(viewport: tuple[int, int] = (1280, 720), device_scale_factor: float = 1) -> Iterator[BrowserPage]:
    """Start headless Chromium with a fresh temporary profile, yield one page, then close it all.

    Args:
        viewport: CSS pixels, (width, height).
        device_scale_factor: Device pixels per CSS pixel; screenshots are ``viewport * device_scale_factor``.

    Raises:
        RuntimeError: Chromium was not found (see ``missing_reason``).
    """
    executable = chromium_path()
    if executable is None:
        raise RuntimeError(missing_reason())
    from playwright.sync_api import sync_playwright

    width, height = viewport
    with (
        tempfile.TemporaryDirectory(prefix="roadlabel-chromium-", ignore_cleanup_errors=True) as profile,
        sync_playwright() as playwright,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height},
            device_scale_factor=device_scale_factor,
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            context.set_default_timeout(DEFAULT_TIMEOUT_MS)
            # A persistent context opens with one blank page.
            page = context.pages[0] if context.pages else context.new_page()
            browser = BrowserPage(page)
            page.on("console", browser._on_console)
            page.on("pageerror", browser._on_pageerror)
            yield browser
        finally:
            context.close()
