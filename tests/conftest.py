"""Test-wide settings."""

from __future__ import annotations

from hypothesis import settings

# Wall-clock deadlines make property tests flaky on a shared 2-core machine (CI runs beside other work);
# speed is measured by `make bench`, never asserted by tests.
settings.register_profile("roadlabel", deadline=None)
settings.load_profile("roadlabel")
