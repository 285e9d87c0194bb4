"""Test-wide settings and fixtures."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import pytest
from hypothesis import settings

from tests.browser import BrowserPage, browser_page, missing_reason
from tests.pg import PG_SERVER_BINARIES, find_pg_bin, temporary_postgres

# Wall-clock deadlines make property tests flaky on a shared 2-core machine (CI runs beside other work);
# speed is measured by `make bench`, never asserted by tests.
settings.register_profile("roadlabel", deadline=None)
settings.load_profile("roadlabel")


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL server (database `roadlabel`, superuser, no password) for this session.

    Without the server binaries the tests that use it are skipped, except in CI (CI=true), where they fail: CI
    installs Debian's `postgresql` package (.ci/run), so missing binaries there are a broken setup, not a reason to
    skip the PostgreSQL tests silently.
    """
    if find_pg_bin() is None:
        message = (
            f"PostgreSQL server binaries ({', '.join(PG_SERVER_BINARIES)}) not found in /usr/lib/postgresql/*/bin "
            "or on PATH (Debian: apt-get install postgresql)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true, so the PostgreSQL tests may not be skipped", pytrace=False)
        pytest.skip(message)
    with temporary_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture
def browser() -> Iterator[BrowserPage]:
    """A page in a fresh headless Chromium (tests/browser.py), closed after the test; its ``errors`` list collects
    console errors and uncaught exceptions.

    Without Chromium or Playwright the tests that use it are skipped, except in CI (CI=true), where they fail: CI
    installs Debian's `chromium` package (.ci/run) and Playwright (the dev extra), so a missing one there is a broken
    setup, not a reason to skip the browser tests silently.
    """
    message = missing_reason()
    if message is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}; CI=true, so the browser tests may not be skipped", pytrace=False)
        pytest.skip(message)
    with browser_page() as page:
        yield page


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    """Undo what an entry point's ``services.common.log.setup()`` did to the root logger."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
