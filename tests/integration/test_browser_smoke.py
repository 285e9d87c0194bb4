"""The browser test infrastructure works (tests/browser.py, the `browser` fixture): Debian's Chromium starts
headless under Playwright, loads a page from a loopback server, takes keys and clicks, screenshots, reports console
errors and uncaught exceptions, resolves no internet host names, and plays H.264 MP4 (which the reviewer page
relies on; a Chromium built without proprietary codecs would not).

The pages are served from memory by a stdlib HTTP server on 127.0.0.1 (no Range requests, so a <video> there can
play but not seek: the gateway's own server does Range).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.browser import BrowserPage
from tests.synthvideo import make_road_video

# Without Playwright the `browser` fixture skips these tests (fails them in CI) and says why.
with contextlib.suppress(ImportError):
    from playwright.sync_api import expect

SMOKE_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>smoke</title></head>
<body>
  <p>Count: <output id="count">0</output>, last key: <output id="last-key">none</output>,
    frame: <output id="frame">0</output></p>
  <button id="add" type="button">Add</button>
  <script>
    const count = document.getElementById("count");
    document.getElementById("add").addEventListener("click", () => {
      count.textContent = String(+count.textContent + 1);
    });
    document.addEventListener("keydown", (event) => {
      document.getElementById("last-key").textContent = event.key;
      const frame = document.getElementById("frame");
      if (event.key === "ArrowRight") frame.textContent = String(+frame.textContent + 1);
      if (event.key === "ArrowLeft") frame.textContent = String(+frame.textContent - 1);
    });
  </script>
</body>
</html>
"""

ERROR_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>errors</title></head>
<body>
  <img src="/missing.png" alt="">
  <img src="http://example.com/logo.png" alt="">
  <script>
    console.error("deliberate console error");
    console.warn("a warning is not an error");
    setTimeout(() => { throw new Error("deliberate uncaught error"); }, 0);
  </script>
</body>
</html>
"""

VIDEO_PAGE = """<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>video</title></head>
<body><video id="video" src="/clip.mp4" muted preload="auto"></video></body>
</html>
"""

Routes = dict[str, tuple[str, bytes]]


@pytest.fixture
def serve() -> Iterator[tuple[Routes, str]]:
    """A loopback HTTP server for ``routes`` (path -> (content type, body); add to it in the test) and its base URL."""
    routes: Routes = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path not in routes:
                self.send_error(404)
                return
            content_type, body = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, name="browser-smoke-http", daemon=True)
    thread.start()
    try:
        yield routes, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_keys_clicks_and_screenshot(browser: BrowserPage, serve: tuple[Routes, str], tmp_path: Path) -> None:
    routes, base = serve
    routes["/"] = ("text/html; charset=utf-8", SMOKE_PAGE.encode())
    page = browser.page
    page.goto(base + "/")
    expect(page).to_have_title("smoke")

    page.keyboard.press("j")
    expect(page.locator("#last-key")).to_have_text("j")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#frame")).to_have_text("1")
    page.click("#add")
    page.get_by_role("button", name="Add").click()
    expect(page.locator("#count")).to_have_text("2")

    shot = tmp_path / "smoke.png"
    page.screenshot(path=shot)
    with Image.open(shot) as image:
        assert image.format == "PNG"
        assert image.size == (1280, 720)
        assert np.asarray(image.convert("L")).min() < 128  # some dark text was drawn on the white page

    # The favicon request (a 404 here) is the browser's, not the page's: not an error.
    browser.assert_no_errors()


def test_errors_are_collected(browser: BrowserPage, serve: tuple[Routes, str]) -> None:
    routes, base = serve
    routes["/"] = ("text/html; charset=utf-8", ERROR_PAGE.encode())
    browser.page.goto(base + "/")
    browser.page.wait_for_function("document.readyState === 'complete'")
    browser.page.evaluate("() => new Promise((resolve) => setTimeout(resolve, 50))")  # after the uncaught error

    errors = "\n".join(browser.errors)
    assert "console.error: deliberate console error" in errors
    assert "pageerror: Error: deliberate uncaught error" in errors
    assert "404" in errors  # /missing.png
    assert "net::ERR_NAME_NOT_RESOLVED" in errors  # example.com: no DNS from the browser
    assert "warning" not in errors
    assert len(browser.errors) == 4, errors
    with pytest.raises(AssertionError, match="deliberate console error"):
        browser.assert_no_errors()


def test_h264_mp4_plays(browser: BrowserPage, serve: tuple[Routes, str], tmp_path: Path) -> None:
    clip = tmp_path / "clip.mp4"
    make_road_video(clip, width=320, height=180, n_frames=25, signs=(), codec="h264", faststart=True)
    routes, base = serve
    routes["/"] = ("text/html; charset=utf-8", VIDEO_PAGE.encode())
    routes["/clip.mp4"] = ("video/mp4", clip.read_bytes())
    page = browser.page
    page.goto(base + "/")

    assert page.evaluate("() => document.createElement('video').canPlayType('video/mp4; codecs=\"avc1.64001f\"')") in (
        "probably",
        "maybe",
    )
    page.wait_for_function("document.getElementById('video').readyState >= 4")  # HAVE_ENOUGH_DATA
    size = page.evaluate("() => { const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight]; }")
    assert size == [320, 180]
    assert page.evaluate("() => document.getElementById('video').duration") == pytest.approx(1.0, abs=0.05)
    browser.assert_no_errors()
