"""services.common.log.setup(): JSON lines on stderr, installed once."""

from __future__ import annotations

import json
import logging

import pytest

from services.common import log


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_on_stderr(capsys):
    log.setup("INFO")
    log.setup("INFO")  # again: still one handler, so one line per record
    logger = logging.getLogger("roadlabel.test")
    logger.debug("hidden")
    logger.info("classified %d images", 3, extra={"images": 3, "recording_id": "rec-1"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO"
    assert first["logger"] == "roadlabel.test"
    assert first["msg"] == "classified 3 images"
    assert first["images"] == 3
    assert first["recording_id"] == "rec-1"
    assert first["ts"].endswith("Z")
    assert second["recording_id"] is None
    assert "ValueError: boom" in second["exc"]
